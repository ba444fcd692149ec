"""Evaluation during training (cmkit.monitor): stop rules on scripted FIDs, the best model, resume, the
consistency metric, bad input, and one real run through the CLI."""

from __future__ import annotations

import json
import os
import shutil
import signal
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from cmkit import monitor
from cmkit.checkpoint import BEST_NAME, EXPORT_NAME, build_model, list_states, load_state
from cmkit.errors import CmkitError
from cmkit.methods import EDMConfig
from cmkit.monitor import consistency_gaps, evaluations_since_best
from cmkit.train import Run, TrainingStopped, load_training_data, train
from conftest import GaussianOracle, exit_status, train_tiny


class ScriptedFid:
    """Stands in for ``evaluate_model``: call i (evaluation i) scores ``script[i]`` at the first step count and
    one less at the second; keeps a copy of the weights it was asked to score and the options; ``on_call`` runs
    first."""

    def __init__(self, script: list[float], on_call=None) -> None:
        self.script, self.on_call, self.weights, self.calls = script, on_call, [], []

    def __call__(self, model, spec, *, steps, **options):
        if self.on_call is not None:
            self.on_call(len(self.weights))
        self.weights.append({k: v.clone() for k, v in model.state_dict().items()})
        self.calls.append({"steps": tuple(steps), "sampler": spec.sampler, **options})
        fid = self.script[len(self.weights) - 1]
        return [{"steps": k, "fid": fid - i} for i, k in enumerate(steps)]


@pytest.fixture
def scripted(monkeypatch):
    """Install a ScriptedFid (and a feature network and reference that cost nothing); returns its maker. The
    consistency metric's batch shrinks to 4 images (18 forward passes of 64 cost seconds at every evaluation)."""
    fake = SimpleNamespace(name="fid-fmnist", weights="none", min_count=2, dim=1)
    monkeypatch.setattr(monitor, "HELD_OUT", 4)
    monkeypatch.setattr(monitor, "get_extractor", lambda name, **kw: fake)
    monkeypatch.setattr(monitor, "reference_features", lambda *a, **kw: np.zeros((2, 1), np.float32))

    def install(script, on_call=None):
        stub = ScriptedFid(script, on_call)
        monkeypatch.setattr(monitor, "evaluate_model", stub)
        return stub

    return install


def _config(tiny_config, data, **train):
    """tiny_config on the 320-image subset (no test split: the held-out batch falls back to training images):
    8 steps of 32, a checkpoint every 4, a log line every 2, here an evaluation every step."""
    settings = {"eval_kimg": 0.032, **train}
    return replace(tiny_config, data=replace(tiny_config.data, source=str(data)),
                   train=replace(tiny_config.train, **settings))


def _evaluations(out):
    lines = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]
    return [ln for ln in lines if "best_fid" in ln]


def _without_time(records):
    return [{k: v for k, v in r.items() if k != "eval_seconds"} for r in records]


def test_until_fid_stops_at_the_first_evaluation_that_reaches_it(scripted, tiny_config, fmnist_subset, tmp_path,
                                                                  capsys):
    scripted([80.0, 60.0, 50.0, 40.0, 30.0, 20.0, 10.0, 5.0])
    out = tmp_path / "run"
    assert train(_config(tiny_config, fmnist_subset, until_fid=50), out) == out / EXPORT_NAME
    records = _evaluations(out)
    assert [r["step"] for r in records] == [1, 2, 3]  # 50 <= 50: the third evaluation stops the run
    assert [r["fid_1step"] for r in records] == [80, 60, 50] and [r["fid_2step"] for r in records] == [79, 59, 49]
    assert [r["best_fid"] for r in records] == [80, 60, 50]
    assert {"kimg", "consistency", "consistency_pairs", "eval_seconds"} <= set(records[-1])
    assert len(records[-1]["consistency_pairs"]) == 17
    state = load_state(list_states(out)[-1])
    assert state["step"] == 3 and [r["step"] for r in state["evaluations"]] == [1, 2, 3]
    assert (out / EXPORT_NAME).is_file() and (out / BEST_NAME).is_file()
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("cmkit:")]
    assert err == [f"cmkit: stopped at 96 images: 1-step fid-fmnist 50.00 <= train.until_fid 50; best model: "
                   f"{out / BEST_NAME}"]


