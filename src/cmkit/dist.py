"""torch.distributed helpers: one code path for 1 and N processes (world size 1 needs no process group).

Launch N processes with ``torchrun --nproc_per_node=N -m cmkit train ...``; :func:`init` reads torchrun's
``RANK``, ``WORLD_SIZE`` and ``LOCAL_RANK`` and joins the group (NCCL on GPUs, gloo on CPUs). Without
torchrun every helper acts as the single process it is: rank 0 of 1, reductions are the identity.

How randomness is split so that N processes train exactly like one process with the same global batch:

- The data order is a pure function of the images seen (:func:`cmkit.data.batch_indices`); process r of W
  takes rows ``[r B/W, (r+1) B/W)`` of each global batch of B, and splits them into ``accum`` micro-batches.
- Per-sample randomness (noise levels, noise, pair indices, flips) is keyed by the global batch, not by the
  process: :class:`cmkit.rng.BatchNoise` draws for all B rows from a generator seeded by (seed, step) and keeps this
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
import inspect
import os
import warnings
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


def data_parallel(model: nn.Module, device: torch.device, *, find_unused: bool = False) -> nn.Module:
    """``model`` wrapped in DistributedDataParallel under torchrun; ``model`` itself in one process.
    ``find_unused``: some steps leave parameters without gradients (a warm-start does not train sCM's
    log-variance head), which DDP must then look for."""
    if world_size() == 1:
        return model
    # 1x1-conv gradients [C, C, 1, 1] arrive with other (equivalent) strides for their size-1 dims
    warnings.filterwarnings("ignore", message="Grad strides do not match bucket view strides")
    ids = [device.index] if device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(model, device_ids=ids, gradient_as_bucket_view=True,
                                               find_unused_parameters=find_unused,
                                               **no_buffer_sync(nn.parallel.DistributedDataParallel))


def no_buffer_sync(ddp: Callable[..., nn.Module]) -> dict[str, bool]:
    """The keyword that stops ``ddp`` (DistributedDataParallel) broadcasting the module's buffers before every
    forward: cmkit's buffers are constants every process builds alike (FIR kernels, noise-embedding
    frequencies). torch 2.13 renamed ``broadcast_buffers`` (which it deprecates) to ``forward_sync_buffers``
    (pytorch/pytorch PR 178054); torch 2.4, cmkit's floor, knows only the first."""
    known = inspect.signature(ddp).parameters
    return {"forward_sync_buffers": False} if "forward_sync_buffers" in known else {"broadcast_buffers": False}


def check_batch(batch: int, accum: int) -> int:
    """Rows per micro-batch per process; CmkitError (the same on every rank) unless they divide evenly."""
    w = world_size()
    if batch % (w * accum):
        raise CmkitError(f"train.batch={batch} is the global batch: it must be divisible by the number of "
                         f"processes x train.accum = {w} x {accum} = {w * accum}; choose a batch that is a "
                         f"multiple of {w * accum}, or change --nproc_per_node or train.accum")
    return batch // (w * accum)
