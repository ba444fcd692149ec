"""The config of an SD-route run (:mod:`cmkit.sd`): frozen dataclasses, JSON round trip, ``--set`` overrides and the
presets ``sd-lcm`` and ``sd-lcm-lora``. Every value and its source: docs/methods.md, "LCM on diffusers pipelines".
"""

from __future__ import annotations

import dataclasses
import math
import typing
from dataclasses import dataclass, field, fields, replace
from typing import Any

from cmkit.config import override_fields
from cmkit.errors import CmkitError

STUDENTS = ("full", "lora")
DISTANCES = ("huber", "l2")
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
# LCM-LoRA's target modules: every linear and convolution layer of the UNet's blocks (diffusers'
# examples/consistency_distillation/train_lcm_distill_lora_sd_wds.py, its default lora_target_modules).
LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2", "conv1",
                "conv2", "conv_shortcut", "downsamplers.0.conv", "upsamplers.0.conv", "time_emb_proj")


@dataclass(frozen=True)
class SDData:
    """Captioned images (:mod:`cmkit.sd.captions`): ``source`` a folder with a metadata.jsonl or a .txt beside each
    image; images are resized (shorter side) to ``resolution`` and centre-cropped, in RGB."""

    source: str = ""
    resolution: int = 512


@dataclass(frozen=True)
class SDMethod:
    """Latent consistency distillation in the pipeline's terms (LCM, Alg. 1; diffusers' train_lcm_distill_*).

    ``student="full"``: a copy of the teacher's UNet with a guidance input (``time_cond_proj_dim``, the teacher's own
    when it has one), the target network an EMA of it at rate ``mu``. ``student="lora"``: LoRA adapters of rank
    ``lora_rank`` and scale ``lora_alpha / lora_rank`` on ``LORA_TARGETS`` of the teacher's UNet, no guidance input,
    no target network (the target is the student under stop-grad: ``mu`` must be 0). The teacher's DDIM step skips
    k = num_train_timesteps / ``ddim_steps`` timesteps; its guidance scale is drawn per sample from U[``w_min``,
    ``w_max``] in diffusers' ``guidance_scale`` convention (1: no guidance; LCM's omega = w - 1), and the full student
    is told ``w - 1``. ``w_default`` is the scale a full student samples at. Boundary scalings as LCMScheduler's with
    its sigma_data 0.5 and ``timestep_scaling``; ``distance`` ``huber`` (per value, constant ``huber_c``) or ``l2``.
    """

    name: str = "sd-lcm"
    student: str = "full"
    ddim_steps: int = 50
    w_min: float = 6.0
    w_max: float = 16.0
    w_default: float = 8.5
    time_cond_proj_dim: int = 256
    lora_rank: int = 64
    lora_alpha: float = 64.0
    timestep_scaling: float = 10.0
    distance: str = "huber"
    huber_c: float = 0.001
    mu: float = 0.95


@dataclass(frozen=True)
class SDTrain:
    """The loop: AdamW (``lr``, ``betas``, ``weight_decay``) warmed up linearly over ``warmup_steps`` optimiser
    steps, gradient norm clipped at ``grad_clip`` (0: off), ``batch`` images per step over all processes in ``accum``
    micro-batches, ``kimg`` thousand images in all; checkpoints every ``ckpt_kimg`` (the newest ``keep_ckpts``
    kept), a log line every ``log_kimg``. ``precision`` is the frozen parts' (teacher UNet, VAE, text encoder) and
    the forward passes' autocast dtype: auto is bf16 where the device computes it natively, else fp32; the student's
    weights stay fp32. ``grad_checkpointing`` recomputes the student's activations in the backward pass."""

    kimg: float = 12.0
    batch: int = 12
    lr: float = 1e-6
    betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = 0.0
    warmup_steps: int = 0
    grad_clip: float = 1.0
    accum: int = 1
    seed: int = 0
    ckpt_kimg: float = 2.4
    log_kimg: float = 0.12
    keep_ckpts: int = 3
    precision: str = "auto"
    grad_checkpointing: bool = True

    @property
    def total_steps(self) -> int:
        return math.ceil(self.kimg * 1000 / self.batch)


@dataclass(frozen=True)
class SDConfig:
    """A whole SD-route run: the preset's name, the teacher pipeline folder (absolute), data, method and loop."""

    preset: str = "sd-lcm"
    teacher: str = ""
    data: SDData = field(default_factory=SDData)
    method: SDMethod = field(default_factory=SDMethod)
    train: SDTrain = field(default_factory=SDTrain)

    @property
    def lora(self) -> bool:
        return self.method.student == "lora"

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any], *, where: str = "config") -> SDConfig:
        """Inverse of :meth:`to_dict`, validated; CmkitError naming ``where`` for anything else."""
        try:
            config = cls(preset=data["preset"], teacher=data["teacher"], data=_section(SDData, data["data"]),
                         method=_section(SDMethod, data["method"]), train=_section(SDTrain, data["train"]))
        except (KeyError, TypeError, AttributeError) as e:
            raise CmkitError(f"{where}: not an SD-route config ({e})") from None
        validate(config, where=where)
        return config


def _section(cls: type, values: dict[str, Any]) -> Any:
    hints = typing.get_type_hints(cls)
    return cls(**{k: tuple(v) if typing.get_origin(hints[k]) is tuple else v for k, v in values.items()})


# ---------------------------------------------------------------------------------------------- presets

