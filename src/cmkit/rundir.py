"""The files of a run directory, written by rank 0 alone: ``config.json``, training checkpoints, the
``model.safetensors`` export (and ``model-best.safetensors`` when the run evaluates itself), sample grids and
``metrics.jsonl`` (plus TensorBoard scalars).

The training loop (:mod:`cmkit.train`) hands over what is to be written: the training state as plain values and
state_dicts, the EMA model, the config and the counts; nothing here reads or changes the loop's own state.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
from torch import nn

from cmkit import checkpoint, dist
from cmkit.config import Config
from cmkit.errors import CmkitError
from cmkit.images import save_images


def prepare_run_dir(config: Config, out: Path, *, resume: bool) -> Path | None:
    """Create the run directory; return the checkpoint to resume from (None: start from the beginning).

    ``resume`` continues from the newest checkpoint, or starts from the beginning when there is none yet
    (a run stopped before its first checkpoint lost nothing worth keeping). Without ``resume``, a directory
    holding checkpoints is refused, and so is one started with another config, so no work is overwritten.
    Every process checks before rank 0 writes anything, so all raise the same error or none does.
    """
    states = checkpoint.list_states(out)
    stored = out / "config.json"
    text = json.dumps(config.to_dict(), indent=2) + "\n"
    resume_from = states[-1] if states and resume else None
    if resume_from is None and (states or (stored.exists() and stored.read_text() != text)):
        raise CmkitError(f"{out} already holds a run; pass --resume (with the same options) to continue it or "
                         "choose another --out")
    dist.barrier()

    def prepare() -> None:
        if resume_from is None:
            try:
                out.mkdir(parents=True, exist_ok=True)
                stored.write_text(text)
            except OSError as e:
                raise CmkitError(f"--out {out}: the run directory could not be created ({e.strerror or e})") from None
        checkpoint.remove_partial_writes(out)  # a killed write's leftovers

    dist.on_main(prepare)
    return resume_from


class MetricsLog:
    """metrics.jsonl plus TensorBoard scalars; on resume, drops lines newer than the checkpoint."""

    def __init__(self, out: Path, *, resume_step: int) -> None:
        self.path = out / "metrics.jsonl"
        if self.path.exists():
            kept = [ln for ln in self.path.read_text().splitlines() if _logged_step(ln) <= resume_step]
            self.path.write_text("".join(ln + "\n" for ln in kept))
        from torch.utils.tensorboard import (
            SummaryWriter,  # imported late: slow import, only the loop needs it
        )

        self.tb = SummaryWriter(str(out / "tensorboard"), purge_step=resume_step + 1)

    def write(self, record: dict[str, Any]) -> None:
        """Append one line; None (a loss when every step since the last line was skipped) is JSON null. Numbers
        other than the step also go to TensorBoard; other values (None, lists) to metrics.jsonl alone."""
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        for key, value in record.items():
            if key != "step" and isinstance(value, int | float) and not isinstance(value, bool):
                self.tb.add_scalar(key, value, record["step"])
        self.tb.flush()


def _logged_step(line: str) -> float:
    """The step of one metrics.jsonl line; infinite for a blank or partial line (a write that was killed)."""
    try:
        return json.loads(line)["step"]
    except (ValueError, KeyError, TypeError):
        return math.inf


def save(out: Path, state: dict[str, Any], *, ema: nn.Module, config: Config, images_seen: int) -> None:
    """On rank 0, write the training state ``state`` (plain values and state_dicts, what ``--resume`` loads) as
    the checkpoint of ``images_seen`` training images, keeping the newest ``train.keep_ckpts``, and ``ema``'s
    export with ``config`` as ``model.safetensors``; a failed write raises CmkitError on every rank. Sampling
    schedules tuned for the export it replaces (``cmkit tune-steps``) are kept. The caller checks first that
    every process holds the same weights (:func:`cmkit.dist.check_same_weights`)."""

    def write() -> None:
        checkpoint.save_state(state, out, images_seen=images_seen, keep=config.train.keep_ckpts)
        export = out / checkpoint.EXPORT_NAME
        spec = checkpoint.export_spec(export) if export.is_file() else None
        checkpoint.save_export(ema, config, export, spec=spec)

    dist.on_main(write)


def save_best(out: Path, *, ema: nn.Module, config: Config) -> None:
    """Write ``ema``'s export with ``config`` as ``model-best.safetensors`` on rank 0 (the caller decides that
    it is the best)."""
    dist.on_main(lambda: checkpoint.save_export(ema, config, out / checkpoint.BEST_NAME))


def save_grid(images: np.ndarray, out: Path, *, images_seen: int) -> Path:
    """Write a sample grid (uint8 [N, H, W, C]) as ``samples/samples-<images_seen>.png`` on rank 0."""
    path = out / "samples" / f"samples-{images_seen:010d}.png"

    def write() -> None:
        path.parent.mkdir(exist_ok=True)
        save_images(images, path)

    dist.on_main(write)
    return path
