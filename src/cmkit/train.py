"""The training loop: one flat sequence of steps delegating to config, data, losses and checkpoints.

Every step's randomness comes from generators seeded with :func:`cmkit.rng.derive_seed` of (seed, step), and
the data order is a pure function of the images seen, so a run resumed from a checkpoint ends bit-identical
to a straight one.
The same loop runs in 1 or N processes (``torchrun``): ``train.batch`` is the global batch, each process
takes its rows and splits them into ``train.accum`` micro-batches, DDP averages the gradients, and rank 0
alone writes files (:mod:`cmkit.rundir`); :mod:`cmkit.dist` explains how samples keep their noise at any
world size.
"""

from __future__ import annotations

import contextlib
import copy
import math
import signal
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from cmkit import checkpoint, data, dist, rundir, schedules
from cmkit.codec import data_codec
from cmkit.cond import drop_labels, of_labels
from cmkit.config import Config, validate
from cmkit.errors import CmkitError
from cmkit.images import to_numpy_images
from cmkit.losses import WarmStarted, check_compiled_jvp
from cmkit.machine import resolve_precision, run_config
from cmkit.methods import make_loss, method_entry, sampling_spec
from cmkit.monitor import Monitor
from cmkit.rng import BatchNoise, derive_seed
from cmkit.sampling import default_sigmas, generate
from cmkit.teacher import init_student, load_teacher

SNAPSHOT_SEEDS = range(64)


@dataclass
class Intervals:
    """How many optimiser steps lie between logs, snapshots, checkpoints and evaluations (0: none), and in the
    whole run."""

    total: int
    log: int
    snap: int
    ckpt: int
    eval: int

    @classmethod
    def of(cls, config: Config) -> Intervals:
        t = config.train
        every = lambda kimg: max(1, round(kimg * 1000 / t.batch))  # noqa: E731
        return cls(total=t.total_steps, log=every(t.log_kimg), snap=every(t.snap_kimg),
                   ckpt=every(t.ckpt_kimg), eval=every(t.eval_kimg) if t.eval_kimg else 0)


def load_training_data(config: Config) -> data.ImageData:
    """The dataset of ``config.data``, checked against the model's class count."""
    d, classes = config.data, config.net.num_classes
    dataset = data.load_dataset(d.source, resolution=d.resolution, channels=d.channels)
    if classes and dataset.num_classes != classes:
        raise CmkitError(f"net.num_classes={classes}, but {dataset.name} has "
                         f"{dataset.num_classes or 'no'} class labels; set net.num_classes to match or to 0")
    return dataset


def make_optimizer(config: Config, model: nn.Module) -> torch.optim.Optimizer:
    t = config.train
    kind = torch.optim.Adam if t.optimizer == "adam" else torch.optim.RAdam
    return kind(model.parameters(), lr=t.lr, betas=t.betas)


@torch.no_grad()
def ema_update(ema: nn.Module, model: nn.Module, decay: float) -> None:
    """ema <- decay * ema + (1 - decay) * model for every float entry of the state_dicts (parameters and
    buffers), paired by name; other entries (integer buffers) are copied. CmkitError when the two state_dicts
    do not hold the same names and shapes (a copy of another architecture)."""
    ours, theirs = ema.state_dict(), model.state_dict()
    differ = sorted(ours.keys() ^ theirs.keys()) or [k for k in ours if ours[k].shape != theirs[k].shape]
    if differ:
        raise CmkitError(f"EMA update: the EMA model and the model differ in {len(differ)} state_dict entries "
                         f"(first {differ[0]!r}); expected two copies of one architecture")
    for name, e in ours.items():
        if e.is_floating_point():
            e.lerp_(theirs[name], 1 - decay)
        else:
            e.copy_(theirs[name])


