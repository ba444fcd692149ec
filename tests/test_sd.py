"""The SD route (cmkit.sd): a tiny random diffusers text-to-image pipeline distilled end to end through the CLI,
the LCM formulas against diffusers' schedulers, captioned folders, bad input, export, resume."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from cmkit.cli import main
from conftest import import_or_missing

import_or_missing("peft", 'peft not installed: pip install "cmkit[sd]"')

from sd_tiny import RESOLUTION, captioned_folder  # noqa: E402

CAPTIONS = ["a red shirt", "a blue shoe", "", "ünïcödé 漢字 bag", "a photo of a coat", "dress", "a bag", "a bag"]
FAST = ["--kimg", "0.016", "--set", "train.batch=4", "train.lr=1e-4", f"data.resolution={RESOLUTION}",
        "train.ckpt_kimg=0.008", "train.log_kimg=0.004", "method.lora_rank=4"]


@pytest.fixture(scope="module")
def captioned(tmp_path_factory) -> Path:
    return captioned_folder(tmp_path_factory.mktemp("data") / "captioned", CAPTIONS)


def train(preset: str, teacher: Path, data: Path, out: Path, *extra: str) -> int:
    """``cmkit train`` in this process on one thread: the arithmetic of the child processes below, which run with
    OMP_NUM_THREADS=1 (a CPU op's sums can change with the thread count)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return main(["train", "--preset", preset, "--teacher", str(teacher), "--data", str(data), "--out", str(out),
                     *FAST, *extra])
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def runs(sd_pipeline, captioned, tmp_path_factory) -> dict[str, Path]:
    """One run of each preset, four steps of batch 4 (a checkpoint every two), trained through the CLI."""
    out = {}
    for preset in ("sd-lcm", "sd-lcm-lora"):
        out[preset] = tmp_path_factory.mktemp(preset) / "run"
        assert train(preset, sd_pipeline, captioned, out[preset]) == 0
    return out


@pytest.mark.parametrize("preset", ["sd-lcm", "sd-lcm-lora"])
def test_distils_a_pipeline_end_to_end(preset, runs):
    out = runs[preset]
    lines = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]
    assert [ln["step"] for ln in lines] == [1, 2, 3, 4] and all(ln["loss"] > 0 for ln in lines)
    assert (out / "student.safetensors").is_file() and (out / "latents.safetensors").is_file()


# Plain diffusers, in a process that never imports cmkit: for each job, load the export, sample 4 steps from the
# given latents with a seeded generator for the noise between steps, keep the final latents (and, for a LoRA, the
# same after fuse_lora: merged weights).
DIFFUSERS_SAMPLER = r"""
import sys, torch
from diffusers import DiffusionPipeline, LCMScheduler, StableDiffusionPipeline
jobs = torch.load(sys.argv[1])
results = []
for job in jobs:
    if job["teacher"] is None:
        pipe = DiffusionPipeline.from_pretrained(job["export"], local_files_only=True)
    else:
        pipe = StableDiffusionPipeline.from_pretrained(job["teacher"], local_files_only=True)
        pipe.scheduler = LCMScheduler.from_pretrained(job["export"], subfolder="scheduler")
        pipe.load_lora_weights(job["export"])
    def run():
        return pipe(job["prompts"], num_inference_steps=4, latents=job["latents"].clone(), output_type="latent",
                    guidance_scale=job["guidance_scale"], generator=torch.Generator().manual_seed(7)).images
    results.append({"unmerged": run()})
    if job["teacher"] is not None:
        pipe.fuse_lora()
        results[-1]["merged"] = run()
assert not any(name.startswith("cmkit") for name in sys.modules), "imported cmkit"
torch.save(results, sys.argv[2])
"""


