"""Consistency training (Song et al. 2023, the CM paper, Alg. 3)."""

from __future__ import annotations

import functools
from dataclasses import dataclass, field

from cmkit import schedules
from cmkit.losses import ConsistencyLoss, data_point, uniform_weight
from cmkit.methods.base import (
    CONSISTENCY_CAPABILITIES,
    CONSISTENCY_POLICY,
    ConsistencyDistance,
    MethodEntry,
    TeacherRole,
    distance_of,
    ema_rate,
    grid_pairs,
    grid_sizes,
    shared_dropout,
)
from cmkit.precond import ConsistencyFunction


@dataclass(frozen=True)
class CTConfig(ConsistencyDistance):
    """Consistency training (CM paper, Alg. 3): a Karras grid of N(k) levels growing as sqrt from s0 + 1 to
    s1 + 1, a uniformly drawn adjacent pair, weight 1, and an EMA target with rate mu(k) from ``mu0``
    (``mu0 = 0``: the target is the student under stop-grad)."""

    name: str = field(default="ct", init=False)
    distance: str = "l2"
    rho: float = 7.0
    s0: int = 2
    s1: int = 150
    mu0: float = 0.9

    def _positive(self) -> tuple[str, ...]:
        return ("rho", "s0")

    def _checks(self) -> list[tuple[bool, str]]:
        return [*super()._checks(), grid_sizes(self.s0, self.s1), ema_rate("mu0", self.mu0)]


def build_loss(method: CTConfig, *, dim: int, total_images: int, **_) -> ConsistencyLoss:
    """CT (CM paper, Alg. 3): sqrt curriculum N(k), uniform pairs, weight 1, target EMA mu(k)."""
    num_scales = functools.partial(schedules.ct_num_scales, total=total_images, s0=method.s0, s1=method.s1)

    def target_decay(images_seen: int) -> float | None:
        if method.mu0 == 0:
            return None
        return schedules.ct_target_decay(num_scales(images_seen), s0=method.s0, mu0=method.mu0)

    return ConsistencyLoss(pairs=grid_pairs(method, num_scales), point=data_point, weight=uniform_weight,
                           distance=distance_of(method, dim), target_decay=target_decay, sigma_min=method.sigma_min)


ENTRY = MethodEntry(CTConfig, build_loss, ConsistencyFunction, CONSISTENCY_POLICY, TeacherRole.NONE,
                    CONSISTENCY_CAPABILITIES, checks=(shared_dropout,))
