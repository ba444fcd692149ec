"""Shared fixtures: Gaussian data with closed-form denoiser and consistency function, tiny configs."""

from __future__ import annotations

import contextlib
import gzip
import importlib
import math
import os
import signal
import struct
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import NoReturn

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from cmkit.checkpoint import build_model, save_export
from cmkit.cli import main
from cmkit.config import Config, DataConfig, NetConfig, TrainConfig
from cmkit.eval.features import train_fmnist_classifier
from cmkit.methods import EDMConfig, ICTConfig

pytest_plugins = ["pytester"]  # test_conftest.py runs pytest in-process


class GaussianOracle(nn.Module):
    """Exact models for data x0 ~ N(0, s^2 I): the EDM denoiser or the consistency function.

    Denoiser: D(x, sigma) = s^2 / (s^2 + sigma^2) x. The probability-flow ODE keeps x / sqrt(s^2 + sigma^2)
    constant, so the consistency function is f(x, sigma) = x sqrt(s^2 + eps^2) / sqrt(s^2 + sigma^2).
    ``log_s`` is a parameter so tests can take gradients with respect to the assumed data scale. ``kind`` is
    ``edm`` (the denoiser, named as an EDM model) or ``consistency`` (the consistency function, named as an iCT
    model), so cmkit's capability checks see a model of that method.
    """

    sigma_data = 0.5

    def __init__(self, s: float, *, kind: str, channels: int = 1, resolution: int = 4) -> None:
        super().__init__()
        self.log_s = nn.Parameter(torch.tensor(math.log(s)))
        self.kind, self.channels, self.resolution, self.num_classes = kind, channels, resolution, 0
        self.method_name = "edm" if kind == "edm" else "ict"
        self.sigma_min, self.sigma_max = 0.002, 80.0

    def forward(self, x: torch.Tensor, sigma, cond=None) -> torch.Tensor:
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
    sigma^2), with TrigFlow's boundary f(x, 0) = x (not at sigma_min). ``raw(y, t, cond)``
    returns (F, w), w being the parameter ``logvar`` (0 unless set): the adaptive weight of the sCM loss.
    """

    def __init__(self, s: float, **kw) -> None:
        super().__init__(s, kind="consistency", **kw)
        self.method_name = "sct"
        self.logvar = nn.Parameter(torch.zeros(()))

    def forward(self, x: torch.Tensor, sigma, cond=None):
        s2 = self.log_s.exp() ** 2
        sigma = torch.as_tensor(sigma, dtype=x.dtype).expand(x.shape[0]).view(-1, 1, 1, 1)
        return x * (s2 / (s2 + sigma**2)).sqrt()

    def raw(self, x: torch.Tensor, t: torch.Tensor, cond=None):
        s2, sd2 = self.log_s.exp() ** 2, self.sigma_data**2
        cos, sin = (v.view(-1, 1, 1, 1) for v in (t.cos(), t.sin()))
        r = (s2 * cos**2 + sd2 * sin**2).sqrt()
        out = x * sin * (sd2 * cos**2 - s2 * (1 + cos**2)) / (r * (r * cos + s2.sqrt()))
        return out, self.logvar.expand(x.shape[0])


class GaussianMeanFlow(GaussianOracle):
    """The exact average velocity of N(0, s^2 I) data on MeanFlow's linear path (Geng et al. 2025), with
    ``raw(z, r, t, cond)`` as :class:`cmkit.precond.MeanFlow`'s.

    z_t = (1 - t) x0 + t e is N(0, m(t)^2 I) with m(t)^2 = (1 - t)^2 s^2 + t^2; the flow of a Gaussian scales by
    m: z_r = z_t m(r) / m(t). So u(z, r, t) = (z_t - z_r) / (t - r) = z (m(t)^2 - m(r)^2) / ((t - r) m(t) (m(t) +
    m(r))), and m(t)^2 - m(r)^2 = (t - r) ((t + r)(1 + s^2) - 2 s^2): u = z ((t + r)(1 + s^2) - 2 s^2) / (m(t)
    (m(t) + m(r))), which at r = t is the instantaneous velocity v(z, t) = z (t - (1 - t) s^2) / m(t)^2.
    """

    def __init__(self, s: float, **kw) -> None:
        super().__init__(s, kind="consistency", **kw)
        self.method_name = "meanflow"

    def scale(self, t: torch.Tensor) -> torch.Tensor:
        """m(t) [N] (see the class docstring)."""
        s2 = self.log_s.exp() ** 2
        return ((1 - t) ** 2 * s2 + t**2).sqrt()

    def raw(self, z: torch.Tensor, r: torch.Tensor, t: torch.Tensor, cond=None) -> torch.Tensor:
        s2, m_t, m_r = self.log_s.exp() ** 2, self.scale(t), self.scale(r)
        return z * (((t + r) * (1 + s2) - 2 * s2) / (m_t * (m_t + m_r))).view(-1, 1, 1, 1)


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
def sd_pipeline(tmp_path_factory) -> Path:
    """A tiny random StableDiffusionPipeline folder of diffusers' own classes (tests/sd_tiny.py), built once."""
    for name in ("diffusers", "transformers", "peft"):
        import_or_missing(name, f'{name} not installed: pip install "cmkit[sd]"')
    from sd_tiny import build_pipeline

    return build_pipeline(tmp_path_factory.mktemp("sd") / "pipe")


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


