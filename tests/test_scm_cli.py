"""sCT and sCD end to end on real Fashion-MNIST images: TrigFlow models trained through the CLI (sCT from scratch,
sCD from a cmkit EDM teacher), resumed, sampled in 1 and 2 steps, edited, and their refusals.

Teachers through the CLI (sCT and sCD students of a cmkit EDM teacher, bad teachers): tests/test_teacher.py;
tune-steps on the sCT run: tests/test_eval_cli.py; the loss itself: tests/test_losses.py.
"""

from __future__ import annotations

import json
import math
import shutil

import numpy as np
import pytest
import torch

from cmkit import editing
from cmkit.checkpoint import build_model, list_states, load_export, load_state, save_export
from cmkit.config import apply_overrides
from cmkit.images import to_numpy_images
from cmkit.precond import TrigFlow
from cmkit.presets import preset
from cmkit.sampling import SeededNoise, default_sigmas, generate
from conftest import TINY, exit_status, train_tiny_sct

TWO_STEP = 0.5 * math.tan(1.1)  # sCM's 2-step t_mid = 1.1 as a noise level, sigma = sigma_data tan t


@pytest.fixture(scope="module")
def scd_run(fmnist_subset, tmp_path_factory):
    """2 sCD steps of 16 real images from a tiny cmkit EDM teacher (random weights, exported as a run would be)."""
    folder = tmp_path_factory.mktemp("scd")
    config = apply_overrides(preset("fmnist-edm"), TINY[:4])
    torch.manual_seed(0)
    save_export(build_model(config).eval(), config, folder / "edm.safetensors")
    out = folder / "run"
    assert exit_status(["train", "--preset", "fmnist-scd", "--out", str(out), "--data", str(fmnist_subset),
                        "--teacher", str(folder / "edm.safetensors"), "--kimg", "0.032", "--seed", "1",
                        "--set", "train.batch=16", "train.log_kimg=0.016", "train.snap_kimg=0.032"]) == 0
    return out


def _records(run) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_sct_trains_from_scratch(sct_run):
    """No teacher: a fresh TrigFlow network with the paper's time input, a log-variance head and sCT's dropout;
    the tangent warm-up logged as it grows over the preset's first 10,000 images."""
    method = json.loads((sct_run / "config.json").read_text())["method"]
    assert (method["name"], method["teacher"], method["c_noise"]) == ("sct", "", "t")
    assert [p.name for p in list_states(sct_run)] == ["state-0000000032.pt", "state-0000000064.pt"]
    records = _records(sct_run)
    assert [r["step"] for r in records] == [2, 4] and all(math.isfinite(r["loss"]) for r in records)
    assert [r["tangent_warmup"] for r in records] == pytest.approx([0.0032, 0.0064])
    model, config, _ = load_export(sct_run)
    assert isinstance(model, TrigFlow) and model.method_name == "sct" and model.c_noise == "t"
    assert model.net.map_logvar is not None and config.net.dropout == 0.2


def test_scd_distils_a_cmkit_edm_teacher(scd_run):
    method = json.loads((scd_run / "config.json").read_text())["method"]
    assert method["name"] == "scd" and method["teacher"].endswith("edm.safetensors")
    assert all(math.isfinite(r["loss"]) for r in _records(scd_run))
    model, config, _ = load_export(scd_run)
    assert isinstance(model, TrigFlow) and model.c_noise == "log-sigma" and config.net.model_channels == 8


def test_sct_resume_is_bit_exact(sct_run, fmnist_subset, tmp_path):
    """4 steps straight equal 2 steps, a checkpoint and 2 more after --resume, bit for bit: weights (log-variance
    head included), EMA and RAdam's state, with the dropout masks the JVP and gradient passes share."""
    half = tmp_path / "half"
    shutil.copytree(sct_run, half)
    list_states(half)[-1].unlink()
    (half / "model.safetensors").unlink()
    assert train_tiny_sct(half, fmnist_subset, "--resume") == 0
    midway, straight, resumed = (load_state(p) for p in (list_states(sct_run)[0], list_states(sct_run)[-1],
                                                         list_states(half)[-1]))
    assert resumed["step"] == straight["step"] == 4
    for key in ("model", "ema", "optimizer"):
        torch.testing.assert_close(resumed[key], straight[key], rtol=0, atol=0)
    assert not torch.equal(midway["model"]["net.map_logvar.bias"], straight["model"]["net.map_logvar.bias"])
    assert len(_records(half)) == 2


@pytest.mark.parametrize("run", ["sct_run", "scd_run"])
def test_sample_in_one_and_two_steps(run, request, tmp_path):
    """`cmkit sample --steps 1` is one consistency step from sigma_max; `--steps 2` adds sCM's t_mid = 1.1
    (sigma = 0.5 tan 1.1 = 0.982), the same images as `--sigmas 80,0.982...`."""
    path = request.getfixturevalue(run)
    model, _, spec = load_export(path)
    assert spec.two_step_sigma == pytest.approx(TWO_STEP, rel=1e-12)
    assert default_sigmas(spec, 2).tolist() == [80.0, spec.two_step_sigma]
    images, options = {}, {"one": ["--steps", "1"], "two": ["--steps", "2"], "listed": ["--sigmas", f"80,{TWO_STEP!r}"]}
    for name, args in options.items():
        out = tmp_path / f"{name}.npz"
        assert exit_status(["sample", str(path), "--n", "6", "--seed", "4", *args, "--out", str(out)]) == 0
        images[name] = np.load(out)["images"]
    one = torch.cat(list(generate(model, range(4, 10), sigmas=[80.0], sampler="consistency", batch_size=6)))
    assert np.array_equal(images["one"], to_numpy_images(one))
    assert np.array_equal(images["two"], images["listed"]) and not np.array_equal(images["two"], images["one"])


def test_inpainting_with_a_trigflow_model_keeps_known_pixels(sct_run):
    model, _, _ = load_export(sct_run)
    x = torch.rand(3, 1, 28, 28, generator=torch.Generator().manual_seed(0)) * 2 - 1
    mask = editing.box_mask((4, 6, 12, 10), resolution=28)
    noise = SeededNoise([0, 1, 2], (1, 28, 28))
    out = editing.inpaint(model, x, mask, sigmas=[80.0, 10.0, TWO_STEP, 0.1], noise=noise)
    assert out.shape == x.shape and out.dtype == torch.float32 and out.abs().max() <= 1
    assert torch.equal(out[:, :, ~mask], x[:, :, ~mask])
    assert (out[:, :, mask] - x[:, :, mask]).abs().min() > 0  # the hole is generated
