"""Quality ladder (docs/benchmarks.md, "Quality ladder"): students against their diffusion teacher.

On Fashion-MNIST 28x28 with the CPU-size presets, every model gets the same training budget (images):
1. the EDM diffusion teacher (fmnist-edm);
2. from it: consistency distillation (fmnist-cd) and easy consistency tuning (fmnist-ect);
3. from scratch: iCT (fmnist-ict) and the original CT (fmnist-ct);
   and the continuous-time sCT (fmnist-sct) and sCD (fmnist-scd), both from the teacher; MeanFlow (fmnist-meanflow)
   from scratch and TCM (fmnist-tcm) from the ECT row;
4. each model is evaluated on N samples with fid-fmnist and on N_INCEPTION with fid-inception (the metric the
   benchmarks decide on: "Metric calibration" in docs/benchmarks.md) at its method's evaluation steps: students at
   1, 2 and 4 steps (for consistency models, 2 steps with the intermediate sigma found by golden-section search on
   fid-fmnist, the affordable metric on 2 cores; MeanFlow at its sampler's default level), the teacher with Heun at
   18 steps (35 evaluations).

Writes bench/results/quality-<size>.json, sample grids and a plot under docs/img/, and the table in
docs/benchmarks.md. Runs resume: a finished model is not trained or evaluated again (its results are kept
in its run directory, ladder-eval.json). ``--only LABEL ...`` trains and evaluates those models (their teachers
are trained when missing, not evaluated) and keeps the other rows of the committed results file, marked with the commit
they come from.
The latent rows (``LATENT_MODELS``; docs/latent.md) train an fmnist-ae autoencoder first, then the guided latent
teacher on its latent and LCM from it at the ladder's budget, and score decoded images: the teacher at 35
evaluations without guidance and with w = 2 (twice the evaluations), LCM at 1, 2 and 4 steps at w = 2.
Usage: python bench/quality.py quick|full [--runs runs/ladder] [--only sCT sCD]
       python bench/quality.py quick --only "latent teacher (EDM)" "latent teacher (EDM), w=2" "LCM (latent), w=2"
"""

from __future__ import annotations

import argparse
import json
import re
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from cmkit import checkpoint
from cmkit.autoencoder import AEConfig, train_autoencoder
from cmkit.codec import Codec, data_codec, resolve_codec
from cmkit.config import Config, apply_overrides
from cmkit.eval.evaluate import evaluate_model, plot_quality, reference_features, tune_two_step_sigma
from cmkit.eval.features import get_extractor
from cmkit.images import save_images, to_numpy_images
from cmkit.methods import Capability, method_entry
from cmkit.presets import ae_preset, preset
from cmkit.sampling import SamplingSpec, default_sigmas, generate
from cmkit.teacher import with_teacher
from cmkit.train import train
from throughput import machine, write_docs_section

ROOT = Path(__file__).resolve().parent.parent
SIZES = {
    "quick": {"kimg": 48, "n": 10_000, "n_inception": 500, "tune_n": 2_000, "tune_iters": 8},
    "full": {"kimg": 200, "n": 10_000, "n_inception": 2_000, "tune_n": 5_000, "tune_iters": 12},
}
# label: (preset, the preset of its teacher or None, --set overrides); the small rows: a quarter of the teacher's
# parameters, distilled (fmnist-cd-small, fmnist-scd-small) and trained from scratch (iCT on the same network)
MODELS = {"teacher (EDM)": ("fmnist-edm", None, ()), "CD": ("fmnist-cd", "fmnist-edm", ()),
          "ECT": ("fmnist-ect", "fmnist-edm", ()), "iCT": ("fmnist-ict", None, ()), "CT": ("fmnist-ct", None, ()),
          "sCT": ("fmnist-sct", "fmnist-edm", ()), "sCD": ("fmnist-scd", "fmnist-edm", ()),
          "CD small": ("fmnist-cd-small", "fmnist-edm", ()), "sCD small": ("fmnist-scd-small", "fmnist-edm", ()),
          "iCT small": ("fmnist-ict", None, ("net.model_channels=16",)),
          # issue 29: MeanFlow from scratch; TCM's stage two of the ECT row (its teacher is that run, whose schedule
          # it continues: 48k images at a stage every 6k end at stage 8; --only TCM trains ECT and its teacher first)
          "MeanFlow": ("fmnist-meanflow", None, ()),
          "MeanFlow small": ("fmnist-meanflow", None, ("net.model_channels=16",)),
          "TCM": ("fmnist-tcm", "fmnist-ect", ("method.start_stage=8",))}
