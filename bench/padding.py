"""What batch-invariance padding costs: network-call time at batch sizes that are not multiples of 16.

Until commit 57d5980 every eval-mode call of a wrapped network padded its batch to a multiple of 16 rows
(sampling, editing, evaluation, and CD's teacher, which is loaded in eval mode). Now only `generate` and editing
pad, and only CPU batches under 16 rows. This script times, with the fmnist-sized U-Net (random weights),
1-step sampling through `generate` and one Heun teacher step (`ode_step`, CD's teacher call) at several batch
sizes; run with the code of each commit on PYTHONPATH, alternating, it measures the change:

    python bench/padding.py --compare 57d5980

writes bench/results/padding.json (median milliseconds per call, old and new, per batch size).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BATCHES = (1, 7, 17, 24, 40)


def measure(repeats: int) -> dict:
    """Median milliseconds per call of 1-step `generate` and of a Heun teacher step, per batch size."""
    import torch

    from cmkit.checkpoint import build_model
    from cmkit.presets import preset
    from cmkit.sampling import generate, ode_step

    torch.manual_seed(0)
    student = build_model(preset("fmnist-ict")).eval().requires_grad_(False)
    teacher = build_model(preset("fmnist-edm")).eval().requires_grad_(False)
    out = {}
    for batch in BATCHES:
        x, sigma = torch.randn(batch, 1, 28, 28), torch.full((batch,), 2.0)
        calls = {
            "sample_1step": lambda b=batch: list(generate(student, range(b), sigmas=[80.0], sampler="consistency",
                                                          batch_size=b)),
            "teacher_heun_step": lambda x=x, s=sigma: ode_step(teacher, x, s, s * 0.8, heun=True),
        }
        for name, call in calls.items():
            with torch.no_grad():
                call()
                times = []
                for _ in range(repeats):
                    start = time.perf_counter()
                    call()
                    times.append((time.perf_counter() - start) * 1000)
            out[f"{name}@{batch}"] = statistics.median(times)
    return out


def compare(old: str, rounds: int, repeats: int) -> dict:
    """Alternate runs of this script's measurement under the old commit's and the current code."""
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run(["git", "worktree", "add", "--detach", tmp, old], cwd=ROOT, check=True, capture_output=True)
        try:
            runs = {"old": [], "new": []}
            for _ in range(rounds):
                for which, src in (("old", Path(tmp) / "src"), ("new", ROOT / "src")):
                    env = {**os.environ, "PYTHONPATH": str(src)}
                    text = subprocess.run([sys.executable, __file__, "--measure", str(repeats)], check=True,
                                          capture_output=True, text=True, env=env).stdout
                    runs[which].append(json.loads(text))
        finally:
            subprocess.run(["git", "worktree", "remove", "--force", tmp], cwd=ROOT, check=True)
    keys = runs["new"][0]
    return {k: {w: round(statistics.median(r[k] for r in runs[w]), 2) for w in runs} for k in keys}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--compare", metavar="COMMIT", help="the commit whose code padded every eval-mode call")
    parser.add_argument("--measure", type=int, metavar="REPEATS", help=argparse.SUPPRESS)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=15)
    args = parser.parse_args()
    if args.measure:
        print(json.dumps(measure(args.measure)))
        return
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT)
    result = {"machine": platform.processor() or platform.machine(), "commit": commit.stdout.strip(),
              "old_commit": args.compare, "ms_per_call": compare(args.compare, args.rounds, args.repeats)}
    path = ROOT / "bench" / "results" / "padding.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    for key, row in result["ms_per_call"].items():
        print(f"{key:>24}: old {row['old']:8.2f} ms  new {row['new']:8.2f} ms  ({row['old'] / row['new']:.2f}x)")


if __name__ == "__main__":
    main()
