"""The SD route (cmkit.sd): a tiny random diffusers text-to-image pipeline distilled end to end through the CLI,
the LCM formulas against diffusers' schedulers, captioned folders, bad input, export, resume."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from cmkit.cli import main
from conftest import import_or_missing

import_or_missing("peft", 'peft not installed: pip install "cmkit[sd]"')

from sd_tiny import RESOLUTION, captioned_folder  # noqa: E402

CAPTIONS = ["a red shirt", "a blue shoe", "", "ünïcödé 漢字 bag", "a photo of a coat", "dress", "a bag", "a coat"]
FAST = ["--kimg", "0.008", "--set", "train.batch=4", "train.lr=1e-4", f"data.resolution={RESOLUTION}",
        "train.ckpt_kimg=0.004", "train.log_kimg=0.004", "method.lora_rank=4"]


@pytest.fixture(scope="module")
def captioned(tmp_path_factory) -> Path:
    return captioned_folder(tmp_path_factory.mktemp("data") / "captioned", CAPTIONS)


def train(preset: str, teacher: Path, data: Path, out: Path, *extra: str) -> int:
    return main(["train", "--preset", preset, "--teacher", str(teacher), "--data", str(data), "--out", str(out),
                 *FAST, *extra])


@pytest.mark.parametrize("preset", ["sd-lcm", "sd-lcm-lora"])
def test_distils_a_pipeline_end_to_end(preset, sd_pipeline, captioned, tmp_path):
    out = tmp_path / "run"
    assert train(preset, sd_pipeline, captioned, out) == 0
    lines = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]
    assert [ln["step"] for ln in lines] == [1, 2] and all(ln["loss"] > 0 for ln in lines)
    assert (out / "student.safetensors").is_file() and (out / "latents.safetensors").is_file()
