"""torch.distributed helpers: one code path for 1 and N processes (world size 1 needs no process group).

Launch N processes with ``torchrun --nproc_per_node=N -m cmkit train ...``; :func:`init` reads torchrun's
``RANK``, ``WORLD_SIZE`` and ``LOCAL_RANK`` and joins the group (NCCL on GPUs, gloo on CPUs). Without
torchrun every helper acts as the single process it is: rank 0 of 1, reductions are the identity.

How randomness is split so that N processes train exactly like one process with the same global batch:

- The data order is a pure function of the images seen (:func:`cmkit.data.batch_indices`); process r of W
  takes rows ``[r B/W, (r+1) B/W)`` of each global batch of B, and splits them into ``accum`` micro-batches.
- Per-sample randomness (noise levels, noise, pair indices, flips) is keyed by the global batch, not by the
  process: :class:`BatchNoise` draws for all B rows from a generator seeded by (seed, step) and keeps this
  process's rows. Every sample therefore gets the same noise at any world size or accumulation, and the
  gradients, averaged over processes by DDP, equal the one-process gradients up to float summation order.
- Dropout masks are drawn inside the network from the global generator, which the loop seeds per micro-batch
  from (seed, step, first global row of the micro-batch). They match whenever the micro-batch size per
  process matches (e.g. 2 processes x 1 = 1 process x 2 accumulation steps); otherwise they are equally
  random but not identical, so runs with dropout agree only in distribution across world sizes.
- Sampling and evaluation shard seed lists over ranks (:func:`shard`) and gather in seed order
  (:func:`gather_in_order`); a seed identifies an image, so the images equal the one-process ones.
"""

from __future__ import annotations

import datetime
import hashlib
import os
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import numpy as np
import torch
import torch.distributed as td
from torch import Tensor, nn

from cmkit.errors import CmkitError

T = TypeVar("T")


# ----------------------------------------------------------------------------------------- process group

def init(*, timeout_s: float = 600.0) -> torch.device:
    """Join the process group torchrun describes (idempotent) and return this process's device.

    NCCL and ``cuda:LOCAL_RANK`` where CUDA is available, else gloo on the CPU. With ``WORLD_SIZE`` unset or
    1 no group is created. ``timeout_s`` bounds how long a collective waits for a rank that disappeared.
    """
    cuda = torch.cuda.is_available()
    device = torch.device("cuda", local_rank()) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not td.is_initialized():
        td.init_process_group("nccl" if cuda else "gloo", timeout=datetime.timedelta(seconds=timeout_s),
                              device_id=device if cuda else None)
    return device


def shutdown() -> None:
    """Leave the process group, if one was joined."""
    if td.is_initialized():
        td.destroy_process_group()


def world_size() -> int:
    return td.get_world_size() if td.is_initialized() else 1


def rank() -> int:
    return td.get_rank() if td.is_initialized() else 0


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def is_main() -> bool:
    """True on rank 0, the only process that writes files."""
    return rank() == 0


def barrier() -> None:
    if world_size() > 1:
        td.barrier()


# ------------------------------------------------------------------------------------------- reductions

def _device() -> torch.device:
    """Where collectives' tensors live: the current GPU under NCCL, else the CPU."""
    nccl = td.is_initialized() and td.get_backend() == "nccl"
    return torch.device("cuda", torch.cuda.current_device()) if nccl else torch.device("cpu")


def all_reduce_mean(values: Tensor) -> Tensor:
    """The mean over ranks of a float tensor (a new tensor on ``values``' device); identity at world size 1."""
    if world_size() == 1:
        return values.clone()
    out = values.detach().to(_device(), torch.float64)
    td.all_reduce(out)
    return (out / world_size()).to(values.device, values.dtype)


def any_rank(flag: bool) -> bool:
    """True when ``flag`` is true on at least one rank (the same answer on every rank)."""
    if world_size() == 1:
        return flag
    t = torch.tensor([float(flag)], device=_device())
    td.all_reduce(t, op=td.ReduceOp.MAX)
    return bool(t.item() > 0)


def on_main(fn: Callable[[], T]) -> T | None:
    """Run ``fn`` on rank 0 only; a CmkitError there (a full disk, say) is raised on every rank."""
    result, error = None, None
    if is_main():
        try:
            result = fn()
        except CmkitError as e:
            error = str(e)
    if world_size() > 1:
        box = [error]
        td.broadcast_object_list(box, src=0)
        error = box[0]
    if error is not None:
        raise CmkitError(error if is_main() else f"on rank 0: {error}")
    return result


