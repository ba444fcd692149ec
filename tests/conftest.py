"""Shared fixtures: Gaussian data with closed-form denoiser and consistency function, tiny configs."""

from __future__ import annotations

import gzip
import importlib
import math
import os
import struct
from pathlib import Path
from types import ModuleType
from typing import NoReturn

import numpy as np
import pytest
import torch
from torch import nn

from cmkit.cli import main
from cmkit.config import Config, DataConfig, NetConfig, TrainConfig
from cmkit.eval.features import train_fmnist_classifier
from cmkit.methods import ICTConfig

pytest_plugins = ["pytester"]  # test_conftest.py runs pytest in-process


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


class GaussianTrigFlow(GaussianOracle):
    """The exact consistency model of N(0, s^2 I) data in TrigFlow form (sCT, sCD), with sigma_data = 0.5.

    With x_t = cos t x0 + sin t z, z ~ N(0, sd^2 I), the ODE keeps x_t / r(t) constant, r(t)^2 = s^2 cos^2 t +
    sd^2 sin^2 t, so f(x_t, t) = s x_t / r(t); from f = cos t x_t - sin t sd F(x_t / sd, t), F(y, t) = y (cos t -
    s / r) / sin t, written as y sin t (sd^2 cos^2 t - s^2 (1 + cos^2 t)) / (r (r cos t + s)) so that float32 keeps
    its digits at small t. In the denoiser contract (x = x_t / cos t, sigma = sd tan t) f is s x / sqrt(s^2 +
    sigma^2), with TrigFlow's boundary f(x, 0) = x (not at sigma_min). ``forward(y, t, labels, trig=True)``
    returns (F, w), w being the parameter ``logvar`` (0 unless set): the adaptive weight of the sCM loss.
    """

    sigma_data = 0.5

    def __init__(self, s: float, **kw) -> None:
        super().__init__(s, kind="consistency", **kw)
        self.logvar = nn.Parameter(torch.zeros(()))

    def forward(self, x: torch.Tensor, sigma, labels=None, *, trig: bool = False):
        s2, sd2 = self.log_s.exp() ** 2, self.sigma_data**2
        if not trig:
            sigma = torch.as_tensor(sigma, dtype=x.dtype).expand(x.shape[0]).view(-1, 1, 1, 1)
            return x * (s2 / (s2 + sigma**2)).sqrt()
        cos, sin = (v.view(-1, 1, 1, 1) for v in (sigma.cos(), sigma.sin()))
        r = (s2 * cos**2 + sd2 * sin**2).sqrt()
        out = x * sin * (sd2 * cos**2 - s2 * (1 + cos**2)) / (r * (r * cos + s2.sqrt()))
        return out, self.logvar.expand(x.shape[0])


# ------------------------------------------------------------- missing datasets, weights and packages


def under_ci() -> bool:
    """True when the environment variable CI is ``true`` (or ``1``), as CI services set it."""
    return os.environ.get("CI", "").strip().lower() in ("true", "1")


def missing_requirement(reason: str) -> NoReturn:
    """A dataset, weight file or optional package a test needs is absent: skip the test, or fail under CI.

    Every such skip in tests/ goes through here. CI installs everything (``make test``), so there an absence
    is a broken set-up and must fail loudly instead of passing as a skip. Works inside tests and fixtures and
    at module level (``allow_module_level``).
    """
    if under_ci():
        pytest.fail(f"{reason} (CI=true: a missing requirement fails instead of skipping)", pytrace=False)
    pytest.skip(reason, allow_module_level=True)


def import_or_missing(name: str, reason: str) -> ModuleType:
    """``importlib.import_module(name)``, or :func:`missing_requirement` when it cannot be imported."""
    try:
        return importlib.import_module(name)
    except ImportError:
        missing_requirement(reason)


@pytest.fixture
def tiny_config() -> Config:
    """A ~20k-parameter iCT config at 28x28 that trains a step in well under a second."""
    return Config(
        preset="test",
        net=NetConfig(model_channels=8, channel_mult=(1, 2), num_blocks=1, attn_resolutions=(14,)),
        data=DataConfig(source="fashion-mnist", resolution=28, channels=1),
        method=ICTConfig(s0=2, s1=8),
        train=TrainConfig(kimg=0.256, batch=32, lr=1e-3, ema_halflife_kimg=0.1, ckpt_kimg=0.128,
                          snap_kimg=0.256, log_kimg=0.064),
    )


