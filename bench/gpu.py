"""GPU readiness (docs/scaling.md, "Benchmarks"): what each CIFAR-10 preset costs on one accelerator.

On random tensors (no dataset, no network access), for every ``cifar10-*`` preset at its paper's batch:
- training images/s in fp32 and bf16, one optimiser step of a run at its midpoint (past any warm-start), the
  median of ``--repeats`` steps after a warm-up step. A batch that does not fit is retried with gradient
  accumulation (micro-batches halved until it fits; ``--batch-gpu`` caps the first try, as EDM's option);
  methods that take a teacher get a randomly initialised EDM teacher (``cifar10-cd-small``: the teacher's
  full-size network);
- the projected GPU-hours of the preset's whole run (``train.kimg`` at the measured images/s);
- sampling images/s at ``--sample-batch``: 1 step for consistency models, EDM Heun with 18 steps (35 network
  evaluations) for the EDM presets (``cifar10-edm``, ``cifar10-edm-ncsnpp``), in fp32 and bf16;
- sCT's and sCD's step time (their forward-mode JVP) as a ratio to EDM's at the same batch (all 512);
- peak accelerator memory of each measurement.

Writes ``bench/results/gpu-<gpu name>.json``. ``--smoke`` runs every code path on tiny networks and batches (on
the CPU when there is no GPU; out-of-memory is simulated above 4 images per micro-batch) in a few seconds; its
result goes to ``runs/gpu-smoke.json`` unless ``--out`` says otherwise.
Usage: bench/gpu.sh [--presets cifar10-edm,cifar10-ict] [--repeats 3] [--sample-batch 512] [--batch-gpu N] [--smoke]
"""

from __future__ import annotations

import argparse
import gc
import json
import platform
import re
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import replace
from datetime import date
from pathlib import Path

import torch

from cmkit.checkpoint import build_model
from cmkit.config import Config
from cmkit.methods import EDMConfig, method_entry, sampling_spec
from cmkit.presets import PRESETS, preset
from cmkit.sampling import default_sigmas, generate
from cmkit.train import Run

