"""Truncated consistency models, TCM (Lee et al., ICLR 2025, arXiv 2410.14895): a second training stage that
learns the consistency function only on the high-noise range [t', T], anchored at the truncation time t' to the
frozen stage-one consistency model (the ``--teacher``), starting from the stage-one weights.

Facts from the paper and its official code (NVlabs/TCM, training/loss.py, training/networks_tcm.py and the
README's CIFAR-10 stage-two command); the code here is cmkit's own.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from cmkit import schedules
from cmkit.cond import Cond
from cmkit.distances import Distance
from cmkit.losses import replayed_randomness
from cmkit.methods.base import (
    CONSISTENCY_CAPABILITIES,
    CONSISTENCY_POLICY,
    ConsistencyDistance,
    MethodEntry,
    TaughtConfig,
    TeacherRole,
    distance_of,
    shared_dropout,
)
from cmkit.precond import ConsistencyFunction
from cmkit.rng import GlobalNoise, RowNoise


@dataclass(frozen=True)
class TCMConfig(ConsistencyDistance, TaughtConfig):
    """TCM's stage two (Lee et al. 2025, Sec. 4) of a stage-one consistency model ``teacher``.

    ``ln t`` follows a Student-t with ``t_df`` degrees of freedom, location ``t_mean`` and scale ``t_std``,
    truncated to [ln ``transition``, ln sigma_max] (the paper's t' and T); a share ``boundary_prob`` of the rows
    has t = t' exactly (the boundary loss, weight ``boundary_weight`` against the consistency loss's 1). r(t) is
    ECT's (:func:`cmkit.schedules.ect_r`) at stage ``start_stage`` + one more every ``stage_kimg`` thousand images
    (stage two continues stage one's schedule), ECT's ratio 1 - q^-(stage+1) capped at ``ratio_limit``; weight
    1 / (t - r). The target is the truncated consistency
    function at r: the student under stop-gradient where r >= t', the frozen stage-one model below. Defaults: the
    paper's CIFAR-10 stage two (NVlabs/TCM README: t' = 1, ln t ~ t_0.01(0, 0.2), boundary share 0.25 at weight 0.1,
    q = 2 every 25k iterations of batch 1024, ratio limit 0.999).
    """

    name: str = field(default="tcm", init=False)
    transition: float = 1.0
    t_mean: float = 0.0
    t_std: float = 0.2
    t_df: float = 0.01
    boundary_prob: float = 0.25
    boundary_weight: float = 0.1
    q: float = 2.0
    stage_kimg: float = 25_600.0
    start_stage: int = 0
    ratio_limit: float = 0.999

    def _positive(self) -> tuple[str, ...]:
        return ("transition", "t_std", "t_df", "stage_kimg")

    def _checks(self) -> list[tuple[bool, str]]:
        w = self.boundary_weight
        return [*super()._checks(),
                (self.sigma_min < self.transition < self.sigma_max, f"method.transition: expected a truncation "
                 f"time t' in (sigma_min, sigma_max) = ({self.sigma_min}, {self.sigma_max}), got {self.transition}"),
                (0 < self.boundary_prob < 1, f"method.boundary_prob: expected a share in (0, 1), got "
                 f"{self.boundary_prob}"),
                (w >= 0 and math.isfinite(w), f"method.boundary_weight: expected >= 0, got {w}"),
                (self.q > 1, f"method.q: expected a ratio > 1, got {self.q}"),
                (0 < self.ratio_limit <= 1, f"method.ratio_limit: expected a value in (0, 1], got {self.ratio_limit}"),
                (self.start_stage >= 0, f"method.start_stage: expected >= 0, got {self.start_stage}"),
                (self.student_net == "teacher", "method.student_net: TCM's stage two starts from its stage one's "
                 f"weights; expected teacher, got {self.student_net}"),
                (self.warm_start_kimg == 0, "method.warm_start_kimg: TCM's stage two starts from its stage one's "
                 f"weights; expected 0, got {self.warm_start_kimg:g}")]


class TruncatedStudentT:
    """Draws of a Student-t (``df`` degrees of freedom, location ``mean``, scale ``std``) truncated to [low, high],
    by inverting its CDF tabulated on ``points`` points (trapezoids of the density, float64; torch has no Student-t
    quantile function). The official code draws ln t this way with scipy's quantile function (NVlabs/TCM,
    torch_utils/misc.py, ``truncated_t``)."""

    def __init__(self, *, mean: float, std: float, df: float, low: float, high: float, points: int = 16_385) -> None:
        x = torch.linspace(low, high, points, dtype=torch.float64)
        density = (1 + ((x - mean) / std) ** 2 / df) ** (-(df + 1) / 2)
        cdf = torch.cat([torch.zeros(1, dtype=torch.float64), ((density[1:] + density[:-1]) / 2).cumsum(0)])
        self.x, self.cdf = x, cdf / cdf[-1]

    def __call__(self, u: Tensor) -> Tensor:
        """The quantiles at ``u`` (float [n] in [0, 1]), float32 [n] in [low, high], on ``u``'s device."""
        u64 = u.detach().to("cpu", torch.float64)
        hi = torch.searchsorted(self.cdf, u64).clamp(1, len(self.x) - 1)
        c0, c1, x0, x1 = self.cdf[hi - 1], self.cdf[hi], self.x[hi - 1], self.x[hi]
        share = ((u64 - c0) / (c1 - c0).clamp(min=1e-300)).clamp(0, 1)
        return (x0 + share * (x1 - x0)).to(u.device, torch.float32)