class Run:
    """The training state of one run in this process: the modules, the optimiser, the loss, the step and the
    records of the evaluations. Only the loop (this module) changes it; it writes no files, and what it hands
    to the writers (:mod:`cmkit.rundir`) and the evaluator (:mod:`cmkit.monitor`) is explicit data:
    :meth:`state_dict` (what a checkpoint holds), the EMA model, the config and the counts.
    """

    def __init__(self, config: Config, device: torch.device, *, teacher: nn.Module | None = None) -> None:
        config = resolve_precision(config, device)  # train.precision=auto: what this machine computes natively
        self.config, self.device = config, device
        t = config.train
        self.micro = dist.check_batch(t.batch, t.accum)  # rows per micro-batch in this process
        with torch.random.fork_rng(devices=[]):  # the initial weights depend on the run seed alone
            torch.manual_seed(t.seed)
            self.model = checkpoint.build_model(config).to(device).train()
        init_student(self.model, teacher, config)
        self.ema = copy.deepcopy(self.model).eval().requires_grad_(False)
        dim = data_codec(config.data).dim  # D, the values in one sample in model space
        self.loss = make_loss(config.method, dim=dim, total_images=t.total_steps * t.batch, teacher=teacher,
                              augment=config.data.augment)
        self.loss_scale = dim if t.loss_reduction == "sum" else 1  # from a mean over the D values to their sum
        self.target = None
        if self.loss.target_decay(0) is not None:
            self.target = copy.deepcopy(self.model).requires_grad_(False)
        dist.check_same_weights(self.model)
        if t.channels_last:  # the training replica only: the EMA and target stay contiguous (safetensors)
            self.model.to(memory_format=torch.channels_last)
        if t.compile:  # in place: the state_dict keys stay those of the plain module
            self.model.net.compile()
            if getattr(config.method, "jvp", None) == "forward":  # sCT, sCD, MeanFlow: tangents through compile
                check_compiled_jvp(self.model)
        # the log-variance head rests while warming up
        unused = method_entry(config.method.name).logvar_head and isinstance(self.loss, WarmStarted)
        self.ddp = dist.data_parallel(self.model, device, find_unused=unused)  # what the loss calls
        self.optimizer = make_optimizer(config, self.model)
        self.scaler = torch.amp.GradScaler(device.type, enabled=t.precision == "fp16")
        self.step = 0
        self.nonfinite = 0  # non-finite steps in a row
        self.evaluations: list[dict[str, Any]] = []  # the records of the loop's evaluations, oldest first

    @property
    def images_seen(self) -> int:
        """Training images consumed so far (over all processes): the progress every schedule is a function of."""
        return self.step * self.config.train.batch

    def optimizer_step(self, x0: torch.Tensor, labels: torch.Tensor | None) -> float | None:
        """One training step at ``self.step`` on this process's rows ``x0`` [B / world, ...] (from
        :func:`local_batch`): loss and backward per micro-batch, gradients averaged over processes, clipping,
        learning rate, optimiser step, then the sampling EMA and any target network. Returns the mean loss
        over the global batch, or None when the loss or the gradients were not finite on any process: then
        nothing is updated and ``self.nonfinite`` counts the skipped steps in a row (an fp16 overflow while
        the gradient scale is still >= 1 is left to the scaler and not counted). The step counter advances
        either way (the next step sees the next batch)."""
        t = self.config.train
        self.optimizer.zero_grad(set_to_none=True)
        loss = self._forward_backward(x0, labels)
        finite = bool(torch.isfinite(loss))  # the global mean: the same verdict on every process
        overflow = False
        if finite:  # the gradients, averaged over processes, are the same everywhere, and so is the verdict
            self.scaler.unscale_(self.optimizer)
            norm = nn.utils.clip_grad_norm_(self.model.parameters(), t.grad_clip if t.grad_clip > 0 else math.inf)
            finite = bool(torch.isfinite(norm))
            overflow = not finite and self.scaler.is_enabled() and self.scaler.get_scale() >= 1
            if finite:
                self._update()
            else:
                self.scaler.update()  # fp16: halve the gradient scale
        self.nonfinite = 0 if finite or overflow else self.nonfinite + 1
        self.step += 1
        return loss.item() if finite else None

    def _forward_backward(self, x0: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
        """Accumulate the gradients of this process's micro-batches (DDP averages them over processes on the
        last one); return the loss averaged over the global batch (non-finite if it is on any process)."""
        t, dtype = self.config.train, {"bf16": torch.bfloat16, "fp16": torch.float16}.get(self.config.train.precision)
        first = dist.rank() * (t.batch // dist.world_size())
        total = torch.zeros((), device=self.device)
        if t.channels_last:
            x0 = x0.contiguous(memory_format=torch.channels_last)
        for j in range(t.accum):
            rows = slice(j * self.micro, (j + 1) * self.micro)
            start = first + j * self.micro  # the micro-batch's first row in the global batch
            torch.manual_seed(derive_seed(t.seed, "dropout", self.step, start, self.micro))
            noise = BatchNoise(derive_seed(t.seed, "noise", self.step), start=start, total=t.batch)
            sync = j == t.accum - 1 or self.ddp is self.model
            with contextlib.nullcontext() if sync else self.ddp.no_sync():
                with torch.autocast(self.device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
                    loss = self.loss(self.ddp, x0[rows], of_labels(None if labels is None else labels[rows]),
                                     images_seen=self.images_seen, target=self.target, noise=noise)
                loss = loss.mean() * self.loss_scale  # the batch mean of train.loss_reduction's per-sample loss
                self.scaler.scale(loss / t.accum).backward()
            total += loss.detach().float()
        return dist.all_reduce_mean(total / t.accum)

    def _update(self) -> None:
        """Apply the gradients at the scheduled learning rate; update the sampling EMA and any target."""
        t, m = self.config.train, self.config.method
        for group in self.optimizer.param_groups:
            group["lr"] = schedules.learning_rate(self.images_seen, lr=t.lr, warmup_kimg=t.warmup_kimg,
                                                  warm_start_images=m.warm_start_images,
                                                  warm_start_lr=m.warm_start_rate)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        beta = schedules.ema_beta(self.images_seen, t.batch, halflife_kimg=t.ema_halflife_kimg, rampup=t.ema_rampup)
        ema_update(self.ema, self.model, beta)
        if self.target is not None:
            ema_update(self.target, self.model, self.loss.target_decay(self.images_seen))

    def state_dict(self) -> dict[str, Any]:
        """The resumable training state: plain values and the unwrapped modules' state_dicts."""
        return {"config": self.config.to_dict(), "step": self.step, "nonfinite": self.nonfinite,
                "model": self.model.state_dict(),
                "ema": self.ema.state_dict(), "optimizer": self.optimizer.state_dict(),
                "target": None if self.target is None else self.target.state_dict(),
                "scaler": self.scaler.state_dict(), "evaluations": self.evaluations}

    def load_state_dict(self, state: dict[str, Any], path: Path) -> None:
        """Load ``state`` read from ``path`` (every process loads the same one); CmkitError when it was
        trained with another config."""
        stored = Config.from_dict(state["config"], where=str(path))
        if stored != self.config:
            raise CmkitError(f"--resume: {path} was trained with a different config "
                             f"({config_diff(stored.to_dict(), self.config.to_dict())}); resume with the same "
                             "options or train into a new --out")
        self.model.load_state_dict(state["model"])
        self.ema.load_state_dict(state["ema"])
        self.optimizer.load_state_dict(state["optimizer"])
        if self.target is not None:
            self.target.load_state_dict(state["target"])
        if state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        self.step, self.nonfinite = state["step"], state.get("nonfinite", 0)
        self.evaluations = state.get("evaluations", [])  # none in a checkpoint written before they existed

    def snapshot_images(self) -> np.ndarray:
        """The EMA model's samples for seeds 0-63 with the default sampler of its kind, uint8 [64, H, W, C] on
        rank 0 (the seeds are shared out over the processes)."""
        spec = sampling_spec(self.config.method)
        seeds = dist.shard(list(SNAPSHOT_SEEDS))
        batches = generate(self.ema, seeds, sigmas=default_sigmas(spec, spec.steps), sampler=spec.sampler,
                           batch_size=64)
        shape = (0, self.config.data.resolution, self.config.data.resolution, self.config.data.channels)
        images = (to_numpy_images(data_codec(self.config.data).to_images(b)) for b in batches)
        return dist.gather_in_order(np.concatenate([np.zeros(shape, np.uint8), *images]))


def local_batch(config: Config, dataset: data.ImageData, step: int,
                device: torch.device) -> tuple[torch.Tensor, torch.Tensor | None]:
    """This process's rows of step ``step``'s global batch: x0 float32 [B / world, ...] in model space (images in
    [-1, 1] encoded by ``data.codec``) and labels int64 [B / world] or None. Flips and label dropout
    (``train.p_uncond``: the null label) are drawn for the global batch, so a sample's flip and dropped label are
    the same at any world size and micro-batching."""
    t, share = config.train, config.train.batch // dist.world_size()
    first = dist.rank() * share
    idx = data.batch_indices(len(dataset.images), t.batch, seed=t.seed, start=step * t.batch)
    idx = idx[first:first + share]
    x0 = data.to_model_range(dataset.images[idx])
    if config.data.xflip:
        flip = BatchNoise(derive_seed(t.seed, "flip", step), start=first, total=t.batch)
        x0 = torch.where((flip.rand(share) < 0.5).view(-1, 1, 1, 1), x0.flip(-1), x0)
    labels = dataset.labels[idx] if config.net.num_classes else None
    if t.p_uncond > 0:
        coin = BatchNoise(derive_seed(t.seed, "uncond", step), start=first, total=t.batch)
        labels = drop_labels(labels, coin.rand(share) < t.p_uncond)
    x0 = data_codec(config.data).encode(x0.to(device))
    return x0, None if labels is None else labels.to(device)


def config_diff(a: dict[str, Any], b: dict[str, Any], prefix: str = "") -> str:
    """``key: old -> new`` for the leaves where two config dicts differ."""
    out = []
    for key in a.keys() | b.keys():
        if isinstance(a.get(key), dict) and isinstance(b.get(key), dict):
            out.append(config_diff(a[key], b[key], f"{prefix}{key}."))
        elif a.get(key) != b.get(key):
            out.append(f"{prefix}{key}: {a.get(key)} -> {b.get(key)}")
    return ", ".join(sorted(o for o in out if o))


class TrainingStopped(Exception):
    """SIGINT or SIGTERM stopped training after the current step, and a checkpoint was written."""

    def __init__(self, signum: int, images_seen: int, state: Path) -> None:
        self.signum, self.images_seen, self.state = signum, images_seen, state
        super().__init__(f"stopped by {signal.Signals(signum).name} after {images_seen:,} training images; "
                         f"checkpoint {state}")


@contextlib.contextmanager
def stop_requests() -> Iterator[list[int]]:
    """While active, SIGINT and SIGTERM ask the loop to stop after its current step: the yielded list receives
    the signal numbers. A second signal interrupts at once (KeyboardInterrupt). Outside the main thread,
    where Python cannot install handlers, signals keep their usual effect."""
    received: list[int] = []

    def request(signum: int, frame: object) -> None:
        if received:
            raise KeyboardInterrupt
        received.append(signum)

    if threading.current_thread() is not threading.main_thread():
        yield received
        return
    previous = {s: signal.signal(s, request) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield received
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def check_nonfinite(run: Run, out: Path) -> None:
    """Stop the run when ``train.max_nonfinite`` steps in a row had a non-finite loss or gradients."""
    limit = run.config.train.max_nonfinite
    if run.nonfinite >= limit:
        states = checkpoint.list_states(out)
        last = f"the last good checkpoint is {states[-1]}" if states else "no checkpoint was written yet"
        raise CmkitError(f"training stopped at step {run.step}: {limit} steps in a row had a non-finite loss or "
                         f"gradients (all skipped); {last}. Lower train.lr, set train.grad_clip, or check the data")


def save_run(run: Run, out: Path) -> None:
    """Check that every process holds the same weights, then write ``run``'s training state and its EMA model's
    export into run directory ``out`` (rank 0; :func:`cmkit.rundir.save`)."""
    dist.check_same_weights(run.model, run.ema, *([run.target] if run.target is not None else []))
    rundir.save(out, run.state_dict(), ema=run.ema, config=run.config, images_seen=run.images_seen)


def log_record(run: Run, losses: list[float | None], busy: float) -> dict[str, float | None]:
    """The metrics line for the steps since the last one; ``losses`` holds None for each skipped step."""
    finite = [v for v in losses if v is not None]
    return {"step": run.step, "kimg": run.images_seen / 1000,
            "loss": float(np.mean(finite)) if finite else None, "skipped_steps": len(losses) - len(finite),
            "lr": run.optimizer.param_groups[0]["lr"], "images_per_s": len(losses) * run.config.train.batch / busy,
            **run.loss.stats(run.images_seen)}


def train(config: Config, out: Path, *, resume: bool = False, device: str | None = None) -> Path:
    """Train the model ``config`` describes into run directory ``out``; returns the export's path.

    ``config`` is validated first (CmkitError naming the first bad field). Under ``torchrun`` every process
    calls this; rank 0 alone writes files. SIGINT/SIGTERM finish the current step on every process, write a
    checkpoint and raise :class:`TrainingStopped`; resume with ``resume=True``. Steps with a non-finite loss or
    gradients are skipped and logged (``skipped_steps``). With ``train.eval_kimg`` the EMA model is evaluated
    (:mod:`cmkit.monitor`); when a stop rule (``train.until_fid``, ``train.eval_patience``) holds, a checkpoint
    and the export are written, rank 0 prints one line saying why, and this returns as at the end.
    """
    # 1. Process group, checks, data, teacher and the run's modules (all before anything is written).
    validate(config)
    own_device = dist.init()
    dist.check_batch(config.train.batch, config.train.accum)
    dataset = load_training_data(config)
    device = torch.device(device) if device else own_device
    config = resolve_precision(config, device, stored=run_config(out) if resume else None)  # auto: as it began
    teacher = load_teacher(config, device=device)
    run = Run(config, device, teacher=teacher)  # may refuse the teacher's weights (TrigFlow's c_noise)
    monitor = Monitor(config, dataset, device) if config.train.eval_kimg else None  # features of the reference
    resume_from = rundir.prepare_run_dir(config, out, resume=resume)
    if resume_from is not None:
        run.load_state_dict(checkpoint.load_state(resume_from), resume_from)
    every, main = Intervals.of(config), dist.is_main()
    log = rundir.MetricsLog(out, resume_step=run.step) if main else None
    losses: list[float | None] = []
    busy = 0.0  # seconds spent in training steps since the last log line
    reason = None  # why a stop rule ended the run
    bar = tqdm(total=every.total, initial=run.step, unit="step", dynamic_ncols=True, mininterval=1.0,
               disable=not main)
    with bar, stop_requests() as stop:  # the bar ends its line before any message
        while run.step < every.total:
            tick = time.perf_counter()
            # 2. This process's rows of the step's batch; all randomness is a function of (seed, step, row).
            x0, labels = local_batch(config, dataset, run.step, device)
            # 3. Loss, backward, optimiser step, EMA and target updates (skipped when not finite anywhere).
            losses.append(run.optimizer_step(x0, labels))
            busy += time.perf_counter() - tick
            bar.update(1)
            check_nonfinite(run, out)
            stopping = dist.any_rank(bool(stop))  # a stop request on any process stops all at this step
            # 4. Logs and sample grids at their intervals, and always at the end.
            last = run.step == every.total
            if (run.step % every.log == 0 or last) and log is not None:
                record = log_record(run, losses, busy)
                log.write(record)
                bar.set_postfix(loss=f"{record['loss']:.4g}" if record["loss"] is not None else "nan",
                                img_s=f"{record['images_per_s']:.0f}")
            if run.step % every.log == 0 or last:
                losses, busy = [], 0.0
            if run.step % every.snap == 0 or last:
                rundir.save_grid(run.snapshot_images(), out, images_seen=run.images_seen)
            # 5. Evaluations likewise: the record joins the run's history and the log, a new best FID writes
            #    model-best.safetensors, and a stop rule may end the run.
            if monitor is not None and (run.step % every.eval == 0 or last):
                evaluation = monitor.measure(run.ema, step=run.step, images_seen=run.images_seen,
                                             history=run.evaluations)
                run.evaluations.append(evaluation)
                if log is not None:
                    log.write(evaluation)
                if monitor.is_best(run.evaluations):
                    rundir.save_best(out, ema=run.ema, config=run.config)
                reason = monitor.stop_reason(run.evaluations, out)
            # 6. Checkpoints at their interval, at the end, and on a stop request or rule.
            if run.step % every.ckpt == 0 or last or stopping or reason:
                save_run(run, out)
            if reason:
                break
            if stopping and not last:
                signum = stop[0] if stop else signal.SIGTERM  # the request came from another process
                raise TrainingStopped(signum, run.images_seen, checkpoint.list_states(out)[-1])
    if reason and main:
        print(f"cmkit: {reason}", file=sys.stderr)
    return out / checkpoint.EXPORT_NAME
