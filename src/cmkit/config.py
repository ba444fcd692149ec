"""Run configuration: frozen dataclasses, JSON round trip and ``--set key=value`` overrides (the named presets:
:mod:`cmkit.presets`).

A :class:`Config` is everything needed to rebuild a run or a model. The resolved config is written to
``config.json`` in every run directory, inside every checkpoint and into the metadata of every export.
"""

from __future__ import annotations

import dataclasses
import math
import os
import types
import typing
from dataclasses import dataclass, field, fields, replace
from typing import Any

from cmkit.augment import AUGMENT_DIM
from cmkit.codec import KINDS
from cmkit.errors import CmkitError
from cmkit.methods import (
    REGISTRY,
    Capability,
    ICTConfig,
    MethodConfig,
    convert_flat,
    init_fields,
    is_flat,
    method_class,
    method_entry,
    methods_that,
    switch_method,
)

CHOICES: dict[str, tuple[str, ...]] = {
    "net.embedding": ("positional", "fourier"),
    "net.encoder_type": ("standard", "skip", "residual"),
    "net.decoder_type": ("standard", "skip"),
    "train.optimizer": ("adam", "radam"),
    "train.precision": ("auto", "fp32", "bf16", "fp16"),
    "train.loss_reduction": ("mean", "sum"),
}


# The NetConfig fields that choose a member of the DDPM++ / NCSN++ family, named as UNet's options.
FAMILY_FIELDS = ("encoder_type", "decoder_type", "resample_filter", "channel_mult_noise", "attn_heads", "augment_dim")


@dataclass(frozen=True)
class NetConfig:
    """The U-Net backbone (EDM's DDPM++ / NCSN++ family, ``SongUNet``); see :class:`cmkit.nets.UNet` for every field.

    ``num_classes > 0`` makes the model class-conditional on the dataset's labels; ``double_norm`` turns on
    sCM's adaptive double normalisation in the residual blocks. The defaults of ``encoder_type``,
    ``decoder_type``, ``resample_filter`` and ``channel_mult_noise`` are DDPM++'s; NCSN++ (EDM's settings):
    ``embedding="fourier"``, ``channel_mult_noise=2``, ``encoder_type="residual"``, ``resample_filter=(1, 3, 3,
    1)`` (:data:`_CIFAR_NCSNPP`). ``attn_heads`` splits attention into heads (EDM: 1; 0, which configs written
    before the field read as: 64-channel heads, cmkit's old rule); ``augment_dim > 0`` makes the network take EDM's
    augmentation labels of that width; ``guidance_dim > 0`` makes it take a guidance scale w, embedded at that width
    (LCM's w conditioning; the methods that train with w as an input only: ``lcm``). Configs written before
    ``guidance_dim`` read it as 0, so their checkpoints load unchanged.
    """

    model_channels: int = 32
    channel_mult: tuple[int, ...] = (1, 2, 2)
    num_blocks: int = 2
    attn_resolutions: tuple[int, ...] = (7,)
    dropout: float = 0.0
    embedding: str = "positional"
    fourier_scale: float = 16.0
    num_classes: int = 0
    double_norm: bool = False
    encoder_type: str = "standard"
    decoder_type: str = "standard"
    resample_filter: tuple[int, ...] = (1, 1)
    channel_mult_noise: int = 1
    attn_heads: int = 1
    augment_dim: int = 0
    guidance_dim: int = 0

    def family_options(self) -> dict[str, Any]:
        """The :data:`FAMILY_FIELDS` as keyword arguments of :class:`cmkit.nets.UNet` (and of the diffusers export's
        ``CmkitUNet2DModel``)."""
        return {name: getattr(self, name) for name in FAMILY_FIELDS}


