"""Consistency distillation (Song et al. 2023, the CM paper, Alg. 2)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

from torch import nn

from cmkit.losses import ConsistencyLoss, TeacherStep, uniform_weight
from cmkit.methods.base import (
    CONSISTENCY_CAPABILITIES,
    CONSISTENCY_POLICY,
    DISTANCES,
    ConsistencyDistance,
    MethodEntry,
    TaughtConfig,
    TeacherRole,
    distance_of,
    ema_rate,
    grid_pairs,
    shared_dropout,
)
from cmkit.precond import ConsistencyFunction


@dataclass(frozen=True)
class CDConfig(ConsistencyDistance, TaughtConfig):
    """Consistency distillation (CM paper, Alg. 2): a fixed Karras grid of ``num_scales`` levels, a uniformly
    drawn adjacent pair, one Euler or Heun step of the ``teacher``'s ODE, weight 1, EMA target rate ``mu``."""

    name: str = field(default="cd", init=False)
    distance: str = "l2"
    rho: float = 7.0
    num_scales: int = 18
    mu: float = 0.0
    solver: str = "heun"

    choices: ClassVar[dict[str, tuple[str, ...]]] = {"distance": DISTANCES, "solver": ("heun", "euler")}

    def _positive(self) -> tuple[str, ...]:
        return ("rho",)

    def _checks(self) -> list[tuple[bool, str]]:
        return [*super()._checks(), ema_rate("mu", self.mu),
                (self.num_scales >= 2, f"method.num_scales: expected at least 2 grid levels, got {self.num_scales}")]


def build_loss(method: CDConfig, *, dim: int, teacher: nn.Module, **_) -> ConsistencyLoss:
    """CD (CM paper, Alg. 2): a fixed grid, uniform pairs, the teacher's ODE step, weight 1, target EMA mu."""
    return ConsistencyLoss(pairs=grid_pairs(method, lambda images_seen: method.num_scales, index_probs=None),
                           point=TeacherStep(teacher, heun=method.solver == "heun"), weight=uniform_weight,
                           distance=distance_of(method, dim),
                           target_decay=lambda images_seen: method.mu if method.mu > 0 else None,
                           sigma_min=method.sigma_min)


ENTRY = MethodEntry(CDConfig, build_loss, ConsistencyFunction, CONSISTENCY_POLICY, TeacherRole.TARGET,
                    CONSISTENCY_CAPABILITIES, checks=(shared_dropout,))