def check_same_weights(*modules: nn.Module) -> None:
    """Raise CmkitError on every rank unless every rank holds bit-identical float state in ``modules``.

    Compares float64 checksums per tensor (sum, sum of squares, position-weighted sum), reduced with max
    and min over ranks; no weights are transferred.
    """
    if world_size() == 1:
        return
    names, sums = [], []
    for i, module in enumerate(modules):
        for name, t in module.state_dict().items():
            if t.is_floating_point():
                v = t.detach().double().flatten()
                ramp = torch.linspace(1, 2, v.numel(), dtype=torch.float64, device=v.device)
                sums.append(torch.stack([v.sum(), v.square().sum(), (v * ramp).sum()]))
                names.append(f"module {i}: {name}")
    local = torch.stack(sums).to(_device())
    hi, lo = local.clone(), -local
    td.all_reduce(hi, op=td.ReduceOp.MAX)
    td.all_reduce(lo, op=td.ReduceOp.MAX)
    differ = ((hi + lo) != 0).any(1) | ~torch.isfinite(hi).all(1)
    if bool(differ.any()):
        bad = [names[i] for i in differ.nonzero().flatten().tolist()]
        raise CmkitError(f"the {world_size()} processes hold different weights ({len(bad)} tensors, first "
                         f"{bad[0]}); nothing was written. The replicas diverged: a non-deterministic kernel, "
                         "a failed all-reduce, or ranks that did not start from the same checkpoint")


# ------------------------------------------------------------------------------------ sharding seed lists

def shard(items: Sequence[T]) -> Sequence[T]:
    """This rank's contiguous block of ``items`` (blocks differ in length by at most one, in rank order)."""
    n, w, r = len(items), world_size(), rank()
    return items[r * n // w:(r + 1) * n // w]


def gather_in_order(local: np.ndarray) -> np.ndarray:
    """Concatenate every rank's ``local`` array (rows of its :func:`shard`) in rank order, on every rank."""
    if world_size() == 1:
        return local
    parts: list[Any] = [None] * world_size()
    td.all_gather_object(parts, local)
    return np.concatenate(parts)


# ------------------------------------------------------------------------------- per-sample randomness

def derive_seed(*keys: int | str) -> int:
    """A 63-bit seed hashed from ``keys`` (e.g. the run seed, a stream name, the step), unrelated for near keys."""
    digest = hashlib.sha256(":".join(map(str, ("cmkit", *keys))).encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


class BatchNoise:
    """Random numbers for rows ``[start, start + n)`` of a global batch of ``total`` samples.

    Each draw generates values for all ``total`` rows from generators seeded with ``seed`` (one per device,
    created on first use) and returns this process's rows, so sample i gets the same numbers however the
    batch is split over processes and micro-batches, provided every split makes the same sequence of draws.
    """

    def __init__(self, seed: int, *, start: int, total: int) -> None:
        if not 0 <= start < total:
            raise ValueError(f"BatchNoise: start {start} outside a batch of {total}")
        self.seed, self.start, self.total = seed, start, total
        self._generators: dict[torch.device, torch.Generator] = {}

    def _generator(self, device: torch.device | str) -> torch.Generator:
        device = torch.device(device)
        if device not in self._generators:
            self._generators[device] = torch.Generator(device).manual_seed(self.seed)
        return self._generators[device]

    def _rows(self, values: Tensor, n: int) -> Tensor:
        if self.start + n > self.total:
            raise ValueError(f"BatchNoise: rows {self.start}..{self.start + n} outside a batch of {self.total}")
        return values[self.start:self.start + n]

    def randn(self, n: int, *shape: int, device: torch.device | str = "cpu") -> Tensor:
        """Standard normal float32 [n, *shape]."""
        return self._rows(torch.randn((self.total, *shape), generator=self._generator(device), device=device), n)

    def rand(self, n: int, device: torch.device | str = "cpu") -> Tensor:
        """Uniform [0, 1) float32 [n]."""
        return self._rows(torch.rand(self.total, generator=self._generator(device), device=device), n)

    def randint(self, high: int, n: int) -> Tensor:
        """Uniform integers in [0, high), int64 [n] on the CPU."""
        return self._rows(torch.randint(0, high, (self.total,), generator=self._generator("cpu")), n)

    def multinomial(self, probs: Tensor, n: int) -> Tensor:
        """Indices drawn with replacement from the CPU weights ``probs`` [K], int64 [n] on the CPU."""
        return self._rows(torch.multinomial(probs, self.total, replacement=True, generator=self._generator("cpu")),
                          n)


class GlobalNoise:
    """The :class:`BatchNoise` interface drawing ``n`` rows from torch's global generators (a whole batch)."""

    def randn(self, n: int, *shape: int, device: torch.device | str = "cpu") -> Tensor:
        return torch.randn((n, *shape), device=device)

    def rand(self, n: int, device: torch.device | str = "cpu") -> Tensor:
        return torch.rand(n, device=device)

    def randint(self, high: int, n: int) -> Tensor:
        return torch.randint(0, high, (n,))

    def multinomial(self, probs: Tensor, n: int) -> Tensor:
        return torch.multinomial(probs, n, replacement=True)


Noise = BatchNoise | GlobalNoise


def check_batch(batch: int, accum: int) -> int:
    """Rows per micro-batch per process; CmkitError (the same on every rank) unless they divide evenly."""
    w = world_size()
    if batch % (w * accum):
        raise CmkitError(f"train.batch={batch} is the global batch: it must be divisible by the number of "
                         f"processes x train.accum = {w} x {accum} = {w * accum}; choose a batch that is a "
                         f"multiple of {w * accum}, or change --nproc_per_node or train.accum")
    return batch // (w * accum)