def test_patience_stops_and_the_best_model_is_the_ema_of_the_best_evaluation(scripted, tiny_config,
                                                                              fmnist_subset, tmp_path, capsys):
    stub = scripted([50.0, 40.0, 45.0, 40.0, 42.0, 30.0, 30.0, 30.0])  # a tie (40) does not improve
    out = tmp_path / "run"
    train(_config(tiny_config, fmnist_subset, eval_patience=3), out)
    records = _evaluations(out)
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5]  # 3 evaluations after the best (step 2)
    assert [r["best_fid"] for r in records] == [50, 40, 40, 40, 40]
    best = load_file(out / BEST_NAME)
    assert best.keys() == stub.weights[1].keys()
    for key, value in best.items():
        torch.testing.assert_close(value, stub.weights[1][key], rtol=0, atol=0)
    assert not all(torch.equal(best[k], v) for k, v in stub.weights[-1].items())  # the EMA moved on since
    assert "did not improve on 40.00 (at 64 images) in 3 evaluations (train.eval_patience 3)" in capsys.readouterr().err


def test_a_diffusion_model_is_scored_with_heun_and_without_the_consistency_metric(scripted, tiny_config,
                                                                                 fmnist_subset, tmp_path, capsys):
    stub = scripted([70.0, 60.0])
    config = replace(_config(tiny_config, fmnist_subset, eval_kimg=0.064, until_fid=60), method=EDMConfig())
    train(config, tmp_path / "run")  # stops at step 4, before the run's one Heun sample grid (step 8)
    assert [(c["steps"], c["sampler"], c["n"]) for c in stub.calls] == [((18,), "heun", 1000)] * 2
    first, second = _evaluations(tmp_path / "run")
    assert (first["step"], first["fid_18step"], second["step"], second["best_fid"]) == (2, 70, 4, 60)
    assert "consistency" not in second and "fid_1step" not in second
    assert "stopped at 128 images: 18-step heun fid-fmnist 60.00 <= train.until_fid 60" in capsys.readouterr().err


def test_resume_keeps_the_history_best_fid_and_patience_count(scripted, tiny_config, fmnist_subset, tmp_path):
    """SIGTERM during the third evaluation stops the run after step 4 (its evaluation included); the resumed run
    stops by patience at step 5, as a straight run does, counting the evaluations before the stop."""
    script = [50.0, 40.0, 45.0, 41.0, 42.0, 43.0, 44.0, 39.0]
    config = _config(tiny_config, fmnist_subset, eval_patience=3)
    straight = scripted(script)
    train(config, tmp_path / "straight")

    def sigterm_at_third(i):
        if i == 2:
            os.kill(os.getpid(), signal.SIGTERM)

    out = tmp_path / "run"
    stub = scripted(script, on_call=sigterm_at_third)
    with pytest.raises(TrainingStopped):
        train(config, out)
    assert [r["step"] for r in _evaluations(out)] == [1, 2, 3, 4]
    stub.on_call = None
    train(config, out, resume=True)
    records = _evaluations(out)
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5]  # a reset patience count would go on to step 7
    assert _without_time(records) == _without_time(_evaluations(tmp_path / "straight"))
    assert _without_time(load_state(list_states(out)[-1])["evaluations"]) == _without_time(records)
    for key, value in load_file(out / BEST_NAME).items():  # still the EMA of step 2, from before the stop
        torch.testing.assert_close(value, straight.weights[1][key], rtol=0, atol=0)


def test_resume_from_a_checkpoint_drops_later_evaluations(scripted, tiny_config, fmnist_subset, tmp_path):
    """A run resumed from its checkpoint at step 4 evaluates steps 6 and 8 again: metrics.jsonl keeps the
    evaluations up to the checkpoint, and each once."""
    config = _config(tiny_config, fmnist_subset, eval_kimg=0.064)
    scripted([60.0, 59.0, 58.0, 57.0])
    out = tmp_path / "run"
    train(config, out)
    list_states(out)[-1].unlink()
    scripted([58.0, 50.0])
    train(config, out, resume=True)
    records = _evaluations(out)
    assert [(r["step"], r["fid_1step"], r["best_fid"]) for r in records] == [(2, 60, 60), (4, 59, 59), (6, 58, 58),
                                                                                 (8, 50, 50)]


