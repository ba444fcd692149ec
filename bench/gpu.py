"""GPU benchmark (shared/design/benchmarks.md, section 3): the CIFAR-10-size network on one accelerator.

On random tensors (no dataset, no network access), for the ``cifar10-ict`` preset (DDPM++, ~56M parameters):
- iCT training images/s in fp32 and bf16 (and fp16 with a gradient scaler, channels_last), one optimiser
  step at the given batch, medians of repeats after a warm-up call;
- sampling images/s at batch 512: 1 consistency step, and EDM Heun with 18 steps (35 network evaluations)
  for the ``cifar10-edm`` network of the same size (Heun: at most 2 repeats, to stay under 5 minutes);
- the training step of EDM, sCT and sCD (their forward-mode JVP) on the same network in bf16, as ratios to EDM's
  (sCT and sCD start from a randomly initialised EDM teacher of the same network);
- peak accelerator memory of each variant.

Writes ``bench/results/gpu-<gpu name>.json``. ``--smoke`` runs a tiny net and batch (on the CPU when there is no
GPU) to check the script; its results go to ``runs/gpu-smoke.json`` unless --out says otherwise.
Usage: bench/gpu.sh [--smoke]  (or python bench/gpu.py [--batch 128] [--repeats 5] [--smoke])
"""

from __future__ import annotations

import argparse
import json
import platform
import re
import statistics
import subprocess
import time
from collections.abc import Callable
from dataclasses import replace
from datetime import date
from pathlib import Path

import torch

from cmkit.checkpoint import build_model
from cmkit.config import Config, preset
from cmkit.sampling import default_sigmas, generate, sampling_policy
from cmkit.train import Run

ROOT = Path(__file__).resolve().parent.parent


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_reset(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def peak_gib(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None


def train_timer(config: Config, device: torch.device) -> Callable[[], float]:
    """Seconds of one optimiser step of a fresh run on random images of the config's size (methods that take a
    teacher get a randomly initialised EDM teacher of the same network)."""
    teacher = None
    if config.method.needs_teacher:
        teacher = build_model(replace(config, method=preset("cifar10-edm").method)).to(device).eval()
    run = Run(config, device, teacher=teacher)
    d = config.data
    x0 = torch.rand(config.train.batch, d.channels, d.resolution, d.resolution, device=device) * 2 - 1

    def step() -> float:
        sync(device)
        start = time.perf_counter()
        run.optimizer_step(x0, None)
        sync(device)
        return time.perf_counter() - start

    return step


def sample_timer(config: Config, steps: int, batch: int, device: torch.device,
                 precision: str) -> Callable[[], float]:
    """Seconds to sample one batch (seeds 0..batch-1) with the EMA net of a fresh run of ``config``."""
    model = Run(config, device).ema
    sampler = sampling_policy(model).sampler
    sigmas = default_sigmas(model, steps)

    def sample() -> float:
        sync(device)
        start = time.perf_counter()
        for _ in generate(model, range(batch), sigmas=sigmas, sampler=sampler, batch_size=batch, precision=precision):
            pass
        sync(device)
        return time.perf_counter() - start

    return sample


def measure(timer: Callable[[], float], device: torch.device, repeats: int) -> tuple[float, float | None]:
    """(median seconds over ``repeats`` after one warm-up call, peak GiB)."""
    peak_reset(device)
    timer()
    times = [timer() for _ in range(repeats)]
    return statistics.median(times), peak_gib(device)


def configs(smoke: bool, batch: int) -> tuple[Config, Config]:
    """(iCT, EDM) configs of the CIFAR-10 presets, or tiny ones for --smoke."""
    ict, edm = preset("cifar10-ict"), preset("cifar10-edm")
    if smoke:
        small = dict(model_channels=16, channel_mult=(1, 2), num_blocks=1, attn_resolutions=(16,))
        ict, edm = (replace(c, net=replace(c.net, **small)) for c in (ict, edm))
    return (replace(ict, train=replace(ict.train, batch=batch)), replace(edm, train=replace(edm.train, batch=batch)))


def gpu_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"


def run(args: argparse.Namespace) -> dict:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False  # fp32 means fp32
    ict, edm = configs(args.smoke, args.batch)
    params = sum(p.numel() for p in Run(ict, device).model.parameters())
    train, memory = {}, {}
    variants = {"fp32": {}, "bf16": {"precision": "bf16"}, "fp16": {"precision": "fp16"},
                "bf16 channels_last": {"precision": "bf16", "channels_last": True}}
    for name, change in variants.items():
        print(f"training {name} ...", flush=True)
        seconds, memory[f"train {name}"] = measure(train_timer(replace(ict, train=replace(ict.train, **change)),
                                                               device), device, args.repeats)
        train[name] = args.batch / seconds
    for name in ("edm", "sct", "scd"):  # the same network and batch, each method's loss
        print(f"training {name} bf16 ...", flush=True)
        config = replace(ict, method=preset(f"cifar10-{name}").method, train=replace(ict.train, precision="bf16"))
        seconds, memory[f"train {name} bf16"] = measure(train_timer(config, device), device, args.repeats)
        train[f"{name} bf16"] = args.batch / seconds
    sample = {}
    for name, config, steps, precision in (("1 step fp32", ict, 1, "fp32"), ("1 step bf16", ict, 1, "bf16"),
                                           ("heun 35 NFE fp32", edm, 18, "fp32"),
                                           ("heun 35 NFE bf16", edm, 18, "bf16")):
        print(f"sampling {name} ...", flush=True)
        seconds, memory[f"sample {name}"] = measure(sample_timer(config, steps, args.sample_batch, device,
                                                                 precision), device,
                                                    min(args.repeats, 2) if steps > 1 else args.repeats)
        sample[name] = args.sample_batch / seconds
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT)
    return {
        "command": f"bench/gpu.sh --batch {args.batch} --repeats {args.repeats}" + " --smoke" * args.smoke,
        "machine": {"gpu": gpu_name(device), "device": device.type, "torch": torch.__version__,
                    "cuda": torch.version.cuda, "commit": commit.stdout.strip(), "date": date.today().isoformat()},
        "preset": "cifar10-ict" + " (smoke: tiny net)" * args.smoke, "net_parameters": params,
        "train_batch": args.batch, "sample_batch": args.sample_batch, "repeats": args.repeats,
        "train_images_per_s": train,
        "bf16_train_speedup": train["bf16"] / train["fp32"],
        "step_time_ratio_to_edm_bf16": {m: train["edm bf16"] / train[f"{m} bf16"] for m in ("sct", "scd")},
        "sample_images_per_s": sample,
        "one_step_speedup_over_heun35": sample["1 step bf16"] / sample["heun 35 NFE bf16"],
        "peak_memory_gib": memory,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=128, help="training images per step (default 128)")
    parser.add_argument("--sample-batch", type=int, default=512, help="images per sampling batch (default 512)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--smoke", action="store_true", help="tiny net and batches: check the script on a CPU")
    parser.add_argument("--out", help="result file (default bench/results/gpu-<gpu name>.json)")
    args = parser.parse_args()
    if args.smoke:
        args.batch, args.sample_batch, args.repeats = min(args.batch, 8), min(args.sample_batch, 8), 1
    result = run(args)
    slug = re.sub(r"[^a-z0-9]+", "-", result["machine"]["gpu"].lower()).strip("-")
    default = ROOT / "runs" / "gpu-smoke.json" if args.smoke else ROOT / "bench" / "results" / f"gpu-{slug}.json"
    out = Path(args.out or default)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