# The latent rows (docs/latent.md): an autoencoder (its preset's images, trained once in the runs folder), the guided
# latent teacher on its latent and LCM from that teacher, both at the ladder's budget, scored decoded; label: (preset,
# the label of its teacher or None, the guidance scale w it samples at or None). The teacher rows share one run; LCM
# is sampled at the teacher's w given as its input, and its FID / teacher is relative to the teacher at that w.
AUTOENCODER = "fmnist-ae"
LATENT_MODELS = {"latent teacher (EDM)": ("fmnist-latent-edm", None, None),
                 "latent teacher (EDM), w=2": ("fmnist-latent-edm", None, 2.0),
                 "LCM (latent), w=2": ("fmnist-lcm", "latent teacher (EDM)", 2.0)}
BATCH = 128  # fastest sampling batch for this net on 2 CPU cores


# bf16 autocast (the committed rows); ``--precision fp32`` where the CPU would emulate bf16 (several times slower)
PRECISIONS = ("bf16", "fp32")
PRECISION_NAMES = {"bf16": "bf16 autocast", "fp32": "fp32"}


def bench_run(config: Config, kimg: float, precision: str = "bf16") -> Config:
    """``config`` trained for ``kimg`` in ``precision`` (all benchmark models alike), one sample grid at the end
    and four checkpoints to resume from."""
    return replace(config, train=replace(config.train, kimg=kimg, precision=precision, snap_kimg=kimg,
                                         ckpt_kimg=kimg / 4))


def train_run(config: Config, run_dir: Path) -> float:
    """Train ``config`` into ``run_dir``, resuming an interrupted run; returns the training's wall seconds (a
    finished run is not trained again: its seconds are kept in ``ladder-train.json``)."""
    record = run_dir / "ladder-train.json"
    if record.exists():
        return json.loads(record.read_text())["seconds"]
    start = time.perf_counter()
    train(config, run_dir, resume=checkpoint.list_states(run_dir) != [])
    seconds = time.perf_counter() - start
    record.write_text(json.dumps({"seconds": seconds, "kimg": config.train.kimg}) + "\n")
    return seconds


def run_name(label: str) -> str:
    """A model's run directory name: its preset, and its overrides if any."""
    name, _, overrides = MODELS[label]
    return "-".join((name, *overrides))


def model_config(name: str, overrides: tuple[str, ...], teacher: Path | None) -> Config:
    """Preset ``name`` with ``--set`` ``overrides``, learning from the ``teacher`` run when given."""
    config = apply_overrides(preset(name), list(overrides))
    return config if teacher is None else with_teacher(config, teacher)


def train_model(label: str, kimg: float, runs: Path, precision: str) -> float:
    """Train the model ``label`` (from its teacher's run in ``runs``) for ``kimg`` in ``precision``; returns wall
    seconds."""
    name, teacher, overrides = MODELS[label]
    config = model_config(name, overrides, teacher and runs / teacher)
    return train_run(bench_run(config, kimg, precision), runs / run_name(label))


def train_ae_run(config: AEConfig, run_dir: Path) -> float:
    """Train the autoencoder ``config`` into ``run_dir``, resuming an interrupted run; returns the training's wall
    seconds (a finished one is kept: its seconds are in ``ladder-train.json``)."""
    record = run_dir / "ladder-train.json"
    if record.exists():
        return json.loads(record.read_text())["seconds"]
    start = time.perf_counter()
    train_autoencoder(config, run_dir, resume=(run_dir / "config.json").exists())
    seconds = time.perf_counter() - start
    record.write_text(json.dumps({"seconds": seconds, "kimg": config.kimg}) + "\n")
    return seconds


