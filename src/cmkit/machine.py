"""Fitting a run to the machine: the autocast precision ``train.precision=auto`` resolves to, and the training
length a wall-time budget buys (``cmkit train --minutes``), measured by timing real training steps.

bfloat16 autocast pays only where the hardware computes in bfloat16: a CUDA GPU that supports it, or an x86 CPU
with AVX-512 BF16 or AMX instructions. Elsewhere torch emulates it (converting every operand to float32 and
back), which on a CPU with AVX2 alone was about 5x slower than float32 (issue 24), so ``auto`` means fp32 there.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import replace
from pathlib import Path

import torch

from cmkit import dist
from cmkit.config import Config

# /proc/cpuinfo flags of x86 CPUs that compute bfloat16 dot products natively (AVX-512 BF16; AMX tiles).
BF16_CPU_FLAGS = frozenset({"avx512_bf16", "amx_bf16"})


def bf16_is_native(device_type: str, *, cuda_bf16: bool, cpu_capability: str, cpu_flags: frozenset[str]) -> bool:
    """True where bfloat16 arithmetic is done by the hardware: a ``"cuda"`` device when ``cuda_bf16`` (torch's
    ``torch.cuda.is_bf16_supported()``); a ``"cpu"`` whose torch kernels use AVX-512 (``cpu_capability``, from
    ``torch.backends.cpu.get_cpu_capability()``, is ``"AVX512"``) and whose ``cpu_flags`` include
    ``avx512_bf16`` or ``amx_bf16``. False for every other device or CPU."""
    if device_type == "cuda":
        return cuda_bf16
    return device_type == "cpu" and cpu_capability == "AVX512" and bool(cpu_flags & BF16_CPU_FLAGS)


def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags from /proc/cpuinfo (Linux); empty where it cannot be read."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return frozenset()
    return frozenset(word for line in text.splitlines() if line.startswith("flags") for word in line.split()[2:])


def auto_precision(device: torch.device) -> tuple[str, str]:
    """``(precision, why)``: ``"bf16"`` where this machine computes bfloat16 natively on ``device``, else
    ``"fp32"``; ``why`` is a short reason for the log."""
    if device.type == "cuda":
        native = torch.cuda.is_bf16_supported()
        return ("bf16", "the GPU computes bf16") if native else ("fp32", "the GPU has no bf16 arithmetic")
    capability = torch.backends.cpu.get_cpu_capability()
    flags = cpu_flags()
    if bf16_is_native(device.type, cuda_bf16=False, cpu_capability=capability, cpu_flags=flags):
        have = ", ".join(sorted(flags & BF16_CPU_FLAGS))
        return "bf16", f"the CPU computes bf16 ({have}; torch's {capability} kernels)"
    return "fp32", f"the CPU has no AVX-512 BF16 or AMX (torch's {capability} kernels), so bf16 would be emulated"


def run_config(out: Path) -> Config | None:
    """The config a run directory was started with (its ``config.json``), or None when there is none yet."""
    path = Path(out) / "config.json"
    return Config.from_dict(json.loads(path.read_text()), where=str(path)) if path.is_file() else None


def resolve_precision(config: Config, device: torch.device, *, stored: Config | None = None) -> Config:
    """``config`` with ``train.precision=auto`` replaced by a concrete precision: the one ``stored`` (the run
    being resumed) was started with, so a resumed run keeps its precision on any machine, else
    :func:`auto_precision` of ``device``. Any other precision is returned unchanged. It reads and replaces only
    ``train.precision``, so the SD route's configs (:class:`cmkit.sd.config.SDConfig`) go through it too."""
    if config.train.precision != "auto":
        return config
    chosen = stored.train.precision if stored is not None else auto_precision(device)[0]
    return replace(config, train=replace(config.train, precision=chosen))


WARMUP_STEPS = 2  # untimed steps before --minutes' calibration measures


def measure_images_per_s(config: Config, device: torch.device, *, min_steps: int = 3,
                         min_seconds: float = 5.0) -> float:
    """Training images per second of ``config`` (precision resolved) on ``device``, over all processes: a throwaway
    run on the real data takes :data:`WARMUP_STEPS` untimed steps (first-call allocation, kernel selection: on a
    2-core Xeon the first three steps took 27, 11 and 6 s, then 5 s each), then timed steps until at least
    ``min_steps`` steps and ``min_seconds`` have passed. Nothing is written and the caller's random state is kept;
    under torchrun every process takes part and gets the same value."""
    from cmkit.teacher import load_teacher
    from cmkit.train import Run, load_training_data, local_batch

    dataset = load_training_data(config)
    run = Run(config, device, teacher=load_teacher(config, device=device))
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        for _ in range(WARMUP_STEPS):
            run.optimizer_step(*local_batch(config, dataset, run.step, device))
        _synchronize(device)
        start, steps = time.perf_counter(), 0
        while steps < min_steps or dist.any_rank(time.perf_counter() - start < min_seconds):
            run.optimizer_step(*local_batch(config, dataset, run.step, device))
            steps += 1
        _synchronize(device)
        elapsed = dist.all_reduce_mean(torch.tensor(time.perf_counter() - start, device=device)).item()
    return steps * config.train.batch / elapsed


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def kimg_for_minutes(minutes: float, *, images_per_s: float, batch: int) -> float:
    """The training length (kimg) that ``minutes`` of training at ``images_per_s`` buys, in whole steps of
    ``batch`` images (rounded down, at least one step)."""
    steps = max(1, math.floor(minutes * 60 * images_per_s / batch))
    return steps * batch / 1000
