"""Latent consistency distillation, LCM (Luo et al. 2023, "Latent Consistency Models", arXiv 2310.04378).

Consistency distillation of a classifier-free-guided teacher in whatever space the model works in (pixels, or a
codec's latent: :mod:`cmkit.codec`): the teacher's ODE step uses the guided denoiser at a scale w drawn per sample
from [w_min, w_max], the student takes w as an input (``net.guidance_dim``), and the step skips k points of the
teacher's grid. Every setting and its source: docs/methods.md, "Latent consistency distillation".
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

from torch import nn

from cmkit.losses import ConsistencyLoss, GuidanceDrawn, SkipPairs, TeacherStep, uniform_weight
from cmkit.methods.base import (
    CONSISTENCY_CAPABILITIES,
    CONSISTENCY_POLICY,
    Capability,
    MethodEntry,
    TaughtConfig,
    TeacherRole,
    distance_of,
    ema_rate,
    shared_dropout,
)
from cmkit.precond import GuidedConsistency

if TYPE_CHECKING:
    from cmkit.config import Config

LCM_DISTANCES = ("huber", "l2")


@dataclass(frozen=True)
class LCMConfig(TaughtConfig):
    """LCM (Luo et al. 2023, Alg. 1): pairs ``skip`` = k points apart on a Karras grid of ``num_scales`` points
    (:class:`cmkit.losses.SkipPairs`), one Euler (DDIM) or Heun step of the teacher's guided ODE at
    ``w ~ U[w_min, w_max]`` per sample (cmkit's scale: 1 is no guidance, LCM's omega = w - 1), the student told w,
    weight 1, EMA target rate ``mu``, distance ``huber`` (the per-value pseudo-Huber with constant ``huber_c``,
    averaged over the sample) or ``l2``. ``w_default`` is the scale the model samples at when none is given.
    """

    name: str = field(default="lcm", init=False)
    rho: float = 7.0
    num_scales: int = 1000
    skip: int = 20
    solver: str = "euler"
    w_min: float = 6.0
    w_max: float = 16.0
    w_default: float = 8.5
    mu: float = 0.95
    distance: str = "huber"
    huber_c: float = 0.001

    choices: ClassVar[dict[str, tuple[str, ...]]] = {"distance": LCM_DISTANCES, "solver": ("euler", "heun")}

    @property
    def guidance_range(self) -> tuple[float, float]:
        return (self.w_min, self.w_max)

    def wrapper_options(self) -> dict[str, Any]:
        return {"guidance_range": self.guidance_range, "guidance_default": self.w_default}

    def _positive(self) -> tuple[str, ...]:
        return ("rho",)

    def _checks(self) -> list[tuple[bool, str]]:
        finite = all(math.isfinite(v) for v in (self.w_min, self.w_max, self.w_default, self.huber_c))
        return [
            ema_rate("mu", self.mu),
            (self.num_scales >= 2, f"method.num_scales: expected at least 2 grid points, got {self.num_scales}"),
            (1 <= self.skip < self.num_scales,
             f"method.skip: expected 1 <= skip < num_scales ({self.num_scales}), got {self.skip}"),
            (finite and 0 <= self.w_min <= self.w_max,
             f"method.w_min, method.w_max: expected finite scales with 0 <= w_min <= w_max, got [{self.w_min}, "
             f"{self.w_max}]"),
            (self.w_min <= self.w_default <= self.w_max,
             f"method.w_default: expected a scale in [w_min, w_max] = [{self.w_min}, {self.w_max}], got "
             f"{self.w_default}"),
            (self.huber_c >= 0, f"method.huber_c: expected >= 0, got {self.huber_c}"),
        ]


def guided_student(config: Config) -> tuple[bool, str]:
    """An LCM student is class-conditional (the teacher is guided with its labels) and takes w as an input."""
    n = config.net
    return (n.num_classes > 0 and n.guidance_dim > 0,
            f"method lcm: the student needs class labels and a guidance input, got net.num_classes={n.num_classes} "
            f"and net.guidance_dim={n.guidance_dim}; set net.num_classes (the teacher's) and net.guidance_dim > 0 "
            "(e.g. 32)")


def build_loss(method: LCMConfig, *, dim: int, teacher: nn.Module, **_) -> GuidanceDrawn:
    """LCM (Alg. 1): w ~ U[w_min, w_max], skipping pairs, the guided teacher step, weight 1, target EMA mu."""
    pairs = SkipPairs(num_scales=method.num_scales, skip=method.skip, sigma_min=method.sigma_min,
                      sigma_max=method.sigma_max, rho=method.rho)
    loss = ConsistencyLoss(pairs=pairs, point=TeacherStep(teacher, heun=method.solver == "heun", guided=True),
                           weight=uniform_weight, distance=distance_of(method, dim),
                           target_decay=lambda images_seen: method.mu if method.mu > 0 else None,
                           sigma_min=method.sigma_min)
    return GuidanceDrawn(loss, w_min=method.w_min, w_max=method.w_max)


# No diffusers export: ConsistencyModelPipeline has no guidance-scale input (diffusers' LCM pipelines: a later issue).
ENTRY = MethodEntry(LCMConfig, build_loss, GuidedConsistency, CONSISTENCY_POLICY, TeacherRole.TARGET,
                    CONSISTENCY_CAPABILITIES - {Capability.EXPORT}, checks=(shared_dropout, guided_student))