# diffusers' examples/consistency_distillation/README.md (SD 1.5 on LAION-A6+): fp16, resolution 512, lr 1e-6, Huber,
# EMA 0.95 (full), weight decay 0, 1000 steps at batch 12, gradient checkpointing; the scripts' defaults for the rest
# (w_min 5 / w_max 15 in LCM's omega, i.e. guidance scales 6-16; 50 DDIM timesteps; huber_c 0.001;
# timestep_scaling 10; time_cond_proj_dim 256; lora rank 64, alpha 64; 500 warm-up steps; max_grad_norm 1).
SD_PRESETS: dict[str, tuple[str, SDConfig]] = {
    "sd-lcm": ("LCM of a diffusers text-to-image pipeline (--teacher PIPELINE_DIR --data CAPTIONED_DIR): a full "
               "student with a guidance input, diffusers' LCM settings", SDConfig()),
    "sd-lcm-lora": ("LCM-LoRA of a diffusers text-to-image pipeline (--teacher PIPELINE_DIR --data CAPTIONED_DIR): "
                    "rank-64 LoRA on the teacher's UNet, diffusers' LCM-LoRA settings",
                    SDConfig(preset="sd-lcm-lora", method=SDMethod(name="sd-lcm-lora", student="lora", mu=0.0))),
}


def sd_preset(name: str) -> SDConfig:
    return SD_PRESETS[name][1]


def settable(config: SDConfig) -> dict[str, Any]:
    """Every ``section.field`` key ``--set`` accepts, with its annotation (``teacher`` is ``--teacher``)."""
    keys = {}
    for section in ("data", "method", "train"):
        sub = getattr(config, section)
        hints = typing.get_type_hints(type(sub))
        keys.update({f"{section}.{f.name}": hints[f.name] for f in fields(sub) if f.name != "name"})
    return keys


def apply_sd_overrides(config: SDConfig, overrides: list[str]) -> SDConfig:
    """``config`` with ``key=value`` strings applied (parsed as ``--set`` parses every config); not validated."""
    values = {k: getattr(getattr(config, k.split(".")[0]), k.split(".")[1]) for k in settable(config)}
    values = override_fields(values, settable(config), overrides)
    for key, value in values.items():
        section, name = key.split(".")
        config = replace(config, **{section: replace(getattr(config, section), **{name: value})})
    return config


def validate(config: SDConfig, *, where: str = "") -> None:
    """CmkitError naming the first field no run can use."""
    problems = _problems(config)
    if problems:
        raise CmkitError(f"{where}: {problems[0]}" if where else problems[0])


def _problems(c: SDConfig) -> list[str]:
    m, t, d = c.method, c.train, c.data
    finite = all(math.isfinite(v) for v in (m.w_min, m.w_max, m.w_default, m.huber_c, m.mu, t.lr, t.kimg))
    checks = [
        (finite, "method and train: expected finite numbers"),
        (m.student in STUDENTS, f"method.student: unknown value '{m.student}'; expected one of {', '.join(STUDENTS)}"),
        (m.distance in DISTANCES, f"method.distance: unknown value '{m.distance}'; expected one of "
                                  f"{', '.join(DISTANCES)}"),
        (t.precision in PRECISIONS, f"train.precision: unknown value '{t.precision}'; expected one of "
                                    f"{', '.join(PRECISIONS)}"),
        (m.ddim_steps >= 1, f"method.ddim_steps: expected a positive number of DDIM timesteps, got {m.ddim_steps}"),
        (1 <= m.w_min <= m.w_max, f"method.w_min, method.w_max: expected 1 <= w_min <= w_max (guidance scales; 1 is "
                                  f"none), got [{m.w_min}, {m.w_max}]"),
        (m.w_min <= m.w_default <= m.w_max, f"method.w_default: expected a scale in [w_min, w_max] = [{m.w_min}, "
                                            f"{m.w_max}], got {m.w_default}"),
        (m.time_cond_proj_dim >= 2, f"method.time_cond_proj_dim: expected >= 2, got {m.time_cond_proj_dim}"),
        (m.lora_rank >= 1, f"method.lora_rank: expected a positive rank, got {m.lora_rank}"),
        (m.lora_alpha > 0, f"method.lora_alpha: expected > 0, got {m.lora_alpha}"),
        (m.timestep_scaling > 0, f"method.timestep_scaling: expected > 0, got {m.timestep_scaling}"),
        (m.huber_c >= 0, f"method.huber_c: expected >= 0, got {m.huber_c}"),
        (0 <= m.mu < 1, f"method.mu: expected an EMA rate in [0, 1), got {m.mu}"),
        (m.student == "full" or m.mu == 0, f"method.mu={m.mu:g}: LCM-LoRA trains without a target network (its "
                                           "target is the student under stop-grad); set method.mu=0"),
        (d.resolution >= 8, f"data.resolution: expected a positive size >= 8, got {d.resolution}"),
        (t.batch >= 1 and t.kimg > 0 and t.lr > 0, "train.batch, train.kimg, train.lr: expected positive values"),
        (t.accum >= 1 and t.batch % t.accum == 0, f"train.batch={t.batch}: expected a multiple of train.accum="
                                                   f"{t.accum}"),
        (t.ckpt_kimg > 0 and t.log_kimg > 0 and t.keep_ckpts >= 1,
         "train.ckpt_kimg, train.log_kimg, train.keep_ckpts: expected positive values"),
        (t.warmup_steps >= 0 and t.grad_clip >= 0 and t.weight_decay >= 0,
         "train.warmup_steps, train.grad_clip, train.weight_decay: expected >= 0"),
        (all(0 <= b < 1 for b in t.betas), f"train.betas: expected values in [0, 1), got {t.betas}"),
    ]
    return [message for ok, message in checks if not ok]