def test_a_checkpoint_without_evaluations_loads_with_an_empty_history(tiny_config, tmp_path):
    run = Run(tiny_config, torch.device("cpu"))
    run.evaluations.append({"step": 0, "fid_1step": 1.0})
    state = run.state_dict()
    del state["evaluations"]
    run.load_state_dict(state, tmp_path / "old.pt")
    assert run.evaluations == []


def test_measure_reads_the_model_counts_and_history_it_is_given_and_changes_none(scripted, tiny_config,
                                                                                  fmnist_subset):
    """The evaluator is a function of explicit data: the record carries the counts it was given and the best
    FID over the history and itself; the history and the weights stay as they were; the loop appends."""
    scripted([30.0, 10.0])
    config = _config(tiny_config, fmnist_subset)
    evaluator = monitor.Monitor(config, load_training_data(config), torch.device("cpu"))
    ema = build_model(config).eval().requires_grad_(False)
    weights = {k: v.clone() for k, v in ema.state_dict().items()}
    history = [{"step": 1, "kimg": 0.032, "fid_1step": 20.0, "best_fid": 20.0}]
    record = evaluator.measure(ema, step=3, images_seen=96, history=history)
    assert (record["step"], record["kimg"], record["fid_1step"], record["best_fid"]) == (3, 0.096, 30.0, 20.0)
    assert len(history) == 1 and not evaluator.is_best([*history, record]) and evaluator.is_best([record])
    torch.testing.assert_close(ema.state_dict(), weights, rtol=0, atol=0)
    better = evaluator.measure(ema, step=4, images_seen=128, history=[*history, record])
    assert better["best_fid"] == 10.0 and evaluator.is_best([*history, record, better])


