"""Evaluation during training (``train.eval_kimg``): the EMA model's FID, the consistency metric, the best
model and the stop rules, so that the loop in :mod:`cmkit.train` stays flat.

An evaluation scores the EMA model with the evaluation pipeline of ``cmkit eval`` (:func:`evaluate_model`):
FID of ``train.eval_n`` samples in the default metric of the data (:func:`default_metric`) against
:data:`REFERENCE_N` images of ``data.source``, for consistency models at 1 and 2 steps, for diffusion models
with Heun at 18 levels. Its record, one line of ``metrics.jsonl`` (numbers also go to TensorBoard):

- ``step``, ``kimg``: when;
- ``fid_{k}step``: FID at k sampling levels (``fid_1step`` and ``fid_2step``; diffusion models ``fid_18step``,
  Heun, 35 network evaluations); the first is the *primary* FID that the best model and the stop rules follow;
- ``best_fid``: the lowest primary FID so far, this evaluation included;
- ``consistency`` (consistency models): the mean over the adjacent pairs of an 18-level Karras grid of the
  squared gap between the model's answers at the two levels of a pair (:func:`consistency_gaps`), on a fixed
  held-out batch with fixed noise; ``consistency_pairs``: the per-pair values, lowest levels first
  (metrics.jsonl only);
- ``eval_seconds``: the evaluation's wall time.

Nothing here keeps or changes the training state: the loop passes the EMA model, the counts and the records
of the earlier evaluations (its ``history``, part of its resumable state, so a resumed run keeps its best FID
and patience count), appends the record :meth:`Monitor.measure` returns, and writes the files; the best model
and the stop rules are pure functions of that history. Under ``torchrun`` every process samples its share and
holds the same gathered features, so every process computes the same FID and they all stop at the same
evaluation.
"""

from __future__ import annotations

import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from cmkit import data
from cmkit.checkpoint import BEST_NAME
from cmkit.codec import data_codec
from cmkit.cond import of_labels
from cmkit.config import Config
from cmkit.errors import CmkitError
from cmkit.eval.evaluate import default_metric, evaluate_model, reference_features
from cmkit.eval.features import get_extractor
from cmkit.methods import Capability, method_entry, sampling_spec
from cmkit.rng import derive_seed
from cmkit.schedules import karras_sigmas

REFERENCE_N = 10_000  # reference images: the default --n of `cmkit eval`, so both share one cached feature file
EVAL_BATCH = 500  # images per sampling batch: the default --batch of `cmkit eval`
HELD_OUT = 64  # images in the consistency metric's fixed batch
METRIC_LEVELS = 18  # Karras levels whose adjacent pairs the consistency metric compares (rho 7)