ROOT = Path(__file__).resolve().parent.parent
PRECISIONS = ("fp32", "bf16")
SMOKE_NET = dict(model_channels=8, channel_mult=(1, 2), num_blocks=1, attn_resolutions=(8,))
SMOKE_RESOLUTION, SMOKE_BATCH, SMOKE_OOM_ABOVE = 16, 8, 4


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def free(device: torch.device) -> None:
    """Release what the last measurement left (after an out-of-memory error too)."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def peak_reset(device: torch.device) -> None:
    free(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_gib(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None


def measure(timer: Callable[[], float], device: torch.device, repeats: int, *,
            warmup: bool) -> tuple[float, float | None]:
    """(median seconds over ``repeats``, after one warm-up call if ``warmup``, peak GiB)."""
    peak_reset(device)
    if warmup:
        timer()
    times = [timer() for _ in range(repeats)]
    return statistics.median(times), peak_gib(device)


def cifar_presets(names: str | None, smoke: bool) -> dict[str, Config]:
    """The CIFAR-10 presets to measure (all, or the comma-separated ``names``); tiny networks and batches for
    --smoke."""
    chosen = names.split(",") if names else [n for n in PRESETS if n.startswith("cifar10-")]
    configs = {name: preset(name) for name in chosen}
    if smoke:
        configs = {name: replace(c, net=replace(c.net, **SMOKE_NET), data=replace(c.data, resolution=SMOKE_RESOLUTION),
                                 train=replace(c.train, batch=SMOKE_BATCH)) for name, c in configs.items()}
    return configs


def teacher_for(config: Config, smoke: bool) -> Config:
    """The EDM teacher's config of a preset that takes one: the student's network, or cifar10-edm's for a student
    with its own (smaller) network."""
    net = config.net
    if getattr(config.method, "student_net", "teacher") == "own":
        net = replace(preset("cifar10-edm").net, **SMOKE_NET) if smoke else preset("cifar10-edm").net
    return replace(config, net=net, method=EDMConfig())


def train_timer(config: Config, device: torch.device, *, smoke: bool, oom_above: int | None) -> Callable[[], float]:
    """Seconds of one optimiser step, at the run's midpoint, of a fresh run of ``config`` on random images;
    micro-batches above ``oom_above`` images raise an out-of-memory error (a simulation that checks the retry)."""
    micro = config.train.batch // config.train.accum
    if oom_above is not None and micro > oom_above:
        raise torch.OutOfMemoryError(f"simulated: a micro-batch of {micro} images is above --oom-above {oom_above}")
    teacher = None
    if method_entry(config.method.name).teacher.takes_teacher:
        teacher = build_model(teacher_for(config, smoke)).to(device).eval().requires_grad_(False)
    run = Run(config, device, teacher=teacher)
    run.step = config.train.total_steps // 2  # mid-run: past a warm-start, mid-curriculum
    d = config.data
    x0 = torch.rand(config.train.batch, d.channels, d.resolution, d.resolution, device=device) * 2 - 1

    def step() -> float:
        sync(device)
        start = time.perf_counter()
        run.optimizer_step(x0, None)
        sync(device)
        return time.perf_counter() - start

    return step


def next_accum(batch: int, accum: int) -> int:
    """The smallest divisor of ``batch`` at least twice ``accum`` (micro-batches at most half as large)."""
    return next(a for a in range(2 * accum, batch + 1) if batch % a == 0)


def first_accum(batch: int, batch_gpu: int | None) -> int:
    """The smallest divisor of ``batch`` whose micro-batches hold at most ``batch_gpu`` images."""
    return next(a for a in range(1, batch + 1) if batch % a == 0 and (batch_gpu is None or batch // a <= batch_gpu))


def train_rate(config: Config, precision: str, device: torch.device, args: argparse.Namespace) -> dict:
    """Training images/s of ``config`` in ``precision`` at its batch, with the least gradient accumulation that
    fits in memory."""
    batch = config.train.batch
    accum = first_accum(batch, args.batch_gpu)
    while True:
        trial = replace(config, train=replace(config.train, precision=precision, accum=accum))
        try:
            seconds, peak = measure(train_timer(trial, device, smoke=args.smoke, oom_above=args.oom_above), device,
                                    args.repeats, warmup=not args.smoke)
            return {"images_per_s": batch / seconds, "accum": accum, "micro_batch": batch // accum,
                    "peak_gib": peak}
        except torch.OutOfMemoryError as e:
            free(device)
            if accum == batch:
                raise
            print(f"  out of memory at {batch // accum} images per micro-batch ({str(e)[:60]}); halving", flush=True)
            accum = next_accum(batch, accum)


def sample_rate(config: Config, precision: str, device: torch.device, args: argparse.Namespace) -> dict:
    """Sampling images/s of ``config``'s model (random weights) with its kind's sampler: 1 consistency step, or EDM
    Heun with 18 steps (35 evaluations)."""
    model = build_model(config).to(device).eval()
    spec = sampling_spec(config.method)
    sigmas, n = default_sigmas(spec, spec.steps), args.sample_batch

    def sample() -> float:
        sync(device)
        start = time.perf_counter()
        for _ in generate(model, range(n), sigmas=sigmas, sampler=spec.sampler, batch_size=n, precision=precision):
            pass
        sync(device)
        return time.perf_counter() - start

    repeats = args.repeats if spec.steps == 1 else min(args.repeats, 2)
    seconds, peak = measure(sample, device, repeats, warmup=not args.smoke)
    return {"sampler": "1 step" if spec.steps == 1 else "heun 35 NFE", "images_per_s": n / seconds, "peak_gib": peak}


def bench_preset(name: str, config: Config, device: torch.device, args: argparse.Namespace) -> dict:
    """Every measurement of one preset and its projected GPU-hours."""
    params = sum(p.numel() for p in build_model(config).parameters())
    out = {"net_parameters": params, "batch": config.train.batch, "kimg": config.train.kimg, "train": {},
           "projected_gpu_hours": {}, "sample": {}}
    for precision in PRECISIONS:
        print(f"{name}: training {precision} at batch {config.train.batch} ...", flush=True)
        rate = train_rate(config, precision, device, args)
        out["train"][precision] = rate
        out["projected_gpu_hours"][precision] = config.train.kimg * 1000 / rate["images_per_s"] / 3600
        print(f"{name}: sampling {precision} ...", flush=True)
        out["sample"][precision] = sample_rate(config, precision, device, args)
        free(device)
    return out


def gpu_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"


def ratios(presets: dict[str, dict]) -> dict:
    """sCT's and sCD's bf16 step time over EDM's (equal batches), and one step's sampling speed over Heun-35's."""
    out = {}
    rate = lambda name: presets[name]["train"]["bf16"]["images_per_s"]  # noqa: E731
    if "cifar10-edm" in presets:
        out["step_time_ratio_to_edm_bf16"] = {m: rate("cifar10-edm") / rate(f"cifar10-{m}") for m in ("sct", "scd")
                                              if f"cifar10-{m}" in presets}
        if "cifar10-ict" in presets:
            heun = presets["cifar10-edm"]["sample"]["bf16"]["images_per_s"]
            out["one_step_speedup_over_heun35_bf16"] = presets["cifar10-ict"]["sample"]["bf16"]["images_per_s"] / heun
    return out


