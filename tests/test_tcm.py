"""Truncated consistency models (TCM, Lee et al. 2025): stage two of a stage-one consistency model.

- Point-mass data, where the exact consistency function is closed-form (f(x, sigma) = x eps / sigma) and maps
  x0 + t z and x0 + r z to the same point for every (r, t): the loss of the exact model is zero; a wrong stage-one
  model makes it non-zero exactly on the rows whose r lies below the truncation time t' (the boundary).
- The time distribution against scipy's Student-t quantiles; the boundary rows sit at t' exactly.
- A tiny CLI run from a tiny iCT stage one: starts from its weights, resumes bit-exact, samples; refusals.
"""

from __future__ import annotations

import json
import math
import shutil

import numpy as np
import pytest
import torch
from torch import nn

from cmkit.checkpoint import list_states, load_export, load_state
from cmkit.config import apply_overrides, validate
from cmkit.errors import CmkitError
from cmkit.methods import TCMConfig, make_loss
from cmkit.methods.tcm import TruncatedStudentT
from cmkit.presets import preset
from cmkit.rng import GlobalNoise
from conftest import GaussianOracle, exit_status, import_or_missing, train_tiny

EPS = 0.002
POINT_MASS = 1e-20  # the data's standard deviation s: x0 = 0 up to rounding


class Scaled(nn.Module):
    """``scale`` times ``model``'s output: a stage-one model that is wrong by a known factor."""

    def __init__(self, model: nn.Module, scale: float) -> None:
        super().__init__()
        self.model, self.scale = model, scale

    def forward(self, x, sigma, cond=None):
        return self.scale * self.model(x, sigma, cond)


def _loss(stage_one: nn.Module, **kw):
    method = TCMConfig(distance="pseudo-huber", huber_c=0.0, **kw)
    return make_loss(method, dim=16, total_images=10_000, teacher=stage_one)


def _draw(loss, model, n=512, seed=0, images_seen=0):
    """(per-sample loss [n], r, t, boundary, z) of one call, its pairs and noise re-drawn from the same seed."""
    x0 = torch.zeros(n, 1, 4, 4)
    torch.manual_seed(seed)
    per_sample = loss(model, x0, None, images_seen=images_seen, noise=GlobalNoise())
    torch.manual_seed(seed)
    r, t, boundary = loss.pairs(n, images_seen, GlobalNoise(), x0.device)
    return per_sample, r, t, boundary, torch.randn(n, 1, 4, 4)


@pytest.mark.parametrize("start_stage", [0, 3])
def test_the_exact_consistency_function_of_point_mass_data_has_zero_loss(start_stage):
    """f(x, sigma) = x eps / sigma maps x_t = t z and x_r = r z to eps z: zero loss per sample at every stage (at
    stage 0 some rows have r = 0, whose target is x0 itself: the stage-one model at sigma_min, eps z against 0)."""
    exact = GaussianOracle(POINT_MASS, kind="consistency")
    x = torch.randn(4, 1, 4, 4)
    torch.testing.assert_close(exact(x, 2.0), x * EPS / 2.0)
    per_sample, r, t, _, z = _draw(_loss(exact, start_stage=start_stage), exact)
    assert per_sample.shape == (512,) and per_sample.dtype == torch.float32
    positive = r > 0
    assert positive.any()
    assert per_sample[positive].abs().max() < 1e-5
    # r = 0: the target is x0 = 0 and the prediction eps z, a loss of ||eps z|| / t times the row's share weight
    zero = ~positive
    share = per_sample[zero] * t[zero] / (EPS * z[zero].flatten(1).norm(dim=1))
    assert all(min(abs(w - 1 / 0.75), abs(w - 0.1 / 0.25)) < 1e-4 for w in share.tolist())


def test_the_boundary_comes_from_the_stage_one_model():
    """With the exact student and a stage-one model wrong by a factor 1.5, exactly the rows with r < t' lose; the
    boundary rows (a quarter) sit at t = t' with r below it, so they all do."""
    exact = GaussianOracle(POINT_MASS, kind="consistency")
    loss = _loss(Scaled(exact, 1.5), start_stage=3)
    per_sample, r, t, boundary, z = _draw(loss, exact, n=2048)
    below = r < 1.0
    assert (t >= 1.0).all() and (t <= 80.0).all() and (r > 0).all() and (r < t).all()
    assert (t[boundary] == 1.0).all() and below[boundary].all()
    assert abs(boundary.float().mean().item() - 0.25) < 0.04
    assert (per_sample[below] > 1e-4).all() and per_sample[~below].abs().max() < 1e-5
    assert below.float().mean() > 0.3  # consistency rows near t' reach below it too
    # a boundary row: ||eps z - 1.5 eps z|| / (t' - r), weighted w / p = 0.1 / 0.25 (the paper's w_b)
    expected = 0.4 * 0.5 * EPS * z[boundary].flatten(1).norm(dim=1) / (1 - r[boundary])
    torch.testing.assert_close(per_sample[boundary], expected, rtol=1e-4, atol=0)