def train_latent_model(label: str, kimg: float, runs: Path, precision: str) -> float:
    """Train the latent row ``label`` for ``kimg`` in ``precision`` (its teacher's run, or the autoencoder, trained
    first when missing); returns its wall seconds."""
    name, teacher, _ = LATENT_MODELS[label]
    if teacher is not None:
        train_latent_model(teacher, kimg, runs, precision)
        config = model_config(name, (), runs / LATENT_MODELS[teacher][0])
    else:
        train_ae_run(ae_preset(AUTOENCODER), runs / AUTOENCODER)
        config = replace(preset(name), data=resolve_codec(replace(preset(name).data, codec=str(runs / AUTOENCODER))))
    return train_run(bench_run(config, kimg, precision), runs / name)


def tune_two_step(model: torch.nn.Module, config: Config, spec: SamplingSpec, run_dir: Path, *, n: int, iters: int,
                  extractor, reference: np.ndarray,
                  precision: str = "bf16") -> tuple[float, list[dict[str, float]], SamplingSpec]:
    """Tune the model's 2-step intermediate sigma on FID (in ``precision``) and store it in the run's export, as
    ``cmkit tune-steps`` does; returns the search's best sigma, its history and the tuned spec."""
    best, history = tune_two_step_sigma(model, n=n, extractor=extractor, reference=reference, batch=BATCH,
                                        iters=iters, precision=precision, codec=data_codec(config.data))
    spec = spec.with_tuned(2, [spec.sigma_max, best])
    checkpoint.save_export(model, config, run_dir / checkpoint.EXPORT_NAME, spec=spec)
    return best, history, spec


def grid(model: torch.nn.Module, spec: SamplingSpec, steps: int, path: Path, *, codec: Codec | None = None,
         guidance: float | None = None) -> str:
    """An 8x8 grid of seeds 0-63 at ``steps`` steps, decoded by ``codec`` (None: pixels), at ``guidance``."""
    codec = codec or Codec("identity", model.channels, model.resolution)
    images = np.concatenate([to_numpy_images(codec.to_images(b)) for b in generate(
        model, range(64), sigmas=default_sigmas(spec, steps), sampler=spec.sampler, batch_size=64,
        guidance=guidance)])
    save_images(images, path)
    return str(path.relative_to(ROOT))


def evaluate(label: str, run_dir: Path, size: dict, extractor, reference: np.ndarray, inception,
             inception_reference: np.ndarray, img_dir: Path, *, guidance: float | None = None,
             precision: str = "bf16") -> dict:
    """Tune, evaluate (fid-fmnist: ``rows``; fid-inception: ``inception_rows``) and draw one model, decoded by its
    codec and sampled at ``guidance`` (None: none, or an LCM's default w, the w its 2-step sigma is tuned at), or
    return its stored results when the settings are unchanged."""
    record = run_dir / ("ladder-eval.json" if guidance is None else f"ladder-eval-w{guidance:g}.json")
    settings = size if precision == "bf16" else {**size, "precision": precision}
    if record.exists() and json.loads(record.read_text())["size"] == settings:
        return json.loads(record.read_text())["entry"]
    model, config, spec = checkpoint.load_export(run_dir)
    common = {"batch": BATCH, "precision": precision, "codec": data_codec(config.data), "guidance": guidance}
    entry: dict = {"images_seen": int(config.train.kimg * 1000)}
    if method_entry(config.method.name).can(Capability.TUNE_STEPS):
        best, history, spec = tune_two_step(model, config, spec, run_dir, n=size["tune_n"],
                                            iters=size["tune_iters"], extractor=extractor, reference=reference,
                                            precision=precision)
        entry.update(two_step_sigma=best, tune_history=history)
    steps = spec.eval_steps  # its method's: 1, 2, 4 for consistency and MeanFlow models, Heun-18 for diffusion
    entry["rows"] = evaluate_model(model, spec, steps=steps, n=size["n"], extractor=extractor, reference=reference,
                                   **common)
    entry["inception_rows"] = evaluate_model(model, spec, steps=steps, n=size["n_inception"], extractor=inception,
                                             reference=inception_reference, **common)
    if guidance not in (None, 1) and getattr(model, "guidance_range", None) is None:  # classifier-free: 2 per step
        for row in entry["rows"] + entry["inception_rows"]:
            row["nfe"] *= 2
    slug = re.sub(r"[^a-z0-9]+", "-", label.split(" (")[0].lower()).strip("-")
    slug += f"-w{guidance:g}" if guidance else ""
    entry["grids"] = {k: grid(model, spec, k, img_dir / f"{slug}-{k}step.png", codec=common["codec"],
                              guidance=guidance) for k in steps}
    record.write_text(json.dumps({"size": settings, "entry": entry}, indent=2) + "\n")
    return entry


