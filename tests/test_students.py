"""Students of their own shape (``method.student_net=own``): smaller than the teacher, from fresh weights, warm-started
on the teacher's denoiser (``method.warm_start_kimg``) before their own loss; bad student settings are refused."""

from __future__ import annotations

import base64
import io
import json
from dataclasses import replace

import numpy as np
import pytest
import torch
from PIL import Image

from cmkit.checkpoint import build_model, load_export, save_export
from cmkit.cli import main
from cmkit.errors import CmkitError
from cmkit.losses import EDMLoss, WarmStarted
from cmkit.methods import CDConfig, SCTConfig, make_loss, switch_method
from cmkit.presets import preset
from cmkit.rng import BatchNoise
from cmkit.teacher import load_teacher
from cmkit.train import Run, load_training_data
from conftest import GaussianOracle


def _teacher(tiny_config, path):
    """A tiny EDM export (random weights: a denoiser all the same) as 'cmkit train' would write it."""
    config = replace(tiny_config, method=switch_method(tiny_config.method, "edm"))
    torch.manual_seed(0)
    save_export(build_model(config), config, path)
    return path


def _train(out, data, teacher, *settings, preset_name="fmnist-cd", kimg="0.128"):
    return main(["train", "--preset", preset_name, "--out", str(out), "--data", str(data), "--kimg", kimg,
                 "--seed", "1", "--teacher", str(teacher), "--set", "train.batch=32", "train.log_kimg=0.032",
                 "train.snap_kimg=0.128", *settings])


def _parameters(model) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("preset_name", ["fmnist-cd", "fmnist-scd"])  # every distillation method, one code path
def test_a_smaller_student_trains_from_a_cmkit_teacher(tiny_config, fmnist_subset, tmp_path, preset_name):
    teacher = _teacher(tiny_config, tmp_path / "edm.safetensors")
    out = tmp_path / "student"
    layout = ["net.channel_mult=1,2", "net.num_blocks=1", "net.attn_resolutions=14"]  # the teacher's
    assert _train(out, fmnist_subset, teacher, "method.student_net=own", *layout, "net.model_channels=4",
                  "method.warm_start_kimg=0.064", preset_name=preset_name) == 0
    student, config, _ = load_export(out)
    assert config.net == replace(tiny_config.net, model_channels=4)  # the teacher's layout, the student's width
    assert _parameters(student) == _parameters(build_model(config)) < _parameters(load_export(teacher)[0]) / 3
    lines = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]
    assert [ln["warm_start"] for ln in lines] == [1.0, 0.0, 0.0, 0.0]  # 2 of 4 steps warm up, then the method
    assert all(torch.isfinite(torch.tensor(ln["loss"])) for ln in lines)


def test_the_small_preset_is_a_quarter_of_its_teacher():
    for small, teacher in (("fmnist-cd-small", "fmnist-edm"), ("fmnist-scd-small", "fmnist-edm"),
                           ("cifar10-cd-small", "cifar10-edm")):
        ratio = _parameters(build_model(preset(teacher))) / _parameters(build_model(preset(small)))
        assert 3.9 < ratio < 4.1, (small, ratio)
    assert _parameters(build_model(preset("fmnist-cd-small"))) == 441_297
    assert preset("fmnist-scd-small").net == preset("fmnist-cd-small").net  # the same student, distilled by sCD


@pytest.mark.parametrize("preset_name", ["fmnist-cd-small", "fmnist-scd-small"])
def test_the_small_preset_trains_with_its_own_network(tiny_config, fmnist_subset, tmp_path, preset_name):
    teacher = _teacher(tiny_config, tmp_path / "edm.safetensors")
    assert _train(tmp_path / "s", fmnist_subset, teacher, "method.warm_start_kimg=0.032", kimg="0.064",
                  preset_name=preset_name) == 0
    assert load_export(tmp_path / "s")[1].net == preset(preset_name).net  # not the teacher's