def test_nothing_below_the_loop_imports_the_training_state():
    """monitor, rundir and checkpoint take explicit data: none of them imports cmkit.train."""
    import ast
    import importlib.util

    for name in ("cmkit.monitor", "cmkit.rundir", "cmkit.checkpoint"):
        tree = ast.parse(Path(importlib.util.find_spec(name).origin).read_text())
        imported = {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
        imported |= {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
        assert "cmkit.train" not in imported, name


def test_evaluations_since_best():
    assert evaluations_since_best([3.0]) == 0
    assert evaluations_since_best([3.0, 2.0, 2.5, 2.0]) == 2  # ties do not improve
    assert evaluations_since_best([3.0, 2.0, 1.0]) == 0


# ------------------------------------------------------------------------------------------ consistency metric

def test_consistency_gaps_of_the_identity_are_the_level_spacing():
    """f(x, sigma) = x gives (s_hi - s_lo)^2 mean(z^2) for each adjacent pair of the 18-level Karras grid."""
    identity = GaussianOracle(1.0, kind="consistency")
    identity.forward = lambda x, sigma, cond=None: x
    x0, z = torch.rand(8, 1, 4, 4) * 2 - 1, torch.randn(8, 1, 4, 4)
    sigmas = np.array([(0.002 ** (1 / 7) + i / 17 * (80 ** (1 / 7) - 0.002 ** (1 / 7))) ** 7 for i in range(18)])
    expected = np.diff(sigmas) ** 2 * z.double().pow(2).mean().item()
    np.testing.assert_allclose(consistency_gaps(identity, x0, z), expected, rtol=1e-3)


def test_consistency_gaps_of_the_gaussian_consistency_function_match_their_expectation():
    """For x0 ~ N(0, s^2) and the exact consistency function f(x, sigma) = a(sigma) x, the gap of a pair is
    s^2 (a_hi - a_lo)^2 + (s_hi a_hi - s_lo a_lo)^2 in expectation: 51k pixels put it within a few percent."""
    s = 0.5
    oracle = GaussianOracle(s, kind="consistency", resolution=28)
    generator = torch.Generator().manual_seed(0)
    x0, z = (torch.randn(64, 1, 28, 28, generator=generator) for _ in range(2))
    gaps = consistency_gaps(oracle, s * x0, z)
    sig = np.array([(0.002 ** (1 / 7) + i / 17 * (80 ** (1 / 7) - 0.002 ** (1 / 7))) ** 7 for i in range(18)])
    a = np.sqrt((s**2 + 0.002**2) / (s**2 + sig**2))
    expected = s**2 * np.diff(a) ** 2 + np.diff(sig * a) ** 2
    np.testing.assert_allclose(gaps, expected, rtol=0.05)


# ------------------------------------------------------------------------------------------------ bad input

@pytest.mark.parametrize(("train_options", "message"), [
    ({"until_fid": -1.0, "eval_kimg": 0.032}, "train.until_fid: expected a positive FID, got -1"),
    ({"until_fid": 0.0, "eval_kimg": 0.032}, "train.until_fid: expected a positive FID, got 0"),
    ({"until_fid": float("nan"), "eval_kimg": 0.032}, "train.until_fid: expected a positive FID, got nan"),
    ({"until_fid": 50.0}, "train.until_fid=50.0 stops on evaluations, but train.eval_kimg=0"),
    ({"eval_patience": 2}, "set train.eval_kimg"),
    ({"eval_patience": -1, "eval_kimg": 0.032}, "train.eval_patience: expected a number of evaluations >= 0"),
    ({"eval_kimg": -1.0}, "train.eval_kimg: expected a number of kimg >= 0"),
    ({"eval_n": 0, "eval_kimg": 0.032}, "train.eval_n: expected a positive number of samples, got 0"),
    ({"eval_n": 1, "eval_kimg": 0.032}, "train.eval_n=1: fid-fmnist needs at least 2 samples"),
])
def test_bad_evaluation_settings_are_refused_before_anything_is_written(train_options, message, scripted,
                                                                        tiny_config, fmnist_subset, tmp_path):
    scripted([])
    config = _config(tiny_config, fmnist_subset, eval_kimg=0.0)
    with pytest.raises(CmkitError, match=message.replace("(", r"\(").replace(")", r"\)")):
        train(replace(config, train=replace(config.train, **train_options)), tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_cli_until_fid_turns_evaluation_on_and_says_so(tmp_path, capsys):
    argv = ["train", "--preset", "fmnist-ict", "--out", str(tmp_path / "a"), "--kimg", "41", "--dry-run",
            "--precision", "fp32"]  # (auto would say on stderr what it chose)
    assert exit_status([*argv, "--until-fid", "30"]) == 0
    captured = capsys.readouterr()
    settings = json.loads(captured.out)["train"]  # 41 kimg at batch 64: 641 steps, evaluated every 64
    assert (settings["until_fid"], settings["eval_kimg"]) == (30, 4.096)
    assert captured.err == "cmkit: --until-fid evaluates every 4,096 images (a tenth of the run; set " \
                           "train.eval_kimg to change)\n"
    assert exit_status([*argv, "--until-fid", "30", "--set", "train.eval_kimg=2"]) == 0  # an interval set: kept
    captured = capsys.readouterr()
    assert json.loads(captured.out)["train"]["eval_kimg"] == 2 and captured.err == ""
    assert exit_status([*argv, "--until-fid", "0"]) == 2
    assert "--until-fid 0: expected a positive number" in capsys.readouterr().err
    assert not (tmp_path / "a").exists()


# ------------------------------------------------------------------------------------- end to end, real metric

def test_until_fid_through_the_cli_with_the_real_metric(fmnist_subset, classifier, tmp_path, monkeypatch, capsys):
    """The fid-fmnist classifier of the fixture in a fresh cache; 64 samples an evaluation; every tenth of the
    8-step run (one step). FIDs are high for 8 steps of training: a threshold of 1e6 stops at the first."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    (tmp_path / "cache" / "cmkit").mkdir(parents=True)
    shutil.copy(classifier, tmp_path / "cache" / "cmkit" / "fid-fmnist.safetensors")
    out = tmp_path / "run"
    assert train_tiny(out, fmnist_subset, "train.eval_n=64", "--until-fid", "1e6") == 0
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("cmkit:")]
    assert err[0] == "cmkit: --until-fid evaluates every 32 images (a tenth of the run; set train.eval_kimg to change)"
    assert "the consistency metric uses the first training images: no test split" in err[1]  # train files only
    assert err[2].startswith("cmkit: stopped at 32 images: 1-step fid-fmnist ")
    assert err[2].endswith(f"<= train.until_fid 1e+06; best model: {out / BEST_NAME}")
    (record,) = _evaluations(out)
    assert record["step"] == 1 and 0 < record["fid_1step"] == record["best_fid"] and record["fid_2step"] > 0
    assert record["consistency"] > 0 and len(record["consistency_pairs"]) == 17
    assert load_state(list_states(out)[-1])["step"] == 1
    assert (out / EXPORT_NAME).is_file() and (out / BEST_NAME).is_file()
