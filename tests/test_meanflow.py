"""MeanFlow (Geng et al. 2025): the loss's target against closed forms and finite differences, the wrapper's
sampling against the paper's formulas, the shared dropout mask, a tiny CLI run, and the refusals."""

from __future__ import annotations

import json
import math
import shutil
from dataclasses import replace

import numpy as np
import pytest
import torch
from torch import nn

from cmkit.checkpoint import build_model, list_states, load_export, load_state
from cmkit.config import Config, DataConfig, NetConfig, TrainConfig, apply_overrides, validate
from cmkit.errors import CmkitError
from cmkit.losses import JVP, JVP_MODES
from cmkit.methods import MeanFlowConfig, SCTConfig, make_loss
from cmkit.methods.meanflow import MeanFlowLoss, TimePairs
from cmkit.nets import UNet
from cmkit.precond import MeanFlow
from cmkit.presets import preset
from cmkit.rng import GlobalNoise, SeededNoise
from cmkit.sampling import generate, meanflow_sample
from conftest import TINY, GaussianMeanFlow, exit_status, train_tiny

S = 0.5


def tiny_meanflow(dropout: float = 0.0, num_classes: int = 0) -> MeanFlow:
    config = Config(preset="test", net=NetConfig(model_channels=8, channel_mult=(1, 2), num_blocks=1,
                                                 attn_resolutions=(14,), dropout=dropout, num_classes=num_classes),
                    data=DataConfig(source="fake", resolution=28, channels=1), method=MeanFlowConfig(),
                    train=TrainConfig(kimg=0.256, batch=32))
    model = build_model(config)
    with torch.no_grad():  # the output layer starts near zero: give u a size worth comparing
        model.net.out_conv.weight.normal_(0, 0.3)
    return model


class Listed:
    """A RowNoise handing out prepared values, in the order the loss asks for them."""

    def __init__(self, *values: torch.Tensor) -> None:
        self.values = list(values)

    def randn(self, n, *shape, device="cpu"):
        value = self.values.pop(0)
        assert value.shape == (n, *shape)
        return value

    rand = randn


def _loss(**kw) -> MeanFlowLoss:
    method = replace(MeanFlowConfig(), **kw)
    return make_loss(method, dim=16, total_images=1000)


# ---------------------------------------------------------------------------------------- the target

