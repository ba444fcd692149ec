"""Time to quality (docs/benchmarks.md): one-step FID against total training minutes, teacher included.

Every route cmkit has to a one-step model on Fashion-MNIST gets budgets of 5, 10 and 20 minutes of this machine
(2 CPU cores, bf16 autocast): iCT (also on a quarter-size network) and CT from scratch; an EDM teacher, then CD,
ECT, sCT or sCD from it, with the budget split between teacher and student (split = the teacher's share; searched
at 10 minutes, where each route also tries 0.3 and 0.7; the other budgets use the split that won at 10 minutes,
0.5 until it is known).
Schedules depend on a run's length, so each budget is its own run.

Budgets count images, not seconds, so that the result does not depend on what else the machine was doing:
``calibrate [--routes ...]`` (run it alone on the machine, all cores) times a short real training run of each
route's config and stores its images/s in bench/results/time-rates.json; a budget of M minutes then trains
``M * 60 * images/s`` images. Each run's actual wall time is recorded beside it. Routes added later, on a machine
that is not idle, get ``relative`` rates: the calibrated rate of iCT-small times the ratio of their step speeds,
measured side by side in one process (``relative`` entries of the rates file).

Each model is evaluated with fid-fmnist on N samples at 1 and 2 steps (the 2-step intermediate sigma tuned by
golden-section search on FID) and with fid-inception on a subset at 1 step (the Inception network runs at about
8 images/s on 2 cores). Runs and evaluations resume: finished ones are kept in their run directories, and
the rows of the committed results file are kept (a later session adds its runs to them). Writes
bench/results/time-to-quality.json, docs/img/time-to-quality.png, sample grids under docs/img/time-to-quality/
and the table in docs/benchmarks.md from whatever runs are finished.

The latent route ("latent LCM", docs/latent.md) trains three models: the autoencoder (``cmkit train-ae``,
``AE_SHARE`` of the budget), the guided latent teacher on its latent, then LCM from that teacher (the rest split
between them as for the other teacher routes), all their minutes counted. Its students are evaluated decoded, at
the LCM's default guidance scale (w = 2). Its three configs' rates (autoencoder, guided latent teacher, LCM)
were measured at commit 9bcc559 by whole 4k-image training runs between two runs of fmnist-edm in one process
(its ``relative`` record in the rates file: ratios, measured rates, load average), before ``relative`` was the one
way to add a rate; ``relative`` times a student's training step on random data, which covers no autoencoder.

Usage: python bench/time_to_quality.py calibrate
       python bench/time_to_quality.py relative --routes MeanFlow TCM [--repeats 7]
       python bench/time_to_quality.py run [--budgets 10] [--routes iCT CD] [--splits 0.5] [--runs runs/time]
       python bench/time_to_quality.py report
Several ``run`` processes with disjoint routes may work at once (OMP_NUM_THREADS=1 each).
"""

from __future__ import annotations

import argparse
import fcntl
import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path

from cmkit import checkpoint
from cmkit.codec import data_codec, resolve_codec
from cmkit.eval.evaluate import evaluate_model, reference_features, save_figure
from cmkit.eval.features import get_extractor
from cmkit.presets import ae_preset, preset
from cmkit.train import train
from quality import BATCH, PRECISIONS, bench_run, grid, model_config, train_ae_run, train_run, tune_two_step
from throughput import machine, write_docs_section

ROOT = Path(__file__).resolve().parent.parent
RATES = ROOT / "bench" / "results" / "time-rates.json"
RESULTS = ROOT / "bench" / "results" / "time-to-quality.json"
PLOT = ROOT / "docs" / "img" / "time-to-quality.png"
GRIDS = ROOT / "docs" / "img" / "time-to-quality"
BUDGETS = (5, 10, 20)  # minutes
SEARCH_BUDGET, SPLITS, DEFAULT_SPLIT = 10, (0.3, 0.5, 0.7), 0.5
EVAL = {"n": 2_000, "tune_n": 500, "tune_iters": 5, "inception_n": 500}
CALIBRATE_KIMG = 4.0  # a log line every 1k images
TEACHER = "fmnist-edm"
AE_SHARE = 0.05  # a latent route's autoencoder: this share of the budget (at 10 minutes, about fmnist-ae's 30k images)


