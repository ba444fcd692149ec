"""The evaluation pipeline: batches of uint8 images -> features -> metrics against reference features.

Samples, image files and reference datasets all go through :func:`features_of`, so the CLI, the quality
ladder and the cached reference statistics share one path. Images are generated and featurised batch by
batch: only features (N x D floats) are kept, never all images. Under ``torchrun`` each process samples (or
featurises) its block of the seeds (or rows), :func:`cmkit.dist.shard`, and the blocks are gathered in order,
so every process holds the features one process would compute and the metrics are the same.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import nn
from tqdm import tqdm

from cmkit import data, dist, readers
from cmkit.checkpoint import EXPORT_NAME
from cmkit.codec import Codec, make_codec
from cmkit.errors import CmkitError
from cmkit.eval.features import FeatureExtractor
from cmkit.eval.metrics import check_features, compute_metrics, feature_stats, frechet_distance
from cmkit.files import atomic_write
from cmkit.sampling import SamplingSpec, default_sigmas, generate

FEATURES_FORMAT = "cmkit-features-1"
GRAY_MODES = {"1", "L", "LA", "I", "I;16"}


def default_metric(resolution: int, channels: int) -> str:
    """fid-fmnist for 28x28 grayscale images (fast on CPU), the standard Inception FID otherwise."""
    return "fid-fmnist" if (resolution, channels) == (28, 1) else "fid-inception"


def features_of(batches: Iterable[torch.Tensor], extractor: FeatureExtractor, *, total: int,
                desc: str, leave: bool = True) -> np.ndarray:
    """Features float32 [N, D] of uint8 [B, C, H, W] batches (N may be 0), with a progress bar counting images
    (on rank 0; ``leave=False`` erases it when done)."""
    chunks = [np.zeros((0, extractor.dim), np.float32)]
    with tqdm(total=total, unit="img", desc=desc, dynamic_ncols=True, mininterval=1.0, leave=leave,
              disable=not dist.is_main()) as bar:
        for batch in batches:
            chunks.append(extractor(batch).numpy())
            bar.update(len(batch))
    return np.concatenate(chunks)


def image_features(images: torch.Tensor, extractor: FeatureExtractor, *, batch: int, desc: str) -> np.ndarray:
    """Features float32 [N, D] of uint8 images [N, C, H, W], in row order; each process featurises its block."""
    rows = dist.shard(range(len(images)))
    mine = images[rows.start:rows.stop]
    feats = features_of((mine[i:i + batch] for i in range(0, len(mine), batch)), extractor, total=len(mine),
                        desc=desc)
    return dist.gather_in_order(feats)


def sample_features(model: nn.Module, *, n: int, sigmas: Sequence[float] | torch.Tensor, sampler: str,
                    batch: int, extractor: FeatureExtractor, desc: str, precision: str = "fp32",
                    leave: bool = True, codec: Codec | None = None, guidance: float | None = None) -> np.ndarray:
    """Features float32 [n, D] of ``model``'s samples for seeds 0 .. n - 1, in seed order, decoded by ``codec``
    (None: the model's space is pixels) and sampled with classifier-free ``guidance`` (None: none,
    :func:`cmkit.sampling.generate`); each process samples its block of the seeds."""
    seeds = dist.shard(range(n))
    codec = codec or make_codec("identity", channels=model.channels, resolution=model.resolution)
    samples = generate(model, seeds, sigmas=sigmas, sampler=sampler, batch_size=batch, guidance=guidance,
                       precision=precision)
    batches = (data.to_uint8(codec.to_images(x)).cpu() for x in samples)
    return dist.gather_in_order(features_of(batches, extractor, total=len(seeds), desc=desc, leave=leave))


def network_evaluations(sampler: str, num_sigmas: int) -> int:
    """NFE of a sampler through ``num_sigmas`` levels: Heun 2n - 1, Euler and consistency n."""
    return 2 * num_sigmas - 1 if sampler == "heun" else num_sigmas


# ------------------------------------------------------------------------------------------- references

def _cache_dir() -> Path:
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "cmkit" / "references"


def reference_features(ref: str, extractor: FeatureExtractor, *, n: int, resolution: int,
                       channels: int) -> np.ndarray:
    """Features of up to ``n`` reference images at ``resolution`` x ``channels``; cached after the first call.

    ``ref`` is a features file written by :func:`save_features` (``.npz``), a dataset name or a path
    ``load_dataset`` accepts. The images are the first ``n`` of a fixed permutation of the train split, so
    the first ``n`` rows of a cached file of more images of the same reference are reused as they are.
    """
    if ref.endswith(".npz"):
        return load_features(Path(ref), extractor=extractor.name, resolution=resolution, channels=channels)
    if ref in data.KNOWN_DATASETS and data.KNOWN_DATASETS[ref] != (resolution, channels):
        native = data.KNOWN_DATASETS[ref]
        raise CmkitError(f"reference {ref} holds {native[0]}x{native[0]}x{native[1]} images, but the images "
                         f"to score are {resolution}x{resolution}x{channels}; pass a matching --ref")
    key = hashlib.sha1(str(Path(ref).resolve() if Path(ref).exists() else ref).encode()).hexdigest()[:10]
    name = re.sub(r"[^A-Za-z0-9_.-]", "_", Path(ref).name)
    stem = f"{name}-{key}-{extractor.name}-{extractor.weights}-{resolution}x{channels}"
    path, cached = _cache_dir() / f"{stem}-{n}.npz", _cached_superset(stem, n)
    # Load only if every process has a cache: one without it would compute alone and wait in the gather.
    if not dist.any_rank(cached is None):
        return load_features(cached, extractor=extractor.name, resolution=resolution, channels=channels)[:n]
    dataset = data.load_dataset(ref, resolution=resolution, channels=channels)
    idx = data.batch_indices(len(dataset.images), min(n, len(dataset.images)), seed=0, start=0)
    feats = image_features(dataset.images[idx], extractor, batch=500, desc=f"reference {ref}")

    def write() -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        save_features(feats, path, extractor=extractor.name, resolution=resolution, channels=channels, source=ref)

    dist.on_main(write)
    return feats


def _cached_superset(stem: str, n: int) -> Path | None:
    """The cache file ``{stem}-{count}.npz`` with the smallest count >= ``n``, or None if there is none."""
    counts = [int(m.group(1)) for path in _cache_dir().glob(f"{stem}-*.npz")
              if (m := re.fullmatch(re.escape(stem) + r"-(\d+)\.npz", path.name))]
    fits = [count for count in counts if count >= n]
    return _cache_dir() / f"{stem}-{min(fits)}.npz" if fits else None


def save_features(features: np.ndarray, path: Path, *, extractor: str, resolution: int, channels: int,
                  source: str) -> None:
    """Write a features file (npz: features, and what they are of), atomically."""
    meta = json.dumps({"format": FEATURES_FORMAT, "extractor": extractor, "resolution": resolution,
                       "channels": channels, "source": source})
    with atomic_write(path) as tmp:
        np.savez(tmp, features=features.astype(np.float32), meta=np.array(meta))


def load_features(path: Path, *, extractor: str, resolution: int, channels: int) -> np.ndarray:
    """Read a features file, checking it was made by ``extractor`` from images of the same size."""
    try:
        with np.load(path, allow_pickle=False) as f:
            feats, meta = f["features"], json.loads(str(f["meta"]))
    except (OSError, KeyError, ValueError) as e:
        raise CmkitError(f"{path}: not a cmkit features file ({readers.one_line(e)})") from None
    if meta.get("format") != FEATURES_FORMAT:
        raise CmkitError(f"{path}: not a cmkit features file; expected one written by 'cmkit eval'")
    if meta["extractor"] != extractor:
        raise CmkitError(f"{path}: features of {meta['extractor']}, but the metric is {extractor}")
    if (meta["resolution"], meta["channels"]) != (resolution, channels):
        raise CmkitError(f"{path}: reference images are {meta['resolution']}x{meta['resolution']}x"
                         f"{meta['channels']}, the images to score are {resolution}x{resolution}x{channels}")
    check_features(feats, name=str(path), min_count=2)
    return feats


# ------------------------------------------------------------------------------------- images to score

def load_images(path: Path) -> torch.Tensor:
    """uint8 [N, C, H, W] from an ``.npz`` holding ``images`` (uint8 N x H x W x C) or a folder of images.

    Folder images must all have one size (the reference decides the size, so nothing is resized here).
    """
    if path.suffix == ".npz":
        return _npz_images(path)
    if not path.is_dir():
        raise CmkitError(f"{path}: expected a run directory, a .safetensors model, an .npz of images or a folder")
    _refuse_run_directory(path)
    headers = [_image_header(p) for p in path.rglob("*") if p.suffix.lower() in data.IMAGE_EXTENSIONS]
    sizes = {size for size, _ in headers}
    if len(sizes) > 1:
        raise CmkitError(f"{path}: images of several sizes {sorted(sizes)}; expected one size")
    if not sizes:
        raise CmkitError(f"{path}: no images ({', '.join(data.IMAGE_EXTENSIONS)})")
    (w, h), = sizes
    if w != h:
        raise CmkitError(f"{path}: images are {w}x{h}; expected square images")
    channels = 1 if {mode for _, mode in headers} <= GRAY_MODES else 3
    return data.load_dataset(str(path), resolution=w, channels=channels).images


def _refuse_run_directory(path: Path) -> None:
    """Raise CmkitError if ``path`` is a run directory of 'cmkit train' (config.json, checkpoints/ or
    samples/samples-*.png): without its model it must not be scored as a folder of sample grids."""
    signs = [name for name in ("config.json", "checkpoints") if (path / name).exists()]
    signs += ["samples/"] if any((path / "samples").glob("samples-*.png")) else []
    if signs:
        raise CmkitError(f"{path}: a cmkit run directory ({', '.join(signs)}) without {EXPORT_NAME}: there is no "
                         f"model to evaluate yet (the run has not finished); expected a run directory with "
                         f"{EXPORT_NAME}, a .safetensors export, an .npz of images or a folder of images")


def _image_header(path: Path) -> tuple[tuple[int, int], str]:
    """(size, mode) from the file header, without decoding the pixels."""
    try:
        with Image.open(path) as img:
            return img.size, img.mode
    except OSError as e:
        raise CmkitError(f"cannot read image {path}: {readers.one_line(e)}") from None


def _npz_images(path: Path) -> torch.Tensor:
    try:
        with np.load(path, allow_pickle=False) as f:
            images = f["images"]
    except (OSError, KeyError, ValueError) as e:
        raise CmkitError(f"{path}: cannot read 'images' ({readers.one_line(e)}); expected an npz from "
                         "'cmkit sample'") from None
    if images.dtype.kind == "f" and not np.isfinite(images).all():
        raise CmkitError(f"{path}: 'images' holds NaN or inf; expected uint8 pixel values")
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[3] not in (1, 3):
        raise CmkitError(f"{path}: 'images' is {images.dtype} {images.shape}; expected uint8 N x H x W x C, C 1 or 3")
    return torch.from_numpy(images).permute(0, 3, 1, 2).contiguous()


# ------------------------------------------------------------------------------------------ evaluation

def evaluate_model(model: nn.Module, spec: SamplingSpec, *, steps: Sequence[int], n: int,
                   extractor: FeatureExtractor, reference: np.ndarray, batch: int, precision: str = "fp32",
                   leave: bool = True, codec: Codec | None = None,
                   guidance: float | None = None) -> list[dict[str, Any]]:
    """Metrics of ``n`` samples for each step count, with ``spec``'s default sampler and schedules
    (:func:`default_sigmas`); ``leave=False`` erases each progress bar when done (evaluations during training);
    ``codec`` and ``guidance`` as in :func:`sample_features`."""
    rows, sampler = [], spec.sampler
    for k in steps:
        sigmas = default_sigmas(spec, k)
        feats = sample_features(model, n=n, sigmas=sigmas, sampler=sampler, batch=batch, extractor=extractor,
                                desc=f"{k} step{'s' * (k > 1)}", precision=precision, leave=leave, codec=codec,
                                guidance=guidance)
        rows.append({"steps": k, "nfe": network_evaluations(sampler, len(sigmas)), "sigmas": sigmas.tolist(),
                     **compute_metrics(reference, feats)})
    return rows


INV_PHI = (math.sqrt(5) - 1) / 2  # 1 / golden ratio


def golden_section_search(score: Callable[[float], float], lo: float, hi: float, *,
                          iters: int) -> tuple[float, list[tuple[float, float]]]:
    """Minimise ``score`` over [lo, hi] by golden-section search (Kiefer 1953); exact for unimodal scores.

    Scores two interior points, then one new point per iteration: each iteration keeps the better interior
    point and shrinks the bracket by 1 / phi ~ 0.618, so ``iters + 2`` calls leave a bracket of width
    (hi - lo) * 0.618^(iters + 1) around the best point. Returns (the best x scored, every (x, score) in
    the order scored); ties keep the earlier point.
    """
    if not lo < hi or iters < 0:
        raise CmkitError(f"golden-section search needs lo < hi and iters >= 0, got [{lo}, {hi}], {iters}")
    history: list[tuple[float, float]] = []

    def scored(x: float) -> float:
        history.append((x, score(x)))
        return history[-1][1]

    a, b = lo, hi
    c, d = b - INV_PHI * (b - a), a + INV_PHI * (b - a)
    fc, fd = scored(c), scored(d)
    for _ in range(iters):
        if fc <= fd:  # the minimum lies in [a, d]; c becomes the right interior point
            b, d, fd = d, c, fc
            c = b - INV_PHI * (b - a)
            fc = scored(c)
        else:  # the minimum lies in [c, b]; d becomes the left interior point
            a, c, fc = c, d, fd
            d = a + INV_PHI * (b - a)
            fd = scored(d)
    best = min(history, key=lambda point: point[1])
    return best[0], history


FINALISTS = 2  # the search's best sigmas, scored again on every sample by tune_two_step_sigma


def tune_two_step_sigma(model: nn.Module, *, n: int, extractor: FeatureExtractor, reference: np.ndarray,
                        batch: int, iters: int = 5, lo: float | None = None, hi: float | None = None,
                        precision: str = "fp32", search_n: int | None = None,
                        codec: Codec | None = None) -> tuple[float, list[dict[str, float]]]:
    """The intermediate sigma of 2-step sampling with the lowest FID, in two rounds sized for a CPU (samples
    decoded by ``codec``, as in :func:`sample_features`).

    1. Search: :func:`golden_section_search` in log sigma over [lo, hi] (default [sigma_min, sigma_max / 2]) on
       FIDs of ``search_n`` samples (default ``n // 4``, at least ``extractor.min_count``): ``iters + 2`` FIDs.
       Small samples bias FID upward by about the same amount at every sigma, so they find the basin cheaply.
    2. Final: the :data:`FINALISTS` best sigmas of the search (fewer if it scored fewer) scored again on ``n``
       samples; the best of these is the answer, so the choice between close candidates rests on the larger
       sample's FID.
    All FIDs use the same seeds (the search's are the first ``search_n`` of the final ``n``) against reference
    statistics computed once: ``(iters + 2) * search_n + FINALISTS * n`` samples in all. A progress bar counts the
    FIDs (on rank 0). Returns the best sigma (rounded to 6 digits, the value scored) and every FID computed as
    ``{"sigma", "fid", "n"}``, the search's by sigma, then the final round's by sigma.
    """
    t = model.sigma_max
    search_n = max(extractor.min_count, search_n or n // 4)
    ref_stats = feature_stats(reference)
    finalists = min(FINALISTS, iters + 2)
    with tqdm(total=iters + 2 + finalists, unit="FID", desc="2-step sigma", dynamic_ncols=True,
              disable=not dist.is_main()) as bar:

        def score(log_sigma: float, count: int) -> float:
            sigma = round(math.exp(log_sigma), 6)
            feats = sample_features(model, n=count, sigmas=[t, sigma], sampler="consistency", batch=batch,
                                    extractor=extractor, desc=f"sigma {sigma:.4g}, n={count}", precision=precision,
                                    leave=False, codec=codec)
            value = frechet_distance(*ref_stats, *feature_stats(feats))
            bar.update()
            bar.set_postfix_str(f"sigma {sigma:.4g}: FID {value:.3f} (n={count})")
            return value

        _, searched = golden_section_search(lambda x: score(x, search_n), math.log(lo or model.sigma_min * 1.0001),
                                            math.log(hi or t / 2), iters=iters)
        best_first = sorted(searched, key=lambda point: point[1])[:finalists]
        final = [(x, score(x, n)) for x, _ in sorted(best_first)]
    best = min(final, key=lambda point: point[1])[0]
    rows = [{"sigma": round(math.exp(x), 6), "fid": value, "n": count}
            for points, count in ((searched, search_n), (final, n)) for x, value in sorted(points)]
    return round(math.exp(best), 6), rows


def plot_quality(series: dict[str, list[tuple[int, float]]], path: Path, *, metric: str) -> None:
    """Plot FID against network evaluations (log x), one line per model, to a PNG, atomically."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    for name, points in series.items():
        nfe, values = zip(*sorted(points), strict=True)
        ax.plot(nfe, values, marker="o", label=name)
    ax.set_xscale("log")
    ax.set_xlabel("network evaluations (NFE)")
    ax.set_ylabel(f"FID ({metric})")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    save_figure(fig, path)


def save_figure(fig, path: Path) -> None:
    """Write a matplotlib figure to ``path`` as a PNG, atomically, and close it."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    try:
        with atomic_write(path) as tmp:
            fig.savefig(tmp, format="png")
    finally:
        plt.close(fig)