def test_target_of_the_exact_average_velocity_is_itself():
    """The MeanFlow identity u = v - (t - r) du/dt holds for the exact u of N(0, S^2) data with v the exact
    (marginal) velocity: the loss's JVP target, given that v, returns u(z, r, t) itself. The model of another data
    scale, given the same data's v, is moved where r < t."""
    exact = GaussianMeanFlow(S)
    z = torch.randn(6, 1, 4, 4, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([0.9, 0.7, 0.5, 0.3, 0.99, 0.2])
    r = torch.tensor([0.1, 0.0, 0.45, 0.3, 0.5, 0.0])
    with torch.no_grad():
        v = exact.raw(z, t, t)
        goal = _loss().target(exact, z, r, t, v, None)
        torch.testing.assert_close(goal, exact.raw(z, r, t), rtol=1e-5, atol=1e-6)
        wrong = GaussianMeanFlow(0.8 * S)
        moved = _loss().target(wrong, z, r, t, v, None) - wrong.raw(z, r, t)
        assert moved.abs().amax(dim=(1, 2, 3))[r < t].min() > 1e-3
        assert moved[r == t].abs().max() > 1e-3  # at r = t the target is v itself, not the model's velocity


def test_loss_vanishes_where_the_sample_velocity_is_the_exact_one():
    """Rows drawn where x0 and e are their conditional means given z (so e - x0 is the marginal velocity): the
    exact model's loss is 0 there, for r < t and r = t alike; another data scale's is not. The noise is fed in
    the loss's order: t's and r's normal draws, the r = t coin, then e."""
    exact = GaussianMeanFlow(S)
    t = torch.tensor([0.9, 0.6, 0.4, 0.8])
    r0 = torch.tensor([0.2, 0.1, 0.3, 0.8])
    logit = torch.log(t / (1 - t)), torch.log(r0 / (1 - r0))
    z = torch.randn(4, 1, 4, 4, generator=torch.Generator().manual_seed(1))
    m2 = ((1 - t) ** 2 * S**2 + t**2).view(-1, 1, 1, 1)
    x0, e = (1 - t.view(-1, 1, 1, 1)) * S**2 / m2 * z, t.view(-1, 1, 1, 1) / m2 * z
    loss = _loss(t_mean=0.0, t_std=1.0, r_mean=0.0, r_std=1.0, ratio=1.0)

    def value(model):
        return loss(model, x0, None, images_seen=0, noise=Listed(logit[0], logit[1], torch.ones(4), e)).detach()

    assert value(exact).max() < 1e-9
    assert value(GaussianMeanFlow(0.7 * S)).min() > 1e-4


def test_jvp_target_equals_central_differences_of_the_network():
    """du/dt along (v, 0, 1) on (z, r, t) by forward mode equals (u(z + h v, r, t + h) - u(z - h v, r, t - h)) / 2h
    of the U-Net itself (float32, h = 1e-2: truncation and rounding errors both near 1e-4 of du/dt), read back
    from the target as du/dt = (v - u_tgt) / (t - r)."""
    model = tiny_meanflow().eval()
    gen = torch.Generator().manual_seed(2)
    z, v = (torch.randn(3, 1, 28, 28, generator=gen) for _ in range(2))
    t, r = torch.tensor([0.8, 0.6, 0.3]), torch.tensor([0.1, 0.5, 0.0])
    gap = (t - r).view(-1, 1, 1, 1)
    forward_mode = (v - _loss().target(model, z, r, t, v, None)) / gap
    h = 1e-2
    with torch.no_grad():
        finite = (model.raw(z + h * v, r, t + h) - model.raw(z - h * v, r, t - h)) / (2 * h)
    assert finite.abs().max() > 1e-1  # a derivative worth comparing
    assert (forward_mode - finite).abs().max() < 2e-3 * finite.abs().max()


def test_time_pairs_follow_the_sampler():
    """t is the larger logit-normal draw, r = t for a share 1 - ratio of the rows ("sorted", the paper's)."""
    times = TimePairs(t_mean=-2.0, t_std=2.0, r_mean=-2.0, r_std=2.0, ratio=0.75, pairing="sorted")
    torch.manual_seed(0)
    r, t = times(20_000, GlobalNoise(), torch.device("cpu"))
    assert ((r <= t) & (r > 0) & (t < 1)).all()
    assert (r == t).float().mean().item() == pytest.approx(0.25, abs=0.01)
    # the larger of two independent logit-normal(-2, 2) draws: P(t < 1/2) = P(both < 1/2) = Phi(1)^2
    assert (t < 0.5).float().mean().item() == pytest.approx(0.8413**2, abs=0.01)


# -------------------------------------------------------------------------------------- dropout masks

class MaskedVelocity(nn.Module):
    """u(z, r, t) = m * z * t with a fresh Bernoulli(1/2) mask m per call (from torch's global generator, as
    dropout), every mask recorded."""

    sigma_min, sigma_max = 0.002, 80.0

    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(()))
        self.masks: list[torch.Tensor] = []

    def raw(self, z, r, t, cond=None):
        mask = torch.bernoulli(torch.full(z.shape, 0.5))
        self.masks.append(mask)
        return self.weight * mask * z * t.view(-1, 1, 1, 1)


def test_jvp_and_gradient_passes_share_the_dropout_mask():
    """The loss equals ||m z t - v + (t - r) m (v t + z)||^2 (p = 0) with ONE mask m in both passes."""
    model, loss = MaskedVelocity(), _loss(norm_p=0.0, ratio=1.0)
    x0 = torch.randn(8, 1, 4, 4)
    torch.manual_seed(5)
    out = loss(model, x0, None, images_seen=0)
    jvp_mask, gradient_mask = model.masks
    assert torch.equal(jvp_mask, gradient_mask) and 0.3 < jvp_mask.mean() < 0.7
    torch.manual_seed(5)  # the same draws again, for the independent formula
    r, t = loss.times(8, GlobalNoise(), torch.device("cpu"))
    e = torch.randn(8, 1, 4, 4)
    t4, r4, m = t.view(-1, 1, 1, 1), r.view(-1, 1, 1, 1), jvp_mask
    z, v = (1 - t4) * x0 + t4 * e, e - x0
    formula = (m * z * t4 - v + (t4 - r4) * m * (v * t4 + z)).flatten(1).pow(2).sum(1)
    torch.testing.assert_close(out.detach(), formula)


# -------------------------------------------------------------------------------------- the wrapper

def test_one_step_sample_is_e_minus_u_at_0_1():
    model = tiny_meanflow().eval()
    seeds = [3, 4, 5]
    e = SeededNoise(seeds, (1, 28, 28))()
    ones = torch.ones(3)
    with torch.no_grad():
        paper = e - model.raw(e, 0 * ones, ones)
    for sampler in ("meanflow", "consistency"):
        x = torch.cat(list(generate(model, seeds, sigmas=[80.0], sampler=sampler, batch_size=3)))
        torch.testing.assert_close(x, paper, rtol=0, atol=1e-5)


