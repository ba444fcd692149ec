"""Teachers for CD, ECT, sCT and sCD through the CLI: a cmkit EDM teacher is distilled; bad teachers are refused
cleanly. (sCD's run and sCT without a teacher: tests/test_scm_cli.py.)"""

from __future__ import annotations

import itertools
import json
from dataclasses import replace

import pytest
import torch

from cmkit.checkpoint import build_model, load_export, save_export
from cmkit.cli import main
from cmkit.methods import switch_method
from conftest import TINY


def _export(tiny_config, path, *, method, resolution=28, channels=1):
    """Write an export of random weights for a tiny net, as 'cmkit train' would."""
    config = replace(tiny_config, method=switch_method(tiny_config.method, method),
                     data=replace(tiny_config.data, resolution=resolution, channels=channels))
    torch.manual_seed(0)
    save_export(build_model(config), config, path)
    return path


def _train(out, data, teacher, preset="fmnist-cd", *extra):
    args = ["train", "--preset", preset, "--out", str(out), "--data", str(data), "--kimg", "0.064",
            "--seed", "1", "--set", "train.batch=32", "train.log_kimg=0.032", "train.snap_kimg=0.064", *extra]
    return main(args + ([] if teacher is None else ["--teacher", str(teacher)]))


@pytest.mark.parametrize("preset", ["fmnist-cd", "fmnist-ect", "fmnist-sct"])
def test_students_train_from_a_cmkit_teacher(tiny_config, fmnist_subset, tmp_path, preset):
    teacher = _export(tiny_config, tmp_path / "edm.safetensors", method="edm")
    out = tmp_path / "student"
    assert _train(out, fmnist_subset, teacher, preset) == 0
    config = json.loads((out / "config.json").read_text())
    assert config["method"]["teacher"] == str(teacher.resolve())
    assert config["net"]["model_channels"] == 8  # the student took the teacher's architecture
    model, stored, _ = load_export(out)
    assert model.method_name == stored.method.name == preset.split("-")[1]
    lines = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]
    assert all(torch.isfinite(torch.tensor(ln["loss"])) for ln in lines)


def _refused(capsys, out, message):
    err = capsys.readouterr().err
    assert err.startswith("cmkit: error: ") and message in err and "Traceback" not in err
    assert not out.exists()  # nothing written


@pytest.mark.parametrize("preset", ["fmnist-cd", "fmnist-scd"])  # sCT trains without one: tests/test_scm_cli.py
def test_distillation_without_a_teacher_is_refused(fmnist_subset, tmp_path, capsys, preset):
    assert _train(tmp_path / "r", fmnist_subset, None, preset) == 2
    _refused(capsys, tmp_path / "r", "pass --teacher MODEL")


@pytest.mark.parametrize("preset", ["fmnist-cd", "fmnist-scd"])
@pytest.mark.parametrize("method", ["ict", "sct"])
def test_a_consistency_model_is_not_a_teacher(tiny_config, fmnist_subset, tmp_path, capsys, preset, method):
    teacher = _export(tiny_config, tmp_path / f"{method}.safetensors", method=method)
    assert _train(tmp_path / "r", fmnist_subset, teacher, preset) == 2
    _refused(capsys, tmp_path / "r", f"a model trained with {method}; a teacher must have the 'teach' capability")


@pytest.mark.parametrize("preset", ["fmnist-sct", "fmnist-scd"])
def test_a_trigflow_student_of_a_cmkit_teacher_needs_its_time_input(tiny_config, fmnist_subset, tmp_path, capsys,
                                                                   preset):
    """The student becomes the EDM teacher only with EDM's ln(sigma) / 4 as its time input: c_noise=t is refused
    (when the student is built, still before the run directory is written)."""
    teacher = _export(tiny_config, tmp_path / "edm.safetensors", method="edm")
    assert _train(tmp_path / "r", fmnist_subset, teacher, preset, "method.c_noise=t") == 2
    _refused(capsys, tmp_path / "r", "method.c_noise=t: a student that starts from an EDM teacher's weights")


def test_a_teacher_of_another_shape_is_refused(tiny_config, fmnist_subset, tmp_path, capsys):
    teacher = _export(tiny_config, tmp_path / "rgb.safetensors", method="edm", resolution=32, channels=3)
    assert _train(tmp_path / "r", fmnist_subset, teacher) == 2
    _refused(capsys, tmp_path / "r", "a 32x32 model with 3 channel(s)")


