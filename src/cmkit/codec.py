"""Codecs: the map between images and the space the model works in (``data.codec``).

Images are float32 [N, C, H, W] in [-1, 1]; a codec's ``encode`` takes them to model space ([N, *shape]),
``decode`` takes model-space tensors back to images. Training encodes its data; samplers and
:func:`cmkit.sampling.generate` return model-space tensors, unclamped; the edges (``cmkit sample``, eval, the
studio, editing, training snapshots) decode with :meth:`Codec.to_images`, the one place where results are
clamped to [-1, 1]. The model space's size D (``Codec.dim``) is the data dimension of pseudo-Huber's
constant ``c = 0.00054 sqrt(D)``.

Two kinds of codec (``Codec.kind``): "identity" (pixels are the model space; ``data.codec = "identity"``) and
"latent": ``data.codec`` is the absolute path of an autoencoder file of ``cmkit train-ae``
(:mod:`cmkit.autoencoder`), and ``data.codec_digest`` the sha256 of that file's bytes, checked whenever the codec is
loaded: a latent model is bound to the autoencoder it was trained with, referenced by path (not copied into the
run or the export). :func:`resolve_codec` turns what a user gives (a run directory or the file, relative or not)
into the two fields. ``data.codec = "latent"`` is a placeholder of presets (``fmnist-latent-edm``): some
autoencoder, to be named with ``--set data.codec=...`` or adopted from a latent ``--teacher``.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import ClassVar

import torch
from torch import Tensor

from cmkit.autoencoder import Autoencoder, file_digest, load_autoencoder, resolve_autoencoder_path
from cmkit.errors import CmkitError

IDENTITY = "identity"
LATENT = "latent"  # the placeholder: some autoencoder, not named yet
KINDS = (IDENTITY, LATENT)


@dataclass(frozen=True)
class Codec:
    """The identity codec of images of ``channels`` x ``resolution`` x ``resolution``; subclasses override
    :meth:`encode`, :meth:`decode` and :attr:`shape`."""

    name: str
    channels: int
    resolution: int

    kind: ClassVar[str] = IDENTITY

    @property
    def shape(self) -> tuple[int, int, int]:
        """The shape (C, H, W) of one sample in model space."""
        return (self.channels, self.resolution, self.resolution)

    @property
    def dim(self) -> int:
        """D, the number of values of one sample in model space."""
        return math.prod(self.shape)

    def encode(self, images: Tensor) -> Tensor:
        """Images float32 [N, C, H, W] in [-1, 1] -> model space float32 [N, *shape]."""
        return images

    def decode(self, x: Tensor) -> Tensor:
        """Model space float [N, *shape] -> images float32 [N, C, H, W], NOT clamped."""
        return x

    def to_images(self, x: Tensor) -> Tensor:
        """Model space -> images float32 [N, C, H, W] clamped to [-1, 1]: what the edges show and save."""
        return self.decode(x).float().clamp(-1, 1)


@dataclass(frozen=True)
class LatentCodec(Codec):
    """An autoencoder's scaled latent space (LDM, Rombach et al. 2022): ``encode = scale * mean(x)``
    (deterministic: the mean of q(z | x), not a draw), ``decode = decoder(z / scale)``; ``shape`` is the latent's
    (z_channels, H / f, W / f). ``name`` is the autoencoder file's absolute path. Both directions run without
    gradients, in float32, on the device of their input (the autoencoder moves there)."""

    autoencoder: Autoencoder = field(default=None, compare=False, repr=False)

    kind: ClassVar[str] = LATENT

    @property
    def shape(self) -> tuple[int, int, int]:
        return self.autoencoder.config.latent_shape

    @torch.no_grad()
    def encode(self, images: Tensor) -> Tensor:
        ae = self._on(images.device)
        return ae.scale * ae.encoder(images.float())[0]

    @torch.no_grad()
    def decode(self, x: Tensor) -> Tensor:
        ae = self._on(x.device)
        return ae.decoder(x.float() / ae.scale)

    def _on(self, device: torch.device) -> Autoencoder:
        if self.autoencoder.scale.device != device:
            self.autoencoder.to(device)
        return self.autoencoder


def codec_kind(name: str) -> str:
    """The kind of codec ``data.codec = name`` means: "identity", or "latent" (an autoencoder, or the
    placeholder)."""
    return IDENTITY if name == IDENTITY else LATENT


def resolve_codec(data, *, what: str = "data.codec"):
    """``data`` (a :class:`cmkit.config.DataConfig`) with a latent codec pinned: ``codec`` the autoencoder file's
    absolute path (a ``cmkit train-ae`` run directory means its file) and ``codec_digest`` its sha256; checked
    against the data's size (:func:`make_codec`). The identity codec and the placeholder pass unchanged."""
    if data.codec in KINDS:
        return data
    path = resolve_autoencoder_path(data.codec, what=f"{what}={data.codec}")
    data = replace(data, codec=str(path), codec_digest=file_digest(path))
    data_codec(data)  # loads and checks it: a file of another shape is refused here, before anything runs
    return data


