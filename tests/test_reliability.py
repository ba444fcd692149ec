"""Crash safety: SIGKILL at any point loses at most one checkpoint interval and resumes bit-exact; SIGTERM and
SIGINT stop cleanly with a checkpoint; non-finite steps are skipped, counted and finally stop the run; a low or
full disk is warned about or refused without harming the earlier checkpoints."""

from __future__ import annotations

import errno
import importlib
import json
import os
import pickle
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from cmkit import checkpoint
from cmkit.checkpoint import list_states, load_state, save_state
from cmkit.cli import main
from cmkit.errors import CmkitError
from cmkit.methods import SCTConfig
from cmkit.train import Run, train
from conftest import TINY, train_tiny

STEPS, BATCH = 8, 32  # checkpoints after steps 2, 4, 6 and 8
ARGS = ["--preset", "fmnist-ict", "--kimg", "0.256", "--ckpt-kimg", "0.064", "--keep", "2", "--seed", "3",
        "--set", *TINY, "train.snap_kimg=0.256"]

# The child trains through the CLI and holds still at a chosen point until a signal arrives (SIGTERM/SIGINT:
# then training goes on and the CLI handles the stop request; SIGKILL: it dies there). Points:
#   step K  -- before the optimiser step K (K steps done);
#   write K -- inside the K-th checkpoint write, with only half the file on disk (a killed write).
CHILD = """
import signal, sys, time
from pathlib import Path
import torch
from cmkit.cli import main
from cmkit.train import Run

point, at, marker = sys.argv[1], int(sys.argv[2]), Path(sys.argv[3])

def hold():
    got = []
    for s in (signal.SIGINT, signal.SIGTERM):
        previous = signal.getsignal(s)
        signal.signal(s, lambda n, f, previous=previous: (got.append(n), previous(n, f)))
    marker.touch()
    while not got:
        time.sleep(0.01)

step, save, writes = Run.optimizer_step, torch.save, []

def held_step(self, *args, **kwargs):
    if point == "step" and self.step == at:
        hold()
    return step(self, *args, **kwargs)

def held_save(obj, f, *args, **kwargs):
    save(obj, f, *args, **kwargs)
    writes.append(f)
    if point == "write" and len(writes) == at:
        f.flush()
        f.truncate(f.tell() // 2)
        f.flush()
        hold()

Run.optimizer_step, torch.save = held_step, held_save
sys.exit(main(sys.argv[4:]))
"""


def _cli(out: Path, data: Path, *extra: str) -> list[str]:
    return ["train", "--out", str(out), "--data", str(data), *ARGS, *extra]