# The arguments of the session's fid-fmnist classifier: test_features.py trains again with them (determinism).
CLASSIFIER = {"dataset": "fashion-mnist", "seed": 0, "epochs": 1, "limit": 512}


@pytest.fixture(scope="session")
def classifier(tmp_path_factory) -> Path:
    """A fid-fmnist classifier trained with CLASSIFIER, on 512 images for one epoch (the contract, not the
    accuracy); the only one trained outside test_fmnist_training_is_deterministic."""
    return train_fmnist_classifier(out=tmp_path_factory.mktemp("clf") / "fid.safetensors", progress=False,
                                   **CLASSIFIER)


# ------------------------------------------------------------------- the studio: tiny models and a server

def _tiny_net(channels: int = 8, **kw) -> NetConfig:
    return NetConfig(model_channels=channels, channel_mult=(1, 2), num_blocks=1, attn_resolutions=(), **kw)


def _export(config: Config, path: Path) -> Path:
    """An untrained export of ``config``, every weight perturbed (zero-initialised layers too), so that its
    images depend on the noise, the class and the inputs: the studio's behaviour is under test, not quality."""
    torch.manual_seed(0)
    model = build_model(config)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.2 * torch.randn_like(p))
    save_export(model, config, path)
    return path


def _image_folder(folder: Path, *, size: int, mode: str, count: int = 4) -> Path:
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(count):
        shape = (size, size) if mode == "L" else (size, size, 3)
        Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode).save(folder / f"{i}.png")
    return folder


@pytest.fixture(scope="session")
def studio_files(tmp_path_factory) -> dict[str, Path]:
    """Untrained tiny exports: ``gray`` (iCT, 28x28x1), ``rgb`` (iCT, 32x32x3, 10 classes) and its ``teacher``
    (EDM), with image folders ``gray_data`` and ``rgb_data`` of four random images each."""
    root = tmp_path_factory.mktemp("studio")
    gray = Config(preset="tiny-gray", net=_tiny_net(), data=DataConfig(resolution=28, channels=1),
                  method=ICTConfig())
    rgb_data = DataConfig(source="cifar10", resolution=32, channels=3)
    rgb = Config(preset="tiny-rgb", net=_tiny_net(num_classes=10), data=rgb_data, method=ICTConfig())
    teacher = Config(preset="tiny-edm", net=_tiny_net(num_classes=10), data=rgb_data, method=EDMConfig())
    return {"gray": _export(gray, root / "gray.safetensors"), "rgb": _export(rgb, root / "rgb.safetensors"),
            "teacher": _export(teacher, root / "teacher.safetensors"),
            "gray_data": _image_folder(root / "gray-data", size=28, mode="L"),
            "rgb_data": _image_folder(root / "rgb-data", size=32, mode="RGB")}


@contextlib.contextmanager
def studio_server(model: Path, *args: str) -> Iterator[tuple[str, subprocess.Popen]]:
    """``cmkit serve MODEL --port 0 ARGS`` in a subprocess: yields (its URL, the process); stopped with
    SIGINT (Ctrl-C) at the end."""
    command = [sys.executable, "-m", "cmkit", "serve", str(model), "--port", "0", *args]
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()
        if not line.startswith("cmkit studio: http://"):
            proc.kill()
            raise AssertionError(f"cmkit serve did not start: {line!r} {proc.stderr.read()}")
        yield line.split()[2], proc
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