class Monitor:
    """The evaluator of one run: built once, before anything is written (feature network, reference features,
    the held-out batch and its noise), then called by the loop at ``train.eval_kimg`` and at the end. It reads
    what it is given and keeps nothing of it."""

    def __init__(self, config: Config, dataset: data.ImageData, device: torch.device) -> None:
        t, d = config.train, config.data
        self.config = config
        self.extractor = get_extractor(default_metric(d.resolution, d.channels), device=str(device))
        if t.eval_n < self.extractor.min_count:
            raise CmkitError(f"train.eval_n={t.eval_n}: {self.extractor.name} needs at least "
                             f"{self.extractor.min_count} samples")
        self.reference = reference_features(d.source, self.extractor, n=REFERENCE_N, resolution=d.resolution,
                                            channels=d.channels)
        self.spec = sampling_spec(config.method)
        self.sampler, self.steps = self.spec.sampler, self.spec.eval_steps[:2]  # consistency: 1, 2; diffusion: 18
        self.key = f"fid_{self.steps[0]}step"  # the primary FID
        self.label = f"{self.steps[0]}-step" + ("" if self.sampler == "consistency" else f" {self.sampler}")
        self.x0, self.labels, self.noise = held_out_batch(config, dataset, device)

    def measure(self, ema: nn.Module, *, step: int, images_seen: int,
                history: list[dict[str, Any]]) -> dict[str, Any]:
        """The record of an evaluation of ``ema`` (the EMA model, denoiser contract) after ``step`` optimiser
        steps and ``images_seen`` training images, ``history`` holding the records of the earlier evaluations
        (for ``best_fid``); see the module's docstring. Every process must call this."""
        tick, t = time.perf_counter(), self.config.train
        rows = evaluate_model(ema, self.spec, steps=self.steps, n=t.eval_n, extractor=self.extractor,
                              reference=self.reference, batch=EVAL_BATCH, precision=t.precision, leave=False,
                              codec=data_codec(self.config.data))
        record: dict[str, Any] = {"step": step, "kimg": images_seen / 1000,
                                  **{f"fid_{row['steps']}step": row["fid"] for row in rows}}
        record["best_fid"] = min([record[self.key], *(e[self.key] for e in history)])
        if method_entry(self.config.method.name).can(Capability.CONSISTENCY_METRIC):
            gaps = consistency_gaps(ema, self.x0, self.noise, labels=self.labels)
            record.update(consistency=float(np.mean(gaps)), consistency_pairs=gaps)
        record["eval_seconds"] = time.perf_counter() - tick
        return record

    def is_best(self, history: list[dict[str, Any]]) -> bool:
        """Whether the last record of ``history`` has the lowest primary FID of them all (a tie does not
        improve: the earlier record stays the best)."""
        *earlier, last = (e[self.key] for e in history)
        return all(last < e for e in earlier)

    def stop_reason(self, history: list[dict[str, Any]], out: Path) -> str | None:
        """Why the run stops after the last evaluation of ``history`` (``train.until_fid``, then
        ``train.eval_patience``), or None."""
        t, last, key = self.config.train, history[-1], self.key
        what = f"{self.label} {self.extractor.name}"
        where = f"stopped at {round(last['kimg'] * 1000):,} images"
        best_model = f"best model: {out / BEST_NAME}"
        if t.until_fid is not None and last[key] <= t.until_fid:
            return f"{where}: {what} {last[key]:.2f} <= train.until_fid {t.until_fid:g}; {best_model}"
        since = evaluations_since_best([e[key] for e in history])
        if t.eval_patience and since >= t.eval_patience:
            best = history[-1 - since]
            return (f"{where}: {what} did not improve on {best[key]:.2f} (at {round(best['kimg'] * 1000):,} "
                    f"images) in {since} evaluations (train.eval_patience {t.eval_patience}); {best_model}")
        return None


def evaluations_since_best(values: list[float]) -> int:
    """How many values come after the first occurrence of the lowest one (0: the last one is the best)."""
    return len(values) - 1 - int(np.argmin(values))


def held_out_batch(config: Config, dataset: data.ImageData,
                   device: torch.device) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """The consistency metric's fixed inputs: the first :data:`HELD_OUT` images of the data's test split (of
    ``dataset``, the training data, when the source has no test split) as x0 float32 [B, ...] in model space,
    their labels (class-conditional models; else None) and noise z ~ N(0, I) of x0's shape, seeded with
    ``derive_seed(train.seed, "consistency-metric")``."""
    d = config.data
    try:
        held_out = data.load_dataset(d.source, resolution=d.resolution, channels=d.channels, split="test")
    except CmkitError as e:  # an IDX folder with training files only, or a folder of images (no splits)
        warnings.warn(f"the consistency metric uses the first training images: no test split ({e})", stacklevel=2)
        held_out = dataset
    x0 = data_codec(d).encode(data.to_model_range(held_out.images[:HELD_OUT]))
    labels = held_out.labels[:HELD_OUT].to(device) if config.net.num_classes else None
    generator = torch.Generator().manual_seed(derive_seed(config.train.seed, "consistency-metric"))
    return x0.to(device), labels, torch.randn(x0.shape, generator=generator).to(device)


@torch.no_grad()
def consistency_gaps(model: nn.Module, x0: torch.Tensor, z: torch.Tensor, *, labels: torch.Tensor | None = None,
                     levels: int = METRIC_LEVELS) -> list[float]:
    """The consistency metric per pair: for the adjacent levels s_lo < s_hi of a ``levels``-point Karras grid
    over the model's [sigma_min, sigma_max] (rho 7; ascending, so the lowest pair comes first), the mean over
    images of mean((f(x0 + s_hi z, s_hi) - f(x0 + s_lo z, s_lo))^2), f being ``model`` (denoiser contract) and
    x0, z float [B, C, H, W] sharing one noise direction per image. This is the consistency-training loss of
    Song et al. 2023 (eq. 10, Alg. 3) with l2, unit weights and the model itself as the target, at fixed pairs,
    noise and images, so successive evaluations compare like with like."""
    sigmas = karras_sigmas(levels, sigma_min=model.sigma_min, sigma_max=model.sigma_max).tolist()
    outs = [model(x0 + s * z, torch.full((len(x0),), s, device=x0.device), of_labels(labels)) for s in sigmas]
    return [(hi - lo).float().pow(2).flatten(1).mean(1).mean().item()
            for lo, hi in zip(outs, outs[1:], strict=False)]