def _start(point: str, at: int, out: Path, data: Path) -> tuple[subprocess.Popen, Path]:
    """Start the child; return it once it holds at ``point`` ``at``."""
    marker = out.parent / f"{out.name}.held"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path),
           "OMP_NUM_THREADS": str(torch.get_num_threads())}  # the same arithmetic as this process
    child = subprocess.Popen([sys.executable, "-c", CHILD, point, str(at), str(marker), *_cli(out, data)],
                             env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not marker.exists():
        if child.poll() is not None or time.monotonic() > deadline:
            child.kill()
            pytest.fail(f"the child never reached {point} {at}: {child.communicate()[1][-2000:]}")
        time.sleep(0.02)
    return child, marker


@pytest.fixture(scope="module")
def straight(run_dir) -> dict:
    """The final training state of an uninterrupted run: the session's ``run_dir``, the same training as ARGS
    with other checkpoint and snapshot intervals (neither changes what is trained: the resumed runs below
    match it bit for bit)."""
    return load_state(list_states(run_dir)[-1])


def _assert_same_as(straight: dict, out: Path) -> None:
    resumed = load_state(list_states(out)[-1])
    assert resumed["step"] == straight["step"] == STEPS
    for key in ("model", "ema", "optimizer"):
        torch.testing.assert_close(resumed[key], straight[key], rtol=0, atol=0, msg=key)


def _temp_files(out: Path) -> list[str]:
    return sorted(p.name for p in out.rglob(".*") if p.is_file())


@pytest.mark.parametrize(("point", "at", "resumes_from"), [
    ("step", 2, 2),   # right after the first checkpoint: nothing lost
    ("step", 5, 4),   # between checkpoints: the step since the last one is lost and redone
    ("write", 3, 4),  # inside the third checkpoint's write: the half-written file is ignored, then removed
])
def test_sigkill_anywhere_resumes_bit_exact(point, at, resumes_from, straight, fmnist_subset, tmp_path):
    out = tmp_path / "run"
    child, _ = _start(point, at, out, fmnist_subset)
    child.send_signal(signal.SIGKILL)
    child.communicate()
    assert child.returncode == -signal.SIGKILL
    assert load_state(list_states(out)[-1])["step"] == resumes_from
    if point == "write":
        assert [n for n in _temp_files(out) if n.startswith(".state-")], "the killed write left no temporary file"
    assert main(_cli(out, fmnist_subset, "--resume")) == 0
    _assert_same_as(straight, out)
    assert _temp_files(out) == []
    assert len(list_states(out)) == 2  # --keep 2
    assert [json.loads(ln)["step"] for ln in (out / "metrics.jsonl").read_text().splitlines()] == [2, 4, 6, 8]


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_sigterm_and_sigint_stop_with_a_checkpoint(signum, straight, fmnist_subset, tmp_path):
    out = tmp_path / "run"
    child, _ = _start("step", 5, out, fmnist_subset)
    child.send_signal(signum)
    _, err = child.communicate(timeout=120)
    assert child.returncode == 128 + signum
    assert "Traceback" not in err
    lines = [ln for ln in err.splitlines() if ln.startswith("cmkit:")]
    name = signal.Signals(signum).name
    assert len(lines) == 2 and f"stopped by {name} after 192 training images" in lines[0], err
    assert "state-0000000192.pt" in lines[0] and "--resume" in lines[1]
    assert load_state(list_states(out)[-1])["step"] == 6  # step 5 was finished, then saved
    if signum == signal.SIGTERM:  # the resume path is the same for both signals
        assert main(_cli(out, fmnist_subset, "--resume")) == 0
        _assert_same_as(straight, out)


def test_leftovers_of_killed_writes_are_cleaned_on_resume(run_dir, fmnist_subset, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(run_dir, out)
    list_states(out)[-1].unlink()
    stale = [out / "checkpoints" / ".state-0000000256.ab_12xyz.pt", out / ".model.q7_x2abc.safetensors"]
    for path in stale:
        path.write_bytes(b"half a file")
    other = out / "checkpoints" / "notes.txt"
    other.write_text("not ours")
    with (out / "metrics.jsonl").open("a") as f:
        f.write('{"step": 8, "lo')  # an append that was killed
    assert train_tiny(out, fmnist_subset, "--resume") == 0
    assert not any(p.exists() for p in stale) and other.exists()
    assert [json.loads(ln)["step"] for ln in (out / "metrics.jsonl").read_text().splitlines()] == [2, 4, 6, 8]


class Payload:
    def __reduce__(self):
        return (os.system, ("touch PWNED",))


def test_resume_from_a_planted_pickle_runs_no_code(run_dir, fmnist_subset, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "run"
    shutil.copytree(run_dir, out)
    newest = list_states(out)[-1]
    torch.save({**load_state(newest), "evil": Payload()}, newest, pickle_module=pickle)
    assert train_tiny(out, fmnist_subset, "--resume") == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("cmkit: error: ") and "not a loadable cmkit training state" in err
    assert len(err.splitlines()) == 1 and not (tmp_path / "PWNED").exists()


# ------------------------------------------------------------------------------------------ non-finite steps

def _nan_batches(monkeypatch, steps: set[int]) -> None:
    """Make the training batches of ``steps`` NaN, so their loss is NaN."""
    loop = importlib.import_module("cmkit.train")  # the module: cmkit.train is also the function's name
    batch = loop.local_batch

    def poisoned(config, dataset, step, device):
        x0, labels = batch(config, dataset, step, device)
        return (torch.full_like(x0, float("nan")) if step in steps else x0), labels

    monkeypatch.setattr(loop, "local_batch", poisoned)


def _snapshot(run: Run) -> dict:
    return {"model": {k: v.clone() for k, v in run.model.state_dict().items()},
            "ema": {k: v.clone() for k, v in run.ema.state_dict().items()},
            "optimizer": [v.clone() for s in run.optimizer.state.values() for v in s.values()]}


@pytest.mark.parametrize("cause", ["loss", "gradients", "tangent"])
def test_a_nonfinite_step_changes_nothing(cause, tiny_config, monkeypatch):
    """tangent: sCT with an infinite velocity dx_t/dt (as a diverged sCD teacher would give): the normalised
    tangent g / (||g|| + c) is NaN, and so is the loss."""
    config = tiny_config
    if cause == "tangent":  # batch 8: an sCM step costs 2.5 others'
        config = replace(tiny_config, method=SCTConfig(), train=replace(tiny_config.train, batch=8))
    run = Run(config, torch.device("cpu"))
    x0 = torch.rand(config.train.batch, 1, 28, 28, generator=torch.Generator().manual_seed(0)) * 2 - 1
    assert run.optimizer_step(x0, None) is not None
    before = _snapshot(run)
    bad = x0
    if cause == "loss":
        bad = torch.full_like(x0, float("nan"))
    elif cause == "gradients":
        monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", lambda *a, **k: torch.tensor(float("inf")))
    else:
        monkeypatch.setattr(run.loss, "velocity", lambda x0, *rest: torch.full_like(x0, float("inf")))
    assert run.optimizer_step(bad, None) is None
    assert (run.step, run.nonfinite) == (2, 1)
    torch.testing.assert_close(_snapshot(run), before, rtol=0, atol=0)
    monkeypatch.undo()
    assert run.optimizer_step(x0, None) is not None and run.nonfinite == 0


def test_nonfinite_steps_are_logged_and_too_many_stop_the_run(tiny_config, fmnist_subset, tmp_path, monkeypatch):
    config = replace(tiny_config, data=replace(tiny_config.data, source=str(fmnist_subset)),
                     train=replace(tiny_config.train, ckpt_kimg=0.128, log_kimg=0.064, max_nonfinite=3))
    _nan_batches(monkeypatch, {1, 5, 6, 7})  # one alone, then three in a row
    out = tmp_path / "run"
    with pytest.raises(CmkitError, match=r"step 8: 3 steps in a row had a non-finite.*state-0000000128\.pt"):
        train(config, out, device="cpu")
    records = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]
    assert [(r["step"], r["skipped_steps"]) for r in records] == [(2, 1), (4, 0), (6, 1)]
    assert [p.name for p in list_states(out)] == ["state-0000000128.pt"]  # the last good one, intact
    state = load_state(list_states(out)[-1])
    assert state["step"] == 4 and state["nonfinite"] == 0


# ------------------------------------------------------------------------------------------- low or full disk

def _full_disk(monkeypatch, *, after: int = 0) -> None:
    """Let ``after`` checkpoint writes succeed, then fail each with ENOSPC after writing part of the file."""
    save, calls = torch.save, []

    def failing(obj, f, *args, **kwargs):
        calls.append(1)
        if len(calls) <= after:
            return save(obj, f, *args, **kwargs)
        f.write(b"partial")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(torch, "save", failing)


def test_low_disk_is_warned_about_before_the_write(tmp_path, monkeypatch):
    usage = checkpoint.shutil.disk_usage(tmp_path)
    monkeypatch.setattr(checkpoint.shutil, "disk_usage", lambda p: usage._replace(free=7999))
    state = {"w": torch.zeros(1000)}  # 4000 bytes of tensors: warn below 8000 bytes free
    with monkeypatch.context() as m:
        _full_disk(m)
        with pytest.warns(UserWarning, match=r"low disk space: 0 MiB free"), pytest.raises(CmkitError):
            save_state(state, tmp_path, images_seen=1, keep=3)  # warned although the write then failed
    with pytest.warns(UserWarning, match="low disk space"):
        assert load_state(save_state(state, tmp_path, images_seen=2, keep=3))["w"].shape == (1000,)


def test_enough_disk_is_not_warned_about(tmp_path, recwarn):
    save_state({"w": torch.zeros(10)}, tmp_path, images_seen=1, keep=3)
    assert not [w for w in recwarn if "disk" in str(w.message)]


def test_a_full_disk_keeps_the_earlier_checkpoints(tmp_path, monkeypatch):
    save_state({"step": 1, "w": torch.ones(3)}, tmp_path, images_seen=100, keep=3)
    _full_disk(monkeypatch)
    with pytest.raises(CmkitError, match=r"state-0000000200\.pt: cannot be written \(No space"):
        save_state({"step": 2, "w": torch.ones(3)}, tmp_path, images_seen=200, keep=3)
    assert os.listdir(tmp_path / "checkpoints") == ["state-0000000100.pt"]  # no temporary file left
    assert load_state(tmp_path / "checkpoints" / "state-0000000100.pt")["step"] == 1


def test_a_low_then_full_disk_during_training(fmnist_subset, tmp_path, monkeypatch, capsys):
    usage = checkpoint.shutil.disk_usage(tmp_path)
    monkeypatch.setattr(checkpoint.shutil, "disk_usage", lambda p: usage._replace(free=1000))
    _full_disk(monkeypatch, after=1)
    out = tmp_path / "run"
    assert main(_cli(out, fmnist_subset)) == 2
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.startswith("cmkit:")]
    assert "Traceback" not in err and len(lines) == 2, err  # the warning (shown once), then the error
    assert lines[0].startswith("cmkit: warning: low disk space: 0 MiB free")
    assert lines[1].startswith("cmkit: error: ") and "No space left on device" in lines[1]
    assert [p.name for p in list_states(out)] == ["state-0000000064.pt"] and _temp_files(out) == []
    assert load_state(list_states(out)[0])["step"] == 2