@dataclass(frozen=True)
class Route:
    """A way to a one-step model: ``preset`` with ``overrides``, after a ``teacher`` preset run when given, or after
    the run of route ``stage_one`` (TCM's stage one, its --teacher, with all its own minutes) when given; a route with
    ``kimg`` trains that many images whatever the budget (a fixed configuration to compare against)."""

    preset: str
    overrides: tuple[str, ...] = ()
    teacher: str | None = None
    kimg: float | None = None
    speed_of: tuple[str, ...] | None = None  # the overrides that change its speed, when not all of them do
    autoencoder: str | None = None  # a latent route: this ``cmkit train-ae`` preset first, AE_SHARE of the budget
    stage_one: str | None = None

    @property
    def split(self) -> bool:
        """True when its budget is split between what comes first (a teacher or a stage one) and itself."""
        return bool(self.teacher or self.stage_one)

    @property
    def key(self) -> str:
        """What its training speed depends on: the preset and the overrides (or ``speed_of``)."""
        return " ".join((self.preset, *(self.overrides if self.speed_of is None else self.speed_of)))


ROUTES = {
    "iCT": Route("fmnist-ict"),
    "CT-mu0.9": Route("fmnist-ct", ("method.mu0=0.9", "method.distance=l2"), speed_of=()),  # the paper's values
    "CD": Route("fmnist-cd", teacher=TEACHER),
    "ECT": Route("fmnist-ect", teacher=TEACHER),
    "sCT": Route("fmnist-sct", teacher=TEACHER),
    "sCD": Route("fmnist-scd", teacher=TEACHER),
    "iCT-b32-s40": Route("fmnist-ict", ("train.batch=32", "method.s1=40"), speed_of=("train.batch=32",)),
    "CT-mu0": Route("fmnist-ct", ("method.mu0=0", "method.distance=l2"), speed_of=("method.mu0=0",)),
    "CT-mu0-huber": Route("fmnist-ct", ("method.mu0=0", "method.distance=pseudo-huber")),
    "demo-before": Route("fmnist-ict", kimg=48),
    "iCT-small": Route("fmnist-ict", ("net.model_channels=16",)),  # fmnist-cd-small's network, a quarter the size
    "latent LCM": Route("fmnist-lcm", teacher="fmnist-latent-edm", autoencoder="fmnist-ae"),
    "MeanFlow": Route("fmnist-meanflow"),
    "MeanFlow-small": Route("fmnist-meanflow", ("net.model_channels=16",)),
    # TCM's stage two after the stage one's share of the minutes (split): the paper's ECT from an EDM teacher, and iCT
    # on the small network. Stage two continues an ECT stage one's schedule (its stage is set from its images); after
    # iCT (N = 81 at the end), stage 4 gives t - r about iCT's final grid gap near t' = 1.
    "TCM": Route("fmnist-tcm", stage_one="ECT", speed_of=()),
    "TCM-small": Route("fmnist-tcm", ("net.model_channels=16", "method.start_stage=4"), stage_one="iCT-small",
                       speed_of=("net.model_channels=16",)),
}
# The reference of ``relative``: routes added after the idle calibration get its calibrated rate times the ratio of
# their step speed to its, measured side by side in one process (the machine need not be idle).
REFERENCE = "iCT-small"


def ae_key(name: str) -> str:
    """The rates file's key of the ``cmkit train-ae`` preset ``name``."""
    return f"train-ae {name}"


# ------------------------------------------------------------------------------------------- calibration

def calibrate(keys: dict[str, Route]) -> dict[str, float]:
    """Images/s of each route's config (and of the teacher's, when a route has one) in a fresh ``CALIBRATE_KIMG``
    training run in a scratch directory: the images over the seconds of the training steps after the first log
    line (the steady state; a run's start-up and saves, a few seconds each, are left out). A teacher route learns
    from the teacher run just timed. Other rates in the rates file are kept, so routes can be added later."""
    load = os.getloadavg()[0]
    if load > 0.5:
        print(f"warning: load average {load:.2f}: calibrate alone on the machine, or the rates are too low")
    rates: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as scratch:
        teacher = Path(scratch) / "teacher"
        teachers = {TEACHER: Route(TEACHER)} if any(route.teacher for route in keys.values()) else {}
        for key, route in {**teachers, **keys}.items():
            config = model_config(route.preset, route.overrides, teacher if route.teacher else None)
            config = bench_run(config, CALIBRATE_KIMG)
            out = teacher if key == TEACHER else Path(scratch) / "run"
            train(config, out)
            rates[key] = steady_rate(out, config.train.batch)
            print(f"{key}: {rates[key]:.1f} images/s")
            if out != teacher:
                shutil.rmtree(out)
    return rates