def test_the_exports_sample_in_plain_diffusers_as_in_cmkit(runs, sd_pipeline, tmp_path):
    """Each exported folder (the full pipeline, the LoRA), loaded by diffusers alone, gives cmkit's own 4-step
    samples (same latents, prompts and noise); the LoRA merged into the weights gives the same as unmerged."""
    from cmkit.sd.model import load_sd_model

    jobs, ours = [], []
    prompts = ["a red shirt", "ünïcödé bag", ""]
    latents = torch.randn(3, 4, RESOLUTION // 2, RESOLUTION // 2, generator=torch.Generator().manual_seed(1))
    for preset, out in runs.items():
        export = tmp_path / preset
        assert main(["export", str(out), "--diffusers", str(export)]) == 0
        model = load_sd_model(out)
        lora = model.config.lora
        ours.append(model.sample(prompts, latents, steps=4, generator=torch.Generator().manual_seed(7)))
        images = model.pipeline.decode(ours[-1])
        assert images.shape == (3, 3, RESOLUTION, RESOLUTION) and images.abs().max() <= 1
        jobs.append({"export": str(export), "teacher": str(sd_pipeline) if lora else None, "prompts": prompts,
                     "latents": latents, "guidance_scale": 1.0 if lora else model.config.method.w_default})
    torch.save(jobs, tmp_path / "jobs.pt")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    subprocess.run([sys.executable, "-c", DIFFUSERS_SAMPLER, str(tmp_path / "jobs.pt"), str(tmp_path / "theirs.pt")],
                   check=True, env=env, capture_output=True)
    for mine, theirs in zip(ours, torch.load(tmp_path / "theirs.pt"), strict=True):
        assert mine.abs().mean() > 0.1
        for name, result in theirs.items():
            torch.testing.assert_close(result, mine, rtol=1e-4, atol=1e-4, msg=name)


# ------------------------------------------------------------------------ the formulas against diffusers' own


def _scheduler_config(prediction: str) -> dict:
    return {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012, "prediction_type": prediction}


@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction"])
def test_the_guided_ddim_step_is_diffusers_ddim_step(prediction):
    """x0_and_eps + guidance + ddim_step over k = 20 equal DDIMScheduler.step (eta 0, 50 'trailing' timesteps, the
    LCM grid) on the classifier-free-guided output, at the grid's timesteps, the first one (19, to 0) included."""
    from diffusers import DDIMScheduler

    from cmkit.sd import lcm

    ddim = DDIMScheduler(**_scheduler_config(prediction), timestep_spacing="trailing", set_alpha_to_one=False,
                         clip_sample=False)
    ddim.set_timesteps(50)
    grid = lcm.ddim_grid(1000, 50)
    assert sorted(ddim.timesteps.tolist()) == grid.tolist()
    abar = ddim.alphas_cumprod.float()
    g = torch.Generator().manual_seed(0)
    x, cond, uncond = (torch.randn(1, 4, 8, 8, generator=g) for _ in range(3))
    w = 7.5
    for t in (999, 519, 19):
        ts = torch.tensor([t])
        theirs = ddim.step(uncond + w * (cond - uncond), t, x, eta=0.0).prev_sample
        (x0c, ec), (x0u, eu) = (lcm.x0_and_eps(o, x, ts, abar, prediction) for o in (cond, uncond))
        ours = lcm.ddim_step(x0u + w * (x0c - x0u), eu + w * (ec - eu), (ts - 20).clamp(min=0), abar)
        torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-5)


def test_timesteps_scalings_and_guidance_embedding_are_diffusers_lcm():
    """LCM sampling timesteps as LCMScheduler.set_timesteps, its boundary scalings, and the guidance embedding as
    LatentConsistencyModelPipeline.get_guidance_scale_embedding."""
    from diffusers import LatentConsistencyModelPipeline, LCMScheduler

    from cmkit.sd import lcm

    scheduler = LCMScheduler(**_scheduler_config("epsilon"))
    for steps in range(1, 51):
        scheduler.set_timesteps(steps, original_inference_steps=50)
        assert lcm.lcm_timesteps(1000, 50, steps) == scheduler.timesteps.tolist(), steps
    t = torch.tensor([0, 1, 19, 259, 999])
    c_skip, c_out = lcm.boundary_scalings(t, timestep_scaling=10.0)
    theirs = [scheduler.get_scalings_for_boundary_condition_discrete(int(v)) for v in t]
    torch.testing.assert_close(c_skip.flatten(), torch.tensor([float(a) for a, _ in theirs]))
    torch.testing.assert_close(c_out.flatten(), torch.tensor([float(b) for _, b in theirs]))
    assert c_skip[0].item() == 1 and c_out[0].item() == 0  # the boundary condition at t = 0
    w = torch.tensor([0.0, 1.0, 7.5, 15.0])
    for dim in (256, 33):
        theirs = LatentConsistencyModelPipeline.get_guidance_scale_embedding(None, w, embedding_dim=dim)
        torch.testing.assert_close(lcm.guidance_embedding(w, dim), theirs)


# ------------------------------------------------------------------------------------------------ bad input


def _edit_json(path: Path, **changes) -> None:
    data = json.loads(path.read_text())
    data.update(changes)
    path.write_text(json.dumps(data))