@dataclass(frozen=True)
class DataConfig:
    """Training data: a dataset name or path, conformed to ``resolution`` and ``channels``.

    ``xflip`` mirrors each training image left-right with probability 1/2, unlabelled. ``augment = p > 0`` turns
    on EDM's non-leaking augmentation pipeline with probability p (:mod:`cmkit.augment`, EDM's CIFAR-10 setting;
    EDM trains CIFAR-10 with p = 0.12): the EDM method only, and the network needs the augment-label input
    (``net.augment_dim`` = 9). The pipeline does its own x-flips (a fair coin for every image, labelled, EDM's
    replacement of dataset flips), so ``augment > 0`` requires ``xflip = false``.

    ``codec`` names the map between images and the model's space (:mod:`cmkit.codec`): "identity" (pixels), or
    the absolute path of an autoencoder file of ``cmkit train-ae`` with ``codec_digest`` its sha256
    (:func:`cmkit.codec.resolve_codec` pins both), or "latent", a preset's placeholder for an autoencoder still to
    be named. ``resolution`` and ``channels`` are the images' size either way; the model's is the codec's shape.
    """

    source: str = "fashion-mnist"
    resolution: int = 28
    channels: int = 1
    xflip: bool = False
    augment: float = 0.0
    codec: str = "identity"
    codec_digest: str = ""


@dataclass(frozen=True)
class TrainConfig:
    """The optimisation loop. Lengths and intervals count training images, in thousands (kimg).

    ``batch`` is the global batch: images per optimiser step over all processes, so a config means the same
    run at any world size. Each of W processes computes ``accum`` micro-batches of ``batch / (W * accum)``
    images and accumulates their gradients (``batch`` must be divisible by ``W * accum``).

    ``precision = "bf16"`` (or ``"fp16"``, with a dynamic gradient scaler) runs the network's forward passes
    under autocast; the noise embedding, the preconditioning coefficients, the network's output scaling and
    the loss stay in float32. ``"auto"`` is bf16 where the hardware computes it natively, else fp32
    (:mod:`cmkit.machine`); a run resolves it before it starts, so its saved config holds the choice.
    ``compile`` compiles the backbone with ``torch.compile``; ``channels_last`` trains in the NHWC memory format
    (often faster on GPUs). Neither changes what is saved.
    A step whose loss or gradients are not finite is skipped; ``max_nonfinite`` of them in a row stop the run.

    ``loss_reduction`` reduces a loss that is a mean over each sample's D values (EDM, l2, sCM): ``mean`` keeps
    it, ``sum`` multiplies it by D, as EDM's training loop sums its loss over pixels (NVlabs/edm
    ``training/training_loop.py``: ``loss.sum().mul(loss_scaling / batch_gpu_total)``); the gradients grow D-fold,
    which matters to Adam only through its epsilon, and to ``grad_clip``. Either way the batch is averaged, and
    the logged loss is the reduced one. A pseudo-Huber distance (a function of the sample's norm) takes ``mean``.

    ``eval_kimg > 0`` evaluates the EMA model at that interval and at the end (:mod:`cmkit.monitor`): FID of
    ``eval_n`` samples, the consistency metric, ``model-best.safetensors``. Two stop rules act on the primary FID
    (1-step for consistency models): ``until_fid`` stops once it is at most that value; ``eval_patience = P > 0``
    stops after P evaluations in a row that did not improve on the best.

    ``p_uncond`` is the probability that a training label is replaced by the null label (label dropout, for
    classifier-free guidance at sampling: Ho and Salimans 2022); class-conditional models only.
    """

    kimg: float = 100.0
    batch: int = 128
    optimizer: str = "radam"
    lr: float = 1e-4
    betas: tuple[float, float] = (0.9, 0.999)
    warmup_kimg: float = 0.0
    grad_clip: float = 0.0
    ema_halflife_kimg: float = 500.0
    ema_rampup: float = 0.05
    seed: int = 0
    ckpt_kimg: float = 10.0
    snap_kimg: float = 10.0
    log_kimg: float = 1.0
    keep_ckpts: int = 3
    precision: str = "fp32"
    max_nonfinite: int = 10
    accum: int = 1
    compile: bool = False
    channels_last: bool = False
    loss_reduction: str = "mean"
    eval_kimg: float = 0.0
    eval_n: int = 1000
    until_fid: float | None = None
    eval_patience: int = 0
    p_uncond: float = 0.0

    @property
    def total_steps(self) -> int:
        """Optimiser steps in the whole run: ``kimg`` thousand images in steps of ``batch``, rounded up."""
        return math.ceil(self.kimg * 1000 / self.batch)


