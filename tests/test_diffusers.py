"""diffusers integration: DDPM-family teachers behind the denoiser contract; export to ConsistencyModelPipeline."""

from __future__ import annotations

import ast
import contextlib
import json
import logging
import os
import re
import subprocess
import sys
import warnings
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from conftest import import_or_missing

import_or_missing("diffusers", 'diffusers not installed: pip install "cmkit[diffusers]"')

from diffusers import (  # noqa: E402
    CMStochasticIterativeScheduler,
    ConsistencyModelPipeline,
    DDPMPipeline,
    DDPMScheduler,
    UNet2DModel,
)

from cmkit.checkpoint import build_model, save_export  # noqa: E402
from cmkit.cli import main  # noqa: E402
from cmkit.cond import Cond  # noqa: E402
from cmkit.config import FAMILY_FIELDS, Config, apply_overrides  # noqa: E402
from cmkit.errors import CmkitError  # noqa: E402
from cmkit.export import CmkitUNet2DModel, export_diffusers, module_files, tuned_schedules  # noqa: E402
from cmkit.methods import SCTConfig, sampling_spec, switch_method  # noqa: E402
from cmkit.nets.foreign import alphas_cumprod, is_diffusers_folder, load_diffusers_teacher  # noqa: E402
from cmkit.presets import preset  # noqa: E402
from cmkit.sampling import consistency_sample  # noqa: E402
from cmkit.teacher import load_teacher  # noqa: E402

SCHEDULE = {"num_train_timesteps": 1000, "beta_start": 1e-4, "beta_end": 0.02, "beta_schedule": "linear"}


def tiny_unet(num_class_embeds: int | None = None) -> UNet2DModel:
    torch.manual_seed(0)
    return UNet2DModel(sample_size=8, in_channels=3, out_channels=3, block_out_channels=(32, 32),
                       layers_per_block=1, norm_num_groups=8, down_block_types=("DownBlock2D", "DownBlock2D"),
                       up_block_types=("UpBlock2D", "UpBlock2D"), num_class_embeds=num_class_embeds).eval()


def save_teacher(folder: Path, unet: UNet2DModel, *, layout: str, **scheduler_config) -> Path:
    scheduler = DDPMScheduler(**{**SCHEDULE, **scheduler_config})
    if layout == "pipeline":
        DDPMPipeline(unet=unet, scheduler=scheduler).save_pretrained(folder)
    else:
        unet.save_pretrained(folder)
        scheduler.save_pretrained(folder)
    return folder


def table_sigmas(**scheduler_config) -> torch.Tensor:
    abar = DDPMScheduler(**{**SCHEDULE, **scheduler_config}).alphas_cumprod
    return ((1 - abar) / abar).sqrt()


def by_hand(unet: UNet2DModel, x: torch.Tensor, sigma: torch.Tensor, t: torch.Tensor, prediction: str,
            labels: torch.Tensor | None = None) -> torch.Tensor:
    """x0 from the unet called directly at VP input x / sqrt(1 + sigma^2) and timestep t."""
    s = sigma.view(-1, 1, 1, 1)
    x_vp = x / (1 + s**2).sqrt()
    with torch.no_grad():
        out = unet(x_vp, t, class_labels=labels).sample
    if prediction == "epsilon":
        return x - s * out
    abar = 1 / (1 + s**2)
    return abar.sqrt() * x_vp - (1 - abar).sqrt() * out


# ------------------------------------------------------------------------------------------ the teacher

@pytest.mark.parametrize("schedule", ["linear", "scaled_linear", "squaredcos_cap_v2"])
def test_alphas_cumprod_equal_diffusers(schedule):
    config = {**SCHEDULE, "beta_schedule": schedule, "beta_end": 0.012 if schedule == "scaled_linear" else 0.02}
    assert torch.equal(alphas_cumprod(config), DDPMScheduler(**config).alphas_cumprod)