def table(result: dict) -> str:
    teacher = result["models"]["teacher (EDM)"]["rows"][0]["fid"]
    lines = [f"Command: `{result['command']}` -- {result['machine']['date']}, commit {result['machine']['commit']}, "
             f"{result['machine']['cpu']}, {result['machine']['cores']} cores. Metrics: {result['metric']} on "
             f"{result['n']} samples against {result['n']} training images, and fid-inception (which decides) on "
             f"{result.get('n_inception', '-')} against as many (- where a row predates it; precision and recall are "
             f"fid-fmnist's); {PRECISION_NAMES[result.get('precision', 'bf16')]} for training, tuning and "
             "sampling, all models of this run alike (a row kept from an earlier run keeps its run's). "
             "CD, ECT, sCT and sCD start from the teacher, and the small CD and sCD students "
             "learn from it (their warm-starts counted among their images): their images seen do not count the "
             "teacher's. The small rows' network has a quarter of the parameters (0.44M against 1.75M). "
             "A row marked with a commit comes from that earlier run of this ladder: its "
             "student learnt from that run's teacher (the same config and seed), and its FID / teacher is "
             "relative to that teacher's FID.", "",
             "| model | steps | NFE | fid-inception | fid-fmnist | fid-fmnist / teacher | precision | recall | "
             "images seen | train wall time |", "|---|---|---|---|---|---|---|---|---|---|"]
    for label, entry in result["models"].items():
        name = f"{label} ({entry['from_commit']})" if "from_commit" in entry else label
        reference = entry.get("teacher_fid", teacher)
        inception = {row["steps"]: f"{row['fid']:.1f}" for row in entry.get("inception_rows", [])}
        for row in entry["rows"]:
            lines.append(f"| {name} | {row['steps']} | {row['nfe']} | {inception.get(row['steps'], '-')} | "
                         f"{row['fid']:.2f} | "
                         f"{row['fid'] / reference:.2f} | {row['precision']:.3f} | {row['recall']:.3f} | "
                         f"{entry['images_seen']:,} | {entry['train_seconds'] / 60:.1f} min |")
    sigmas = ", ".join(f"{k}: {v['two_step_sigma']:.3g}" for k, v in result["models"].items() if "two_step_sigma" in v)
    lines += ["", f"Best 2-step intermediate sigma (golden-section search on FID): {sigmas} (papers, CIFAR-10: 0.821).",
              f"FID against network evaluations: `{result['plot']}`. One sample grid per row:", ""]
    for label, entry in result["models"].items():
        lines.append(" ".join(f"![{label}, {k} step(s)]({Path(p).relative_to('docs')})"
                              for k, p in entry["grids"].items()))
    return "\n".join(lines)