def test_truncated_student_t_matches_scipy():
    stats = import_or_missing("scipy.stats", "scipy checks the Student-t quantiles")
    for mean, std, df, low, high in [(0.0, 0.2, 0.01, 0.0, math.log(80)), (-1.0, 1.0, 2.0, -2.0, 3.0)]:
        draw = TruncatedStudentT(mean=mean, std=std, df=df, low=low, high=high)
        u = torch.linspace(0.001, 0.999, 499)
        a, b = stats.t.cdf((low - mean) / std, df), stats.t.cdf((high - mean) / std, df)
        expected = stats.t.ppf(a + u.double().numpy() * (b - a), df) * std + mean
        np.testing.assert_allclose(draw(u).numpy(), expected, atol=2e-3)
        assert draw(torch.tensor([0.0, 1.0])).tolist() == pytest.approx([low, high], abs=1e-6)


def test_config_refusals():
    good = apply_overrides(preset("fmnist-tcm"), ["method.teacher=x"])
    validate(good)
    for setting, message in [("method.transition=90", "method.transition"), ("method.boundary_prob=1", "boundary_prob"),
                             ("method.student_net=own", "method.student_net"), ("method.ratio_limit=0", "ratio_limit"),
                             ("method.warm_start_kimg=1", "method.warm_start_kimg")]:
        with pytest.raises(CmkitError, match=message):
            validate(apply_overrides(good, [setting]))
    with pytest.raises(CmkitError, match="stage-one consistency model is required"):
        make_loss(TCMConfig(), dim=16, total_images=1000)


# ------------------------------------------------------------------------------------- a tiny run

TINY_TCM = ["train.batch=16", "train.snap_kimg=0.064", "train.log_kimg=0.032", "net.dropout=0.2",
            "method.start_stage=2", "method.stage_kimg=0.032"]


def train_tiny_tcm(out, data, stage_one, *settings: str, flags: tuple[str, ...] = ()) -> int:
    """``settings``: more ``--set`` values; ``flags``: more options."""
    return train_tiny(out, data, *settings, "--teacher", str(stage_one), *flags, preset="fmnist-tcm",
                      settings=TINY_TCM, kimg=0.064)


@pytest.fixture(scope="module")
def tcm_run(run_dir, fmnist_subset, tmp_path_factory):
    """4 TCM steps of 16 real images with dropout from the tiny iCT run, checkpoints after steps 2 and 4."""
    out = tmp_path_factory.mktemp("runs") / "tcm"
    assert train_tiny_tcm(out, fmnist_subset, run_dir) == 0
    return out


def test_a_tiny_stage_two_trains_resumes_bit_exact_and_samples(tcm_run, run_dir, fmnist_subset, tmp_path):
    config = json.loads((tcm_run / "config.json").read_text())
    assert config["method"]["name"] == "tcm" and config["net"]["model_channels"] == 8  # the stage one's network
    records = [json.loads(line) for line in (tcm_run / "metrics.jsonl").read_text().splitlines()]
    assert [r["stage"] for r in records] == [3, 4] and all(math.isfinite(r["loss"]) for r in records)
    half = tmp_path / "half"
    shutil.copytree(tcm_run, half)
    list_states(half)[-1].unlink()
    (half / "model.safetensors").unlink()
    assert train_tiny_tcm(half, fmnist_subset, run_dir, flags=("--resume",)) == 0
    straight, resumed = load_state(list_states(tcm_run)[-1]), load_state(list_states(half)[-1])
    for key in ("model", "ema", "optimizer"):
        torch.testing.assert_close(resumed[key], straight[key], rtol=0, atol=0)
    model, _, spec = load_export(tcm_run)
    assert model.method_name == "tcm" and spec.sampler == "consistency"
    out = tmp_path / "s.npz"
    assert exit_status(["sample", str(tcm_run), "--n", "4", "--steps", "1", "--out", str(out)]) == 0
    assert np.load(out)["images"].shape == (4, 28, 28, 1)


def test_stage_two_starts_from_the_stage_one_weights(run_dir, fmnist_subset, tmp_path):
    """Steps at a vanishing learning rate leave the stage one's backbone as it was (not fresh weights)."""
    out = tmp_path / "still"
    assert train_tiny_tcm(out, fmnist_subset, run_dir, "train.lr=1e-12") == 0
    first, _, _ = load_export(run_dir)
    second, _, _ = load_export(out)
    for key, value in first.net.state_dict().items():
        torch.testing.assert_close(second.net.state_dict()[key], value, rtol=0, atol=1e-6)


def _refused(capsys, out, message):
    err = capsys.readouterr().err
    assert err.startswith("cmkit: error: ") and message in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1
    assert not out.exists()


def test_stage_two_without_a_stage_one_model_is_refused(fmnist_subset, tmp_path, capsys):
    out = tmp_path / "r"
    assert train_tiny(out, fmnist_subset, preset="fmnist-tcm", settings=TINY_TCM, kimg=0.064) == 2
    _refused(capsys, out, "second stage of a trained consistency model: pass --teacher MODEL")


def test_a_stage_one_of_another_parameterisation_is_refused(tiny_config, fmnist_subset, tmp_path, capsys):
    from test_teacher import _export

    for method in ("edm", "sct", "meanflow"):
        teacher = _export(tiny_config, tmp_path / f"{method}.safetensors", method=method)
        out = tmp_path / f"r-{method}"
        assert train_tiny_tcm(out, fmnist_subset, teacher) == 2
        _refused(capsys, out, f"a model trained with {method}; TCM's stage one must be a consistency model")