def steady_rate(run_dir: Path, batch: int) -> float:
    """Images/s of a run's training steps after its first log line (``metrics.jsonl``: ``step``, ``images_per_s``
    of the span since the previous line), ``batch`` images a step."""
    logged = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    spans = [((r["step"] - prev["step"]) * batch, r["images_per_s"])
             for prev, r in zip(logged, logged[1:], strict=False)]
    return sum(n for n, _ in spans) / sum(n / speed for n, speed in spans)


def relative(keys: dict[str, Route], rates: dict[str, float], repeats: int,
             precision: str) -> dict[str, dict[str, float]]:
    """Images/s of each route's config as ``rates[REFERENCE's key]`` times the ratio of the reference's seconds per
    optimiser step to the route's (interleaved medians of ``repeats`` steps on random data in this process, both at
    their own batch: bench/throughput.py's timers), so that a busy machine slows both alike."""
    from throughput import interleaved, train_step_timer

    reference = ROUTES[REFERENCE]
    configs = {key: bench_run(model_config(route.preset, route.overrides, None), CALIBRATE_KIMG,
                          precision)
               for key, route in {reference.key: reference, **keys}.items()}
    seconds = interleaved({key: train_step_timer(config) for key, config in configs.items()}, repeats)
    per_image = {key: seconds[key] / configs[key].train.batch for key in configs}
    base = rate(reference.key, rates)
    return {key: {"rate": base * per_image[reference.key] / per_image[key],
                  "vs_reference": per_image[reference.key] / per_image[key]} for key in keys}


def load_rates() -> dict[str, float]:
    return json.loads(RATES.read_text())["rates"] if RATES.exists() else {}


def rate(key: str, rates: dict[str, float]) -> float:
    if key not in rates:
        raise SystemExit(f"no training rate for '{key}' in {RATES}: run `python bench/time_to_quality.py calibrate` "
                         "alone on the machine first")
    return rates[key]


# ---------------------------------------------------------------------------------------------- training

@dataclass(frozen=True)
class Plan:
    """One benchmark run: ``route`` with ``budget`` minutes, ``split`` of them for its teacher."""

    label: str
    route: Route
    budget: float
    split: float

    def name(self) -> str:
        slug = self.label.lower().replace(" ", "-")
        if self.route.kimg is not None:
            return slug
        return f"{slug}-{self.budget:g}m" + (f"-split{self.split:g}" if self.route.split else "")

    def kimg(self, rates: dict[str, float]) -> tuple[float, float, float]:
        """(autoencoder kimg, teacher kimg, student kimg) of the budget."""
        if self.route.kimg is not None:
            return 0.0, 0.0, self.route.kimg
        seconds, ae = self.budget * 60, 0.0
        if self.route.stage_one:  # the stage one's images: its own plan (train_plan)
            return 0.0, 0.0, seconds * (1 - self.split) * rate(self.route.key, rates) / 1000
        if self.route.autoencoder:
            ae = seconds * AE_SHARE * rate(ae_key(self.route.autoencoder), rates) / 1000
            seconds *= 1 - AE_SHARE
        if self.route.teacher is None:
            return ae, 0.0, seconds * rate(self.route.key, rates) / 1000
        return (ae, seconds * self.split * rate(self.route.teacher, rates) / 1000,
                seconds * (1 - self.split) * rate(self.route.key, rates) / 1000)


def best_splits(results: dict[str, dict]) -> dict[str, float]:
    """Per route, the split whose run at ``SEARCH_BUDGET`` minutes has the lowest 1-step fid-fmnist."""
    best: dict[str, tuple[float, float]] = {}
    for entry in results.values():
        if entry["budget"] == SEARCH_BUDGET and entry["teacher_kimg"] > 0:
            fid = entry["fid_fmnist"][0]["fid"]
            if entry["route"] not in best or fid < best[entry["route"]][1]:
                best[entry["route"]] = (entry["split"], fid)
    return {route: split for route, (split, _) in best.items()}