# ------------------------------------------------------------- a tiny model trained on real data, once

FMNIST = Path("/usr/share/datasets/fashion-mnist")
TINY = ["net.model_channels=8", "net.channel_mult=1,2", "net.num_blocks=1", "net.attn_resolutions=14",
        "train.batch=32", "method.s1=20", "train.snap_kimg=0.128", "train.log_kimg=0.064"]


def _write_idx(folder: Path, images: np.ndarray, labels: np.ndarray) -> None:
    folder.mkdir(parents=True)
    with gzip.open(folder / "train-images-idx3-ubyte.gz", "wb") as f:
        f.write(struct.pack(">IIII", 2051, len(images), 28, 28) + images.tobytes())
    with gzip.open(folder / "train-labels-idx1-ubyte.gz", "wb") as f:
        f.write(struct.pack(">II", 2049, len(labels)) + labels.tobytes())


@pytest.fixture(scope="session")
def fmnist_subset(tmp_path_factory) -> Path:
    """The first 320 real Fashion-MNIST training images, as an IDX folder."""
    if not FMNIST.is_dir():
        missing_requirement(f"{FMNIST} missing: apt-get install dataset-fashion-mnist")
    with gzip.open(FMNIST / "train-images-idx3-ubyte.gz") as f:
        images = np.frombuffer(f.read(), np.uint8, offset=16)[: 320 * 784].reshape(320, 28, 28)
    with gzip.open(FMNIST / "train-labels-idx1-ubyte.gz") as f:
        labels = np.frombuffer(f.read(), np.uint8, offset=8)[:320]
    folder = tmp_path_factory.mktemp("data") / "fmnist-320"
    _write_idx(folder, images, labels)
    return folder


def exit_status(argv: list[str]) -> int:
    """``cmkit argv``'s exit status: option errors found while parsing exit (SystemExit), the others return."""
    try:
        return main(argv)
    except SystemExit as e:
        return e.code


def train_tiny(out: Path, data: Path, *extra: str, preset: str = "fmnist-ict", settings: list[str] = TINY,
               kimg: float = 0.256) -> int:
    """``cmkit train`` of a tiny ``preset`` run on ``data`` with a checkpoint halfway; ``extra``: more ``--set``
    values or flags."""
    return main(["train", "--preset", preset, "--out", str(out), "--data", str(data), "--kimg", str(kimg),
                 "--ckpt-kimg", str(kimg / 2), "--seed", "3", "--set", *settings, *extra])


@pytest.fixture(scope="session")
def run_dir(fmnist_subset, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("runs") / "a"
    assert train_tiny(out, fmnist_subset) == 0
    return out


# sCT from scratch (no teacher, the paper's time input c_noise = t), with sCT's dropout: JVP and gradient passes
# share each mask, so resuming is bit-exact only if the masks are seeded per step. Batch 16: an sCT step costs
# about 2.5 iCT steps (the JVP pass is 4 forward passes' worth on the CPU).
TINY_SCT = [*TINY[:4], "train.batch=16", "train.snap_kimg=0.064", "train.log_kimg=0.032", "net.dropout=0.2",
            "method.c_noise=t"]


def train_tiny_sct(out: Path, data: Path, *extra: str) -> int:
    return train_tiny(out, data, *extra, preset="fmnist-sct", settings=TINY_SCT, kimg=0.064)


@pytest.fixture(scope="session")
def sct_run(fmnist_subset, tmp_path_factory) -> Path:
    """A tiny TrigFlow model: 4 sCT steps of 16 real images from scratch, checkpoints after steps 2 and 4."""
    out = tmp_path_factory.mktemp("runs") / "sct"
    assert train_tiny_sct(out, fmnist_subset) == 0
    return out


@pytest.fixture(scope="session")
def classifier(tmp_path_factory) -> Path:
    """A fid-fmnist classifier trained on 512 images for one epoch (the contract, not the accuracy)."""
    return train_fmnist_classifier(out=tmp_path_factory.mktemp("clf") / "fid.safetensors", epochs=1, limit=512,
                                   progress=False)
