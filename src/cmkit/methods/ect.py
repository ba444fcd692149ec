"""Easy consistency tuning (Geng et al. 2024) of a diffusion teacher."""

from __future__ import annotations

from dataclasses import dataclass, field

from cmkit.losses import ConsistencyLoss, ECTPairs, data_point, inverse_gap_weight
from cmkit.methods.base import (
    CONSISTENCY_CAPABILITIES,
    CONSISTENCY_POLICY,
    ConsistencyDistance,
    MethodEntry,
    TaughtConfig,
    TeacherRole,
    distance_of,
    no_target,
    shared_dropout,
)
from cmkit.precond import ConsistencyFunction


@dataclass(frozen=True)
class ECTConfig(ConsistencyDistance, TaughtConfig):
    """Easy consistency tuning (Geng et al. 2024) of a ``teacher``: ln t ~ N(p_mean, p_std^2), r(t) shrinking
    t - r by ``q`` every ``stage_kimg`` thousand images, weight 1 / (t - r)."""

    name: str = field(default="ect", init=False)
    p_mean: float = -1.1
    p_std: float = 2.0
    q: float = 2.0
    stage_kimg: float = 3_200.0

    def _positive(self) -> tuple[str, ...]:
        return ("p_std", "stage_kimg")

    def _checks(self) -> list[tuple[bool, str]]:
        return [*super()._checks(), (self.q > 1, f"method.q: expected a ratio > 1, got {self.q}")]


def build_loss(method: ECTConfig, *, dim: int, **_) -> ConsistencyLoss:
    """ECT (Geng et al. 2024): continuous (r, t) pairs, the clean image where r = 0, weight 1 / (t - r)."""
    pairs = ECTPairs(p_mean=method.p_mean, p_std=method.p_std, q=method.q, stage_kimg=method.stage_kimg,
                     sigma_min=method.sigma_min, sigma_max=method.sigma_max)
    return ConsistencyLoss(pairs=pairs, point=data_point, weight=inverse_gap_weight, distance=distance_of(method, dim),
                           target_decay=no_target, sigma_min=method.sigma_min)


ENTRY = MethodEntry(ECTConfig, build_loss, ConsistencyFunction, CONSISTENCY_POLICY, TeacherRole.INIT_REQUIRED,
                    CONSISTENCY_CAPABILITIES, checks=(shared_dropout,))