def _pipeline_copy(sd_pipeline: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "pipe"
    shutil.copytree(sd_pipeline, copy)
    return copy


def _refused(capsys, args: list[str], out: Path, *needles: str) -> None:
    assert main(args) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and all(n in lines[0] for n in needles), lines
    assert not out.exists(), "a refused run wrote its directory"


def _args(preset: str, teacher: Path, data: Path, out: Path, *sets: str) -> list[str]:
    return ["train", "--preset", preset, "--teacher", str(teacher), "--data", str(data), "--out", str(out),
            "--kimg", "0.004", "--set", f"data.resolution={RESOLUTION}", "method.lora_rank=4", *sets]


def test_refuses_a_folder_that_is_not_a_pipeline(captioned, tmp_path, capsys):
    _refused(capsys, _args("sd-lcm", tmp_path, captioned, tmp_path / "run"), tmp_path / "run",
             "not a diffusers pipeline folder", "model_index.json")


@pytest.mark.parametrize(("component", "kind", "says"), [
    ("text_encoder_2", "StableDiffusionXLPipeline", "SDXL's second text encoder"),
    ("transformer", "FluxPipeline", "transformer denoiser (Flux"),
])
def test_refuses_layouts_not_supported_by_name(component, kind, says, sd_pipeline, captioned, tmp_path, capsys):
    pipe = _pipeline_copy(sd_pipeline, tmp_path)
    _edit_json(pipe / "model_index.json", _class_name=kind, **{component: ["transformers", "SomeModel"]})
    _refused(capsys, _args("sd-lcm", pipe, captioned, tmp_path / "run"), tmp_path / "run",
             str(pipe / "model_index.json"), kind, says)


def test_refuses_a_vae_of_another_latent_size(sd_pipeline, captioned, tmp_path, capsys):
    pipe = _pipeline_copy(sd_pipeline, tmp_path)
    _edit_json(pipe / "vae" / "config.json", latent_channels=8)
    _refused(capsys, _args("sd-lcm", pipe, captioned, tmp_path / "run"), tmp_path / "run",
             str(pipe / "vae" / "config.json"), "8 latent channels")


def test_refuses_images_without_captions(sd_pipeline, tmp_path, capsys):
    data = captioned_folder(tmp_path / "data", ["a bag", "a coat"])
    (data / "metadata.jsonl").unlink()
    (data / "000.txt").write_text("a bag")
    _refused(capsys, _args("sd-lcm", sd_pipeline, data, tmp_path / "run"), tmp_path / "run",
             str(data / "001.png"), "no caption")


@pytest.mark.parametrize(("line", "says"), [
    ('{"file_name": "000.png"}', "line 3: expected a JSON object with file_name and text"),
    ('{"file_name": "gone.png", "text": "a bag"}', "line 3: file_name 'gone.png' is not a file"),
    ("not json", "line 3: expected a JSON object"),
])
def test_refuses_a_malformed_metadata_line(line, says, sd_pipeline, tmp_path, capsys):
    data = captioned_folder(tmp_path / "data", ["a bag", "a coat"])
    with open(data / "metadata.jsonl", "a") as f:
        f.write(line + "\n")
    _refused(capsys, _args("sd-lcm", sd_pipeline, data, tmp_path / "run"), tmp_path / "run",
             str(data / "metadata.jsonl"), says)


def test_refuses_a_lora_rank_that_does_not_fit(sd_pipeline, captioned, tmp_path, capsys):
    _refused(capsys, _args("sd-lcm-lora", sd_pipeline, captioned, tmp_path / "run", "method.lora_rank=64"),
             tmp_path / "run", "method.lora_rank=64", "at most 32")


def test_refuses_a_resolution_the_unet_cannot_halve(sd_pipeline, captioned, tmp_path, capsys):
    _refused(capsys, _args("sd-lcm", sd_pipeline, captioned, tmp_path / "run", "data.resolution=18"),
             tmp_path / "run", "data.resolution=18", "multiple of 4")


def test_dry_run_prints_the_config_and_writes_nothing(sd_pipeline, captioned, tmp_path, capsys):
    out = tmp_path / "run"
    assert main([*_args("sd-lcm-lora", sd_pipeline, captioned, out, "method.lora_alpha=8"), "--dry-run"]) == 0
    config = json.loads(capsys.readouterr().out)
    assert config["method"]["student"] == "lora" and config["method"]["lora_alpha"] == 8
    assert config["teacher"] == str(sd_pipeline.resolve()) and config["data"]["resolution"] == RESOLUTION
    assert not out.exists()
    minutes = ["train", "--preset", "sd-lcm", "--teacher", str(sd_pipeline), "--data", str(captioned), "--out",
               str(out), "--minutes", "1"]
    _refused(capsys, minutes, out, "--minutes")
    _refused(capsys, _args("sd-lcm-lora", sd_pipeline, captioned, out, "method.mu=0.95"), out, "method.mu=0.95")


def test_captions_from_txt_files_metadata_unicode_and_empty(tmp_path):
    from cmkit.sd.captions import read_captions

    data = captioned_folder(tmp_path / "data", ["ünïcödé 漢字", ""])
    assert [t for _, t in read_captions(data)] == ["ünïcödé 漢字", ""]
    (data / "metadata.jsonl").unlink()
    (data / "000.txt").write_text("  ünïcödé\n", encoding="utf-8")
    (data / "001.txt").write_text("")
    assert [t for _, t in read_captions(data)] == ["ünïcödé", ""]


# ------------------------------------------------------------------------------------- cache, resume, v-pred


def test_the_cache_is_built_once_and_reused_on_resume(runs, sd_pipeline, captioned):
    """--resume of a finished run reads the cache (untouched); a cache deleted is rebuilt bit for bit."""
    from safetensors.torch import load_file

    from cmkit.sd.captions import CACHE_NAME

    out = runs["sd-lcm-lora"]
    cache = out / CACHE_NAME
    before, stamp = load_file(cache), cache.stat().st_mtime_ns
    assert before["mean"].shape == (len(CAPTIONS), 4, RESOLUTION // 2, RESOLUTION // 2)
    assert len(before["text"]) == len(set(CAPTIONS)) == len(CAPTIONS) - 1  # "a bag" twice: one embedding
    assert train("sd-lcm-lora", sd_pipeline, captioned, out, "--resume") == 0
    assert cache.stat().st_mtime_ns == stamp
    cache.unlink()
    assert train("sd-lcm-lora", sd_pipeline, captioned, out, "--resume") == 0
    torch.testing.assert_close(load_file(cache), before, rtol=0, atol=0)


def test_resume_after_sigkill_is_bit_exact(runs, sd_pipeline, captioned, tmp_path):
    """A run killed (SIGKILL) after its first checkpoint (step 2 of 4) and resumed ends where the straight run did,
    bit for bit."""
    from cmkit.checkpoint import list_states, load_state

    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "cmkit", "train", "--preset", "sd-lcm", "--teacher", str(sd_pipeline), "--data",
           str(captioned), "--out", str(out), *FAST]
    child = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                             env={**os.environ, "OMP_NUM_THREADS": "1"})
    deadline = time.monotonic() + 120
    while not list_states(out) and child.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    child.send_signal(signal.SIGKILL)
    child.wait()
    assert child.returncode == -signal.SIGKILL, "the run ended before it could be killed"
    assert len(list_states(out)) == 1
    assert train("sd-lcm", sd_pipeline, captioned, out, "--resume") == 0
    straight, resumed = (load_state(list_states(r)[-1]) for r in (runs["sd-lcm"], out))
    assert resumed["step"] == straight["step"] == 4
    for key in ("student", "target", "optimizer"):
        torch.testing.assert_close(resumed[key], straight[key], rtol=0, atol=0, msg=key)