@pytest.mark.parametrize("layout", ["pipeline", "bare"])
@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction"])
def test_teacher_equals_unet_on_table(tmp_path, layout, prediction):
    unet = tiny_unet()
    folder = save_teacher(tmp_path / "teacher", unet, layout=layout, prediction_type=prediction)
    assert is_diffusers_folder(folder)
    teacher = load_diffusers_teacher(folder)
    sig = table_sigmas()
    assert (teacher.kind, teacher.resolution, teacher.channels, teacher.num_classes) == ("edm", 8, 3, 0)
    assert teacher.sigma_min == pytest.approx(float(sig[0])) and teacher.sigma_max == pytest.approx(float(sig[-1]))
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
    x = torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(1)) * 3
    t = torch.tensor([0, 10, 500, 999])
    got = teacher(x, sig[t])
    assert got.dtype == torch.float32 and got.shape == x.shape
    torch.testing.assert_close(got, by_hand(unet, x, sig[t], t, prediction), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction"])
def test_teacher_interpolates_timesteps_in_log_sigma(tmp_path, prediction):
    unet = tiny_unet()
    teacher = load_diffusers_teacher(save_teacher(tmp_path / "t", unet, layout="pipeline", prediction_type=prediction))
    sig = table_sigmas()
    k = torch.tensor([3, 250, 700])
    mid = ((sig[k].log() + sig[k + 1].log()) / 2).exp()  # halfway in log sigma -> t = k + 1/2
    # below and above the table: t clamps to its ends, while the sigma itself still sets the scalings
    sigma = torch.cat([mid, torch.tensor([sig[0] / 2, sig[-1] * 2])])
    t = torch.cat([k + 0.5, torch.tensor([0.0, 999.0])])
    torch.testing.assert_close(teacher.sigma_to_t(sigma), t, atol=1e-4, rtol=0)
    x = torch.randn(5, 3, 8, 8, generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(teacher(x, sigma), by_hand(unet, x, sigma, t, prediction), atol=1e-4, rtol=1e-4)
    # the interpolation really sits between the neighbours' outputs' timesteps, not on either
    assert not torch.allclose(teacher(x[:1], mid[:1]), by_hand(unet, x[:1], mid[:1], k[:1], prediction))


def test_teacher_sample_prediction_and_labels(tmp_path):
    unet = tiny_unet(num_class_embeds=4)
    teacher = load_diffusers_teacher(save_teacher(tmp_path / "t", unet, layout="bare", prediction_type="sample"))
    assert teacher.num_classes == 4
    x, labels = torch.randn(2, 3, 8, 8), torch.tensor([0, 3])
    with torch.no_grad():
        want = unet(x / (1 + 0.5**2) ** 0.5, teacher.sigma_to_t(torch.full((2,), 0.5)), class_labels=labels).sample
    torch.testing.assert_close(teacher(x, 0.5, Cond(labels=labels)), want, atol=1e-5, rtol=1e-5)


def test_is_diffusers_folder_false(tmp_path, tiny_config):
    assert not is_diffusers_folder(tmp_path)
    save_export(build_model(tiny_config), tiny_config, tmp_path / "model.safetensors")
    assert not is_diffusers_folder(tmp_path)


def _expect_error(folder: Path, *words: str) -> None:
    with pytest.raises(CmkitError) as e:
        load_diffusers_teacher(folder)
    for word in words:
        assert word in str(e.value)


def test_teacher_bad_folders(tmp_path, tiny_config):
    _expect_error(tmp_path, "not a diffusers UNet folder", "model_index.json")
    (tmp_path / "p").mkdir()
    (tmp_path / "p" / "model_index.json").write_text("{}")
    _expect_error(tmp_path / "p", "unet/config.json")
    bare = save_teacher(tmp_path / "bare", tiny_unet(), layout="bare")
    (bare / "scheduler_config.json").unlink()
    _expect_error(bare, "no scheduler config", "scheduler_config.json")
    save_teacher(bare, tiny_unet(), layout="bare", prediction_type="flow_prediction")
    _expect_error(bare, "scheduler_config.json", "prediction_type 'flow_prediction'", "epsilon")
    save_teacher(bare, tiny_unet(), layout="bare")
    weights = bare / "diffusion_pytorch_model.safetensors"
    weights.rename(bare / "diffusion_pytorch_model.bin")  # a pickle is never loaded
    _expect_error(bare, "no safetensors UNet weights", "model.safetensors", ".bin weights are refused")
    save_teacher(bare, tiny_unet(), layout="bare")
    config = json.loads((bare / "config.json").read_text())
    (bare / "config.json").write_text(json.dumps({**config, "_class_name": "UNet2DConditionModel"}))
    _expect_error(bare, "config.json", "UNet2DConditionModel", "expected a diffusers UNet2DModel")


def test_consistency_folder_refused_as_teacher(tmp_path, tiny_config):
    folder = export_diffusers(build_model(tiny_config), tiny_config, tmp_path / "cm")
    assert is_diffusers_folder(folder)
    _expect_error(folder, "is a consistency model; a teacher must be a diffusion model")


def cd_config(teacher: Path, *sets: str) -> Config:
    """The fmnist-cd preset distilling ``teacher`` (a tiny_unet folder: 8x8 RGB), with ``--set`` strings."""
    return apply_overrides(preset("fmnist-cd"), [f"method.teacher={teacher}", "data.resolution=8",
                                                 "data.channels=3", *sets])


def test_teacher_table_above_the_grids_lowest_sigma_warns(tmp_path):
    """Issue 12: a DDPM table starting at 0.01 with CD's sigma_min 0.002 is no longer clamped silently."""
    teacher = save_teacher(tmp_path / "ddpm", tiny_unet(), layout="pipeline")  # sigma_0 = 0.0100005
    with pytest.warns(UserWarning) as warned:
        load_teacher(cd_config(teacher), device=torch.device("cpu"))
    message = str(warned[0].message)
    assert f"--teacher {teacher}: its noise table starts at sigma 0.01, above the grid's lowest level " \
           "method.sigma_min=0.002" in message
    assert message.endswith("--set method.sigma_min=0.01001")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the suggested value silences it
        load_teacher(cd_config(teacher, "method.sigma_min=0.01001"), device=torch.device("cpu"))


def test_a_diffusers_teacher_is_refused_to_a_run_with_label_dropout(tmp_path):
    """CD gives the teacher the student's labels, null labels included; a diffusers UNet has none: refused once,
    when the teacher is loaded, not on a training step."""
    teacher = save_teacher(tmp_path / "ddpm", tiny_unet(num_class_embeds=4), layout="bare")
    config = cd_config(teacher, "method.sigma_min=0.01001", "net.num_classes=4", "train.p_uncond=0.1")
    with pytest.raises(CmkitError, match="a diffusers UNet has no null class label .* train.p_uncond=0.1"):
        load_teacher(config, device=torch.device("cpu"))
    assert load_teacher(replace(config, train=replace(config.train, p_uncond=0.0)), device=torch.device("cpu"))


def test_teacher_table_below_the_grids_highest_sigma_is_refused(tmp_path):
    """The mirror case: above its table the teacher's errors grow with sigma, so it is refused, not clamped."""
    schedule = {"beta_schedule": "scaled_linear", "beta_end": 0.012}
    teacher = save_teacher(tmp_path / "ddpm", tiny_unet(), layout="bare", **schedule)
    top = float(table_sigmas(**schedule)[-1])  # about 9.04
    with pytest.raises(CmkitError) as e:
        load_teacher(cd_config(teacher, "method.sigma_min=0.02"), device=torch.device("cpu"))
    message = str(e.value)
    assert f"its noise table ends at sigma {top:.4g}, below the grid's highest level method.sigma_max=80" in message
    suggested = re.search(r"expected --set method.sigma_max=([0-9.]+) \(or less\)$", message).group(1)
    assert top * (1 - 1e-3) < float(suggested) <= top
    load_teacher(cd_config(teacher, "method.sigma_min=0.02", f"method.sigma_max={suggested}"),
                 device=torch.device("cpu"))


def test_import_cmkit_does_not_import_diffusers():
    code = "import sys, cmkit, cmkit.cli, cmkit.nets.foreign; assert 'diffusers' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_missing_diffusers_is_a_user_error(tmp_path, tiny_config, monkeypatch, capsys):
    """In-process, with diffusers made unimportable and cmkit.export imported afresh."""
    save_export(build_model(tiny_config), tiny_config, tmp_path / "cm.safetensors")
    monkeypatch.setitem(sys.modules, "diffusers", None)
    monkeypatch.delitem(sys.modules, "cmkit.export", raising=False)
    assert main(["export", str(tmp_path / "cm.safetensors"), "--diffusers", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert 'pip install "cmkit[diffusers]"' in err and len(err.splitlines()) == 1, err
    assert not (tmp_path / "o").exists()


# ------------------------------------------------------------------------------------------- the export

# The parameterisations an export carries: the CM paper's (ict), and TrigFlow (sct) with each time input, with
# double normalisation and Fourier features between them; TrigFlow models have a log-variance head. sct-log-sigma
# also has NCSN++'s options (its input path, FIR resampling, a wider noise embedding) with the progressive output
# path, two heads and augmentation labels (none when sampling).
NCSNPP = {"encoder_type": "residual", "decoder_type": "skip", "resample_filter": (1, 3, 3, 1), "channel_mult_noise": 2,
          "attn_heads": 2, "augment_dim": 3}
VARIANTS = {
    "ict": lambda c: c,
    "sct-log-sigma": lambda c: replace(c, net=replace(c.net, double_norm=True, **NCSNPP), method=SCTConfig()),
    "sct-t": lambda c: replace(c, net=replace(c.net, embedding="fourier"), method=SCTConfig(c_noise="t")),
}


def random_consistency_model(config):
    """A cmkit consistency model with weights far from their near-zero init, so the output depends on them."""
    torch.manual_seed(0)
    model = build_model(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return model


# Loads exported folders in a fresh interpreter where cmkit is not importable, as a diffusers user would, and
# samples with them: argv = output file, JSON {folder: [runs]}, a run = {"seed", "latents": bool, pipeline
# kwargs}. A run draws its latents (when asked) and then the scheduler's noise from one generator seeded "seed".
LOAD_WITH_DIFFUSERS_ALONE = r"""
import json, os, sys
sys.path[:] = [p for p in sys.path if not os.path.isdir(os.path.join(p or ".", "cmkit"))]
try:
    import cmkit
except ImportError:
    pass
else:
    sys.exit(f"cmkit is importable here ({cmkit.__file__}): the test would prove nothing")
import torch
from diffusers import ConsistencyModelPipeline

results = {}
for folder, runs in json.loads(sys.argv[2]).items():
    pipe = ConsistencyModelPipeline.from_pretrained(folder, trust_remote_code=True)
    pipe.set_progress_bar_config(disable=True)
    c, r = pipe.unet.config.in_channels, pipe.unet.config.sample_size
    results[folder] = got = {"unet_module": type(pipe.unet).__module__, "scheduler": dict(pipe.scheduler.config)}
    for i, run in enumerate(runs):
        g = torch.Generator().manual_seed(run.pop("seed"))
        if run.pop("latents", False):
            run["latents"] = torch.randn(3, c, r, r, generator=g)
        seen = []
        images = pipe(batch_size=3, output_type="pt", generator=g, callback=lambda i, t, x: seen.append(x),
                      **run).images
        got.update({f"raw{i}": seen[-1], f"images{i}": images, f"sigmas{i}": pipe.scheduler.sigmas[:-1].tolist()})
torch.save(results, sys.argv[1])
"""


def sample_with_diffusers_alone(runs: dict[Path, list[dict]], tmp_path: Path) -> tuple[dict[Path, dict], str]:
    """(results of LOAD_WITH_DIFFUSERS_ALONE per folder, its stderr); fails the test if the interpreter fails."""
    out = tmp_path / "diffusers-alone.pt"
    env = {**os.environ, "HF_MODULES_CACHE": str(tmp_path / "hf-modules"), "HF_HUB_OFFLINE": "1"}
    env.pop("PYTHONPATH", None)
    runs_json = json.dumps({str(folder): folder_runs for folder, folder_runs in runs.items()})
    done = subprocess.run([sys.executable, "-I", "-c", LOAD_WITH_DIFFUSERS_ALONE, str(out), runs_json],
                          cwd=tmp_path, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    return {Path(k): v for k, v in torch.load(out).items()}, done.stderr


def noise_of(seed: int, shape: tuple[int, ...]):
    """cmkit's noise callable drawing from one generator seeded with ``seed``, as the loader script does."""
    g = torch.Generator().manual_seed(seed)
    return lambda: torch.randn(shape, generator=g)


def test_export_loads_with_diffusers_alone_and_matches_cmkit_sampling(tmp_path, tiny_config):
    """Issue 12: the folder loads where cmkit is not importable, without "Expected types", and samples as cmkit;
    TrigFlow models (sct, scd) too, though the scheduler applies the CM paper's scalings. One interpreter loads
    the iCT and the sCT (log-sigma) exports at 1 and 3 channels (sct-t in-process only, below, to save time)."""
    folders, models = {}, {}
    for variant in ("ict", "sct-log-sigma"):
        for channels in (1, 3):
            config = VARIANTS[variant](replace(tiny_config, data=replace(tiny_config.data, channels=channels)))
            models[variant, channels] = model = random_consistency_model(config)
            folders[variant, channels] = folder = export_diffusers(model, config, tmp_path / f"{variant}-{channels}")
            index = json.loads((folder / "model_index.json").read_text())
            assert index["unet"] == ["cmkit_unet2d", "CmkitUNet2DModel"]
            assert sorted(p.name for p in (folder / "unet").glob("*.py")) == ["cmkit_unet2d.py", "layers.py",
                                                                             "unet.py"]
    # 1 channel: noise from the generator; 3 channels: latents (the pipeline checks them only for 3 channels);
    # 2 steps: the scheduler draws the second noise from the same generator, after the latents
    runs = [{"seed": 1, "num_inference_steps": 1}, {"seed": 2, "timesteps": [600, 0]}]
    results, stderr = sample_with_diffusers_alone(
        {folder: [{**run, "latents": channels == 3} for run in runs] for (_, channels), folder in folders.items()},
        tmp_path)
    assert "Expected types" not in stderr and "Traceback" not in stderr and "were not used" not in stderr
    for (variant, channels), folder in folders.items():
        got, model, shape = results[folder], models[variant, channels], (3, channels, 28, 28)
        # every weight loads, the log-variance head of TrigFlow models too (sampling does not use it)
        state = CmkitUNet2DModel.from_pretrained(folder / "unet").net.state_dict()
        assert state.keys() == model.net.state_dict().keys()
        assert all(torch.equal(state[k], v) for k, v in model.net.state_dict().items())
        assert got["unet_module"] == "diffusers_modules.local.cmkit_unet2d"  # the shipped file, not cmkit's
        assert got["sigmas0"] == [model.sigma_max]
        sigmas = got["sigmas1"]  # the Karras levels timesteps [600, 0] mean (80 and 0.959)
        assert len(sigmas) == 2 and sigmas[0] == pytest.approx(model.sigma_max)
        refs = [consistency_sample(model, [model.sigma_max], noise_of(1, shape)),
                consistency_sample(model, sigmas, noise_of(2, shape))]
        for i, ref in enumerate(refs):
            torch.testing.assert_close(got[f"raw{i}"], ref, atol=1e-4, rtol=0, msg=f"{variant} {channels}")
            torch.testing.assert_close(got[f"images{i}"], (ref / 2 + 0.5).clamp(0, 1), atol=1e-4, rtol=0)
        assert max(ref.abs().max() for ref in refs) > 1  # so the unclamped comparison means something


@pytest.mark.parametrize("variant", ["sct-log-sigma", "sct-t"])
def test_trigflow_output_under_the_scheduler_scalings_is_the_model(tmp_path, tiny_config, variant):
    """The scheduler's c_skip x + c_out F' is cmkit's TrigFlow f(x, sigma) at every level but sigma_min, where
    c_out = 0 and the unet returns F' = 0 (documented): the step then gives x. So the pipeline samples as cmkit."""
    config = VARIANTS[variant](tiny_config)
    model = random_consistency_model(config)
    folder = export_diffusers(model, config, tmp_path / "sct")
    unet = CmkitUNet2DModel.from_pretrained(folder / "unet")
    scheduler = CMStochasticIterativeScheduler.from_pretrained(folder / "scheduler")
    sigmas = torch.tensor([80.0, 20.0, 0.959, 0.5, 0.05, 0.00205], dtype=torch.float64)  # 0.00205: level 998
    x = torch.randn(len(sigmas), 1, 28, 28, generator=torch.Generator().manual_seed(5))
    x = x * (1 + sigmas.float().view(-1, 1, 1, 1))
    c_in = (1 / (sigmas**2 + model.sigma_data**2).sqrt()).float().view(-1, 1, 1, 1)
    timesteps = torch.from_numpy(scheduler.sigma_to_t(sigmas.numpy()))  # float64, as the pipeline passes them
    with torch.no_grad():
        out = unet(x * c_in, timesteps).sample
        ref = model(x, sigmas.float())
    c_skip, c_out = (c.float().view(-1, 1, 1, 1) for c in scheduler.get_scalings_for_boundary_condition(sigmas))
    torch.testing.assert_close(c_skip * x + c_out * out, ref, atol=1e-4, rtol=0)
    assert (c_out * out).abs().amax(dim=(1, 2, 3)).min() > 1e-3  # the network's part is not negligible anywhere
    with torch.no_grad():
        at_min = unet(x[:1], torch.tensor(float(scheduler.sigma_to_t(model.sigma_min)))).sample
    assert torch.equal(at_min, torch.zeros_like(at_min))
    # and the pipeline (in this process, the unet from cmkit) samples as cmkit in 1 and 2 steps
    pipe = ConsistencyModelPipeline(unet=unet, scheduler=scheduler)
    pipe.set_progress_bar_config(disable=True)
    for seed, kwargs in enumerate([{"num_inference_steps": 1}, {"timesteps": [600, 0]}]):
        raw = final_sample(pipe, generator=torch.Generator().manual_seed(seed), **kwargs)
        ref = consistency_sample(model, pipe.scheduler.sigmas[:-1].tolist(), noise_of(seed, (3, 1, 28, 28)))
        torch.testing.assert_close(raw, ref, atol=1e-4, rtol=0)


@pytest.mark.parametrize("module", module_files(), ids=lambda p: p.name)
def test_shipped_module_files_need_only_torch_and_diffusers(module):
    """The files an export ships are cmkit's own modules, copied verbatim: they must not import cmkit."""
    shipped = {p.stem for p in module_files()}
    for node in ast.walk(ast.parse(module.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level:
            assert node.module in shipped, f"{module.name}: relative import of {node.module}, which is not shipped"
        elif isinstance(node, ast.Import | ast.ImportFrom):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module]
            for top in (name.split(".")[0] for name in names):
                assert top in sys.stdlib_module_names or top in ("torch", "diffusers"), f"{module.name}: {top}"


def test_folders_naming_cmkit_export_still_load_after_importing_it(tmp_path, tiny_config):
    """Folders written before the custom-component layout name the unet ["cmkit.export", "CmkitUNet2DModel"],
    and their unet config lacks the fields added for TrigFlow models."""
    model = random_consistency_model(tiny_config)
    folder = export_diffusers(model, tiny_config, tmp_path / "old")
    index = json.loads((folder / "model_index.json").read_text())
    (folder / "model_index.json").write_text(json.dumps({**index, "unet": ["cmkit.export", "CmkitUNet2DModel"]}))
    unet_config = json.loads((folder / "unet" / "config.json").read_text())
    new_fields = ("double_norm", "logvar_head", "parameterisation", "c_noise", "sigma_min", "sigma_data",
                  *FAMILY_FIELDS)
    (folder / "unet" / "config.json").write_text(json.dumps({k: v for k, v in unet_config.items()
                                                            if k not in new_fields}))
    for path in (folder / "unet").glob("*.py"):
        path.unlink()
    pipe = ConsistencyModelPipeline.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    noise = torch.randn(2, 1, 28, 28, generator=torch.Generator().manual_seed(3))
    images = pipe(batch_size=2, num_inference_steps=1, generator=torch.Generator().manual_seed(3),
                  output_type="pt").images
    torch.testing.assert_close(images, (model(noise * 80, 80.0) / 2 + 0.5).clamp(0, 1), atol=1e-4, rtol=0)
    assert pipe.unet.config.parameterisation == "consistency" and not pipe.unet.config.logvar_head


def test_export_refusals(tmp_path, tiny_config):
    model = random_consistency_model(tiny_config)
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("keep")
    with pytest.raises(CmkitError, match="already exists and is not an empty folder"):
        export_diffusers(model, tiny_config, tmp_path / "full")
    assert [p.name for p in (tmp_path / "full").iterdir()] == ["x"]
    edm_config = replace(tiny_config, method=switch_method(tiny_config.method, "edm"))
    with pytest.raises(CmkitError, match="ConsistencyModelPipeline samples consistency models only"):
        export_diffusers(build_model(edm_config), edm_config, tmp_path / "edm")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["full"]  # no temporary folder left behind
    (tmp_path / "empty").mkdir()
    assert export_diffusers(model, tiny_config, tmp_path / "empty") == tmp_path / "empty"
    assert (tmp_path / "empty" / "unet" / "diffusion_pytorch_model.safetensors").is_file()


@contextlib.contextmanager
def diffusers_warnings() -> Iterator[list[str]]:
    """Collect the warnings diffusers logs meanwhile (its logger does not propagate, so caplog misses them)."""
    messages: list[str] = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = lambda record: messages.append(record.getMessage())
    logger = logging.getLogger("diffusers")
    logger.addHandler(handler)
    try:
        yield messages
    finally:
        logger.removeHandler(handler)


def final_sample(pipe: ConsistencyModelPipeline, **kwargs) -> torch.Tensor:
    """The pipeline's last sample of a batch of 3, before postprocessing (which clamps)."""
    seen = []
    pipe(batch_size=3, output_type="pt", callback=lambda i, t, x: seen.append(x), **kwargs)
    return seen[-1]


# 4: two sigmas share a level of the grid; 5: does not start at sigma_max. Neither has timesteps.
TUNED = {1: [80.0], 2: [80.0, 0.9], 3: [80.0, 5.0, 0.5], 4: [80.0, 79.99, 1.0, 0.5], 5: [40.0, 10.0, 1.0, 0.5, 0.1]}


def test_tuned_sigmas_survive_the_export(tmp_path, tiny_config, capsys):
    """Issue 12: `cmkit tune-steps` schedules (export metadata) reach the scheduler config, with timesteps."""
    model, spec = random_consistency_model(tiny_config), sampling_spec(tiny_config.method)
    for steps, sigmas in TUNED.items():
        spec = spec.with_tuned(steps, sigmas)
    save_export(model, tiny_config, tmp_path / "cm.safetensors", spec=spec)
    assert main(["export", str(tmp_path / "cm.safetensors"), "--diffusers", str(tmp_path / "out")]) == 0
    printed = capsys.readouterr().out
    stored = json.loads((tmp_path / "out" / "scheduler" / "scheduler_config.json").read_text())
    assert stored["_cmkit_tuned_sigmas"] == {str(k): v for k, v in TUNED.items()}  # exactly, all of them

    with diffusers_warnings() as warned:
        schedules = {t.steps: t for t in tuned_schedules(tmp_path / "out")}  # read back through diffusers
    assert warned == []  # e.g. not "The config attributes {...} were passed to ..., but are not expected"
    assert {k: t.sigmas for k, t in schedules.items()} == TUNED
    assert schedules[1].timesteps == [0] and schedules[1].grid_sigmas == [80.0]
    for k in (4, 5):
        assert schedules[k].timesteps is None and schedules[k].grid_sigmas is None
        assert str(k) not in stored["_cmkit_tuned_timesteps"]
    assert "tuned 4-step sigmas 80,79.99,1,0.5 (kept in scheduler/scheduler_config.json as _cmkit_tuned_sigmas): " \
           "no timesteps= reproduces them" in printed
    for k in (2, 3):
        assert schedules[k].grid_sigmas == pytest.approx(TUNED[k], rel=0.012)  # half a level at most (docs)
        assert f"tuned {k}-step sigmas" in printed and f"pipe(timesteps={schedules[k].timesteps})" in printed

    # the stored timesteps sample at those levels, as cmkit does (the unet from cmkit: no remote code here)
    pipe = ConsistencyModelPipeline(unet=CmkitUNet2DModel.from_pretrained(tmp_path / "out" / "unet"),
                                    scheduler=CMStochasticIterativeScheduler.from_pretrained(tmp_path / "out" /
                                                                                             "scheduler"))
    pipe.set_progress_bar_config(disable=True)
    for k in (2, 3):
        raw = final_sample(pipe, timesteps=stored["_cmkit_tuned_timesteps"][str(k)],
                           generator=torch.Generator().manual_seed(k))
        assert pipe.scheduler.sigmas[:-1].tolist() == schedules[k].grid_sigmas
        ref = consistency_sample(model, schedules[k].grid_sigmas, noise_of(k, (3, 1, 28, 28)))
        torch.testing.assert_close(raw, ref, atol=1e-4, rtol=0)


@pytest.mark.parametrize("variant", ["ict", "sct-log-sigma"])
def test_cli_export(tmp_path, tiny_config, capsys, variant):
    config = VARIANTS[variant](tiny_config)
    save_export(random_consistency_model(config), config, tmp_path / "cm.safetensors")
    assert main(["export", str(tmp_path / "cm.safetensors"), "--diffusers", str(tmp_path / "out")]) == 0
    printed = capsys.readouterr().out
    assert "trust_remote_code=True" in printed and "import cmkit" not in printed
    unet_config = json.loads((tmp_path / "out" / "unet" / "config.json").read_text())
    assert unet_config["parameterisation"] == ("consistency" if variant == "ict" else "trigflow")
    assert unet_config["double_norm"] == unet_config["logvar_head"] == (variant != "ict")
    assert main(["export", str(tmp_path / "cm.safetensors"), "--diffusers", str(tmp_path / "out")]) == 2
    assert "already exists" in capsys.readouterr().err
    edm_config = replace(tiny_config, method=switch_method(tiny_config.method, "edm"))
    save_export(build_model(edm_config), edm_config, tmp_path / "edm.safetensors")
    assert main(["export", str(tmp_path / "edm.safetensors"), "--diffusers", str(tmp_path / "edm")]) == 2
    assert "consistency models only" in capsys.readouterr().err
    assert not (tmp_path / "edm").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cm.safetensors", "edm.safetensors", "out"]


def test_cd_distils_a_diffusers_teacher_and_ect_and_sct_refuse_one(fmnist_subset, tmp_path, capsys):
    """`cmkit train --preset fmnist-cd --teacher DIR` with a DDPM UNet2DModel folder of Fashion-MNIST's shape."""
    torch.manual_seed(0)
    unet = UNet2DModel(sample_size=28, in_channels=1, out_channels=1, block_out_channels=(16, 32),
                       layers_per_block=1, norm_num_groups=8, down_block_types=("DownBlock2D", "DownBlock2D"),
                       up_block_types=("UpBlock2D", "UpBlock2D"))
    teacher = save_teacher(tmp_path / "ddpm", unet, layout="pipeline")
    common = ["--out", str(tmp_path / "cd"), "--data", str(fmnist_subset), "--kimg", "0.064", "--teacher",
              str(teacher), "--set", "net.model_channels=8", "net.channel_mult=1,2", "net.num_blocks=1",
              "net.attn_resolutions=14", "train.batch=32", "train.snap_kimg=0.064"]
    assert main(["train", "--preset", "fmnist-cd", *common]) == 0
    err = capsys.readouterr().err
    assert "cmkit: warning: a diffusers teacher cannot seed the student" in err
    assert f"cmkit: warning: --teacher {teacher.resolve()}: its noise table starts at sigma 0.01" in err
    assert json.loads((tmp_path / "cd" / "config.json").read_text())["method"]["teacher"] == str(teacher.resolve())
    for name in ("ect", "sct"):  # they start from the teacher's own weights
        common[1] = str(tmp_path / name)
        assert main(["train", "--preset", f"fmnist-{name}", *common]) == 2
        assert f"{name.upper()} starts from the teacher's own weights" in capsys.readouterr().err
        assert not (tmp_path / name).exists()