class TruncatedPairs:
    """TCM's (r, t) pairs and boundary rows (Lee et al. 2025; NVlabs/TCM training/loss.py): ln t from ``times``,
    a row is a boundary row (t = t') with probability ``boundary_prob``, r = ECT's r(t) at the stage reached, its
    ratio capped at ``ratio_limit``."""

    def __init__(self, times: TruncatedStudentT, *, transition: float, boundary_prob: float, q: float,
                 stage_kimg: float, start_stage: int, ratio_limit: float) -> None:
        self.times, self.transition, self.boundary_prob = times, transition, boundary_prob
        self.q, self.stage_kimg, self.start_stage, self.ratio_limit = q, stage_kimg, start_stage, ratio_limit

    def stage(self, images_seen: int) -> int:
        return self.start_stage + schedules.ect_stage(images_seen, stage_kimg=self.stage_kimg)

    def __call__(self, n: int, images_seen: int, noise: RowNoise,
                 device: torch.device) -> tuple[Tensor, Tensor, Tensor]:
        """(r, t, boundary): float32 [n], float32 [n] in [t', sigma_max] with 0 <= r < t, bool [n]."""
        t = self.times(noise.rand(n, device=device)).exp()
        boundary = noise.rand(n, device=device) < self.boundary_prob
        t = torch.where(boundary, torch.full_like(t, self.transition), t)
        r = schedules.ect_r(t, stage=self.stage(images_seen), q=self.q, ratio_limit=self.ratio_limit)
        return r, t, boundary

    def stats(self, images_seen: int) -> dict[str, float]:
        return {"stage": self.stage(images_seen)}


class TCMLoss:
    """TCM's stage-two loss (Lee et al. 2025, Sec. 4; NVlabs/TCM training/loss.py and ct_training_loop.py).

    For (r, t, boundary) from ``pairs`` and one noise z: ``x_t = x0 + t z``, ``x_r = x0 + r z``; per sample
    ``d(f(x_t, t), stopgrad f_trunc(x_r, r)) / (t - r)`` with the truncated consistency function ``f_trunc``: the
    student (same dropout mask as the gradient pass) where r >= t', the frozen ``stage_one`` model (evaluated at
    max(r, sigma_min), so r = 0 targets x0) below t'. The paper's objective is the mean of the consistency rows'
    losses plus ``boundary_weight`` times the mean of the boundary rows'; here each row is drawn a boundary row
    independently, so that a sample's loss does not depend on the rest of its batch, and the rows are weighted
    1 / (1 - p) and ``boundary_weight`` / p: the batch mean's expectation is the paper's objective.
    """

    def __init__(self, pairs: TruncatedPairs, *, stage_one: nn.Module, boundary_weight: float, distance: Distance,
                 sigma_min: float) -> None:
        self.pairs, self.stage_one, self.boundary_weight = pairs, stage_one, boundary_weight
        self.distance, self.sigma_min = distance, sigma_min

    @torch.no_grad()
    def target(self, model: nn.Module, x_r: Tensor, r: Tensor, cond: Cond | None) -> Tensor:
        """``f_trunc(x_r, r)`` [N, C, H, W] float32: the student at max(r, t') with the gradient pass's dropout
        mask, replaced by the stage-one model's output on the rows with r < t'."""
        goal = model(x_r, r.clamp(min=self.pairs.transition), cond).float()
        below = (r < self.pairs.transition).nonzero().flatten()
        if len(below):
            rows = None if cond is None else cond.rows(below)
            goal[below] = self.stage_one(x_r[below], r[below].clamp(min=self.sigma_min), rows).float()
        return goal

    def __call__(self, model: nn.Module, x0: Tensor, cond: Cond | None, *, images_seen: int,
                 target: nn.Module | None = None, noise: RowNoise | None = None) -> Tensor:
        noise = noise or GlobalNoise()
        r, t, boundary = self.pairs(x0.shape[0], images_seen, noise, x0.device)
        z = noise.randn(*x0.shape, device=x0.device)
        x_t, x_r = x0 + t.view(-1, 1, 1, 1) * z, x0 + r.view(-1, 1, 1, 1) * z
        with replayed_randomness(x0.device):
            prediction = model(x_t, t, cond)
        goal = self.target(model, x_r, r, cond)
        p = self.pairs.boundary_prob
        share = torch.where(boundary, torch.full_like(t, self.boundary_weight / p), torch.full_like(t, 1 / (1 - p)))
        return share / (t - r) * self.distance(prediction, goal)

    def target_decay(self, images_seen: int) -> float | None:
        return None

    def stats(self, images_seen: int) -> dict[str, float]:
        return self.pairs.stats(images_seen)


def build_loss(method: TCMConfig, *, dim: int, teacher: nn.Module | None = None, **_) -> TCMLoss:
    """TCM's stage two (Lee et al. 2025) with the stage-one model ``teacher`` at the boundary."""
    times = TruncatedStudentT(mean=method.t_mean, std=method.t_std, df=method.t_df, low=math.log(method.transition),
                              high=math.log(method.sigma_max))
    pairs = TruncatedPairs(times, transition=method.transition, boundary_prob=method.boundary_prob, q=method.q,
                           stage_kimg=method.stage_kimg, start_stage=method.start_stage, ratio_limit=method.ratio_limit)
    return TCMLoss(pairs, stage_one=teacher, boundary_weight=method.boundary_weight,
                   distance=distance_of(method, dim), sigma_min=method.sigma_min)


# The exported model is the stage-two network alone, sampled as any consistency model (the official evaluation
# samples the stage-two EMA network at every step, the 2-step intermediate 0.821 included: ct_eval.py).
ENTRY = MethodEntry(TCMConfig, build_loss, ConsistencyFunction, CONSISTENCY_POLICY, TeacherRole.STAGE_ONE,
                    CONSISTENCY_CAPABILITIES, checks=(shared_dropout,))
