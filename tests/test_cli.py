"""End to end through the CLI on a few hundred real Fashion-MNIST images: train, checkpoint, resume, sample."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from dataclasses import replace

import numpy as np
import pytest
import torch
from PIL import Image

from cmkit.checkpoint import list_states, load_export, load_state
from cmkit.cli import main, make_parser
from cmkit.config import Config
from cmkit.machine import auto_precision
from cmkit.methods import method_entry
from cmkit.presets import PRESETS, preset
from conftest import exit_status, train_tiny


def test_train_writes_the_run_directory(run_dir):
    for name in ("config.json", "metrics.jsonl", "model.safetensors", "samples", "checkpoints", "tensorboard"):
        assert (run_dir / name).exists(), name
    assert [p.name for p in list_states(run_dir)] == ["state-0000000128.pt", "state-0000000256.pt"]
    state = load_state(list_states(run_dir)[-1])  # weights_only=True
    assert state["step"] == 8 and state["config"]["net"]["model_channels"] == 8
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 4 and all(np.isfinite(eval(ln.replace("null", "None"))["loss"]) for ln in lines)
    grids = sorted((run_dir / "samples").glob("*.png"))
    assert len(grids) == 2 and Image.open(grids[-1]).size == (2 + 8 * 30, 2 + 8 * 30)
    model, config, _ = load_export(run_dir)
    assert config.preset == "fmnist-ict" and config.data.source.endswith("fmnist-320")
    torch.testing.assert_close(model.state_dict(), state["ema"], rtol=0, atol=0)


def test_resume_is_bit_exact(run_dir, fmnist_subset, tmp_path):
    """run_dir resumed after its first checkpoint ends where it did, bit for bit; the tune-steps result stored
    in its export survives (the export rewritten at the end keeps it). An export absent at resume:
    tests/test_reliability.py."""
    from cmkit.checkpoint import export_spec, save_export

    half = tmp_path / "b"
    shutil.copytree(run_dir, half)
    list_states(half)[-1].unlink()
    model, config, spec = load_export(half)
    save_export(model, config, half / "model.safetensors", spec=spec.with_tuned(2, [80.0, 1.5]))
    assert train_tiny(half, fmnist_subset, "--resume") == 0
    straight, resumed = load_state(list_states(run_dir)[-1]), load_state(list_states(half)[-1])
    for key in ("model", "ema", "optimizer"):
        torch.testing.assert_close(resumed[key], straight[key], rtol=0, atol=0)
    assert len((half / "metrics.jsonl").read_text().splitlines()) == 4
    assert export_spec(half).tuned == {2: (80.0, 1.5)}
    assert load_export(half).spec.tuned == {2: (80.0, 1.5)}


def test_resume_refuses_another_config(run_dir, fmnist_subset, tmp_path, capsys):
    other = tmp_path / "c"
    shutil.copytree(run_dir, other)
    assert train_tiny(other, fmnist_subset, "train.lr=5e-4", "--resume") == 2
    assert "train.lr" in capsys.readouterr().err


def test_fresh_run_refuses_an_existing_run(run_dir, fmnist_subset, capsys):
    before = sorted(p.name for p in (run_dir / "checkpoints").iterdir())
    assert train_tiny(run_dir, fmnist_subset) == 2
    assert "--resume" in capsys.readouterr().err
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == before


def test_resume_before_the_first_checkpoint_starts_over(run_dir, fmnist_subset, tmp_path, capsys):
    """A run killed before its first checkpoint left only config.json: --resume (or a plain re-run with the
    same options) starts from the beginning and ends as the straight run did; other options are refused."""
    early = tmp_path / "early"
    early.mkdir()
    shutil.copy(run_dir / "config.json", early / "config.json")
    assert train_tiny(early, fmnist_subset, "train.lr=5e-4") == 2
    assert "already holds a run" in capsys.readouterr().err
    assert train_tiny(early, fmnist_subset, "--resume") == 0
    straight, again = load_state(list_states(run_dir)[-1]), load_state(list_states(early)[-1])
    torch.testing.assert_close(again["model"], straight["model"], rtol=0, atol=0)


def test_sample_npz_and_png(run_dir, tmp_path):
    a, b, g = tmp_path / "a.npz", tmp_path / "b.npz", tmp_path / "g.png"
    assert main(["sample", str(run_dir), "--n", "10", "--seed", "5", "--out", str(a)]) == 0
    assert main(["sample", str(run_dir / "model.safetensors"), "--n", "10", "--seed", "5", "--batch", "3",
                 "--out", str(b)]) == 0
    images = np.load(a)["images"]
    assert images.dtype == np.uint8 and images.shape == (10, 28, 28, 1)
    assert np.array_equal(images, np.load(b)["images"])
    assert main(["sample", str(run_dir), "--n", "4", "--sigmas", "80,0.821", "--out", str(g)]) == 0
    assert Image.open(g).size == (2 + 2 * 30, 2 + 2 * 30)


@pytest.mark.parametrize("argv, message", [
    (["sample", "{run}", "--sigmas", "0.5,2", "--out", "{tmp}/x.png"], "descending"),
    (["sample", "{run}", "--sigmas", "100", "--out", "{tmp}/x.png"], "within"),
    (["sample", "{run}", "--steps", "0", "--out", "{tmp}/x.png"], "positive"),
    (["sample", "{run}", "--n", "0", "--out", "{tmp}/x.png"], "positive"),
    (["sample", "{run}", "--out", "{tmp}/x.jpg"], ".png or .npz"),
    (["sample", "{run}", "--out", "{tmp}/missing/x.png"], "does not exist"),
    (["sample", "{tmp}/notamodel.safetensors", "--out", "{tmp}/x.png"], "not a cmkit model"),
    (["sample", "{tmp}", "--out", "{tmp}/x.png"], "not a cmkit run directory"),
    (["train", "--preset", "no-such", "--out", "{tmp}/r"], "unknown preset"),
    (["train", "--preset", "fmnist-ict", "--out", "{tmp}/r", "--set", "no.such.key=1"], "no.such.key"),
    (["train", "--preset", "fmnist-ict", "--out", "{tmp}/r", "--set", "train.lr=abc"], "expected float"),
    (["train", "--preset", "fmnist-ict", "--out", "{tmp}/r", "--set", "net.embedding=x"], "net.embedding"),
    (["train", "--preset", "fmnist-ict", "--out", "{tmp}/r", "--data", "{tmp}/empty"], "no images"),
])
def test_bad_input_gets_one_clear_line(argv, message, run_dir, tmp_path, capsys):
    (tmp_path / "notamodel.safetensors").write_text("not a model")
    (tmp_path / "empty").mkdir()
    argv = [a.format(run=run_dir, tmp=tmp_path) for a in argv]
    assert exit_status(argv) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and "Traceback" not in err and len(err.splitlines()) == 1, err
    assert not (tmp_path / "x.png").exists() and not (tmp_path / "r").exists()


@pytest.mark.parametrize("command", [
    "sample m --out x.png --n 0", "sample m --out x.png --batch -2", "sample m --out x.png --steps 0",
    "edit interpolate m --out x.png --frames 0", "edit denoise m --out x.png --sigma 0",
    "edit superres m --out x.png --factor -4", "edit inpaint m --out x.png --batch 0",
    "eval m --n -1", "eval m --batch 0", "tune-steps m --n 0", "tune-steps m --batch -1",
    "train --preset p --out r --kimg -0.5", "train --preset p --out r --ckpt-kimg 0",
    "train --preset p --out r --keep 0", "train --preset p --out r --accum 0",
])
def test_counts_and_sizes_refuse_zero_and_negatives_while_parsing(command, capsys):
    """One validator for every numeric option where 0 or less means nothing: one line naming flag and value,
    status 2, before any file is read (the model paths here do not exist)."""
    argv = command.split()
    assert exit_status(argv) == 2
    flag, value = argv[-2:]
    kind = "number" if flag in ("--sigma", "--kimg", "--ckpt-kimg") else "integer"
    assert capsys.readouterr().err == f"cmkit: error: {flag} {float(value):g}: expected a positive {kind}\n"


def test_zero_stays_meaningful_for_seeds_and_labels():
    args = make_parser().parse_args(["sample", "m", "--out", "x.png", "--seed", "0", "--label", "0"])
    assert (args.seed, args.label, args.n) == (0, 0, 64)
    args = make_parser().parse_args(["edit", "denoise", "m", "--out", "x.png", "--seed", "0", "--label", "0"])
    assert (args.seed, args.label, args.frames) == (0, 0, None)


def test_corrupt_image_is_named(tmp_path, capsys):
    (tmp_path / "imgs").mkdir()
    (tmp_path / "imgs" / "broken.png").write_bytes(b"\x89PNG not really")
    Image.new("L", (28, 28), 128).save(tmp_path / "imgs" / "good.png")
    assert main(["train", "--preset", "fmnist-ict", "--out", str(tmp_path / "r"), "--data",
                 str(tmp_path / "imgs")]) == 2
    assert "broken.png" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()


def test_the_console_script_exits_with_mains_status(tmp_path):
    """The one subprocess of these tests: ``python -m cmkit`` passes main's status to the shell, and a refusal
    is one line on stderr."""
    done = subprocess.run([sys.executable, "-m", "cmkit", "train", "--preset", "no-such", "--out", str(tmp_path / "r")],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and done.stdout == "" and not (tmp_path / "r").exists()
    assert done.stderr.startswith("cmkit: error: ") and "unknown preset" in done.stderr
    assert len(done.stderr.splitlines()) == 1, done.stderr


def test_presets_lists_every_preset(capsys):
    assert main(["presets"]) == 0
    listed = capsys.readouterr().out
    assert all(name in listed for name in PRESETS)


@pytest.mark.parametrize("name", PRESETS)
def test_every_preset_dry_runs_to_its_config_with_the_options_applied(name, tmp_path, capsys):
    """``--dry-run`` prints the resolved config: the preset's, with --kimg, --seed, --accum and --teacher (made
    absolute) applied, and writes nothing."""
    needs_teacher = method_entry(PRESETS[name][1].method.name).teacher.takes_teacher
    teacher = ["--teacher", str(tmp_path)] if needs_teacher else []
    expected = preset(name)
    if needs_teacher and expected.data.codec == "latent":  # a latent student: here in the folder teacher's pixels
        teacher += ["--set", "data.codec=identity"]
        expected = replace(expected, data=replace(expected.data, codec="identity"))
    kimg = 2 * expected.train.kimg  # past any warm-start
    assert main(["train", "--preset", name, "--out", str(tmp_path / "r"), "--dry-run", "--kimg", str(kimg), "--seed",
                 "11", "--accum", "2", *teacher]) == 0
    printed = Config.from_dict(json.loads(capsys.readouterr().out))
    precision = expected.train.precision
    if precision == "auto":  # the dry run prints what auto resolves to on this machine
        precision = auto_precision(torch.device("cpu"))[0]
    expected = replace(expected, train=replace(expected.train, kimg=kimg, seed=11, accum=2, precision=precision))
    if needs_teacher:
        expected = replace(expected, method=replace(expected.method, teacher=str(tmp_path.resolve())))
    assert printed == expected and not (tmp_path / "r").exists()


def test_options_apply_in_any_order(tmp_path, capsys):
    def dry(*argv: str) -> dict:
        assert main(["train", "--preset", "fmnist-ict", "--out", str(tmp_path / "r"), "--dry-run", *argv]) == 0
        return json.loads(capsys.readouterr().out)

    a = dry("--accum", "3", "--set", "train.batch=96", "method.s0=40", "method.s1=40")
    b = dry("--set", "method.s1=40", "method.s0=40", "train.batch=96", "--accum", "3")
    assert a == b and (a["train"]["accum"], a["train"]["batch"], a["method"]["s0"]) == (3, 96, 40)


def test_a_data_folder_is_stored_absolute(tmp_path, monkeypatch, capsys):
    (tmp_path / "imgs").mkdir()
    monkeypatch.chdir(tmp_path)
    assert main(["train", "--preset", "fmnist-ict", "--out", "r", "--data", "imgs", "--dry-run"]) == 0
    assert json.loads(capsys.readouterr().out)["data"]["source"] == str(tmp_path / "imgs")
    assert main(["train", "--preset", "fmnist-ict", "--out", "r", "--data", "fashion-mnist", "--dry-run"]) == 0
    assert json.loads(capsys.readouterr().out)["data"]["source"] == "fashion-mnist"
