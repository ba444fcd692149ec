"""The SD route (cmkit.sd): a tiny random diffusers text-to-image pipeline distilled end to end through the CLI,
the LCM formulas against diffusers' schedulers, captioned folders, bad input, export, resume."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

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


# Plain diffusers, in a process that never imports cmkit: load the export, sample 4 steps from the given latents
# with a seeded generator for the noise between steps, write the final latents (and, for a LoRA, the same after
# fuse_lora: merged weights).
DIFFUSERS_SAMPLER = r"""
import sys, torch
from diffusers import DiffusionPipeline, LCMScheduler, StableDiffusionPipeline
export, teacher, inputs, out = sys.argv[1:5]
given = torch.load(inputs)
if teacher == "-":
    pipe = DiffusionPipeline.from_pretrained(export, local_files_only=True)
    kw = {"guidance_scale": given["guidance_scale"]}
else:
    pipe = StableDiffusionPipeline.from_pretrained(teacher, local_files_only=True)
    pipe.scheduler = LCMScheduler.from_pretrained(export, subfolder="scheduler")
    pipe.load_lora_weights(export)
    kw = {"guidance_scale": 1.0}
def run():
    return pipe(given["prompts"], num_inference_steps=4, latents=given["latents"].clone(), output_type="latent",
                generator=torch.Generator().manual_seed(7), **kw).images
results = {"unmerged": run()}
if teacher != "-":
    pipe.fuse_lora()
    results["merged"] = run()
assert not any(name.startswith("cmkit") for name in sys.modules), "imported cmkit"
torch.save(results, out)
"""


@pytest.mark.parametrize("preset", ["sd-lcm", "sd-lcm-lora"])
def test_the_export_samples_in_plain_diffusers_as_in_cmkit(preset, sd_pipeline, captioned, tmp_path):
    """The exported folder, loaded by diffusers alone, gives cmkit's own 4-step samples (same latents, prompts and
    noise); a LoRA merged into the weights gives the same as unmerged."""
    from cmkit.sd.model import load_sd_model

    out, export = tmp_path / "run", tmp_path / "export"
    assert train(preset, sd_pipeline, captioned, out) == 0
    assert main(["export", str(out), "--diffusers", str(export)]) == 0
    model = load_sd_model(out)
    prompts = ["a red shirt", "ünïcödé bag", ""]
    latents = torch.randn(3, 4, RESOLUTION // 2, RESOLUTION // 2, generator=torch.Generator().manual_seed(1))
    ours = model.sample(prompts, latents, steps=4, generator=torch.Generator().manual_seed(7))
    torch.save({"prompts": prompts, "latents": latents, "guidance_scale": model.config.method.w_default},
               tmp_path / "inputs.pt")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    teacher = str(sd_pipeline) if preset == "sd-lcm-lora" else "-"
    subprocess.run([sys.executable, "-c", DIFFUSERS_SAMPLER, str(export), teacher, str(tmp_path / "inputs.pt"),
                    str(tmp_path / "theirs.pt")], check=True, env=env, capture_output=True)
    theirs = torch.load(tmp_path / "theirs.pt")
    assert ours.abs().mean() > 0.1
    for name, result in theirs.items():
        torch.testing.assert_close(result, ours, rtol=1e-4, atol=1e-4, msg=name)