def run(args: argparse.Namespace) -> dict:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False  # fp32 means fp32
    started = time.perf_counter()
    presets = {name: bench_preset(name, config, device, args)
               for name, config in cifar_presets(args.presets, args.smoke).items()}
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT)
    return {
        "command": "bench/gpu.sh " + " ".join(args.argv),
        "machine": {"gpu": gpu_name(device), "device": device.type, "torch": torch.__version__,
                    "cuda": torch.version.cuda, "commit": commit.stdout.strip(), "date": date.today().isoformat()},
        "smoke": args.smoke, "repeats": args.repeats, "sample_batch": args.sample_batch,
        "presets": presets, **ratios(presets), "seconds": time.perf_counter() - started,
    }


def summary(result: dict) -> str:
    """One line per preset: batch, accumulation, images/s and projected GPU-hours in fp32 / bf16, sampling."""
    lines = [f"{'preset':18} {'batch':>5} {'accum':>9} {'img/s fp32':>11} {'bf16':>8} {'GPU-h fp32':>11} "
             f"{'bf16':>8}  sampling img/s fp32 / bf16"]
    for name, p in result["presets"].items():
        t, h, s = p["train"], p["projected_gpu_hours"], p["sample"]
        lines.append(f"{name:18} {p['batch']:>5} {t['fp32']['accum']:>4} / {t['bf16']['accum']:<2} "
                     f"{t['fp32']['images_per_s']:>11.1f} {t['bf16']['images_per_s']:>8.1f} {h['fp32']:>11.1f} "
                     f"{h['bf16']:>8.1f}  {s['fp32']['sampler']}: {s['fp32']['images_per_s']:.1f} / "
                     f"{s['bf16']['images_per_s']:.1f}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--presets", help="comma-separated CIFAR-10 presets (default: all)")
    parser.add_argument("--repeats", type=int, default=3, help="timed steps per measurement (default 3)")
    parser.add_argument("--sample-batch", type=int, default=512, help="images per sampling batch (default 512)")
    parser.add_argument("--batch-gpu", type=int, help="first try micro-batches of at most this many images")
    parser.add_argument("--oom-above", type=int, help="treat micro-batches above N images as out of memory")
    parser.add_argument("--smoke", action="store_true", help="tiny nets and batches: check every path on a CPU")
    parser.add_argument("--out", help="result file (default bench/results/gpu-<gpu name>.json)")
    args = parser.parse_args(argv)
    args.argv = sys.argv[1:] if argv is None else list(argv)
    if args.smoke:  # one thread: a CPU shared with other jobs stalls multi-threaded kernels at every barrier; one
        # timed call per measurement and no warm-up (the smoke checks the paths, not the times)
        torch.set_num_threads(1)
        args.sample_batch, args.repeats = min(args.sample_batch, 4), 1
        args.oom_above = args.oom_above or SMOKE_OOM_ABOVE
    result = run(args)
    slug = re.sub(r"[^a-z0-9]+", "-", result["machine"]["gpu"].lower()).strip("-")
    default = ROOT / "runs" / "gpu-smoke.json" if args.smoke else ROOT / "bench" / "results" / f"gpu-{slug}.json"
    out = Path(args.out or default)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(summary(result))
    print(f"wrote {out} ({result['seconds']:.0f} s)")


if __name__ == "__main__":
    main()