def plans(labels: list[str], budget: float, known: dict[str, float], search: tuple[float, ...]) -> list[Plan]:
    """The runs of ``budget`` minutes for the routes ``labels``, at the splits ``known`` per route (the splits
    ``search`` at the search budget); a fixed-size route's one run whatever the budget."""
    out = []
    for label in labels:
        route = ROUTES[label]
        if route.kimg is not None:
            out.append(Plan(label, route, 0, 0.0))
        elif not route.split:
            out.append(Plan(label, route, budget, 0.0))
        else:
            splits = search if budget == SEARCH_BUDGET else (known.get(label, DEFAULT_SPLIT),)
            out += [Plan(label, route, budget, split) for split in splits]
    return out


def train_plan(plan: Plan, runs: Path, rates: dict[str, float], precision: str) -> dict:
    """Train the plan's autoencoder, teacher or stage one (each shared by the plans with the same images; a lock
    keeps concurrent processes from training one twice) and its student; their sizes, minutes and wall seconds."""
    route = plan.route
    ae_kimg, teacher_kimg, student_kimg = plan.kimg(rates)
    teacher_dir, ae_dir, seconds = None, None, 0.0
    minutes = student_kimg * 1000 / rate(route.key, rates) / 60
    overrides = route.overrides
    if route.stage_one:
        first, overrides = stage_one(plan, runs, rates, precision)
        teacher_dir, teacher_kimg = runs / first["name"], first["teacher_kimg"] + first["student_kimg"]
        minutes, seconds = minutes + first["minutes"], first["wall_seconds"]
    if route.autoencoder:
        ae_kimg = round(ae_kimg, 1)
        ae_dir = runs / f"{route.autoencoder}-{ae_kimg:g}k"
        with _lock(runs, ae_dir.name):
            seconds += train_ae_run(replace(ae_preset(route.autoencoder), kimg=ae_kimg), ae_dir)
        minutes += ae_kimg * 1000 / rate(ae_key(route.autoencoder), rates) / 60
    if route.teacher:
        teacher_kimg = round(teacher_kimg, 1)
        config = bench_run(preset(route.teacher), teacher_kimg, precision)
        if ae_dir is None:
            teacher_dir = runs / f"teacher-{teacher_kimg:g}k"
        else:
            teacher_dir = runs / f"{route.teacher}-{ae_dir.name}-{teacher_kimg:g}k"
            config = replace(config, data=resolve_codec(replace(config.data, codec=str(ae_dir))))
        with _lock(runs, teacher_dir.name):
            seconds += train_run(config, teacher_dir)
        minutes += teacher_kimg * 1000 / rate(route.teacher, rates) / 60
    student = model_config(route.preset, overrides, teacher_dir)
    seconds += train_run(bench_run(student, student_kimg, precision), runs / plan.name())
    described = " ".join((route.preset, *route.overrides))
    if ae_dir is not None:
        described = f"{route.autoencoder} ({ae_kimg * 1000:,.0f} images) -> {route.teacher} (guided) -> {described}"
    return {"route": plan.label, "config": described, "budget": plan.budget, "split": plan.split,
            "autoencoder_kimg": ae_kimg, "teacher_kimg": teacher_kimg, "student_kimg": student_kimg,
            "minutes": minutes, "wall_seconds": seconds}


