from dataclasses import replace

import pytest
import torch

from cmkit.checkpoint import build_model
from cmkit.methods import TEACHER_METHODS, CDConfig, CTConfig, ECTConfig, EDMConfig, ICTConfig
from cmkit.train import Intervals, Run, ema_update, local_batch

METHODS = {
    "edm": EDMConfig(p_mean=-1.2, p_std=1.2),
    "ct": CTConfig(s0=2, s1=10, mu0=0.9, distance="l2"),
    "ict": ICTConfig(s0=2, s1=8),
    "cd": CDConfig(num_scales=18, distance="l2"),
    "ect": ECTConfig(stage_kimg=0.064),
}


def _teacher(config):
    """A diffusion model of the student's architecture (random weights), frozen."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(123)
        return build_model(replace(config, method=METHODS["edm"])).eval().requires_grad_(False)


def _steps(config, n, seed=0):
    teacher = _teacher(config) if config.method.needs_teacher else None
    run = Run(config, torch.device("cpu"), teacher=teacher)
    x0 = torch.rand(config.train.batch, 1, 28, 28, generator=torch.Generator().manual_seed(0)) * 2 - 1
    losses = []
    for _ in range(n):
        torch.manual_seed(seed + run.step)
        losses.append(run.optimizer_step(x0, None))
    return run, losses


@pytest.mark.parametrize("name", METHODS)
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_every_method_trains_and_is_deterministic(tiny_config, name, precision):
    config = replace(tiny_config, method=METHODS[name], train=replace(tiny_config.train, precision=precision))
    run_a, losses = _steps(config, 3)
    run_b, again = _steps(config, 3)
    assert all(torch.isfinite(torch.tensor(losses))) and losses == again
    for a, b in zip(run_a.model.state_dict().values(), run_b.model.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    assert (run_a.target is not None) == (name == "ct")


@pytest.mark.parametrize("name", TEACHER_METHODS)
def test_student_starts_from_the_teacher(tiny_config, name):
    config = replace(tiny_config, method=METHODS[name])
    teacher = _teacher(config)
    run = Run(config, torch.device("cpu"), teacher=teacher)
    for ours, theirs in ((run.model.net, teacher.net), (run.ema.net, teacher.net)):
        torch.testing.assert_close(ours.state_dict(), theirs.state_dict(), rtol=0, atol=0)


def test_ema_update_is_a_lerp():
    a, b = torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)
    expected = 0.9 * a.weight.detach() + 0.1 * b.weight.detach()
    ema_update(a, b, 0.9)
    torch.testing.assert_close(a.weight.detach(), expected)


def test_intervals_of_config(tiny_config):
    every = Intervals.of(tiny_config)  # 0.256 kimg at batch 32; ckpt 0.128, snap 0.256, log 0.064
    assert (every.total, every.ckpt, every.snap, every.log) == (8, 4, 8, 2)


def test_class_conditional_batch_and_step(tiny_config):
    from cmkit.data import ImageData

    config = replace(tiny_config, net=replace(tiny_config.net, num_classes=3),
                     data=replace(tiny_config.data, xflip=True))
    images = torch.randint(0, 256, (40, 1, 28, 28), dtype=torch.uint8)
    dataset = ImageData(images=images, labels=torch.arange(40) % 3, num_classes=3, name="fake")
    run = Run(config, torch.device("cpu"))
    run.step = 1  # the second batch: positions 32..63 of the stream, crossing into epoch 2
    x0, labels = local_batch(run.config, dataset, run.step, run.device)
    assert x0.shape == (32, 1, 28, 28) and labels.shape == (32,) and labels.max() < 3
    assert torch.isfinite(torch.tensor(run.optimizer_step(x0, labels)))