def _student_config(tiny_config, teacher, **method):
    return replace(tiny_config, net=replace(tiny_config.net, model_channels=4),
                   method=CDConfig(teacher=str(teacher), student_net="own", distance="pseudo-huber", **method),
                   train=replace(tiny_config.train, kimg=4.0))


def _distance_to_teacher(student, teacher, x0) -> float:
    """EDM-weighted mean squared distance between the two denoisers at fixed noisy images and levels."""
    gen = torch.Generator().manual_seed(7)
    total = 0.0
    for sigma in (0.05, 0.3, 1.0, 3.0):
        x = x0 + sigma * torch.randn(x0.shape, generator=gen)
        with torch.no_grad():
            gap = (student(x, sigma) - teacher(x, sigma)).pow(2).mean().item()
        total += gap * (sigma**2 + 0.25) / (sigma * 0.5) ** 2
    return total / 4


def test_the_warm_start_lowers_the_students_distance_to_the_teachers_denoiser(tiny_config, fmnist_subset, tmp_path):
    path = _teacher(tiny_config, tmp_path / "edm.safetensors")
    config = _student_config(tiny_config, path, warm_start_kimg=2.0)
    config = replace(config, data=replace(config.data, source=str(fmnist_subset)))
    teacher = load_teacher(config, device=torch.device("cpu"))
    run = Run(config, torch.device("cpu"), teacher=teacher)
    assert isinstance(run.loss, WarmStarted)
    data = load_training_data(config)
    held_out = data.images[-64:].float() / 127.5 - 1
    before = _distance_to_teacher(run.model, teacher, held_out)
    for step in range(40):
        x0 = data.images[(step * 32) % 256:(step * 32) % 256 + 32].float() / 127.5 - 1
        assert run.optimizer_step(x0, None) is not None
    after = _distance_to_teacher(run.model, teacher, held_out)
    assert after < 0.5 * before, (before, after)


def test_the_warm_start_loss_vanishes_at_the_teachers_denoiser_and_pulls_towards_it():
    teacher = GaussianOracle(0.5, kind="edm")
    loss = EDMLoss(p_mean=-1.2, p_std=1.2, sigma_data=0.5, teacher=teacher)
    x0 = torch.randn(256, 1, 4, 4) * 2.0  # not the teacher's data: the target is the teacher, not x0
    noise = BatchNoise(3, start=0, total=256)
    assert loss(GaussianOracle(0.5, kind="edm"), x0, None, images_seen=0, noise=noise).abs().max() < 1e-6
    student = GaussianOracle(1.5, kind="edm")
    optimizer = torch.optim.Adam(student.parameters(), lr=0.05)
    for step in range(200):
        optimizer.zero_grad()
        loss(student, x0, None, images_seen=0, noise=BatchNoise(step, start=0, total=256)).mean().backward()
        optimizer.step()
    assert student.log_s.exp().item() == pytest.approx(0.5, rel=0.02)  # the teacher's s, not the data's 2.0


class _Recorder:
    def __init__(self, name, calls):
        self.name, self.calls = name, calls

    def __call__(self, model, x0, labels, *, images_seen, target=None, noise=None):
        self.calls.append((self.name, images_seen))
        return torch.zeros(len(x0))

    def target_decay(self, images_seen):
        return 0.9 if images_seen >= 100 else 0.5

    def stats(self, images_seen):
        return {"seen": images_seen}


def test_the_student_loss_starts_its_schedules_after_the_warm_start():
    calls = []
    loss = WarmStarted(_Recorder("loss", calls), warm=_Recorder("warm", calls), images=640)
    for seen in (0, 576, 640, 740):
        loss(None, torch.zeros(2, 1, 4, 4), None, images_seen=seen)
    assert calls == [("warm", 0), ("warm", 576), ("loss", 0), ("loss", 100)]
    assert loss.target_decay(576) == 0.5 and loss.target_decay(740) == 0.9
    assert loss.stats(0) == {"warm_start": 1.0, "seen": 0} and loss.stats(740) == {"warm_start": 0.0, "seen": 100}