@contextmanager
def _lock(runs: Path, name: str):
    """An exclusive lock on ``runs/name.lock`` while the block runs (one process trains a shared model)."""
    runs.mkdir(parents=True, exist_ok=True)
    with open(runs / f"{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def stage_one(plan: Plan, runs: Path, rates: dict[str, float], precision: str) -> tuple[dict, tuple[str, ...]]:
    """Train the stage one of a TCM plan (route ``plan.route.stage_one`` for ``split`` of the minutes, at that
    route's best split); its sizes (and name), and the stage two's overrides, continuing an ECT stage one's stage."""
    label = plan.route.stage_one
    first = Plan(label, ROUTES[label], plan.budget * plan.split, best_splits(collect(runs)).get(label, DEFAULT_SPLIT))
    sizes = {**train_plan(first, runs, rates, precision), "name": first.name()}
    method = model_config(first.route.preset, first.route.overrides, None).method
    more = (f"method.start_stage={int(sizes['student_kimg'] // method.stage_kimg)}",) \
        if hasattr(method, "stage_kimg") else ()
    return sizes, (*plan.route.overrides, *more)


# -------------------------------------------------------------------------------------------- evaluation

def evaluate(plan: Plan, run_dir: Path, extractors: dict, references: dict, precision: str) -> dict:
    """fid-fmnist at 1 and 2 steps (2-step sigma tuned), fid-inception at 1 step, grids; kept in the run."""
    record = run_dir / "time-eval.json"
    if record.exists() and json.loads(record.read_text())["settings"] == EVAL:
        return json.loads(record.read_text())["entry"]
    model, config, spec = checkpoint.load_export(run_dir)
    fmnist, inception = extractors["fid-fmnist"], extractors["fid-inception"]
    best, _, spec = tune_two_step(model, config, spec, run_dir, n=EVAL["tune_n"], iters=EVAL["tune_iters"],
                                  extractor=fmnist, reference=references["fid-fmnist"], precision=precision)
    codec = data_codec(config.data)  # latent models are scored and drawn decoded
    common = {"batch": BATCH, "precision": precision, "codec": codec}
    entry = {"two_step_sigma": best,
             "fid_fmnist": evaluate_model(model, spec, steps=(1, 2), n=EVAL["n"], extractor=fmnist,
                                          reference=references["fid-fmnist"], **common),
             "fid_inception": evaluate_model(model, spec, steps=(1,), n=EVAL["inception_n"], extractor=inception,
                                             reference=references["fid-inception"], **common),
             "grids": {k: grid(model, spec, k, GRIDS / f"{plan.name()}-{k}step.png", codec=codec) for k in (1, 2)}}
    record.write_text(json.dumps({"settings": EVAL, "entry": entry}, indent=2) + "\n")
    return entry


def load_references() -> tuple[dict, dict]:
    extractors = {name: get_extractor(name) for name in ("fid-fmnist", "fid-inception")}
    sizes = {"fid-fmnist": 10_000, "fid-inception": EVAL["inception_n"]}
    references = {name: reference_features("fashion-mnist", extractors[name], n=sizes[name], resolution=28,
                                           channels=1) for name in extractors}
    return extractors, references


# ------------------------------------------------------------------------------------------------ report

def collect(runs: Path) -> dict[str, dict]:
    """Every finished and evaluated run: those in the committed results file (runs of earlier sessions, maybe on
    other machines) updated by those under ``runs``, by run name."""
    results = json.loads(RESULTS.read_text())["runs"] if RESULTS.exists() else {}
    for record in sorted(runs.glob("*/time-run.json")):
        evaluation = record.parent / "time-eval.json"
        if evaluation.exists():
            results[record.parent.name] = {**json.loads(record.read_text()),
                                           **json.loads(evaluation.read_text())["entry"]}
    return results


def table(result: dict) -> str:
    m = result["machine"]
    lines = [f"Command: `{result['command']}` -- {m['date']}, commit {m['commit']}, {m['cpu']}, {m['cores']} cores. "
             f"Minutes are training minutes of this machine at the calibrated images/s (`bench/results/"
             f"time-rates.json`), teacher included; wall is the runs' measured time (longer where runs shared the "
             f"machine). fid-fmnist on {EVAL['n']} samples, fid-inception on {EVAL['inception_n']} (1 step); the "
             "2-step intermediate sigma is tuned by golden-section search on fid-fmnist. Split: the teacher's share.",
             "", "| route | config | minutes | split | teacher images | student images | wall | fid-fmnist 1 step | "
             "2 steps | fid-inception 1 step | precision | recall |", "|---" * 12 + "|"]
    for entry in sorted(result["runs"].values(), key=lambda e: (e["minutes"], e["route"], e["split"])):
        one, two = entry["fid_fmnist"]
        split = f"{entry['split']:g}" if entry["teacher_kimg"] else "-"
        lines.append(f"| {entry['route']} | {entry['config']} | {entry['minutes']:.1f} | {split} | "
                     f"{entry['teacher_kimg'] * 1000:,.0f} | "
                     f"{entry['student_kimg'] * 1000:,.0f} | {entry['wall_seconds'] / 60:.1f} min | {one['fid']:.2f} | "
                     f"{two['fid']:.2f} | {entry['fid_inception'][0]['fid']:.1f} | {one['precision']:.3f} | "
                     f"{one['recall']:.3f} |")
    lines += ["", f"![one-step FID against training minutes]({PLOT.relative_to(ROOT / 'docs')})", "",
              "Sample grids (1 step, 2 steps): " + ", ".join(
                  f"{name}: [1]({Path(e['grids']['1']).relative_to('docs')}), "
                  f"[2]({Path(e['grids']['2']).relative_to('docs')})" for name, e in sorted(result["runs"].items()))]
    return "\n".join(lines)


def plot(results: dict[str, dict], path: Path) -> None:
    """One-step fid-fmnist and fid-inception against minutes, one line per route at its best split."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    splits = best_splits(results)
    fig, axes = plt.subplots(1, 2, figsize=(10, 4), dpi=120)
    colors = plt.cm.tab20.colors  # more routes than the default cycle's 10 colours
    for label, color in zip(ROUTES, colors[::2] + colors[1::2], strict=False):
        points = sorted((e["minutes"], e["fid_fmnist"][0]["fid"], e["fid_inception"][0]["fid"])
                        for e in results.values() if e["route"] == label
                        and (not e["teacher_kimg"] or e["split"] == splits.get(label, DEFAULT_SPLIT)))
        if points:
            minutes, fmnist, inception = zip(*points, strict=True)
            for ax, values in zip(axes, (fmnist, inception), strict=True):
                ax.plot(minutes, values, marker="o", label=label, color=color)
    for ax, metric in zip(axes, ("fid-fmnist", "fid-inception"), strict=True):
        ax.set_xlabel("training minutes on 2 CPU cores, teacher included")
        ax.set_ylabel(f"1-step FID ({metric})")
        ax.set_yscale("log")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    save_figure(fig, path)


def report(runs: Path) -> None:
    results = collect(runs)
    if not results:
        raise SystemExit(f"no evaluated runs under {runs} or in {RESULTS}")
    plot(results, PLOT)
    result = {"command": "python bench/time_to_quality.py run && python bench/time_to_quality.py report",
              "machine": machine(), "eval": EVAL, "rates": load_rates(), "runs": results}
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    write_docs_section("time-to-quality", table(result), heading="## Time to quality (`bench/time_to_quality.py`)")
    print(table(result))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("command", choices=("calibrate", "relative", "run", "report"))
    parser.add_argument("--precision", choices=PRECISIONS, default="bf16",
                        help="run/relative: bf16 autocast (as calibrated) or fp32 (a CPU without native bf16)")
    parser.add_argument("--repeats", type=int, default=7, help=f"relative: steps timed per route and {REFERENCE}")
    parser.add_argument("--runs", type=Path, default=ROOT / "runs" / "time", help="where the models are trained")
    parser.add_argument("--budgets", nargs="+", type=float, default=list(BUDGETS), help="minutes")
    parser.add_argument("--routes", nargs="+", choices=ROUTES, default=list(ROUTES), metavar="ROUTE",
                        help=f"routes to run: {', '.join(ROUTES)}")
    parser.add_argument("--splits", nargs="+", type=float, default=list(SPLITS),
                        help=f"the teacher's shares to try at {SEARCH_BUDGET} minutes")
    args = parser.parse_args()
    if args.command == "calibrate":
        rates = {**load_rates(), **calibrate({ROUTES[r].key: ROUTES[r] for r in args.routes})}
        RATES.write_text(json.dumps({"machine": machine(), "kimg": CALIBRATE_KIMG, "rates": rates}, indent=2) + "\n")
        return
    if args.command == "relative":
        stored = json.loads(RATES.read_text())
        measured = relative({ROUTES[r].key: ROUTES[r] for r in args.routes if r != REFERENCE}, stored["rates"],
                            args.repeats, args.precision)
        stored["rates"].update({key: m["rate"] for key, m in measured.items()})
        stored.setdefault("relative", {}).update({key: {**m, "reference": ROUTES[REFERENCE].key, "machine": machine(),
                                                        "repeats": args.repeats, "precision": args.precision}
                                                       for key, m in measured.items()})
        RATES.write_text(json.dumps(stored, indent=2) + "\n")
        print(json.dumps(measured, indent=1))
        return
    if args.command == "run":
        rates, (extractors, references) = load_rates(), load_references()
        GRIDS.mkdir(parents=True, exist_ok=True)
        for budget in sorted(args.budgets, key=lambda b: b != SEARCH_BUDGET):  # the split search first
            for plan in plans(args.routes, budget, best_splits(collect(args.runs)), tuple(args.splits)):
                sizes = {**train_plan(plan, args.runs, rates, args.precision), "precision": args.precision}
                (args.runs / plan.name() / "time-run.json").write_text(json.dumps(sizes) + "\n")
                evaluate(plan, args.runs / plan.name(), extractors, references, args.precision)
    report(args.runs)


if __name__ == "__main__":
    main()
