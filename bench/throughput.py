"""Throughput benchmark (docs/benchmarks.md, "Throughput").

In one process, variants interleaved so machine drift hits all alike; medians over repeats:
- training images/s of one optimiser step for each method (same net, same batch), as a ratio to EDM (CD
  with its Heun teacher step, ECT, sCT and sCD with their forward-mode JVP);
- sampling images/s for 1 step, 2 steps and EDM Heun with 18 steps (35 evaluations), the 1-step / Heun
  ratio, and the 1-step sampler's overhead over a bare forward pass of the network;
- fp32 eager against bf16 autocast, fp16 autocast with a gradient scaler, channels_last and torch.compile, as
  ratios.

Writes bench/results/throughput.json and the table in docs/benchmarks.md.
Usage: python bench/throughput.py [--preset fmnist-ict] [--batch 64] [--repeats 7]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import time
from collections.abc import Callable
from dataclasses import replace
from datetime import date
from pathlib import Path

import torch

from cmkit.checkpoint import build_model
from cmkit.config import Config
from cmkit.methods import method_entry, sampling_spec
from cmkit.presets import PRESETS, preset
from cmkit.sampling import SeededNoise, default_sigmas, generate
from cmkit.train import Run

ROOT = Path(__file__).resolve().parent.parent
METHODS = {"edm": "fmnist-edm", "ct": "fmnist-ct", "ict": "fmnist-ict", "cd": "fmnist-cd", "ect": "fmnist-ect",
           "sct": "fmnist-sct", "scd": "fmnist-scd", "meanflow": "fmnist-meanflow", "tcm": "fmnist-tcm"}


def method_config(base: Config, method: str, *, precision: str = "fp32") -> Config:
    """``base``'s net, data and batch with the method (and its optimiser) of ``METHODS[method]``."""
    other = PRESETS[METHODS[method]][1]
    train = replace(base.train, optimizer=other.train.optimizer, precision=precision)
    return replace(base, method=other.method, train=train)


def train_step_timer(config: Config, *, compile_model: bool = False,
                     channels_last: bool = False) -> Callable[[], float]:
    """A function timing one optimiser step of a fresh run of ``config`` on random data (methods with a teacher
    get a randomly initialised EDM teacher of the same net)."""
    teacher = None
    if method_entry(config.method.name).teacher.takes_teacher:
        teacher = build_model(method_config(config, "edm")).eval().requires_grad_(False)
    config = replace(config, train=replace(config.train, compile=compile_model, channels_last=channels_last))
    run = Run(config, torch.device("cpu"), teacher=teacher)
    d = config.data
    x0 = torch.rand(config.train.batch, d.channels, d.resolution, d.resolution) * 2 - 1

    def step() -> float:
        start = time.perf_counter()
        run.optimizer_step(x0, None)
        return time.perf_counter() - start

    return step


def sample_timer(config: Config, steps: int, batch: int, *, bare: bool = False,
                 precision: str = "fp32") -> Callable[[], float]:
    """A function timing the sampling of one batch (or one bare forward pass of the network)."""
    model, spec = Run(config, torch.device("cpu")).ema, sampling_spec(config.method)
    sampler = spec.sampler
    sigmas = default_sigmas(spec, steps)
    noise = SeededNoise(range(batch), (config.data.channels, config.data.resolution, config.data.resolution))()
    c_noise = torch.zeros(batch)

    @torch.no_grad()
    def sample() -> float:
        start = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
            if bare:
                model.net(noise, c_noise, None)
            else:
                for _ in generate(model, range(batch), sigmas=sigmas, sampler=sampler, batch_size=batch):
                    pass
        return time.perf_counter() - start

    return sample


def interleaved(timers: dict[str, Callable[[], float]], repeats: int) -> dict[str, float]:
    """Median seconds per call of each timer, after one warm-up call each, calls interleaved."""
    for timer in timers.values():
        timer()
    times: dict[str, list[float]] = {name: [] for name in timers}
    for _ in range(repeats):
        for name, timer in timers.items():
            times[name].append(timer())
    return {name: statistics.median(ts) for name, ts in times.items()}


def compile_works() -> tuple[bool, str]:
    try:
        timer = train_step_timer(replace(preset("fmnist-ict"), net=replace(preset("fmnist-ict").net,
                                                                          model_channels=8)), compile_model=True)
        timer()
        return True, ""
    except Exception as e:  # noqa: BLE001 -- report why compile is unavailable instead of failing the benchmark
        return False, f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"