def kept_rows(path: Path, chosen: set[str]) -> dict[str, dict]:
    """The entries of the results file at ``path`` for the models not in ``chosen``, each marked with the commit
    of the run it comes from and the FID of that run's teacher."""
    if not path.exists():
        return {}
    result = json.loads(path.read_text())
    commit, teacher = result["machine"]["commit"], result["models"]["teacher (EDM)"]["rows"][0]["fid"]
    return {label: {"from_commit": commit, "teacher_fid": teacher, **entry} for label, entry in result["models"].items()
            if label not in chosen}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("size", choices=SIZES)
    parser.add_argument("--runs", default=str(ROOT / "runs" / "ladder"), help="where the models are trained")
    parser.add_argument("--only", nargs="+", choices=[*MODELS, *LATENT_MODELS], metavar="LABEL",
                        help="train and evaluate only these models (their teachers are trained, not evaluated): "
                             f"{', '.join([*MODELS, *LATENT_MODELS])}")
    parser.add_argument("--precision", choices=PRECISIONS, default="bf16",
                        help="train, tune and sample in bf16 autocast (the committed rows) or fp32 (a CPU without "
                             "native bf16)")
    args = parser.parse_args()
    size, runs = SIZES[args.size], Path(args.runs) / args.size
    out = ROOT / "bench" / "results" / f"quality-{args.size}.json"
    img_dir = ROOT / "docs" / "img" / f"ladder-{args.size}"
    img_dir.mkdir(parents=True, exist_ok=True)
    chosen = set(args.only or [*MODELS, *LATENT_MODELS])  # evaluated; their teachers are trained, not re-evaluated
    trained = set(chosen)
    while needed := {label for label, (name, _, _) in MODELS.items()
                     if any(MODELS[c][1] == name for c in trained if c in MODELS)} - trained:
        trained |= needed
    seconds = {label: train_model(label, size["kimg"], runs, args.precision) for label in MODELS if label in trained}
    seconds |= {label: train_latent_model(label, size["kimg"], runs, args.precision)
                for label in LATENT_MODELS if label in chosen}
    extractor = get_extractor("fid-fmnist")
    reference = reference_features("fashion-mnist", extractor, n=size["n"], resolution=28, channels=1)
    inception = get_extractor("fid-inception")
    inception_reference = reference_features("fashion-mnist", inception, n=size["n_inception"], resolution=28,
                                             channels=1)
    earlier = kept_rows(out, chosen)
    models = {}
    for label in MODELS:
        if label in chosen:
            models[label] = {**evaluate(label, runs / run_name(label), size, extractor, reference, inception,
                                        inception_reference, img_dir, precision=args.precision),
                              "train_seconds": seconds[label]}
        elif label in earlier:
            models[label] = earlier[label]
    for label, (name, _, w) in LATENT_MODELS.items():
        if label in chosen:
            models[label] = {**evaluate(label, runs / name, size, extractor, reference, inception,
                                        inception_reference, img_dir, guidance=w, precision=args.precision),
                              "train_seconds": seconds[label]}
        elif label in earlier:
            models[label] = earlier[label]
    for label, (_, teacher, w) in LATENT_MODELS.items():  # FID / teacher: the latent teacher's at the same w
        guided = next(k for k, v in LATENT_MODELS.items() if v[1] is None and v[2] == w)
        if teacher and label in chosen and guided in models:  # evaluated now or kept from an earlier run
            models[label]["teacher_fid"] = models[guided]["rows"][0]["fid"]
    plot = img_dir / "quality.png"
    plot_quality({label: [(r["nfe"], r["fid"]) for r in e["rows"]] for label, e in models.items()}, plot,
                 metric=extractor.name)
    command = f"python bench/quality.py {args.size}" + (f" --precision {args.precision}" if args.precision != "bf16"
                                                          else "")
    result = {"command": command, "precision": args.precision, "machine": machine(), "metric": extractor.name,
              "n": size["n"], "n_inception": size["n_inception"], "plot": str(plot.relative_to(ROOT)), "models": models}
    out.write_text(json.dumps(result, indent=2) + "\n")
    write_docs_section(f"quality-{args.size}", table(result),
                       heading=f"## Quality ladder, {args.size} (`bench/quality.py {args.size}`)")
    print(table(result))


if __name__ == "__main__":
    main()
