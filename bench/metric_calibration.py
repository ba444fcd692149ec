"""Metric calibration (docs/benchmarks.md): does the fast fid-fmnist order images as fid-inception does?

Images of known quality, each scored with every metric against Fashion-MNIST training images (FID, KID,
precision and recall from cmkit.eval):

1. ``degradations``: known damage to real test images (Gaussian blur, pixel noise, quantisation, 10% of the
   images replaced by noise, three classes only, 100 images repeated, a shift of 1-2 pixels) and the clean test
   images as the floor, at the sample counts the benchmarks use (fid-fmnist: 2000 samples against 10000
   training images; fid-inception: 500 against 500, as in bench/time_to_quality.py).
2. ``quality-quick grids`` and ``time-to-quality grids``: the committed sample grids of the benchmarks' rows
   (64 samples each, the first 64 seeds of the model that row scored), so that both metrics score the same
   images of every row, also the rows whose results lack fid-inception and metrics that did not exist when the
   rows were run. 64 samples bias FID upwards; only the ranks are compared.

For each fast metric (``--label``: results of several versions of fid-fmnist are kept side by side, each under
its label), the Spearman rank correlation of its FID with fid-inception's on each set, and every pair of rows the
two order differently; also, on the committed numbers (fid-fmnist on 2000 samples, fid-inception on 500) of the
time-to-quality rows, and how well the 64-sample grids rank those rows against them. Features are cached under
``--work`` per metric weights and images, so a later run only featurises what is new. The cost of one evaluation
of each metric (featurising its sample count at the measured images/s, then the metrics against cached
reference features) is measured on this machine.

Writes bench/results/metric-calibration.json, docs/img/metric-calibration.png and the table in
docs/benchmarks.md. Usage:
    python bench/metric_calibration.py [--label fid-fmnist] [--conditions NAME ...] [--grids SET ...] [--cached-only]
                                       [--work runs/metric-calibration]
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time
from collections.abc import Callable
from itertools import combinations
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from cmkit import data
from cmkit.eval.evaluate import reference_features, save_figure
from cmkit.eval.features import get_extractor
from cmkit.eval.metrics import compute_metrics, fid
from throughput import machine, write_docs_section

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results" / "metric-calibration.json"
PLOT = ROOT / "docs" / "img" / "metric-calibration.png"
SIZES = {"fid-fmnist": {"n": 2_000, "ref": 10_000}, "fid-inception": {"n": 250, "ref": 500}}
GRID_N = 64  # samples in a committed grid
GRID_SETS = ("quality-quick grids", "time-to-quality grids")
THREE_CLASSES = (0, 1, 2)  # T-shirt/top, trouser, pullover


# --------------------------------------------------------------------------------------------- degradations

def gaussian_blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """float [N, 1, H, W] blurred by a separable Gaussian of std ``sigma`` pixels (radius ceil(3 sigma), zero
    padding: Fashion-MNIST's background is black)."""
    radius = math.ceil(3 * sigma)
    taps = torch.exp(-0.5 * (torch.arange(-radius, radius + 1, dtype=torch.float32) / sigma) ** 2)
    taps = taps / taps.sum()
    x = F.conv2d(x, taps.view(1, 1, 1, -1), padding=(0, radius))
    return F.conv2d(x, taps.view(1, 1, -1, 1), padding=(radius, 0))


def shift(x: torch.Tensor, pixels: int) -> torch.Tensor:
    """[N, C, H, W] moved ``pixels`` right and down, zero fill."""
    out = torch.zeros_like(x)
    out[..., pixels:, pixels:] = x[..., :-pixels, :-pixels]
    return out


def quantise(x: torch.Tensor, levels: int) -> torch.Tensor:
    """float pixels in [0, 255] rounded to ``levels`` evenly spaced grey levels."""
    step = 255 / (levels - 1)
    return (x / step).round() * step


def with_noise(x: torch.Tensor, std: float, gen: torch.Generator) -> torch.Tensor:
    """float pixels plus Gaussian noise of ``std`` grey levels."""
    return x + std * torch.randn(x.shape, generator=gen)


def some_replaced(x: torch.Tensor, fraction: float, gen: torch.Generator) -> torch.Tensor:
    """float pixels with a random ``fraction`` of the images replaced by uniform noise images."""
    out = x.clone()
    idx = torch.randperm(len(x), generator=gen)[:round(fraction * len(x))]
    out[idx] = 255 * torch.rand(out[idx].shape, generator=gen)
    return out


Pixels = Callable[[torch.Tensor, torch.Tensor, torch.Generator, int], torch.Tensor]


def _on_pixels(fn: Callable[[torch.Tensor, torch.Generator], torch.Tensor]) -> Pixels:
    """A degradation of the first n test images, from ``fn`` on their float pixels."""
    return lambda images, labels, gen, n: fn(images[:n].float(), gen)


def _three_classes(images: torch.Tensor, labels: torch.Tensor, gen: torch.Generator, n: int) -> torch.Tensor:
    """The first n test images of THREE_CLASSES."""
    return images[torch.isin(labels, torch.tensor(THREE_CLASSES))][:n].float()


def _repeated(images: torch.Tensor, labels: torch.Tensor, gen: torch.Generator, n: int) -> torch.Tensor:
    """The first 100 test images, repeated to n."""
    return images[:100].repeat(math.ceil(n / 100), 1, 1, 1)[:n].float()


# name -> degradation of (test images, labels, generator, n) -> float pixels [n, 1, 28, 28]
DEGRADATIONS: dict[str, Pixels] = {
    "clean": _on_pixels(lambda x, g: x),
    **{f"blur {s:g}px": _on_pixels(lambda x, g, s=s: gaussian_blur(x, s)) for s in (0.5, 1, 1.5, 2)},
    **{f"noise {s:g}/255": _on_pixels(lambda x, g, s=s: with_noise(x, s, g)) for s in (8, 16, 32)},
    **{f"{lv} grey levels": _on_pixels(lambda x, g, lv=lv: quantise(x, lv)) for lv in (8, 4, 2)},
    "10% noise images": _on_pixels(lambda x, g: some_replaced(x, 0.1, g)),
    "three classes": _three_classes,
    "100 images repeated": _repeated,
    **{f"shift {p}px": _on_pixels(lambda x, g, p=p: shift(x, p)) for p in (1, 2)},
}


def degraded(name: str, n: int) -> torch.Tensor:
    """uint8 [n, 1, 28, 28]: condition ``name`` applied to a fixed permutation of the test split (seed 0)."""
    test = data.load_dataset("fashion-mnist", resolution=28, channels=1, split="test")
    order = data.batch_indices(len(test.images), len(test.images), seed=0, start=0)
    gen = torch.Generator().manual_seed(0)
    pixels = DEGRADATIONS[name](test.images[order], test.labels[order], gen, n)
    return pixels.round().clamp(0, 255).to(torch.uint8)


# --------------------------------------------------------------------------------------------------- grids

def committed_grids() -> dict[str, dict[str, Path]]:
    """The sample grids the committed benchmark results point to: {set: {row: PNG}}; the quick ladder's rows by
    model and step count, the time-to-quality rows' one-step grids by run."""
    ladder = json.loads((ROOT / "bench" / "results" / "quality-quick.json").read_text())
    ttq = json.loads((ROOT / "bench" / "results" / "time-to-quality.json").read_text())
    return {GRID_SETS[0]: {f"{label} {k} step": ROOT / path for label, entry in ladder["models"].items()
                                    for k, path in entry["grids"].items()},
            GRID_SETS[1]: {name: ROOT / entry["grids"]["1"] for name, entry in ttq["runs"].items()}}


def grid_images(path: Path, size: int = 28, pad: int = 2) -> torch.Tensor:
    """uint8 [N, 1, size, size]: the images of a grid PNG written by ``cmkit.images.grid`` (square, ``pad``
    pixels between tiles); a row's empty tiles (all padding) are dropped."""
    pixels = np.asarray(Image.open(path).convert("L"))
    cols = (pixels.shape[1] - pad) // (size + pad)
    tiles = [pixels[pad + r * (size + pad):pad + r * (size + pad) + size, pad + c * (size + pad):][:, :size]
             for r in range((pixels.shape[0] - pad) // (size + pad)) for c in range(cols)]
    return torch.from_numpy(np.stack([t for t in tiles if not (t == 255).all()]))[:, None]


# ------------------------------------------------------------------------------------------------- scoring

def featurise(pixels: torch.Tensor, extractor, memo: dict[bytes, np.ndarray]) -> tuple[np.ndarray, int]:
    """Features [n, D] of uint8 images [n, C, H, W] and how many images were featurised: an image met before
    (in ``memo``, by its bytes: repeated images, clean images among damaged ones) is not featurised again."""
    keys = [image.numpy().tobytes() for image in pixels]
    new = {key: i for i, key in enumerate(keys) if key not in memo}
    if new:
        feats = extractor(pixels[list(new.values())]).numpy()
        memo.update(zip(new, feats, strict=True))
    return np.stack([memo[key] for key in keys]), len(new)


def score(images: Callable[[int], torch.Tensor], key: str, extractor, reference: np.ndarray, n: int,
          work: Path, memo: dict[bytes, np.ndarray], *, full: bool = True, cached_only: bool = False) -> dict | None:
    """Metrics of ``images(n)`` against ``reference`` (FID, KID, precision and recall; only FID unless ``full``),
    with how many images were featurised and the seconds that took; features and metrics are cached in ``work``
    under ``key`` and the extractor's weights; None if ``cached_only`` and the features are not cached."""
    name = key.replace(" ", "_").replace("/", "_").replace("%", "pc")
    path = work / "features" / f"{extractor.name}-{extractor.weights}-{name}-{n}.npz"
    if cached_only and not path.exists():
        return None
    pixels = images(n)
    if path.exists():
        with np.load(path) as f:
            feats, featurised, seconds = f["features"], int(f["featurised"]), float(f["seconds"])
        memo.update(zip((image.numpy().tobytes() for image in pixels), feats, strict=True))
    else:
        start = time.perf_counter()
        feats, featurised = featurise(pixels, extractor, memo)
        seconds = time.perf_counter() - start
        path.parent.mkdir(parents=True, exist_ok=True)
        np.savez(path, features=feats, featurised=featurised, seconds=seconds)
    record = path.with_suffix(f".ref{len(reference)}{'' if full else '-fid'}.json")  # slow in 2048-d: once
    if not record.exists():
        start = time.perf_counter()
        metrics = compute_metrics(reference, feats) if full else {"fid": fid(reference, feats)}
        record.write_text(json.dumps({**metrics, "metric_seconds": time.perf_counter() - start}))
    return {**json.loads(record.read_text()), "n": n, "featurised": featurised, "feature_seconds": seconds}


def score_all(metric: str, conditions: list[str], grids: list[str], work: Path, *, cached_only: bool) -> dict:
    """The degradations ``conditions`` and the committed sample grids of the sets ``grids`` scored with
    ``metric`` (only the cached ones if ``cached_only``), and its cost per evaluation (from the degradations:
    their sample count)."""
    extractor = get_extractor(metric)
    size, memo = SIZES[metric], {}
    reference = reference_features("fashion-mnist", extractor, n=size["ref"], resolution=28, channels=1)
    out = {"degradations": {name: score(lambda n, name=name: degraded(name, n), name, extractor, reference,
                                        size["n"], work, memo, cached_only=cached_only) for name in conditions}}
    for part in grids:
        out[part] = {name: score(lambda n, png=png: grid_images(png), f"grid-{png.stem}", extractor, reference,
                                 GRID_N, work, memo, full=False, cached_only=cached_only)
                     for name, png in committed_grids()[part].items()}
    out = {part: {name: r for name, r in rows.items() if r is not None} for part, rows in out.items()}
    scored = list(out["degradations"].values())
    per_image = sum(r["feature_seconds"] for r in scored) / max(1, sum(r["featurised"] for r in scored))
    metrics = statistics.median(r["metric_seconds"] for r in scored)  # all four metrics
    out["cost"] = {"n": size["n"], "reference_n": size["ref"], "weights": extractor.weights,
                   "feature_seconds": per_image * size["n"], "metric_seconds": metrics,
                   "seconds_per_evaluation": per_image * size["n"] + metrics, "images_per_second": 1 / per_image}
    return out


# -------------------------------------------------------------------------------------------- agreement

def ranks(values: list[float]) -> np.ndarray:
    """Ranks 1..n of ``values``, ties sharing their mean rank."""
    arr = np.asarray(values, dtype=np.float64)
    order = np.argsort(arr, kind="stable")
    out = np.empty(len(arr))
    out[order] = np.arange(1, len(arr) + 1)
    for value in np.unique(arr):
        tied = arr == value
        out[tied] = out[tied].mean()
    return out


def spearman(a: list[float], b: list[float]) -> float:
    """Spearman's rank correlation: the Pearson correlation of the ranks (ties at mean rank)."""
    return float(np.corrcoef(ranks(a), ranks(b))[0, 1])


def agreement(fast: dict[str, float], slow: dict[str, float]) -> dict:
    """Spearman of two metrics over the rows both have, and the pairs of rows they order differently."""
    names = [k for k in fast if k in slow]
    discordant = [[a, b] for a, b in combinations(names, 2) if (fast[a] - fast[b]) * (slow[a] - slow[b]) < 0]
    return {"rows": len(names), "spearman": spearman([fast[k] for k in names], [slow[k] for k in names]),
            "discordant": discordant}


def committed_rows() -> dict[str, dict[str, dict[str, float]]]:
    """Committed benchmark rows with both metrics: {table: {row: {"fid-fmnist", "fid-inception"}}}."""
    out: dict[str, dict[str, dict[str, float]]] = {}
    ttq = json.loads((ROOT / "bench" / "results" / "time-to-quality.json").read_text())
    out["time-to-quality"] = {name: {"fid-fmnist": e["fid_fmnist"][0]["fid"],
                                     "fid-inception": e["fid_inception"][0]["fid"]}
                              for name, e in ttq["runs"].items() if e.get("fid_inception")}
    ladder = json.loads((ROOT / "bench" / "results" / "quality-quick.json").read_text())
    out["quality-quick"] = {f"{label} {row['steps']} step": {"fid-fmnist": row["fid"], **(
        {"fid-inception": row["fid_inception"]} if "fid_inception" in row else {})}
        for label, entry in ladder["models"].items() for row in entry["rows"]}
    return out


# ------------------------------------------------------------------------------------------------- report

def fids(rows: dict[str, dict]) -> dict[str, float]:
    return {name: r["fid"] for name, r in rows.items()}


def summarise(result: dict) -> None:
    """Into ``result``: Spearman and discordant pairs of each fast label against fid-inception on each set
    (``agreement``), and against the committed fid-inception numbers of the benchmarks' rows (``committed``):
    the committed fid-fmnist numbers and every label's FIDs of the rows' sample grids."""
    scores = result["scores"]
    slow = scores["fid-inception"]
    result["agreement"] = {label: {part: agreement(fids(fast[part]), fids(slow[part])) for part in fast
                                   if part != "cost" and len(fast[part].keys() & slow.get(part, {}).keys()) > 2}
                           for label, fast in scores.items() if label != "fid-inception"}
    result["committed"] = {}
    for table_name, rows in committed_rows().items():
        committed_slow = {k: v["fid-inception"] for k, v in rows.items() if "fid-inception" in v}
        check = {"rows": len(rows), "rows_with_both": len(committed_slow)}
        candidates = {"fid-fmnist (committed)": {k: rows[k]["fid-fmnist"] for k in committed_slow},
                      **{f"{label} ({GRID_N} grid samples)": fids(s.get(f"{table_name} grids", {}))
                         for label, s in scores.items()}}
        for name, fast in candidates.items():
            if len(fast.keys() & committed_slow.keys()) > 2:
                check[name] = agreement(fast, committed_slow)
        result["committed"][table_name] = check


def table(result: dict) -> str:
    m, scores = result["machine"], result["scores"]
    labels = ["fid-inception", *(lb for lb in scores if lb != "fid-inception")]
    lines = [f"Command: `{result['command']}` -- {m['date']}, commit {m['commit']}, {m['cpu']}, {m['cores']} cores, "
             f"torch {m['torch']}. Degradations of test images against training images: "
             + "; ".join(f"{lb}: {scores[lb]['cost']['n']} images against {scores[lb]['cost']['reference_n']}"
                         for lb in labels) + ". P / R: precision / recall.", "",
             "| condition | " + " | ".join(f"{lb} | KID | P / R" for lb in labels) + " |",
             "|---" * (1 + 3 * len(labels)) + "|"]
    for name in dict.fromkeys(k for label in labels for k in scores[label]["degradations"]):
        cells = []
        for label in labels:
            r = scores[label]["degradations"].get(name)
            cells += ([f"{r['fid']:.1f}", f"{r['kid']:.3g}", f"{r['precision']:.2f} / {r['recall']:.2f}"]
                      if r else ["-"] * 3)
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines += ["", "Spearman rank correlation of each fast FID with fid-inception's (and the pairs of rows the two "
              f"order differently; grids: both metrics on the same {GRID_N} samples of each row):", ""]
    for label, parts in result["agreement"].items():
        for part, agree in parts.items():
            lines.append(f"- {label}, {part} ({agree['rows']} rows): **{agree['spearman']:.3f}**; "
                         f"{len(agree['discordant'])} pairs: {_pairs(agree['discordant'])}")
    for table_name, c in result["committed"].items():
        lines.append(f"- against the committed fid-inception of `{table_name}` ({c['rows_with_both']} of {c['rows']} "
                     "rows have it)" + "".join(f"; {key}: {a['spearman']:.3f} ({len(a['discordant'])} pairs)"
                                               for key, a in c.items() if isinstance(a, dict)))
    lines += ["", "Cost of one evaluation on this machine (featurising the samples at the images/s measured over the "
              "degradations, then FID, KID, precision and recall against cached reference features):", ""]
    for label in labels:
        c = scores[label]["cost"]
        lines.append(f"- {label}: {c['seconds_per_evaluation']:.1f} s for {c['n']} images "
                     f"({c['feature_seconds']:.1f} s features at {c['images_per_second']:.1f} images/s, "
                     f"{c['metric_seconds']:.1f} s metrics)")
    lines += ["", f"![fast FID against fid-inception]({PLOT.relative_to(ROOT / 'docs')})"]
    return "\n".join(lines)


def _pairs(pairs: list[list[str]]) -> str:
    return "; ".join(f"{a} / {b}" for a, b in pairs) or "none"


def plot(result: dict, path: Path) -> None:
    """Each fast FID against fid-inception's, log-log, one panel per set of images."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    scores = result["scores"]
    parts = [part for part in scores["fid-inception"] if part != "cost"]
    fig, axes = plt.subplots(1, len(parts), figsize=(6 * len(parts), 5.5), dpi=110, squeeze=False)
    for ax, part in zip(axes[0], parts, strict=True):
        slow = scores["fid-inception"][part]
        for label, marker in zip([lb for lb in scores if lb != "fid-inception"], "os^v", strict=False):
            names = [k for k in slow if k in scores[label].get(part, {})]
            x = [slow[k]["fid"] for k in names]
            y = [scores[label][part][k]["fid"] for k in names]
            ax.scatter(x, y, marker=marker, label=label, alpha=0.8)
            for name, xi, yi in zip(names, x, y, strict=True):
                ax.annotate(name, (xi, yi), fontsize=5, xytext=(2, 2), textcoords="offset points")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("fid-inception")
        ax.set_ylabel("fast FID")
        ax.set_title(part if part != "degradations" else "degradations of Fashion-MNIST test images")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    save_figure(fig, path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--label", default="fid-fmnist", help="name the fid-fmnist results are kept under")
    parser.add_argument("--conditions", nargs="+", choices=DEGRADATIONS, default=list(DEGRADATIONS),
                        metavar="NAME", help=f"degradations to score (default all: {', '.join(DEGRADATIONS)})")
    parser.add_argument("--grids", nargs="*", choices=GRID_SETS, default=list(GRID_SETS), metavar="SET",
                        help="sets of committed sample grids fid-inception scores (slow; fid-fmnist scores all; "
                             f"default all: {', '.join(GRID_SETS)})")
    parser.add_argument("--work", type=Path, default=ROOT / "runs" / "metric-calibration",
                        help="features are cached here")
    parser.add_argument("--cached-only", action="store_true",
                        help="fid-inception scores only images whose features an earlier run cached in --work")
    parser.add_argument("--no-docs", action="store_true", help="write the results file only")
    args = parser.parse_args()
    result = json.loads(RESULTS.read_text()) if RESULTS.exists() else {"scores": {}}
    result["scores"]["fid-inception"] = score_all("fid-inception", args.conditions, args.grids, args.work,
                                                  cached_only=args.cached_only)
    result["scores"][args.label] = score_all("fid-fmnist", args.conditions, list(GRID_SETS), args.work,
                                             cached_only=False)
    flags = (f" --label {args.label}" if args.label != "fid-fmnist" else "") + " --cached-only" * args.cached_only
    result.update(command=f"python bench/metric_calibration.py{flags}", machine=machine(), sizes=SIZES, grid_n=GRID_N)
    summarise(result)
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    if not args.no_docs:
        plot(result, PLOT)
        write_docs_section("metric-calibration", table(result),
                           heading="## Metric calibration (`bench/metric_calibration.py`)")
    print(table(result))


if __name__ == "__main__":
    main()
