"""Noise grids, curricula, EMA and learning-rate rules: pure functions of training progress.

Nothing here keeps state; the training loop passes the step k (out of K) or the images seen on every
call, which makes resuming exact by construction.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


def karras_sigmas(n: int, *, sigma_min: float = 0.002, sigma_max: float = 80.0, rho: float = 7.0) -> Tensor:
    """The Karras grid of ``n`` >= 2 noise levels, ASCENDING, float64 [n] (Karras et al. 2022, eq. 5).

    ``sigma_i = (eps^(1/rho) + (i-1)/(n-1) (T^(1/rho) - eps^(1/rho)))^rho``, endpoints exact.
    """
    if n < 2:
        raise ValueError(f"a Karras grid needs at least 2 points, got {n}")
    ramp = torch.linspace(0, 1, n, dtype=torch.float64)
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    sigmas = (lo + ramp * (hi - lo)) ** rho
    sigmas[0], sigmas[-1] = sigma_min, sigma_max
    return sigmas


def edm_sampling_sigmas(steps: int, *, sigma_min: float = 0.002, sigma_max: float = 80.0,
                        rho: float = 7.0) -> Tensor:
    """EDM's sampling schedule: ``steps`` Karras levels DESCENDING from sigma_max to sigma_min, float64."""
    if steps == 1:
        return torch.tensor([sigma_max], dtype=torch.float64)
    return karras_sigmas(steps, sigma_min=sigma_min, sigma_max=sigma_max, rho=rho).flip(0)


def ct_num_scales(k: int, total: int, *, s0: int, s1: int) -> int:
    """CT's N(k) = ceil(sqrt(k/K ((s1 + 1)^2 - s0^2) + s0^2) - 1) + 1 (CM paper, App. C)."""
    frac = min(k / max(total, 1), 1.0)
    return math.ceil(math.sqrt(frac * ((s1 + 1) ** 2 - s0**2) + s0**2) - 1) + 1


def ct_target_decay(num_scales: int, *, s0: int, mu0: float) -> float:
    """CT's target EMA rate mu(k) = exp(s0 ln(mu0) / N(k)) (the paper's N(k), not N(k) - 1); mu0 = 0 -> 0."""
    if mu0 == 0:
        return 0.0
    return math.exp(s0 * math.log(mu0) / num_scales)


def ict_num_scales(k: int, total: int, *, s0: int, s1: int) -> int:
    """iCT's N(k) = min(s0 2^floor(k/K'), s1) + 1 with K' = floor(K / (log2 floor(s1/s0) + 1))."""
    stage_len = math.floor(total / (math.log2(math.floor(s1 / s0)) + 1))
    doublings = k // stage_len if stage_len > 0 else 0
    return min(s0 * 2 ** min(doublings, 62), s1) + 1


def ect_stage(images_seen: int, *, stage_kimg: float) -> int:
    """ECT's stage: it advances once every ``stage_kimg`` thousand training images (0 at the start)."""
    return int(images_seen // (stage_kimg * 1000))


def ect_r(t: Tensor, *, stage: int, q: float, ratio_limit: float = 1.0) -> Tensor:
    """ECT's paired level r(t) = max(0, t (1 - q^-(stage+1) (1 + 8 sigmoid(-t)))) (Geng et al. 2024).

    t: float [N] > 0; returns r with 0 <= r < t, same shape and dtype. As the stage grows, t - r
    shrinks by a factor q per stage; at stage 0, r = 0 for small t (the target is the clean image).
    ``ratio_limit`` < 1 caps ECT's ratio 1 - q^-(stage+1) there, so t - r stops shrinking (NVlabs/TCM's
    ``--ratio_limit``, training/loss.py).
    """
    ratio = max(q ** -(stage + 1), 1 - ratio_limit) * (1 + 8 * torch.sigmoid(-t))
    return (t * (1 - ratio)).clamp(min=0)


def lognormal_index_probs(sigmas: Tensor, *, p_mean: float, p_std: float) -> Tensor:
    """iCT's discretised lognormal p(i) over the N-1 adjacent pairs of an ascending grid, float64 [N-1].

    ``p(i) ~ erf((ln sigma_{i+1} - P_mean) / (sqrt 2 P_std)) - erf((ln sigma_i - P_mean) / (sqrt 2 P_std))``.
    """
    cdf = torch.erf((sigmas.double().log() - p_mean) / (math.sqrt(2) * p_std))
    probs = cdf[1:] - cdf[:-1]
    return probs / probs.sum()


def ema_beta(images_seen: int, batch: int, *, halflife_kimg: float, rampup: float) -> float:
    """Per-step EMA decay for the sampling weights (EDM): half-life in images, ramped up early on.

    The half-life is ``min(halflife_kimg * 1000, rampup * images_seen)`` when rampup > 0.
    """
    halflife = halflife_kimg * 1000
    if rampup > 0:
        halflife = min(halflife, rampup * images_seen)
    return 0.5 ** (batch / max(halflife, 1e-8))


def learning_rate(images_seen: int, *, lr: float, warmup_kimg: float, warm_start_images: int = 0,
                  warm_start_lr: float | None = None) -> float:
    """The rate of the step after ``images_seen`` images: ``lr``, or ``warm_start_lr`` (when not None) during a
    student's warm-start, its first ``warm_start_images`` images; both scaled by a linear warm-up over the run's
    first ``warmup_kimg`` thousand images."""
    if warm_start_lr is not None and images_seen < warm_start_images:
        lr = warm_start_lr
    if warmup_kimg <= 0:
        return lr
    return lr * min(images_seen / (warmup_kimg * 1000), 1.0)
