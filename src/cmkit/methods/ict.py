"""Improved consistency training (Song and Dhariwal 2023)."""

from __future__ import annotations

import functools
from dataclasses import dataclass, field

from cmkit import schedules
from cmkit.losses import ConsistencyLoss, data_point, inverse_gap_weight
from cmkit.methods.base import (
    CONSISTENCY_CAPABILITIES,
    CONSISTENCY_POLICY,
    ConsistencyDistance,
    MethodEntry,
    TeacherRole,
    distance_of,
    grid_pairs,
    grid_sizes,
    no_target,
    shared_dropout,
)
from cmkit.precond import ConsistencyFunction


@dataclass(frozen=True)
class ICTConfig(ConsistencyDistance):
    """Improved consistency training (Song and Dhariwal 2023): N(k) doubling from s0 + 1 to s1 + 1, the pair
    index from the discretised lognormal (p_mean, p_std), weight 1 / (sigma_{i+1} - sigma_i), no EMA target."""

    name: str = field(default="ict", init=False)
    rho: float = 7.0
    s0: int = 10
    s1: int = 1280
    p_mean: float = -1.1
    p_std: float = 2.0

    def _positive(self) -> tuple[str, ...]:
        return ("rho", "s0", "p_std")

    def _checks(self) -> list[tuple[bool, str]]:
        return [*super()._checks(), grid_sizes(self.s0, self.s1)]


def build_loss(method: ICTConfig, *, dim: int, total_images: int, **_) -> ConsistencyLoss:
    """iCT (Song and Dhariwal 2023): exponential N(k), lognormal pair index, 1 / gap weight, no target EMA."""
    num_scales = functools.partial(schedules.ict_num_scales, total=total_images, s0=method.s0, s1=method.s1)
    probs = functools.partial(schedules.lognormal_index_probs, p_mean=method.p_mean, p_std=method.p_std)
    return ConsistencyLoss(pairs=grid_pairs(method, num_scales, index_probs=probs), point=data_point,
                           weight=inverse_gap_weight, distance=distance_of(method, dim), target_decay=no_target,
                           sigma_min=method.sigma_min)


ENTRY = MethodEntry(ICTConfig, build_loss, ConsistencyFunction, CONSISTENCY_POLICY, TeacherRole.NONE,
                    CONSISTENCY_CAPABILITIES, checks=(shared_dropout,))