def measure(base: Config, batch: int, repeats: int) -> dict:
    base = replace(base, train=replace(base.train, batch=batch))
    print("training steps ...", flush=True)
    train = interleaved({m: train_step_timer(method_config(base, m)) for m in METHODS}, repeats)
    print("sampling ...", flush=True)
    cm, edm = method_config(base, "ict"), method_config(base, "edm")
    samp = interleaved({"forward": sample_timer(cm, 1, batch, bare=True), "1 step": sample_timer(cm, 1, batch),
                        "2 steps": sample_timer(cm, 2, batch), "heun 35 NFE": sample_timer(edm, 18, batch)},
                       repeats)
    print("precision and compile ...", flush=True)
    prec_timers = {"ict fp32": train_step_timer(method_config(base, "ict")),
                   "ict bf16": train_step_timer(method_config(base, "ict", precision="bf16")),
                   "ict fp16": train_step_timer(method_config(base, "ict", precision="fp16")),
                   "ict channels_last": train_step_timer(method_config(base, "ict"), channels_last=True),
                   "1 step fp32": sample_timer(cm, 1, batch), "1 step bf16": sample_timer(cm, 1, batch,
                                                                                           precision="bf16")}
    ok, why = compile_works()
    if ok:
        prec_timers["ict compiled"] = train_step_timer(method_config(base, "ict"), compile_model=True)
    prec = interleaved(prec_timers, repeats)
    return {
        "train_images_per_s": {m: batch / s for m, s in train.items()},
        "train_ratio_to_edm": {m: s / train["edm"] for m, s in train.items()},
        "sample_images_per_s": {k: batch / s for k, s in samp.items()},
        "one_step_speedup_over_heun35": samp["heun 35 NFE"] / samp["1 step"],
        "one_step_overhead_over_forward": samp["1 step"] / samp["forward"],
        "bf16_train_speedup": prec["ict fp32"] / prec["ict bf16"],
        "bf16_sample_speedup": prec["1 step fp32"] / prec["1 step bf16"],
        "fp16_train_speedup": prec["ict fp32"] / prec["ict fp16"],
        "channels_last_train_speedup": prec["ict fp32"] / prec["ict channels_last"],
        "compile_train_speedup": prec["ict fp32"] / prec["ict compiled"] if ok else None,
        "compile_unavailable": why or None,
    }


def machine() -> dict:
    cpu = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                if ln.startswith("model name")), platform.processor())
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT)
    return {"cpu": cpu, "cores": os.cpu_count(), "threads": torch.get_num_threads(), "torch": torch.__version__,
            "gpu": None, "commit": commit.stdout.strip(), "date": date.today().isoformat()}


def table(result: dict) -> str:
    r, m = result["results"], result["machine"]
    rows = [f"Command: `{result['command']}` -- {m['date']}, commit {m['commit']}, {m['cpu']}, {m['cores']} cores, "
            f"torch {m['torch']}, net {result['net_parameters'] / 1e6:.2f}M parameters, batch {result['batch']}, "
            f"medians of {result['repeats']} interleaved repeats.", "",
            "| training step | images/s | time vs EDM step |", "|---|---|---|"]
    rows += [f"| {k} | {v:.1f} | {r['train_ratio_to_edm'][k]:.2f}x |" for k, v in r["train_images_per_s"].items()]
    rows += ["", "| sampling | images/s |", "|---|---|"]
    rows += [f"| {k} | {v:.1f} |" for k, v in r["sample_images_per_s"].items()]
    compile_text = (f"{r['compile_train_speedup']:.2f}x" if r["compile_train_speedup"]
                    else f"unavailable ({r['compile_unavailable']})")
    rows += ["", f"- 1-step sampling is {r['one_step_speedup_over_heun35']:.1f}x faster than Heun-35 (limit 35x); "
             f"its overhead over a bare forward pass is {r['one_step_overhead_over_forward']:.2f}x (limit 1.0x).",
             f"- bf16 autocast: training {r['bf16_train_speedup']:.2f}x, 1-step sampling "
             f"{r['bf16_sample_speedup']:.2f}x faster than fp32; torch.compile (iCT step): {compile_text}.",
             f"- fp16 autocast with a gradient scaler (iCT step): {r['fp16_train_speedup']:.2f}x; channels_last: "
             f"{r['channels_last_train_speedup']:.2f}x (ratios to fp32 eager; above 1 is faster)."]
    return "\n".join(rows)


def write_docs_section(key: str, body: str, *, heading: str) -> None:
    """Put ``body`` between ``<!-- key:start -->`` and ``<!-- key:end -->`` in docs/benchmarks.md; where the
    markers are missing, append ``heading`` (a section title and any text under it) and the markers first."""
    docs = ROOT / "docs" / "benchmarks.md"
    start, end = f"<!-- {key}:start -->", f"<!-- {key}:end -->"
    text = docs.read_text()
    if start not in text:
        text += f"\n{heading}\n\n{start}\n{end}\n"
    head, _, rest = text.partition(start)
    docs.write_text(f"{head}{start}\n{body}\n{end}{rest.partition(end)[2]}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="fmnist-ict", help="net, data size and batch come from this preset")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "throughput.json"))
    args = parser.parse_args()
    base = preset(args.preset)
    params = sum(p.numel() for p in Run(base, torch.device("cpu")).model.parameters())
    result = {"command": f"python bench/throughput.py --preset {args.preset} --batch {args.batch} "
                         f"--repeats {args.repeats}",
              "machine": machine(), "batch": args.batch, "repeats": args.repeats, "net_parameters": params,
              "results": measure(base, args.batch, args.repeats)}
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    write_docs_section("throughput", table(result), heading="## Throughput (`bench/throughput.py`)")
    print(table(result))


if __name__ == "__main__":
    main()
