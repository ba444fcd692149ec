"""Shared fixtures: Gaussian data with closed-form denoiser and consistency function, tiny configs."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from cmkit.config import Config, DataConfig, MethodConfig, NetConfig, TrainConfig


class GaussianOracle(nn.Module):
    """Exact models for data x0 ~ N(0, s^2 I): the EDM denoiser or the consistency function.

    Denoiser: D(x, sigma) = s^2 / (s^2 + sigma^2) x. The probability-flow ODE keeps x / sqrt(s^2 + sigma^2)
    constant, so the consistency function is f(x, sigma) = x sqrt(s^2 + eps^2) / sqrt(s^2 + sigma^2).
    ``log_s`` is a parameter so tests can take gradients with respect to the assumed data scale.
    """

    def __init__(self, s: float, *, kind: str, channels: int = 1, resolution: int = 4) -> None:
        super().__init__()
        self.log_s = nn.Parameter(torch.tensor(math.log(s)))
        self.kind, self.channels, self.resolution, self.num_classes = kind, channels, resolution, 0
        self.sigma_min, self.sigma_max = 0.002, 80.0

    def forward(self, x: torch.Tensor, sigma, labels=None) -> torch.Tensor:
        s2 = self.log_s.exp() ** 2
        sigma = torch.as_tensor(sigma, dtype=x.dtype).expand(x.shape[0]).view(-1, 1, 1, 1)
        if self.kind == "edm":
            return s2 / (s2 + sigma**2) * x
        return x * ((s2 + self.sigma_min**2) / (s2 + sigma**2)).sqrt()


@pytest.fixture
def tiny_config() -> Config:
    """A ~20k-parameter iCT config at 28x28 that trains a step in well under a second."""
    return Config(
        preset="test",
        net=NetConfig(model_channels=8, channel_mult=(1, 2), num_blocks=1, attn_resolutions=(14,)),
        data=DataConfig(source="fashion-mnist", resolution=28, channels=1),
        method=MethodConfig(name="ict", s0=2, s1=8),
        train=TrainConfig(kimg=0.256, batch=32, lr=1e-3, ema_halflife_kimg=0.1, ckpt_kimg=0.128,
                          snap_kimg=0.256, log_kimg=0.064),
    )
