"""One-step latency of a distilled student at the teacher's network size and at the small student's.

For the networks of ``fmnist-cd`` (the teacher's, 1.75M parameters) and ``fmnist-cd-small`` (0.44M), and of the CIFAR-10
pair with ``--cifar``: the seconds of one-step sampling (``generate``, as ``cmkit sample`` runs it) of 1 image and
of a batch of 64, fp32 and bf16 autocast, and the teacher's own sampler (Heun, 18 levels, 35 evaluations) on the
larger network for reference. Medians of interleaved repeats after a warm-up, in one process: run it on an idle
machine. Writes bench/results/latency.json and the table in docs/benchmarks.md.
Usage: python bench/latency.py [--repeats 21] [--cifar]
"""

from __future__ import annotations

import argparse
import json
from dataclasses import replace
from pathlib import Path

from cmkit.checkpoint import build_model
from cmkit.presets import preset
from throughput import interleaved, machine, sample_timer, write_docs_section

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results" / "latency.json"
PAIRS = {"fashion-mnist": ("fmnist-cd", "fmnist-cd-small", "fmnist-edm"),
         "cifar10": ("cifar10-cd", "cifar10-cd-small", "cifar10-edm")}
BATCHES = (1, 64)


def sampling_config(name: str, method_of: str):
    """``name``'s network and data with the method of ``method_of``: the timers build a model without a teacher."""
    return replace(preset(method_of), net=preset(name).net, data=preset(name).data)


def measure(data: str, repeats: int) -> dict:
    """Milliseconds per call: one step for each network, batch and precision; Heun-35 for the teacher's network."""
    large, small, teacher = PAIRS[data]
    timers = {}
    for name in (large, small):
        config = sampling_config(name, "fmnist-ict")
        for batch in BATCHES:
            for precision in ("fp32", "bf16"):
                timers[f"{name} | 1 step | {batch} | {precision}"] = sample_timer(config, 1, batch, precision=precision)
    for batch in BATCHES:
        timers[f"{teacher} | heun 35 NFE | {batch} | fp32"] = sample_timer(sampling_config(large, "fmnist-edm"), 18,
                                                                           batch)
    seconds = interleaved(timers, repeats)
    parameters = {name: sum(p.numel() for p in build_model(preset(name)).parameters()) for name in PAIRS[data]}
    rows = []
    for key, value in seconds.items():
        name, sampler, batch, precision = key.split(" | ")
        rows.append({"network": name, "parameters": parameters[name],
                     "sampler": sampler, "batch": int(batch), "precision": precision, "ms": value * 1000,
                     "images_per_s": int(batch) / value})
    return {"data": data, "rows": rows}


def table(result: dict) -> str:
    m = result["machine"]
    lines = [f"Command: `{result['command']}` -- {m['date']}, commit {m['commit']}, {m['cpu']}, {m['cores']} cores, "
             f"torch {m['torch']}; medians of {result['repeats']} interleaved repeats. `generate` pads CPU batches "
             "under 16 rows to 16 (batch invariance, docs/cli.md), so 1 image costs a 16-row pass.", "",
             "| data | network | parameters | sampler | batch | precision | ms | images/s | vs teacher size |",
             "|---|---|---|---|---|---|---|---|---|"]
    for part in result["parts"]:
        ms = {(r["network"], r["sampler"], r["batch"], r["precision"]): r["ms"] for r in part["rows"]}
        large = PAIRS[part["data"]][0]
        for r in part["rows"]:
            base = ms.get((large, "1 step", r["batch"], r["precision"]))
            ratio = f"{base / r['ms']:.2f}x" if r["sampler"] == "1 step" and base else "-"
            lines.append(f"| {part['data']} | {r['network']} | {r['parameters'] / 1e6:.2f}M | {r['sampler']} | "
                         f"{r['batch']} | {r['precision']} | {r['ms']:.1f} | {r['images_per_s']:.1f} | {ratio} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=21)
    parser.add_argument("--cifar", action="store_true", help="also the CIFAR-10 networks (55.7M and 14.0M)")
    args = parser.parse_args()
    datasets = ["fashion-mnist", *(["cifar10"] if args.cifar else [])]
    result = {"command": f"python bench/latency.py --repeats {args.repeats}" + " --cifar" * args.cifar,
              "machine": machine(), "repeats": args.repeats, "parts": [measure(d, args.repeats) for d in datasets]}
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    write_docs_section("latency", table(result), heading=(
        "## Latency of a smaller student (`bench/latency.py`)\n\nOne-step sampling time of a consistency model at "
        "the teacher's network size and at the small student's (a quarter of the parameters)."))
    print(table(result))


if __name__ == "__main__":
    main()