@dataclass(frozen=True)
class Config:
    """A whole run: preset name, backbone, data, method and loop.

    Building one checks nothing: :func:`validate` runs once the config is complete (``cmkit train`` after
    the preset, the flags and every ``--set``; :meth:`from_dict` on what it reads; :func:`cmkit.train.train`).
    """

    preset: str = "custom"
    net: NetConfig = field(default_factory=NetConfig)
    data: DataConfig = field(default_factory=DataConfig)
    method: MethodConfig = field(default_factory=ICTConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able values (tuples become lists); the method section includes its ``name``."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any], *, where: str = "config") -> Config:
        """Inverse of :meth:`to_dict`, validated; unknown, ill-typed or invalid fields raise CmkitError naming
        ``where``. A method section written before per-method configs is converted (or refused with a message
        saying how to convert it)."""
        config = _build(cls, data, where)
        validate(config, where=where)
        return config


def _build(cls: type, data: Any, where: str) -> Any:
    if not isinstance(data, dict):
        raise CmkitError(f"{where}: expected a JSON object, got {type(data).__name__}")
    if cls is MethodConfig:
        return _build_method(data, where)
    if cls is NetConfig and "attn_heads" not in data:
        data = {**data, "attn_heads": 0}  # written before attn_heads: its networks have cmkit's old 64-channel heads
    known = {f.name: f for f in fields(cls) if f.init}
    unknown = sorted(set(data) - set(known))
    if unknown:
        raise CmkitError(f"{where}: unknown field(s) {', '.join(unknown)}; expected {', '.join(known)}")
    hints = typing.get_type_hints(cls)
    values = {}
    for name, value in data.items():
        kind = hints[name]
        if dataclasses.is_dataclass(kind):
            values[name] = _build(kind, value, f"{where}.{name}")
        else:
            values[name] = _coerce(value, kind, f"{where}.{name}")
    return cls(**values)


def _build_method(data: dict[str, Any], where: str) -> MethodConfig:
    """The method section: its ``name`` selects the class, the other fields must be that method's."""
    if not isinstance(data.get("name"), str):
        raise CmkitError(f"{where}.name: expected one of {', '.join(REGISTRY)}, got {data.get('name')!r}")
    cls = method_class(data["name"], where=f"{where}.name")
    own = convert_flat(data, where) if is_flat(data) else {k: v for k, v in data.items() if k != "name"}
    unknown = sorted(set(own) - set(init_fields(cls)))
    if unknown:
        raise CmkitError(f"{where}: the {cls.name} method has no field(s) {', '.join(unknown)}; its fields: "
                         f"{', '.join(init_fields(cls))}")
    hints = typing.get_type_hints(cls)
    return cls(**{k: _coerce(v, hints[k], f"{where}.{k}") for k, v in own.items()})


def _coerce(value: Any, kind: Any, key: str) -> Any:
    """Check ``value`` (a JSON value) against the annotation ``kind``; tuples come in as lists."""
    if typing.get_origin(kind) is types.UnionType:  # ``X | None``
        return None if value is None else _coerce(value, typing.get_args(kind)[0], key)
    if typing.get_origin(kind) is tuple:
        args = typing.get_args(kind)
        if not isinstance(value, list | tuple):
            raise CmkitError(f"{key}: expected a list, got {value!r}")
        if args[-1] is not Ellipsis and len(args) != len(value):
            raise CmkitError(f"{key}: expected {len(args)} values, got {len(value)}")
        item = args[0]
        return tuple(_coerce(v, item, key) for v in value)
    ok = {
        bool: isinstance(value, bool),
        int: isinstance(value, int) and not isinstance(value, bool),
        float: isinstance(value, int | float) and not isinstance(value, bool),
        str: isinstance(value, str),
    }[kind]
    if not ok:
        raise CmkitError(f"{key}: expected {kind.__name__}, got {value!r}")
    return float(value) if kind is float else value


def _parse_text(text: str, kind: Any, key: str) -> Any:
    """Parse the text of ``--set key=text`` into the annotation ``kind`` (``auto`` is None for ``X | None``)."""
    if typing.get_origin(kind) is types.UnionType:
        return None if text.lower() == "auto" else _parse_text(text, typing.get_args(kind)[0], key)
    if typing.get_origin(kind) is tuple:
        parts = [p for p in text.strip("()[] ").split(",") if p.strip()]
        return _coerce([_parse_text(p.strip(), typing.get_args(kind)[0], key) for p in parts], kind, key)
    try:
        if kind is bool:
            return {"true": True, "1": True, "yes": True, "false": False, "0": False, "no": False}[text.lower()]
        return kind(text)
    except (KeyError, ValueError):
        raise CmkitError(f"--set {key}={text}: expected {kind.__name__}") from None


def settable_keys(config: Config) -> dict[str, Any]:
    """Every ``section.field`` key that ``--set`` accepts for ``config`` (its method's fields, and
    ``method.name``), with its annotation."""
    keys = {"method.name": str}
    for section in fields(config):
        sub = getattr(config, section.name)
        if dataclasses.is_dataclass(sub):
            hints = typing.get_type_hints(type(sub))
            keys.update({f"{section.name}.{f.name}": hints[f.name] for f in fields(sub) if f.init})
    return keys


def apply_overrides(config: Config, overrides: list[str]) -> Config:
    """Apply ``key=value`` strings (``train.lr=2e-4``, ``net.channel_mult=1,2,2``) to ``config``, in any order.

    ``method.name=NAME`` switches the method first (keeping the noise range), then the other keys apply to
    the new method's fields; a key the method does not have is an error listing the fields it has.
    Nothing is validated here: see :func:`validate`.
    """
    pairs = [_split(item) for item in overrides]
    for key, text in pairs:
        if key == "method.name":
            config = replace(config, method=switch_method(config.method, text))
    keys = settable_keys(config)
    for key, text in pairs:
        if key == "method.name":
            continue
        if key not in keys:
            raise CmkitError(_unknown_key(config, key, keys))
        section, name = key.split(".")
        value = _parse_text(text, keys[key], key)
        config = replace(config, **{section: replace(getattr(config, section), **{name: value})})
    return config


def override_fields(values: dict[str, Any], hints: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """``values`` (the fields of a flat config, e.g. :class:`cmkit.autoencoder.AEConfig`) with ``key=value``
    strings applied, each parsed by its annotation in ``hints`` as ``--set`` parses :class:`Config` keys; a key
    not in ``hints`` is an error naming the keys. Nothing is validated here."""
    values = dict(values)
    for key, text in map(_split, overrides):
        if key not in hints:
            raise CmkitError(f"--set {key}={text}: expected KEY=VALUE with KEY one of {', '.join(hints)}")
        values[key] = _parse_text(text, hints[key], key)
    return values


def _split(item: str) -> tuple[str, str]:
    key, sep, text = item.partition("=")
    if not sep:
        raise CmkitError(f"--set {item}: expected key=value, for example train.lr=2e-4")
    return key.strip(), text.strip()


def _unknown_key(config: Config, key: str, keys: dict[str, Any]) -> str:
    if key.startswith("method."):
        own = ", ".join(k for k in keys if k.startswith("method."))
        return f"--set {key}: the {config.method.name} method has no field '{key[7:]}'; its fields: {own}"
    return f"--set: unknown key '{key}'; valid keys: {', '.join(keys)}"


def validate(config: Config, *, where: str = "") -> None:
    """Raise CmkitError for values no run can use (unknown choices, non-positive sizes, a method's own
    constraints), naming the first problem; ``where`` (a file) prefixes the message."""
    problems = _problems(config) + config.method.problems()
    if problems:
        raise CmkitError(f"{where}: {problems[0]}" if where else problems[0])


def _problems(config: Config) -> list[str]:
    out = []
    for key, choices in CHOICES.items():
        section, name = key.split(".")
        value = getattr(getattr(config, section), name)
        if value not in choices:
            out.append(f"{key}: unknown value '{value}'; expected one of {', '.join(choices)}")
    t, d = config.train, config.data
    warm = config.method.warm_start_images / 1000
    positive = {
        "train.kimg": t.kimg, "train.batch": t.batch, "train.lr": t.lr, "data.resolution": d.resolution,
        "net.model_channels": config.net.model_channels, "train.keep_ckpts": t.keep_ckpts,
        "train.max_nonfinite": t.max_nonfinite, "train.accum": t.accum,
        "train.ckpt_kimg": t.ckpt_kimg, "train.snap_kimg": t.snap_kimg, "train.log_kimg": t.log_kimg,
    }
    out += [f"{key}: expected a positive number, got {value}" for key, value in positive.items()
            if not (value > 0 and math.isfinite(value))]
    checks = [
        (d.channels in (1, 3), f"data.channels: expected 1 or 3, got {d.channels}"),
        (config.net.num_classes >= 0, f"net.num_classes: expected >= 0, got {config.net.num_classes}"),
        *_family_checks(config.net),
        (0 <= config.net.dropout < 1, f"net.dropout: expected a value in [0, 1), got {config.net.dropout}"),
        (0 <= t.p_uncond < 1, f"train.p_uncond: expected a probability in [0, 1), got {t.p_uncond}"),
        (t.p_uncond == 0 or config.net.num_classes > 0,
         f"train.p_uncond={t.p_uncond:g}: label dropout needs a class-conditional model (net.num_classes > 0)"),
        (t.grad_clip >= 0 and t.warmup_kimg >= 0, "train.grad_clip and train.warmup_kimg: expected >= 0"),
        (t.ema_halflife_kimg >= 0 and t.ema_rampup >= 0, "train.ema_halflife_kimg/ema_rampup: expected >= 0"),
        (all(0 <= b < 1 for b in t.betas), f"train.betas: expected values in [0, 1), got {t.betas}"),
        (t.batch % t.accum == 0, f"train.batch={t.batch}: expected a multiple of train.accum={t.accum}"),
        (warm < t.kimg, f"method.warm_start_kimg={warm:g}: expected less than train.kimg={t.kimg:g} (the student's "
         "own loss trains after the warm-start)"),
        (t.loss_reduction == "mean" or config.method.loss_averages_values,
         "train.loss_reduction=sum sums a loss's per-value terms over the sample, but method.distance=pseudo-huber "
         "is a function of the whole sample's norm; set train.loss_reduction=mean"),
    ]
    out += method_entry(config.method.name).problems(config)  # the method's own constraints (compile, dropout)
    if config.net.guidance_dim and config.method.guidance_range is None:
        out.append(f"net.guidance_dim={config.net.guidance_dim}: the {config.method.name} method does not train with "
                   "the guidance scale as an input (lcm does); set net.guidance_dim=0")
    return (out + [message for ok, message in checks if not ok] + _eval_problems(t) + _augment_problems(config)
            + _codec_problems(d))


def _codec_problems(d: DataConfig) -> list[str]:
    """``data.codec``: a kind's name (without a digest) or a pinned autoencoder file (see :class:`DataConfig`)."""
    if d.codec in KINDS:
        return [] if not d.codec_digest else [f"data.codec_digest: expected empty for data.codec={d.codec}"]
    pinned = os.path.isabs(d.codec) and len(d.codec_digest) == 64
    return [] if pinned else [f"data.codec={d.codec}: expected identity or an autoencoder pinned by its absolute "
                              "path and sha256 (data.codec_digest), as cmkit.codec.resolve_codec writes them"]


def _augment_problems(config: Config) -> list[str]:
    """EDM's augmentation pipeline (``data.augment``, see :class:`DataConfig`)."""
    p = config.data.augment
    if not 0 <= p <= 1:  # NaN fails too
        return [f"data.augment: expected a probability in [0, 1] (0: off), got {p}"]
    if p == 0:
        return []
    checks = [
        (method_entry(config.method.name).can(Capability.AUGMENT),
         f"data.augment={p:g} with method {config.method.name}: EDM's augmentation pipeline trains "
         f"{', '.join(methods_that(Capability.AUGMENT))} only (the consistency papers do not use it); set "
         "data.augment=0"),
        (not config.data.xflip, f"data.augment={p:g} with data.xflip=true: the pipeline flips images itself (a "
         "labelled fair coin per image, as EDM's CIFAR-10 run); set data.xflip=false"),
        (config.net.augment_dim == AUGMENT_DIM,
         f"data.augment={p:g}: the network needs net.augment_dim={AUGMENT_DIM} (EDM's augment labels), got "
         f"net.augment_dim={config.net.augment_dim}"),
    ]
    return [message for ok, message in checks if not ok]


def _family_checks(n: NetConfig) -> list[tuple[bool, str]]:
    """(ok, message) for the DDPM++ / NCSN++ options (the choices are in :data:`CHOICES`)."""
    taps = n.resample_filter
    return [
        (n.channel_mult_noise >= 1, f"net.channel_mult_noise: expected a positive integer, got {n.channel_mult_noise}"),
        (n.attn_heads >= 0, f"net.attn_heads: expected a positive integer (0: 64-channel heads, the networks of "
                            f"configs written before attn_heads), got {n.attn_heads}"),
        (n.augment_dim >= 0, f"net.augment_dim: expected >= 0 (0: no augmentation labels), got {n.augment_dim}"),
        (n.guidance_dim == 0 or (n.guidance_dim >= 4 and n.guidance_dim % 2 == 0),
         f"net.guidance_dim: expected 0 (no guidance input) or an even width >= 4, got {n.guidance_dim}"),
        (len(taps) >= 2 and len(taps) % 2 == 0 and min(taps) >= 0 and sum(taps) > 0,
         f"net.resample_filter: expected an even number of integers >= 0 with a positive sum, such as 1,1 or "
         f"1,3,3,1; got {','.join(map(str, taps))}"),
    ]


def _eval_problems(t: TrainConfig) -> list[str]:
    """Evaluation during training and its stop rules (see :class:`TrainConfig`)."""
    checks = [
        (t.eval_kimg >= 0 and math.isfinite(t.eval_kimg),
         f"train.eval_kimg: expected a number of kimg >= 0 (0: no evaluation), got {t.eval_kimg}"),
        (t.eval_n > 0, f"train.eval_n: expected a positive number of samples, got {t.eval_n}"),
        (t.until_fid is None or (t.until_fid > 0 and math.isfinite(t.until_fid)),
         f"train.until_fid: expected a positive FID, got {t.until_fid}"),
        (t.eval_patience >= 0, f"train.eval_patience: expected a number of evaluations >= 0 (0: off), got "
         f"{t.eval_patience}"),
    ]
    out = [message for ok, message in checks if not ok]
    rules = [f"train.{name}={value}" for name, value in (("until_fid", t.until_fid),
                                                          ("eval_patience", t.eval_patience)) if value]
    if rules and t.eval_kimg == 0:
        out.append(f"{' and '.join(rules)} stops on evaluations, but train.eval_kimg=0 turns them off; set "
                   "train.eval_kimg to the interval between evaluations (thousands of images)")
    return out

