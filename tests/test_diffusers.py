"""diffusers integration: DDPM-family teachers behind the denoiser contract; export to ConsistencyModelPipeline."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from conftest import import_or_missing

import_or_missing("diffusers", 'diffusers not installed: pip install "cmkit[diffusers]"')

from diffusers import ConsistencyModelPipeline, DDPMPipeline, DDPMScheduler, UNet2DModel  # noqa: E402

import cmkit.export  # noqa: E402,F401 -- makes CmkitUNet2DModel resolvable by diffusers
from cmkit.checkpoint import build_model, save_export  # noqa: E402
from cmkit.cli import main  # noqa: E402
from cmkit.errors import CmkitError  # noqa: E402
from cmkit.export import export_diffusers  # noqa: E402
from cmkit.methods import switch_method
from cmkit.nets.foreign import alphas_cumprod, is_diffusers_folder, load_diffusers_teacher  # noqa: E402
from cmkit.sampling import consistency_sample  # noqa: E402

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
    torch.testing.assert_close(teacher(x, 0.5, labels), want, atol=1e-5, rtol=1e-5)


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


def test_import_cmkit_does_not_import_diffusers():
    code = "import sys, cmkit, cmkit.cli, cmkit.nets.foreign; assert 'diffusers' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_missing_diffusers_is_a_user_error(tmp_path, tiny_config):
    save_export(build_model(tiny_config), tiny_config, tmp_path / "cm.safetensors")
    code = ("import sys; sys.modules['diffusers'] = None; from cmkit.cli import main; "
            f"sys.exit(main(['export', {str(tmp_path / 'cm.safetensors')!r}, '--diffusers', {str(tmp_path / 'o')!r}]))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 2 and 'pip install "cmkit[diffusers]"' in done.stderr
    assert not (tmp_path / "o").exists()


# ------------------------------------------------------------------------------------------- the export

def random_consistency_model(config):
    """A cmkit consistency model with weights far from their near-zero init, so the output depends on them."""
    torch.manual_seed(0)
    model = build_model(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return model


def run_pipeline(pipe, **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
    """(final sample before postprocessing, "pt" output) for a batch of 3; the callback sees each step's sample."""
    seen = []
    images = pipe(batch_size=3, output_type="pt", callback=lambda i, t, x: seen.append(x), **kwargs).images
    return seen[-1], images


@pytest.mark.parametrize("channels", [1, 3])
def test_export_round_trip_matches_cmkit_sampling(tmp_path, tiny_config, channels):
    config = replace(tiny_config, data=replace(tiny_config.data, channels=channels))
    model = random_consistency_model(config)
    out = export_diffusers(model, config, tmp_path / "cm")
    assert json.loads((out / "model_index.json").read_text())["unet"] == ["cmkit.export", "CmkitUNet2DModel"]
    pipe = ConsistencyModelPipeline.from_pretrained(out)
    pipe.set_progress_bar_config(disable=True)
    shape = (3, channels, 28, 28)

    def noise_of(seed):
        g = torch.Generator().manual_seed(seed)
        return g, lambda: torch.randn(shape, generator=g)

    # one step: noise from the generator (any channel count) or as latents (the pipeline checks 3 channels)
    g, _ = noise_of(1)
    _, noise = noise_of(1)
    kwargs = {"latents": noise()} if channels == 3 else {"generator": g}
    raw, images = run_pipeline(pipe, num_inference_steps=1, **kwargs)
    ref = consistency_sample(model, [model.sigma_max], noise_of(1)[1])
    torch.testing.assert_close(raw, ref, atol=1e-4, rtol=0)
    torch.testing.assert_close(images, (ref / 2 + 0.5).clamp(0, 1), atol=1e-4, rtol=0)
    assert ref.abs().max() > 1  # so the unclamped comparison means something

    # two steps: the scheduler draws the second noise from the same generator, after the latents
    g, _ = noise_of(2)
    raw, _ = run_pipeline(pipe, timesteps=[22, 0], generator=g)
    sigmas = pipe.scheduler.sigmas[:-1].tolist()  # the Karras levels those timesteps mean; the last is sigma_min
    torch.testing.assert_close(raw, consistency_sample(model, sigmas, noise_of(2)[1]), atol=1e-4, rtol=0)


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


def test_cli_export(tmp_path, tiny_config, capsys):
    save_export(random_consistency_model(tiny_config), tiny_config, tmp_path / "cm.safetensors")
    assert main(["export", str(tmp_path / "cm.safetensors"), "--diffusers", str(tmp_path / "out")]) == 0
    assert "import cmkit.export" in capsys.readouterr().out
    assert main(["export", str(tmp_path / "cm.safetensors"), "--diffusers", str(tmp_path / "out")]) == 2
    assert "already exists" in capsys.readouterr().err
    edm_config = replace(tiny_config, method=switch_method(tiny_config.method, "edm"))
    save_export(build_model(edm_config), edm_config, tmp_path / "edm.safetensors")
    assert main(["export", str(tmp_path / "edm.safetensors"), "--diffusers", str(tmp_path / "edm")]) == 2
    assert "consistency models only" in capsys.readouterr().err
    assert not (tmp_path / "edm").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cm.safetensors", "edm.safetensors", "out"]


def test_cd_distils_a_diffusers_teacher_and_ect_refuses_one(fmnist_subset, tmp_path, capsys):
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
    assert "cmkit: warning: a diffusers teacher cannot seed a cmkit student" in capsys.readouterr().err
    assert json.loads((tmp_path / "cd" / "config.json").read_text())["method"]["teacher"] == str(teacher.resolve())
    common[1] = str(tmp_path / "ect")
    assert main(["train", "--preset", "fmnist-ect", *common]) == 2
    assert "ECT tunes the teacher's own weights" in capsys.readouterr().err
    assert not (tmp_path / "ect").exists()