def test_denoiser_contract_and_two_step_sample_follow_the_paper():
    """x0_hat at sigma = 1 (t = 1/2) is z - u(z, 0, 1/2)/2 with z = x/2; two steps through sigma = 1 are
    z = e - u(e, 1/2, 1)/2, then x = z - u(z, 0, 1/2)/2."""
    model = tiny_meanflow().eval()
    x = torch.randn(2, 1, 28, 28, generator=torch.Generator().manual_seed(4))
    half, one = torch.full((2,), 0.5), torch.ones(2)
    with torch.no_grad():
        torch.testing.assert_close(model(x, 1.0), x / 2 - 0.5 * model.raw(x / 2, 0 * one, half))
        noise = SeededNoise([7, 8], (1, 28, 28))
        e = SeededNoise([7, 8], (1, 28, 28))()
        mid = e - 0.5 * model.raw(e, half, one)
        paper = mid - 0.5 * model.raw(mid, 0 * one, half)
        torch.testing.assert_close(meanflow_sample(model, [80.0, 1.0], noise), paper, rtol=0, atol=1e-5)


def test_the_time_input_is_off_by_default():
    """A network without time2_embedding has exactly the parameters it had before the option; one with it
    refuses a call without the second time."""
    plain = UNet(resolution=8, in_channels=1, out_channels=1, model_channels=8, channel_mult=(1,), num_blocks=1)
    assert not any(key.startswith("map_time2") for key in plain.state_dict())
    two = UNet(resolution=8, in_channels=1, out_channels=1, model_channels=8, channel_mult=(1,), num_blocks=1,
               time2_embedding=True)
    assert set(two.state_dict()) - set(plain.state_dict()) == {"map_time2.weight", "map_time2.bias"}
    with pytest.raises(ValueError, match="time2_labels must have shape"):
        two(torch.zeros(2, 1, 8, 8), torch.zeros(2))


# ------------------------------------------------------------------------------------------ the CLI

TINY_MEANFLOW = [*TINY[:4], "train.batch=16", "train.snap_kimg=0.064", "train.log_kimg=0.032", "net.dropout=0.2"]


def train_tiny_meanflow(out, data, *extra) -> int:
    return train_tiny(out, data, *extra, preset="fmnist-meanflow", settings=TINY_MEANFLOW, kimg=0.064)


@pytest.fixture(scope="module")
def meanflow_run(fmnist_subset, tmp_path_factory):
    """4 MeanFlow steps of 16 real images with dropout, checkpoints after steps 2 and 4."""
    out = tmp_path_factory.mktemp("runs") / "meanflow"
    assert train_tiny_meanflow(out, fmnist_subset) == 0
    return out