def _phase_run(tiny_config, path, fmnist_subset):
    """A 4-step run at batch 32 whose first 2 steps warm up at 3e-3, then CD at train.lr 1e-3."""
    config = _student_config(tiny_config, path, warm_start_kimg=0.064, warm_start_lr=3e-3, mu=0.95)
    config = replace(config, data=replace(config.data, source=str(fmnist_subset)),
                     train=replace(config.train, kimg=0.128))
    return Run(config, torch.device("cpu"), teacher=load_teacher(config, device=torch.device("cpu")))


def _phase_steps(run, data, steps):
    rates = []
    for _ in range(steps):
        start = (run.step * 32) % 256
        torch.manual_seed(run.step)
        assert run.optimizer_step(data.images[start:start + 32].float() / 127.5 - 1, None) is not None
        rates.append(run.optimizer.param_groups[0]["lr"])
    return rates


def test_the_warm_start_trains_at_its_own_rate_and_hands_over_to_cd(tiny_config, fmnist_subset, tmp_path):
    """The first 64 images regress the teacher's denoiser at method.warm_start_lr: the teacher itself scores zero
    there (and the fresh student not); from image 64 CD trains at train.lr, where the teacher (a denoiser, not a
    consistency function) scores above zero."""
    run = _phase_run(tiny_config, _teacher(tiny_config, tmp_path / "edm.safetensors"), fmnist_subset)
    data = load_training_data(run.config)
    teacher, x0 = run.loss.warm.teacher, data.images[:32].float() / 127.5 - 1

    def loss(model, seen):
        return run.loss(model, x0, None, images_seen=seen, target=teacher, noise=BatchNoise(5, start=0, total=32))

    assert loss(teacher, 63).abs().max() == 0 and loss(run.model, 63).min() > 0
    assert loss(teacher, 64).min() > 0
    assert run.loss.stats(63)["warm_start"] == 1.0 and run.loss.stats(64)["warm_start"] == 0.0
    assert _phase_steps(run, data, 4) == [3e-3, 3e-3, 1e-3, 1e-3]


def test_resume_across_the_warm_start_boundary_is_bit_exact(tiny_config, fmnist_subset, tmp_path):
    """1 warm-start step, save, load into a new run, 3 more steps (the handover to CD among them) end where 4
    straight steps do, bit for bit."""
    from cmkit.checkpoint import list_states, load_state
    from cmkit.train import save_run

    teacher = _teacher(tiny_config, tmp_path / "edm.safetensors")
    straight = _phase_run(tiny_config, teacher, fmnist_subset)
    data = load_training_data(straight.config)
    _phase_steps(straight, data, 4)
    first = _phase_run(tiny_config, teacher, fmnist_subset)
    _phase_steps(first, data, 1)
    save_run(first, tmp_path / "half")
    resumed = _phase_run(tiny_config, teacher, fmnist_subset)
    (path,) = list_states(tmp_path / "half")
    resumed.load_state_dict(load_state(path), path)
    assert _phase_steps(resumed, data, 3) == [3e-3, 1e-3, 1e-3]
    for key in ("model", "ema", "target", "optimizer"):
        torch.testing.assert_close(resumed.state_dict()[key], straight.state_dict()[key], rtol=0, atol=0, msg=key)


def test_a_student_of_the_teachers_shape_still_starts_from_its_weights(tiny_config, tmp_path):
    path = _teacher(tiny_config, tmp_path / "edm.safetensors")
    config = replace(_student_config(tiny_config, path), net=tiny_config.net)  # own, but the same network
    teacher = load_teacher(config, device=torch.device("cpu"))
    run = Run(config, torch.device("cpu"), teacher=teacher)
    for key, value in teacher.net.state_dict().items():
        assert torch.equal(run.model.net.state_dict()[key], value), key


