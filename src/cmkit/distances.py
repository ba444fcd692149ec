"""Per-sample distances between two batches: plain functions, picked by name from the config.

Each takes a, b of shape [N, ...] and returns [N] float32.
"""

from __future__ import annotations

import math
from collections.abc import Callable

from torch import Tensor

Distance = Callable[[Tensor, Tensor], Tensor]


def l2(a: Tensor, b: Tensor) -> Tensor:
    """Mean squared difference per sample, ||a - b||^2 / D (the squared l2 distance up to 1/D)."""
    return (a - b).float().pow(2).flatten(1).mean(1)


def pseudo_huber(a: Tensor, b: Tensor, *, c: float) -> Tensor:
    """iCT's pseudo-Huber on whole samples: sqrt(||a - b||_2^2 + c^2) - c (Song and Dhariwal 2023, eq. 9)."""
    sq = (a - b).float().pow(2).flatten(1).sum(1)
    return (sq + c**2).sqrt() - c


def huber(a: Tensor, b: Tensor, *, c: float) -> Tensor:
    """The pseudo-Huber function of each value, averaged over the sample: mean of sqrt((a - b)^2 + c^2) - c
    (LCM's ``huber`` loss, diffusers' ``train_lcm_distill_sd_wds.py``, c = 0.001 there); c = 0 is the mean
    absolute difference."""
    return ((a - b).float().pow(2) + c**2).sqrt().sub(c).flatten(1).mean(1)


def huber_c(dim: int) -> float:
    """iCT's c = 0.00054 sqrt(D) for samples of D values (0.03 on CIFAR-10)."""
    return 0.00054 * math.sqrt(dim)


def make_distance(name: str, *, dim: int, c: float | None = None) -> Distance:
    """``l2``; ``pseudo-huber`` on whole samples with constant ``c`` (None selects :func:`huber_c` of ``dim``; 0 is
    the plain l2 norm, as ECT's CIFAR-10 run uses); or ``huber``, the per-value pseudo-Huber averaged over the
    sample (LCM), with constant ``c`` (None: :func:`huber_c` of ``dim``)."""
    if name == "l2":
        return l2
    if name in ("pseudo-huber", "huber"):
        c = huber_c(dim) if c is None else c
        per_sample = pseudo_huber if name == "pseudo-huber" else huber
        return lambda a, b: per_sample(a, b, c=c)
    raise ValueError(f"unknown distance '{name}'; expected l2, pseudo-huber or huber")
