"""Fitting a run to the machine: train.precision=auto's decision, and cmkit train --minutes (issue 24, item 7)."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch

from cmkit import machine
from cmkit.checkpoint import list_states, load_state
from cmkit.cli import main
from cmkit.machine import bf16_is_native, kimg_for_minutes, resolve_precision
from cmkit.presets import PRESETS
from conftest import TINY, exit_status

NONE = frozenset()


@pytest.mark.parametrize(("device", "cuda_bf16", "capability", "flags", "native"), [
    ("cpu", False, "AVX2", NONE, False),                                  # the AMD EPYC of issue 24
    ("cpu", False, "AVX512", frozenset({"avx512f", "avx512_vnni"}), False),  # this machine: AVX-512, no BF16
    ("cpu", False, "AVX512", frozenset({"avx512f", "avx512_bf16"}), True),   # Cooper Lake, Zen 4
    ("cpu", False, "AVX512", frozenset({"amx_bf16", "amx_tile"}), True),     # Sapphire Rapids
    ("cpu", False, "AVX2", frozenset({"avx512_bf16"}), False),            # torch held to its AVX2 kernels
    ("cpu", False, "DEFAULT", NONE, False),
    ("cuda", True, "AVX2", NONE, True),                                   # Ampere and later
    ("cuda", False, "AVX512", frozenset({"avx512_bf16"}), False),         # a GPU without bf16: the CPU is moot
    ("mps", False, "DEFAULT", NONE, False),
])
def test_bf16_is_native_only_where_the_hardware_computes_it(device, cuda_bf16, capability, flags, native):
    assert bf16_is_native(device, cuda_bf16=cuda_bf16, cpu_capability=capability, cpu_flags=flags) is native


@pytest.mark.parametrize(("flags", "capability", "expected"), [
    (frozenset({"avx512f"}), "AVX512", "fp32"), (frozenset({"avx512_bf16"}), "AVX512", "bf16"),
    (frozenset({"avx2"}), "AVX2", "fp32"),
])
def test_auto_precision_reads_this_cpu(monkeypatch, flags, capability, expected):
    monkeypatch.setattr(machine, "cpu_flags", lambda: flags)
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: capability)
    precision, why = machine.auto_precision(torch.device("cpu"))
    assert precision == expected and capability in why


def test_cpu_flags_match_proc_cpuinfo():
    """The flags are read from /proc/cpuinfo's 'flags' line (x86 Linux), e.g. avx2 wherever torch reports AVX2+."""
    flags = machine.cpu_flags()
    if torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512"):
        assert {"avx2", "sse2"} <= flags


def test_resolve_precision_keeps_a_resumed_runs_choice_and_every_explicit_one(tiny_config):
    auto = replace(tiny_config, train=replace(tiny_config.train, precision="auto"))
    cpu = torch.device("cpu")
    assert resolve_precision(auto, cpu).train.precision == machine.auto_precision(cpu)[0]
    began_bf16 = replace(auto, train=replace(auto.train, precision="bf16"))
    assert resolve_precision(auto, cpu, stored=began_bf16).train.precision == "bf16"
    assert resolve_precision(began_bf16, cpu, stored=auto) == began_bf16  # explicit: unchanged


def test_the_cpu_presets_choose_their_precision():
    for name, (_, config) in PRESETS.items():
        assert (config.train.precision == "auto") == name.startswith("fmnist-"), name


@pytest.mark.parametrize(("minutes", "rate", "batch", "kimg"), [
    (10, 147.0, 64, 88.192),  # 88,200 images in 10 minutes: 1,378 whole steps of 64
    (1, 64.0, 64, 3.84),      # exactly 60 steps
    (0.001, 10.0, 64, 0.064),  # under one step: one step
])
def test_kimg_for_minutes_is_whole_steps_within_the_budget(minutes, rate, batch, kimg):
    assert kimg_for_minutes(minutes, images_per_s=rate, batch=batch) == pytest.approx(kimg)


def test_minutes_and_kimg_are_refused_together(tmp_path, capsys):
    base = ["train", "--preset", "fmnist-ict", "--out", str(tmp_path / "r"), "--minutes", "1"]
    assert exit_status([*base, "--kimg", "3"]) == 2
    assert exit_status([*base, "--set", "train.kimg=3"]) == 2
    errors = capsys.readouterr().err.splitlines()
    assert errors == ["cmkit: error: argument --kimg: not allowed with argument --minutes",
                      "cmkit: error: --minutes 1 sets the training length: drop --set train.kimg, or --minutes"]
    assert not (tmp_path / "r").exists()


def test_minutes_measure_a_fixed_length_that_resume_keeps(fmnist_subset, tmp_path, capsys):
    """--minutes times real steps, stores the length as train.kimg (whole steps) with the resolved precision,
    and trains that many steps; --resume with the same options keeps the stored length without re-timing."""
    out = tmp_path / "r"
    argv = ["train", "--preset", "fmnist-ict", "--out", str(out), "--data", str(fmnist_subset), "--minutes", "0.02",
            "--set", *TINY, "train.ckpt_kimg=0.032"]
    assert main(argv) == 0
    err = capsys.readouterr().err
    assert "--minutes 0.02: measured" in err and "images/s (" in err and "so train.kimg=" in err
    assert f"train.precision=auto: {machine.auto_precision(torch.device('cpu'))[0]}: the CPU" in err
    stored = json.loads((out / "config.json").read_text())["train"]
    assert stored["precision"] == machine.auto_precision(torch.device("cpu"))[0]
    steps = round(stored["kimg"] * 1000 / 32)
    assert steps >= 1 and stored["kimg"] == pytest.approx(steps * 0.032)
    assert load_state(list_states(out)[-1])["step"] == steps
    list_states(out)[-1].unlink()  # back to an earlier checkpoint (or none): resume re-trains the rest
    assert main([*argv, "--resume"]) == 0
    err = capsys.readouterr().err
    assert "resuming with the length measured when the run began" in err and "images/s" not in err
    assert json.loads((out / "config.json").read_text())["train"] == stored
    assert load_state(list_states(out)[-1])["step"] == steps