def test_a_tiny_run_trains_resumes_bit_exact_and_samples(meanflow_run, fmnist_subset, tmp_path):
    method = json.loads((meanflow_run / "config.json").read_text())["method"]
    assert method["name"] == "meanflow" and method["pairing"] == "clipped"
    records = [json.loads(line) for line in (meanflow_run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [2, 4] and all(math.isfinite(r["loss"]) for r in records)
    half = tmp_path / "half"
    shutil.copytree(meanflow_run, half)
    list_states(half)[-1].unlink()
    (half / "model.safetensors").unlink()
    assert train_tiny_meanflow(half, fmnist_subset, "--resume") == 0
    straight, resumed = load_state(list_states(meanflow_run)[-1]), load_state(list_states(half)[-1])
    for key in ("model", "ema", "optimizer"):
        torch.testing.assert_close(resumed[key], straight[key], rtol=0, atol=0)
    model, config, spec = load_export(meanflow_run)
    assert isinstance(model, MeanFlow) and model.net.map_time2 is not None and spec.sampler == "meanflow"
    images = {}
    for steps in ("1", "2"):
        out = tmp_path / f"{steps}.npz"
        assert exit_status(["sample", str(meanflow_run), "--n", "4", "--steps", steps, "--out", str(out)]) == 0
        images[steps] = np.load(out)["images"]
        assert images[steps].shape == (4, 28, 28, 1)
    assert not np.array_equal(images["1"], images["2"])


def test_bad_input_is_refused_in_one_line(meanflow_run, tmp_path, capsys):
    """A schedule that does not start at t = 1 (sigma_max), and guidance for an unconditional model."""
    for args, what in ((["--sigmas", "40,1"], "a MeanFlow model starts from pure noise at t = 1"),
                       (["--guidance", "2"], "this model is not class-conditional")):
        out = tmp_path / "x.png"
        assert exit_status(["sample", str(meanflow_run), "--n", "2", *args, "--out", str(out)]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("cmkit: error:") and what in err and len(err.splitlines()) == 1, err
        assert not out.exists()
    model, _, _ = load_export(meanflow_run)
    with pytest.raises(CmkitError, match="expected the first level to be 80"):
        meanflow_sample(model, [79.0], SeededNoise([0], (1, 28, 28)))


# ------------------------------------------------------------------------------------ the JVP options

def test_both_jvp_modes_give_the_closed_form_derivative():
    """fn(x, t) = sin(x) t^2 along (a, b): cos(x) a t^2 + 2 sin(x) t b, by forward mode and central differences."""
    x, t = torch.linspace(-2, 2, 12).view(3, 4), torch.tensor([0.5, 1.0, 1.5])
    a, b = torch.full((3, 4), 0.7), torch.tensor([1.0, -2.0, 0.5])

    def fn(y, s):
        return y.sin() * (s**2).view(-1, 1)

    exact = x.cos() * a * (t**2).view(-1, 1) + 2 * x.sin() * (t * b).view(-1, 1)
    for mode in JVP_MODES:
        value, derivative = JVP(mode, step=1e-3)(fn, (x, t), (a, b))
        torch.testing.assert_close(value, fn(x, t))
        torch.testing.assert_close(derivative, exact, rtol=0, atol=1e-3)


@pytest.mark.parametrize("method", ["meanflow", "sct"])
def test_finite_differences_agree_with_forward_mode_in_the_losses(method):
    """MeanFlow's target and sCT's tangent from a U-Net with dropout in train mode: central differences (each
    call replaying the dropout mask of the single forward-mode call) agree with forward mode."""
    if method == "meanflow":
        model = tiny_meanflow(dropout=0.3).train()
        z, v = (torch.randn(3, 1, 28, 28, generator=torch.Generator().manual_seed(s)) for s in (0, 1))
        t, r = torch.tensor([0.8, 0.6, 0.3]), torch.tensor([0.1, 0.5, 0.0])

        def result(mode):
            torch.manual_seed(7)
            return _loss(jvp=mode, jvp_step=1e-2).target(model, z, r, t, v, None)
    else:
        config = Config(preset="test", net=NetConfig(model_channels=8, channel_mult=(1, 2), num_blocks=1,
                                                     attn_resolutions=(14,), dropout=0.3),
                        data=DataConfig(source="fake", resolution=28, channels=1),
                        method=SCTConfig(c_noise="t", tangent_warmup_kimg=0), train=TrainConfig(kimg=0.256, batch=32))
        model = build_model(config).train()
        with torch.no_grad():
            model.net.out_conv.weight.normal_(0, 0.3)
        x_t, dxdt = (torch.randn(3, 1, 28, 28, generator=torch.Generator().manual_seed(s)) for s in (0, 1))
        t = torch.tensor([0.3, 0.8, 1.2])

        def result(mode):
            torch.manual_seed(7)
            loss = make_loss(replace(config.method, jvp=mode, jvp_step=1e-2), dim=784, total_images=1000)
            return loss.tangent(model, x_t, t, dxdt, None, images_seen=0)
    forward, finite = result("forward"), result("finite-difference")
    assert (forward - finite).abs().max() < 3e-3 * forward.abs().max()


def test_a_bad_jvp_option_is_refused_in_one_line():
    for item, what in (("method.jvp=reverse", "method.jvp: unknown value 'reverse'"),
                       ("method.jvp_step=0", "method.jvp_step: expected a positive number, got 0")):
        with pytest.raises(CmkitError, match=what) as error:
            validate(apply_overrides(preset("fmnist-meanflow"), [item]))
        assert len(str(error.value).splitlines()) == 1


def test_a_class_conditional_model_samples_with_guidance():
    """Classifier-free guidance at sampling wraps the MeanFlow denoiser like any other: one step at scale w is
    D_uncond + w (D_cond - D_uncond), so scale 2 lies as far beyond scale 1 as scale 0 lies before it; two steps
    (r = t/2 reaching both branches through cond.time2) run too."""
    model = tiny_meanflow(num_classes=3).eval()

    def sample(guidance, sigmas=(80.0,)):
        return torch.cat(list(generate(model, [1, 2], sigmas=list(sigmas), sampler="meanflow", batch_size=2,
                                       label=1, guidance=guidance, p_uncond=0.1)))

    unconditional, plain, guided = sample(0.0), sample(None), sample(2.0)
    assert (plain - unconditional).abs().max() > 1e-6
    torch.testing.assert_close(guided - plain, plain - unconditional, rtol=0, atol=1e-6)
    assert torch.isfinite(sample(2.0, (80.0, 1.0))).all()