def make_codec(name: str, *, channels: int, resolution: int, digest: str = "") -> Codec:
    """The codec ``data.codec = name`` names, for images of ``channels`` x ``resolution`` x ``resolution``:
    the identity, or the autoencoder at path ``name`` whose file must have sha256 ``digest``. CmkitError for the
    placeholder "latent", a missing or changed file, or an autoencoder of images of another size."""
    if name == IDENTITY:
        return Codec(name, channels, resolution)
    if name == LATENT:
        raise CmkitError("data.codec=latent: this preset trains in an autoencoder's latent space; name one with "
                         "--set data.codec=RUN_OR_FILE (a run of 'cmkit train-ae'), or pass a latent --teacher")
    file = Path(name)
    stamp = (file.stat().st_mtime_ns, file.stat().st_size) if file.is_file() else None
    return LatentCodec(name, channels, resolution, _load(name, digest, channels, resolution, stamp))


@functools.lru_cache(maxsize=4)
def _load(path: str, digest: str, channels: int, resolution: int, stamp: tuple[int, int] | None) -> Autoencoder:
    """The autoencoder at ``path``, checked against the digest and the size; loaded once per (path, digest) and
    file ``stamp`` (modification time and size: a file written since is read and checked again)."""
    what = f"data.codec={path}"
    file = Path(path)
    if stamp is None:
        raise CmkitError(f"{what}: the autoencoder this model was trained with is gone; put it back at that path "
                         "(a latent model references its autoencoder, it does not hold a copy)")
    if not digest or file_digest(file) != digest:
        raise CmkitError(f"{what}: the file's sha256 is not data.codec_digest={digest or '(empty)'}: it is not the "
                         "autoencoder this config was made with; name the codec again with --set data.codec=...")
    ae = load_autoencoder(file, what=what)
    c = ae.config
    if (c.channels, c.resolution) != (channels, resolution):
        raise CmkitError(f"{what}: an autoencoder of {c.resolution}x{c.resolution} images with {c.channels} "
                         f"channel(s) does not fit the data ({resolution}x{resolution}, {channels} channel(s))")
    return ae


def data_codec(data) -> Codec:
    """The codec of a :class:`cmkit.config.DataConfig` (``data.codec`` for its channels and resolution)."""
    return make_codec(data.codec, channels=data.channels, resolution=data.resolution, digest=data.codec_digest)


def check_codec(name: str, supported: Sequence[str], *, what: str) -> None:
    """Refuse a model whose codec ``name`` is not of a kind (:func:`codec_kind`) that ``what`` (e.g. "editing")
    ``supported``: one line."""
    if codec_kind(name) not in supported:
        raise CmkitError(f"data.codec={name}: {what} works on models with codec {' or '.join(supported)} only, "
                         f"not on {codec_kind(name)} models")