def test_a_v_prediction_teacher_distils(tmp_path, captioned):
    from sd_tiny import build_pipeline

    pipe = build_pipeline(tmp_path / "pipe", prediction_type="v_prediction")
    assert train("sd-lcm", pipe, captioned, tmp_path / "run", "--kimg", "0.004") == 0
    assert json.loads((tmp_path / "run" / "metrics.jsonl").read_text())["loss"] > 0


def test_torchrun_trains_as_one_process(runs, sd_pipeline, captioned, tmp_path):
    """``torchrun --nproc_per_node=2 -m cmkit train`` (gloo, two rows of the global batch 4 per process) logs the
    1-process run's losses: every sample's noise, timestep and guidance scale are functions of (seed, step, row)."""
    out = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent / "src"), "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "cmkit",
               "train", "--preset", "sd-lcm", "--teacher", str(sd_pipeline), "--data", str(captioned), "--out",
               str(out), *FAST]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("model: ") == 1  # rank 0 alone reports
    one, two = ([json.loads(ln)["loss"] for ln in (r / "metrics.jsonl").read_text().splitlines()]
                for r in (runs["sd-lcm"], out))
    assert two == pytest.approx(one, rel=1e-4)


def test_a_resumed_run_keeps_the_precision_it_began_with(tmp_path, monkeypatch):
    """``train.precision=auto`` resumes in the precision stored in the run's config.json (as ``cmkit train``), not
    in what this machine would choose; a new run takes the machine's choice; fp16 off CUDA is refused."""
    from dataclasses import replace

    from cmkit import machine
    from cmkit.errors import CmkitError
    from cmkit.sd.config import sd_preset
    from cmkit.sd.train import resolve_precision

    monkeypatch.setattr(machine, "auto_precision", lambda device: ("bf16", "stands for a CPU with native bf16"))
    config = sd_preset("sd-lcm")
    stored = replace(config, train=replace(config.train, precision="fp32"))
    (tmp_path / "config.json").write_text(json.dumps(stored.to_dict()))
    cpu = torch.device("cpu")
    assert resolve_precision(config, cpu, out=tmp_path, resume=True).train.precision == "fp32"
    assert resolve_precision(config, cpu, out=tmp_path, resume=False).train.precision == "bf16"
    with pytest.raises(CmkitError, match="train.precision=fp16: cpu has no native fp16"):
        resolve_precision(replace(config, train=replace(config.train, precision="fp16")), cpu, out=tmp_path,
                          resume=False)
