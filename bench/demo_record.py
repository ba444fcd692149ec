"""Record what `make demo`'s training did on this machine: the precision train.precision=auto chose, the length
--minutes bought, and the images/s measured while training (metrics.jsonl), with the CPU's name and bf16 flags.

    python bench/demo_record.py runs/demo --minutes 10 [--log train.log] [--note TEXT] [--out bench/results/demo.json]

``--log``: the training's stderr, whose ``cmkit:`` lines (what --minutes measured, what auto chose) are kept.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
from pathlib import Path

import torch

from cmkit.machine import BF16_CPU_FLAGS, auto_precision, cpu_flags, run_config


def cpu_model() -> str:
    """lscpu's 'Model name' (the platform's processor string where lscpu is missing)."""
    try:
        text = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return platform.processor()
    return next((line.split(":", 1)[1].strip() for line in text.splitlines() if line.startswith("Model name")), "")


def training_rate(run: Path) -> tuple[float, float, int]:
    """(images/s over the whole run, seconds spent in training steps, images) from metrics.jsonl: each line's
    images over its images/s is the busy time of the steps it covers."""
    lines = [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines() if ln.strip()]
    images, seconds, before = 0, 0.0, 0
    for line in lines:
        done = round(line["kimg"] * 1000) - before
        images, seconds, before = images + done, seconds + done / line["images_per_s"], round(line["kimg"] * 1000)
    return images / seconds, seconds, images


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path, help="the demo's run directory")
    parser.add_argument("--minutes", type=float, required=True, help="the --minutes the run was trained with")
    parser.add_argument("--log", type=Path, help="the training's stderr")
    parser.add_argument("--note", default="", help="a remark on the conditions of the run")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "demo.json")
    args = parser.parse_args()
    config = run_config(args.run)
    rate, seconds, images = training_rate(args.run)
    record = {
        "cpu": cpu_model(), "cores": os.cpu_count(), "torch": torch.__version__,
        "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "cpu_bf16_flags": sorted(cpu_flags() & BF16_CPU_FLAGS),
        "precision_chosen": config.train.precision, "why": auto_precision(torch.device("cpu"))[1],
        "minutes": args.minutes, "kimg_chosen": config.train.kimg, "batch": config.train.batch,
        "images_trained": images, "training_seconds": round(seconds, 1), "images_per_s": round(rate, 2),
        "load_average_1_5_15": [round(v, 2) for v in os.getloadavg()],
        "log": [] if args.log is None else [ln for ln in args.log.read_text().splitlines() if ln.startswith("cmkit:")],
        "note": args.note,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=2) + "\n")
    print(json.dumps(record, indent=2))


if __name__ == "__main__":
    main()
