"""Distributed training (cmkit.dist): 2 gloo processes on the CPU against 1 process with the same global batch.

One ``torch.multiprocessing`` launch runs every in-library scenario (train each method, dropout, resume, sharded
sampling and evaluation, bad input also through ``cmkit.cli.main``, weight check, stop flag); one ``torchrun``
launch per command runs the real entry point ``torchrun -m cmkit`` (train with resume, eval). Processes use one
thread each.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp

from cmkit import dist
from cmkit.checkpoint import build_model, list_states, load_state
from cmkit.cli import main
from cmkit.config import Config, DataConfig, NetConfig, TrainConfig
from cmkit.data import ImageData
from cmkit.errors import CmkitError
from cmkit.eval.evaluate import evaluate_model, image_features
from cmkit.methods import (
    CDConfig,
    CTConfig,
    ECTConfig,
    EDMConfig,
    ICTConfig,
    MeanFlowConfig,
    SCTConfig,
    method_entry,
    model_spec,
)
from cmkit.sampling import generate
from cmkit.train import Run, local_batch, save_run

SRC = Path(__file__).resolve().parent.parent / "src"
METHODS = {
    "edm": EDMConfig(p_mean=-1.2, p_std=1.2),
    "ct": CTConfig(s0=2, s1=10, mu0=0.9, distance="l2"),
    "ict": ICTConfig(s0=2, s1=8),
    "cd": CDConfig(num_scales=18, distance="l2"),
    "ect": ECTConfig(stage_kimg=0.064),
    # sCM: the JVP pass runs on the module DDP wraps, the gradient pass through DDP. sCD differs from sCT in its
    # velocity source alone (a frozen teacher, no process group): one of the two, as an sCM step costs 2.5 others'.
    "sct": SCTConfig(tangent_warmup_kimg=0.032),
    # MeanFlow: the same JVP-then-gradient pattern, through its own raw call (u(z, r, t)).
    "meanflow": MeanFlowConfig(),
}
STEPS = 3
IMAGES = torch.randint(0, 256, (40, 1, 28, 28), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
DATA = ImageData(images=IMAGES, labels=torch.arange(40) % 3, num_classes=3, name="fake")


def config_of(method: str, *, batch: int = 16, accum: int = 1, dropout: float = 0.0, **train) -> Config:
    """A ~20k-parameter class-conditional net with flips, so labels and flips are sharded too."""
    return Config(
        preset="test",
        net=NetConfig(model_channels=8, channel_mult=(1, 2), num_blocks=1, attn_resolutions=(14,), dropout=dropout,
                      num_classes=3),
        data=DataConfig(source="fake", resolution=28, channels=1, xflip=True),
        method=METHODS[method],
        train=TrainConfig(kimg=0.256, batch=batch, lr=1e-3, ema_halflife_kimg=0.1, accum=accum, **train),
    )


# The resume scenarios: CT (an EMA target besides the sampling EMA) with Adam, which moves every weight by about lr
# per step (RAdam's first steps would leave most weights below float resolution, hiding a wrong resume).
RESUMED = config_of("ct", optimizer="adam")


class PoolFeatures:
    """A cheap feature extractor for the tests: the four 14x14 means of a 28x28 grayscale image. ``seen``
    counts the images it featurised."""

    name, weights, dim, min_count = "pool", "none", 4, 2

    def __init__(self) -> None:
        self.seen = 0

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        self.seen += len(images)
        return torch.nn.functional.avg_pool2d(images.float() / 255, 14).flatten(1)


REFERENCE = PoolFeatures()(IMAGES).numpy()
METRICS = ("fid", "kid", "kid_std", "precision", "recall")


def evaluate_sample_model(batch: int) -> tuple[list[dict], int]:
    """Metrics of 13 one- and two-step samples of :func:`sample_model` against REFERENCE, and how many images
    this process featurised."""
    extractor = PoolFeatures()
    model = sample_model()
    rows = evaluate_model(model, model_spec(model), steps=[1, 2], n=13, extractor=extractor, reference=REFERENCE,
                          batch=batch)
    return rows, extractor.seen


def teacher_of(config: Config) -> torch.nn.Module | None:
    if not method_entry(config.method.name).teacher.takes_teacher:
        return None
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(123)
        return build_model(replace(config, method=METHODS["edm"])).eval().requires_grad_(False)


def train_steps(config: Config, steps: int = STEPS, *,
                resume_from: Path | None = None) -> tuple[Run, list[float | None]]:
    """``steps`` optimiser steps on this process's rows of DATA (the whole batch in one process), from the start
    or from the training state ``resume_from``."""
    run = Run(config, torch.device("cpu"), teacher=teacher_of(config))
    if resume_from is not None:
        run.load_state_dict(load_state(resume_from), resume_from)
    losses = []
    for _ in range(steps):
        x0, labels = local_batch(run.config, DATA, run.step, run.device)
        losses.append(run.optimizer_step(x0, labels))
    return run, losses


def sample_model() -> torch.nn.Module:
    torch.manual_seed(7)
    return build_model(config_of("ict")).eval()


def max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max((a[k].double() - b[k].double()).abs().max().item() for k in a)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ------------------------------------------------------------------------------ the 2-process scenarios

def _expect_error(fn) -> str | None:
    try:
        fn()
    except CmkitError as e:
        return str(e)
    return None


def _worker(rank: int, world: int, port: int, out: str, data: str) -> None:
    torch.set_num_threads(1)
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    dist.init(timeout_s=60)
    result: dict = {}
    for name in METHODS:
        run, losses = train_steps(config_of(name))
        result[name] = (run.model.state_dict(), run.ema.state_dict(), losses)
    result["dropout"] = train_steps(config_of("ict", dropout=0.3))[0].model.state_dict()
    half = train_steps(RESUMED, steps=2)[0]  # checkpointed by 2 processes, resumed by 1 in the test
    save_run(half, Path(out) / "two-then-one")
    result["two_then_one"] = list_states(Path(out) / "two-then-one")[-1]
    one = list_states(Path(out) / "one")[-1]  # checkpointed by 1 process in the fixture
    result["one_then_two"] = train_steps(RESUMED, steps=2, resume_from=one)[0].state_dict()
    result["two_then_two"] = train_steps(RESUMED, steps=2, resume_from=result["two_then_one"])[0].state_dict()
    result["two_straight"] = train_steps(RESUMED, steps=4)[0].state_dict()
    model = sample_model()
    images = [b for b in generate(model, dist.shard(range(5, 12)), sigmas=[80.0], sampler="consistency",
                                  batch_size=2)]
    result["samples"] = dist.gather_in_order(torch.cat(images).numpy())
    result["evaluation"] = evaluate_sample_model(batch=2)
    result["image_features"] = image_features(IMAGES[:11], PoolFeatures(), batch=2, desc="images")
    result["bad_batch"] = _expect_error(lambda: Run(config_of("ict", batch=31), torch.device("cpu")))
    result["bad_accum"] = _expect_error(lambda: Run(config_of("ict", batch=34, accum=2), torch.device("cpu")))
    with torch.no_grad():
        model.net.enc_in.weight[0, 0, 0, 0] += rank * 1e-7  # rank 1 drifts by one value
    result["weights"] = _expect_error(lambda: dist.check_same_weights(model))
    result["stop"] = dist.any_rank(rank == 1)
    result["on_main"] = _expect_error(lambda: dist.on_main(lambda: (_ for _ in ()).throw(CmkitError("disk full"))))
    # Last, as main() leaves the process group: the CLI refuses a batch the 2 processes cannot share, on each rank.
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        status = main(tiny_args(Path(out) / "bad", Path(data), "train.batch=31"))
    result["cli_bad_batch"] = (status, err.getvalue(), (Path(out) / "bad").exists())
    torch.save(result, Path(out) / f"rank{rank}.pt")
    dist.shutdown()


@pytest.fixture(scope="module")
def two(tmp_path_factory, fmnist_subset) -> list[dict]:
    """Every 2-process scenario, run once: the results of rank 0 and rank 1."""
    out = tmp_path_factory.mktemp("two")
    save_run(train_steps(RESUMED, steps=2)[0], out / "one")  # a checkpoint 2 processes resume from
    context = mp.spawn(_worker, args=(2, free_port(), str(out), str(fmnist_subset)), nprocs=2, join=False)
    deadline = time.monotonic() + 240
    while not context.join(timeout=5):
        if time.monotonic() > deadline:
            for p in context.processes:
                p.kill()
            pytest.fail("the 2-process scenarios did not finish in 240 s")
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(2)]


@pytest.mark.parametrize("name", METHODS)
def test_two_processes_train_like_one(two, name):
    """The same global batch of 16 (8 rows per process, flips and labels sharded), 3 steps."""
    run, losses = train_steps(config_of(name))
    for rank in range(2):
        model, ema, theirs = two[rank][name]
        assert max_diff(model, run.model.state_dict()) < 1e-6
        assert max_diff(ema, run.ema.state_dict()) < 1e-6
        np.testing.assert_allclose(theirs, losses, rtol=1e-6)  # the logged loss is the global mean
    assert max_diff(two[0][name][0], two[1][name][0]) == 0  # the replicas are bit-identical


def test_resume_at_the_same_world_size_is_bit_exact(two):
    """A CT run checkpointed after 2 steps by 2 processes and resumed by 2 ends its 4th step exactly where the
    straight 2-process run does: model, both EMAs, optimiser state."""
    for rank in range(2):
        resumed, straight = two[rank]["two_then_two"], two[rank]["two_straight"]
        assert resumed["step"] == straight["step"] == 4
        for key in ("model", "ema", "target", "optimizer"):
            torch.testing.assert_close(resumed[key], straight[key], rtol=0, atol=0)


def test_resume_at_another_world_size(two):
    """A CT run (sampling EMA, EMA target, optimiser state) checkpointed after 2 steps by 2 processes and resumed
    by 1, or checkpointed by 1 and resumed by 2, ends its 4th step where a straight 1-process run does."""
    straight = train_steps(RESUMED, steps=4)[0].state_dict()
    two_then_one = train_steps(RESUMED, steps=2, resume_from=two[0]["two_then_one"])[0].state_dict()
    for state in (two_then_one, two[0]["one_then_two"], two[1]["one_then_two"]):
        assert state["step"] == 4
        for key in ("model", "ema", "target"):
            assert max_diff(state[key], straight[key]) < 1e-6
        for ours, theirs in zip(state["optimizer"]["state"].values(), straight["optimizer"]["state"].values(),
                                strict=True):
            assert max_diff(ours, theirs) < 1e-6  # step count and both moments
    halfway = train_steps(RESUMED, steps=2)[0].state_dict()
    assert max_diff(two_then_one["model"], halfway["model"]) > 1e-3  # steps 3 and 4 moved the weights


def test_dropout_masks_follow_the_micro_batch(two):
    """2 processes x 8 rows draw the same dropout masks as 1 process x 2 micro-batches of 8."""
    run, _ = train_steps(config_of("ict", dropout=0.3, accum=2))
    assert max_diff(two[0]["dropout"], run.model.state_dict()) < 1e-6


def test_sharded_sampling_equals_unsharded(two):
    model = sample_model()
    expected = torch.cat(list(generate(model, range(5, 12), sigmas=[80.0], sampler="consistency", batch_size=3)))
    for rank in range(2):
        assert two[rank]["samples"].shape == (7, 1, 28, 28)
        np.testing.assert_allclose(two[rank]["samples"], expected.numpy(), rtol=0, atol=1e-6)


def test_sharded_evaluation_equals_unsharded(two):
    """Each process samples and featurises its block of the seeds (6 and 7 of 13, for 1 and 2 steps), or of the
    rows; every process ends with the metrics and features of one process."""
    expected, seen = evaluate_sample_model(batch=5)
    assert seen == 26 and [two[rank]["evaluation"][1] for rank in range(2)] == [12, 14]
    features = PoolFeatures()(IMAGES[:11]).numpy()
    for rank in range(2):
        for got, want in zip(two[rank]["evaluation"][0], expected, strict=True):
            assert (got["steps"], got["nfe"], got["sigmas"]) == (want["steps"], want["nfe"], want["sigmas"])
            assert [got[k] for k in METRICS] == pytest.approx([want[k] for k in METRICS], rel=1e-4, abs=1e-6)
        np.testing.assert_allclose(two[rank]["image_features"], features, rtol=0, atol=1e-7)


def test_bad_world_size_fails_the_same_on_every_rank(two):
    """In the library and through ``cmkit train`` (one line per rank, status 2, nothing written)."""
    assert two[0]["bad_batch"] == two[1]["bad_batch"] and "divisible by" in two[0]["bad_batch"]
    assert "2 x 1 = 2" in two[0]["bad_batch"] and "2 x 2 = 4" in two[1]["bad_accum"]
    for rank in range(2):
        status, err, written = two[rank]["cli_bad_batch"]
        assert status == 2 and not written
        assert err.startswith("cmkit: error: train.batch=31 is the global batch") and err.count("\n") == 1, err


def test_diverged_weights_stop_every_rank(two):
    for rank in range(2):
        assert "different weights" in two[rank]["weights"] and "net.enc_in.weight" in two[rank]["weights"]


def test_stop_request_and_rank0_errors_reach_every_rank(two):
    assert two[0]["stop"] and two[1]["stop"]
    assert two[0]["on_main"] == "disk full" and two[1]["on_main"] == "on rank 0: disk full"


# ------------------------------------------------------------------------------- one process, no group

@pytest.mark.parametrize("name", ["edm", "ict", "ect"])
def test_accumulation_equals_one_big_batch(name):
    one, losses = train_steps(config_of(name))
    two_micro, again = train_steps(config_of(name, accum=2))
    assert max_diff(one.model.state_dict(), two_micro.model.state_dict()) < 1e-6
    np.testing.assert_allclose(again, losses, rtol=1e-6)


def test_bf16_stays_finite_and_close_to_fp32():
    """3 iCT steps: bf16 autocast (8 mantissa bits, relative rounding 2^-9 = 0.002 per op) moves the weights by
    a small fraction of what training moved them (measured: about 0.3%, and 0.7% after 8 steps; bound 10%)."""
    start = Run(config_of("ict"), torch.device("cpu")).model.state_dict()
    fp32, l32 = train_steps(config_of("ict"))
    bf16, l16 = train_steps(config_of("ict", precision="bf16"))
    assert all(v is not None and np.isfinite(v) for v in l16)
    moved = max_diff(fp32.model.state_dict(), start)
    assert max_diff(bf16.model.state_dict(), fp32.model.state_dict()) < 0.1 * moved
    np.testing.assert_allclose(l16, l32, rtol=0.05)


def test_fp16_trains_finite_with_a_gradient_scaler():
    run, losses = train_steps(config_of("ict", batch=8, precision="fp16"), steps=2)
    assert run.scaler.is_enabled() and all(v is not None and np.isfinite(v) for v in losses)
    assert run.state_dict()["scaler"]["scale"] > 0


def test_compile_and_channels_last_save_plain_weights():
    plain = Run(config_of("ict"), torch.device("cpu"))
    fast = Run(config_of("ict", compile=True, channels_last=True), torch.device("cpu"))
    assert list(fast.state_dict()["model"]) == list(plain.state_dict()["model"])  # no _orig_mod. or module. prefixes
    assert all(t.is_contiguous() for t in fast.ema.state_dict().values())  # exportable as safetensors


def test_channels_last_trains_like_contiguous():
    """2 steps: the second reads the optimiser state the first wrote."""
    plain, _ = train_steps(config_of("ict"), steps=2)
    nhwc, _ = train_steps(config_of("ict", channels_last=True), steps=2)
    assert max_diff(plain.model.state_dict(), nhwc.model.state_dict()) < 1e-5


def test_accum_that_does_not_divide_the_batch_is_refused(tmp_path, capsys):
    assert main(["train", "--preset", "fmnist-ict", "--out", str(tmp_path / "r"), "--accum", "3"]) == 2
    assert "multiple of train.accum=3" in capsys.readouterr().err and not (tmp_path / "r").exists()


# ---------------------------------------------------------------------------------- torchrun, the CLI path

def torchrun(*args: str, timeout: float = 240, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(SRC), "OMP_NUM_THREADS": "1", **(env or {})}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "--",
               "cmkit", *args]  # "--": torchrun would read cmkit's --n as an abbreviation of its --nnodes
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout)


def tiny_args(out: Path, data: Path, *extra: str) -> list[str]:
    from conftest import TINY

    return ["train", "--preset", "fmnist-ict", "--out", str(out), "--data", str(data), "--kimg", "0.256",
            "--ckpt-kimg", "0.128", "--seed", "3", "--set", *TINY, *extra]


def test_torchrun_resumes_a_one_process_run_and_trains_like_one_process(run_dir, fmnist_subset, tmp_path):
    """``torchrun --nproc_per_node=2 -m cmkit train --resume`` of the 1-process run ``run_dir`` stopped after its
    first checkpoint: steps 5 to 8 of the global batch 32 under 2 processes end within 1e-6 of the 1-process run,
    and rank 0 alone reports (and writes)."""
    half = tmp_path / "half"
    shutil.copytree(run_dir, half)
    list_states(half)[-1].unlink()
    (half / "model.safetensors").unlink()
    done = torchrun(*tiny_args(half, fmnist_subset, "--resume"))
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("model: ") == 1
    one, two = load_state(list_states(run_dir)[-1]), load_state(list_states(half)[-1])
    assert two["step"] == one["step"] == 8
    for key in ("model", "ema"):
        assert max_diff(two[key], one[key]) < 1e-6
    assert len((half / "metrics.jsonl").read_text().splitlines()) == 4


def test_torchrun_eval_reports_once_what_one_process_reports(run_dir, fmnist_subset, classifier, tmp_path):
    """``torchrun --nproc_per_node=2 -m cmkit eval``: the ranks share the samples; rank 0 alone prints and writes
    the report, whose metrics are the 1-process ones."""
    common = ["eval", str(run_dir), "--n", "40", "--steps", "1,2", "--weights", str(classifier), "--ref",
              str(fmnist_subset)]
    one, two = tmp_path / "one.json", tmp_path / "two.json"
    cache = {"XDG_CACHE_HOME": str(tmp_path / "cache")}
    assert main([*common, "--out", str(one)]) == 0
    done = torchrun(*common, "--out", str(two), env=cache)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("FID") == 2  # one line per step count, printed by rank 0 alone
    rows_one, rows_two = (json.loads(p.read_text())["results"] for p in (one, two))
    for a, b in zip(rows_one, rows_two, strict=True):
        assert [b[k] for k in METRICS] == pytest.approx([a[k] for k in METRICS], rel=1e-4, abs=1e-6)