@pytest.mark.parametrize(("make", "message"), [
    (lambda p: p.write_text("not a model"), "not a cmkit model"),
    (lambda p: p.mkdir(), "nor a diffusers UNet2DModel folder"),
    (lambda p: None, "no such file or directory"),
])
def test_a_path_that_is_not_a_diffusion_model_is_refused(fmnist_subset, tmp_path, capsys, make, message):
    teacher = tmp_path / "teacher"
    make(teacher)
    assert _train(tmp_path / "r", fmnist_subset, teacher) == 2
    _refused(capsys, tmp_path / "r", message)


def test_teacher_flag_needs_a_teacher_method(tiny_config, fmnist_subset, tmp_path, capsys):
    teacher = _export(tiny_config, tmp_path / "edm.safetensors", method="edm")
    assert _train(tmp_path / "r", fmnist_subset, teacher, "fmnist-ict", *TINY[4:]) == 2
    _refused(capsys, tmp_path / "r", "trains without a teacher")


def test_a_student_net_other_than_the_teachers_is_refused(tiny_config, fmnist_subset, tmp_path, capsys):
    teacher = _export(tiny_config, tmp_path / "edm.safetensors", method="edm")
    assert _train(tmp_path / "r", fmnist_subset, teacher, "fmnist-cd", "net.model_channels=16") == 2
    _refused(capsys, tmp_path / "r", "net.model_channels: 8 (teacher) vs 16")


def _dry_run(capsys, preset, groups):
    """``cmkit train --dry-run`` of ``preset`` with the option groups in the given order: its config (or None
    when refused) and the error line."""
    argv = ["train", "--preset", preset, "--out", "r", "--dry-run", *(arg for group in groups for arg in group)]
    status = main(argv)
    out, err = capsys.readouterr()
    return (json.loads(out) if status == 0 else None), err


@pytest.mark.parametrize(("preset", "method"), [("fmnist-cd", "scd"), ("fmnist-ict", "cd"), ("fmnist-ect", "cd")])
def test_option_order_never_matters_with_a_teacher(tiny_config, tmp_path, capsys, preset, method):
    """Issue 24: --teacher is applied for the method --set chooses, wherever it stands: every permutation of
    the options gives one config, which distils the teacher with its network and the --set net.* value."""
    teacher = _export(tiny_config, tmp_path / "edm.safetensors", method="edm")
    groups = [("--teacher", str(teacher)), ("--set", f"method.name={method}", "net.dropout=0.25"),
              ("--kimg", "3"), ("--seed", "7")]
    configs = [_dry_run(capsys, preset, order) for order in itertools.permutations(groups)]
    assert all(c == configs[0] for c in configs), {err for _, err in configs}
    config = configs[0][0]
    assert config["method"]["name"] == method and config["method"]["teacher"] == str(teacher)
    teachers_net = json.loads(json.dumps(tiny_config.to_dict()["net"]))  # tuples as JSON lists
    assert config["net"] == {**teachers_net, "dropout": 0.25}  # the teacher's network with --set's dropout
    assert (config["train"]["kimg"], config["train"]["seed"]) == (3, 7)


def test_a_net_setting_wins_over_the_teachers_net_in_any_order(tiny_config, tmp_path, capsys):
    """A --set net.* value is kept whatever the order, so load_teacher's check can refuse it (above)."""
    teacher = _export(tiny_config, tmp_path / "edm.safetensors", method="edm")
    groups = [("--teacher", str(teacher)), ("--set", "net.model_channels=16")]
    configs = [_dry_run(capsys, "fmnist-cd", order)[0] for order in itertools.permutations(groups)]
    assert configs[0] == configs[1] and configs[0]["net"]["model_channels"] == 16


def test_a_teacher_for_a_method_switched_away_from_distillation_is_refused_in_any_order(tiny_config, tmp_path,
                                                                                        capsys):
    teacher = _export(tiny_config, tmp_path / "edm.safetensors", method="edm")
    groups = [("--teacher", str(teacher)), ("--set", "method.name=ict")]
    for order in itertools.permutations(groups):
        config, err = _dry_run(capsys, "fmnist-cd", order)
        assert config is None and "the ict method trains without a teacher" in err
