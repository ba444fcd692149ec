"""Codecs: the map between images and the space the model works in (``data.codec``).

Images are float32 [N, C, H, W] in [-1, 1]; a codec's ``encode`` takes them to model space ([N, *shape]),
``decode`` takes model-space tensors back to images. Training encodes its data; samplers and
:func:`cmkit.sampling.generate` return model-space tensors, unclamped; the edges (``cmkit sample``, eval, the
studio, editing, training snapshots) decode with :meth:`Codec.to_images`, the one place where results are
clamped to [-1, 1]. The model space's size D (``Codec.dim``) is the data dimension of pseudo-Huber's
constant ``c = 0.00054 sqrt(D)``.

"identity" (pixels are the model space) is the only codec so far; a latent autoencoder comes next.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from torch import Tensor

from cmkit.errors import CmkitError


@dataclass(frozen=True)
class Codec:
    """The identity codec of images of ``channels`` x ``resolution`` x ``resolution``; subclasses override
    :meth:`encode`, :meth:`decode` and :attr:`shape`."""

    name: str
    channels: int
    resolution: int

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


CODECS: dict[str, type[Codec]] = {"identity": Codec}


def make_codec(name: str, *, channels: int, resolution: int) -> Codec:
    """The codec ``data.codec`` names, for images of ``channels`` x ``resolution`` x ``resolution``."""
    if name not in CODECS:
        raise CmkitError(f"data.codec: unknown codec {name!r}; expected one of {', '.join(CODECS)}")
    return CODECS[name](name, channels, resolution)


def data_codec(data) -> Codec:
    """The codec of a :class:`cmkit.config.DataConfig` (``data.codec`` for its channels and resolution)."""
    return make_codec(data.codec, channels=data.channels, resolution=data.resolution)


def check_codec(name: str, supported: Sequence[str], *, what: str) -> None:
    """Refuse a model whose codec ``name`` is not among those ``what`` (e.g. "editing") ``supported``."""
    if name not in supported:
        raise CmkitError(f"data.codec={name}: {what} works on models with codec {' or '.join(supported)} only")