def test_make_loss_warm_starts_only_when_asked(tiny_config, tmp_path):
    teacher = GaussianOracle(0.5, kind="edm")
    method = CDConfig(student_net="own")
    assert not isinstance(make_loss(method, dim=16, total_images=1000, teacher=teacher), WarmStarted)
    warm = make_loss(replace(method, warm_start_kimg=0.5), dim=16, total_images=1000, teacher=teacher)
    assert isinstance(warm, WarmStarted) and warm.images == 500 and warm.warm.teacher is teacher


@pytest.mark.parametrize(("settings", "message"), [
    (["method.student_net=own", "net.num_classes=10"], "classes does not fit"),
    (["method.student_net=smaller"], "method.student_net: unknown value 'smaller'; expected one of teacher, own"),
    (["method.warm_start_kimg=-1"], "method.warm_start_kimg: expected >= 0, got -1"),
    (["method.warm_start_kimg=0.128"], "method.warm_start_kimg=0.128: expected less than train.kimg=0.128"),
    (["method.warm_start_kimg=0.064", "method.warm_start_lr=0"],
     "method.warm_start_lr: expected a positive number (or auto: train.lr), got 0.0"),
    (["method.warm_start_lr=1e-3"], "method.warm_start_lr=0.001: the rate of a warm-start, but there is none"),
    (["net.model_channels=4"], "set method.student_net=own for a student of its own shape"),
])
def test_bad_student_settings_are_refused_before_anything_is_written(tiny_config, fmnist_subset, tmp_path, capsys,
                                                                      settings, message):
    teacher = _teacher(tiny_config, tmp_path / "edm.safetensors")
    assert _train(tmp_path / "r", fmnist_subset, teacher, *settings) == 2
    err = capsys.readouterr().err
    assert err.startswith("cmkit: error: ") and message in err and "Traceback" not in err
    assert not (tmp_path / "r").exists()


def test_a_warm_start_without_a_teacher_is_refused(tiny_config):
    config = replace(tiny_config, method=SCTConfig(warm_start_kimg=0.1))
    assert load_teacher(config, device=torch.device("cpu")) is None  # sCT trains without one
    with pytest.raises(CmkitError, match="a warm-start regresses a teacher's denoiser; pass --teacher MODEL"):
        Run(config, torch.device("cpu"))


@pytest.mark.parametrize("preset_name", ["fmnist-cd-small", "fmnist-scd-small"])
def test_the_studio_serves_the_small_student_beside_its_full_size_teacher(tmp_path, preset_name):
    """A small student's export (the preset's network) is served with an fmnist-edm teacher of four times its
    parameters beside it: its generate is cmkit's one-step sample of the same seeds."""
    from cmkit.images import grid, to_numpy_images
    from cmkit.sampling import default_sigmas, generate
    from cmkit.studio.engine import GRID, Models, Studio, check_models

    small, teacher = preset(preset_name), preset("fmnist-edm")
    torch.manual_seed(0)
    save_export(build_model(small), small, tmp_path / "small.safetensors")
    save_export(build_model(teacher), teacher, tmp_path / "edm.safetensors")
    model, config, spec = load_export(tmp_path / "small.safetensors")
    edm, edm_config, _ = load_export(tmp_path / "edm.safetensors")
    models = Models(model, config, edm, edm_config, spec)
    check_models(models)
    reply = Studio(models, data="fashion-mnist").reply({"id": 1, "mode": "generate", "seed": 3, "steps": 1})
    assert "error" not in reply, reply
    x = next(generate(model, range(3, 3 + GRID), sigmas=default_sigmas(spec, 1), sampler="consistency",
                      batch_size=GRID))
    png = base64.b64decode(reply["images"]["result"].split(",", 1)[1])
    np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(png)))[..., None], grid(to_numpy_images(x)))
