"""cmkit runs on the torch its pyproject.toml declares (issue 24): the DistributedDataParallel call is checked
against torch 2.4's signature, since the keyword that turns its buffer sync off was renamed in torch 2.13."""

from __future__ import annotations

import inspect
import re
import tomllib
from pathlib import Path

import torch
from torch import nn

from cmkit import dist

ROOT = Path(__file__).resolve().parents[1]


def ddp_of_torch_2_4(module, device_ids=None, output_device=None, dim=0, broadcast_buffers=True, process_group=None,
                     bucket_cap_mb=None, find_unused_parameters=False, check_reduction=False,
                     gradient_as_bucket_view=False, static_graph=False, delay_all_reduce_named_params=None,
                     param_to_hook_all_reduce=None, mixed_precision=None, device_mesh=None):
    """torch 2.4.0's DistributedDataParallel.__init__ parameters (torch/nn/parallel/distributed.py at v2.4.0)."""
    assert broadcast_buffers is False  # cmkit's buffers are constants: no broadcast before every forward
    return module


def test_the_declared_floor_is_2_4():
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    assert [d for d in deps if re.match(r"torch\b", d)] == ["torch>=2.4"]


def test_data_parallel_calls_ddp_with_keywords_torch_2_4_has(monkeypatch):
    model = nn.Linear(2, 2)
    monkeypatch.setattr(dist, "world_size", lambda: 2)
    monkeypatch.setattr(nn.parallel, "DistributedDataParallel", ddp_of_torch_2_4)
    assert dist.data_parallel(model, torch.device("cpu"), find_unused=True) is model  # a TypeError otherwise


def test_the_installed_torch_gets_a_keyword_it_has():
    ddp = nn.parallel.DistributedDataParallel
    assert set(dist.no_buffer_sync(ddp)) <= set(inspect.signature(ddp).parameters)
