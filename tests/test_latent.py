"""Latent models (cmkit.autoencoder, cmkit.codec.LatentCodec): the autoencoder's export round trip and latent scale,
a tiny guided latent EDM run that resumes bit-exact, exports and samples the same images at any batch size, latent
iCT without a teacher, a student adopting its teacher's codec, and the refusals of mismatched codecs, autoencoders
of another shape, changed autoencoder files and latent models where pixels are edited."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import replace

import numpy as np
import pytest
import torch

from cmkit import data, editing
from cmkit.autoencoder import EXPORT_NAME, AEConfig, Autoencoder, load_autoencoder, save_autoencoder
from cmkit.checkpoint import export_config, list_states, load_export, load_state
from cmkit.cli import main
from cmkit.codec import LatentCodec, data_codec, make_codec, resolve_codec
from cmkit.config import DataConfig, validate
from cmkit.errors import CmkitError
from cmkit.studio.engine import Models, check_models
from conftest import exit_status

TINY_AE = ["model_channels=8", "kimg=0.128", "batch=32"]
TINY_LATENT = ["net.model_channels=8", "net.num_blocks=1", "train.batch=32", "train.snap_kimg=0.128",
               "train.log_kimg=0.064"]


def train_ae(out, source, *extra: str) -> int:
    return main(["train-ae", "--preset", "fmnist-ae", "--out", str(out), "--set", f"source={source}", *TINY_AE,
                 *extra])


def train_latent(out, source, ae, *extra: str, preset: str = "fmnist-latent-edm", kimg: float = 0.128) -> int:
    return main(["train", "--preset", preset, "--out", str(out), "--data", str(source), "--kimg", str(kimg),
                 "--ckpt-kimg", str(kimg / 2), "--seed", "3", "--set", *TINY_LATENT, f"data.codec={ae}", *extra])


@pytest.fixture(scope="session")
def ae_run(fmnist_subset, tmp_path_factory):
    out = tmp_path_factory.mktemp("ae") / "ae"
    assert train_ae(out, fmnist_subset) == 0
    return out


@pytest.fixture(scope="session")
def latent_run(ae_run, fmnist_subset, tmp_path_factory):
    """A tiny class-conditional latent EDM teacher with label dropout: 4 steps, checkpoints after 2 and 4."""
    out = tmp_path_factory.mktemp("runs") / "latent"
    assert train_latent(out, fmnist_subset, ae_run) == 0
    return out


def _images(source, n=64):
    return data.to_model_range(data.load_dataset(str(source), resolution=28, channels=1).images[:n])


def test_exported_autoencoder_is_the_codec_it_was_trained_as(ae_run, fmnist_subset):
    """The codec made from the export encodes to scale * mean and decodes decoder(z / scale), the same
    as the loaded weights; loading twice gives the same decode bit for bit."""
    ae = load_autoencoder(ae_run / EXPORT_NAME, what="test")
    pinned = resolve_codec(DataConfig(source=str(fmnist_subset), codec=str(ae_run)))
    assert pinned.codec == str(ae_run / EXPORT_NAME) and len(pinned.codec_digest) == 64
    codec = data_codec(pinned)
    assert isinstance(codec, LatentCodec) and codec.shape == (4, 7, 7) and codec.dim == 196
    x = _images(fmnist_subset, 8)
    z = codec.encode(x)
    torch.testing.assert_close(z, ae.scale * ae.encoder(x)[0], rtol=0, atol=0)
    torch.testing.assert_close(codec.decode(z), ae.decoder(z / ae.scale), rtol=0, atol=0)
    again = load_autoencoder(ae_run / EXPORT_NAME, what="test")
    torch.testing.assert_close(again.decoder(z / again.scale), codec.decode(z), rtol=0, atol=0)
    assert codec.to_images(z).abs().max() <= 1


def test_a_narrower_decoder_round_trips_and_older_configs_load_unchanged(tmp_path):
    """``decoder_channels`` sets the decoder's width alone (the encoder, hence the latent, keeps ``model_channels``);
    its export loads back bit for bit; a config written before the field means a mirror-image decoder; a width
    GroupNorm cannot split is refused."""
    config = AEConfig(model_channels=16, channel_mult=(1, 2, 4), decoder_channels=8)
    model = Autoencoder(config)
    widths = lambda m: {p.shape[0] for n, p in m.named_parameters() if n.endswith("conv1.weight")}  # noqa: E731
    assert widths(model.decoder) == {8, 16, 32} and widths(model.encoder) == {16, 32, 64}
    save_autoencoder(model, tmp_path / EXPORT_NAME)
    loaded = load_autoencoder(tmp_path / EXPORT_NAME, what="test")
    assert loaded.config == config
    for key, value in model.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[key], value, rtol=0, atol=0)
    older = {k: v for k, v in config.to_dict().items() if k != "decoder_channels"}
    assert AEConfig.from_dict(older).decoder_width == 16
    with pytest.raises(CmkitError, match="decoder_channels"):
        AEConfig.from_dict({**older, "decoder_channels": 12})


def test_scaled_training_latents_have_unit_std(ae_run, fmnist_subset):
    """LDM's scale factor: the scaled latent means of the training images have standard deviation 1."""
    codec = _codec(ae_run, fmnist_subset)
    z = codec.encode(_images(fmnist_subset, 320))
    assert z.double().std().item() == pytest.approx(1.0, abs=1e-4)
    assert load_autoencoder(ae_run / EXPORT_NAME, what="test").scale.item() != 1.0


def _codec(ae_run, source):
    d = resolve_codec(DataConfig(source=str(source), codec=str(ae_run)))
    return make_codec(d.codec, channels=1, resolution=28, digest=d.codec_digest)


def test_latent_edm_resumes_bit_exact(latent_run, ae_run, fmnist_subset, tmp_path):
    half = tmp_path / "half"
    shutil.copytree(latent_run, half)
    list_states(half)[-1].unlink()
    assert train_latent(half, fmnist_subset, ae_run, "--resume") == 0
    straight, resumed = load_state(list_states(latent_run)[-1]), load_state(list_states(half)[-1])
    for key in ("model", "ema", "optimizer"):
        torch.testing.assert_close(resumed[key], straight[key], rtol=0, atol=0)


# The child trains through the CLI and holds before step ``at`` (its batch noise is asked for) until SIGKILL.
AE_CHILD = """
import sys, time
from pathlib import Path
from cmkit import autoencoder
from cmkit.cli import main

at, marker, noise = int(sys.argv[1]), Path(sys.argv[2]), autoencoder._batch_noise

def held(config, step):
    if step == at:
        marker.touch()
        while True:
            time.sleep(0.01)
    return noise(config, step)

autoencoder._batch_noise = held
sys.exit(main(sys.argv[3:]))
"""


def _killed_ae_run(out, source, at: int) -> None:
    """``train_ae`` (states after steps 2 and 4) in a child process, killed with SIGKILL before step ``at``."""
    marker = out.parent / "held"
    argv = ["train-ae", "--preset", "fmnist-ae", "--out", str(out), "--set", f"source={source}", *TINY_AE,
            "log_kimg=0.064"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path),
           "OMP_NUM_THREADS": str(torch.get_num_threads())}  # the same arithmetic as this process
    child = subprocess.Popen([sys.executable, "-c", AE_CHILD, str(at), str(marker), *argv], env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not marker.exists():
        if child.poll() is not None or time.monotonic() > deadline:
            child.kill()
            pytest.fail(f"the child never reached step {at}: {child.communicate()[1][-2000:]}")
        time.sleep(0.02)
    child.send_signal(signal.SIGKILL)
    child.communicate()
    assert child.returncode == -signal.SIGKILL


def test_train_ae_resumes_bit_exact_after_sigkill(fmnist_subset, tmp_path, capsys):
    """Killed between its checkpoints (after step 2's, before step 3), ``train-ae --resume`` redoes step 3 on and
    writes the same autoencoder, bit for bit, as a run never stopped; without --resume, or with other
    options, it is refused in one line and nothing changes."""
    straight, out = tmp_path / "straight", tmp_path / "killed"
    assert train_ae(straight, fmnist_subset, "log_kimg=0.064") == 0
    _killed_ae_run(out, fmnist_subset, at=3)
    assert [load_state(p)["step"] for p in list_states(out)] == [2] and not (out / EXPORT_NAME).exists()
    before = sorted((p.name, p.stat().st_mtime_ns) for p in out.rglob("*"))
    capsys.readouterr()
    for extra, message in ((("log_kimg=0.064",), "already holds a run; pass --resume"),
                           (("log_kimg=0.064", "lr=0.002", "--resume"), "different config (lr:")):
        assert train_ae(out, fmnist_subset, *extra) == 2
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1, err
    assert sorted((p.name, p.stat().st_mtime_ns) for p in out.rglob("*")) == before
    assert train_ae(out, fmnist_subset, "log_kimg=0.064", "--resume") == 0
    resumed, kept = load_autoencoder(out / EXPORT_NAME, what="test"), load_autoencoder(straight / EXPORT_NAME, what="")
    assert resumed.config == kept.config
    for key, value in kept.state_dict().items():  # the scale included
        torch.testing.assert_close(resumed.state_dict()[key], value, rtol=0, atol=0, msg=key)
    assert [json.loads(ln)["step"] for ln in (out / "metrics.jsonl").read_text().splitlines()] == [2, 4]
    assert train_ae(out, fmnist_subset, "log_kimg=0.064", "--resume") == 2  # finished: nothing to resume
    assert "already holds an autoencoder" in capsys.readouterr().err


def test_latent_export_samples_decoded_images_at_any_batch_size(latent_run, tmp_path):
    """The export is sized by the codec (a 4x7x7 model space) and samples 28x28 images decoded through the
    autoencoder, the same at batch 1 and 3, with and without guidance (which changes them)."""
    model, config, _ = load_export(latent_run)
    assert (model.channels, model.resolution) == (4, 7) and config.train.p_uncond == 0.1
    out = {}
    for batch, w in ((1, "1.5"), (3, "1.5"), (3, "1")):
        path = tmp_path / f"{batch}-{w}.npz"
        assert main(["sample", str(latent_run), "--n", "4", "--steps", "3", "--batch", str(batch), "--guidance", w,
                     "--out", str(path)]) == 0
        out[batch, w] = np.load(path)["images"]
    assert out[1, "1.5"].shape == (4, 28, 28, 1)
    assert np.array_equal(out[1, "1.5"], out[3, "1.5"]) and not np.array_equal(out[3, "1.5"], out[3, "1"])


@pytest.fixture(scope="session")
def latent_ict(ae_run, fmnist_subset, tmp_path_factory):
    """A tiny unconditional latent iCT model (no teacher): 2 steps."""
    out = tmp_path_factory.mktemp("runs") / "ict"
    assert train_latent(out, fmnist_subset, ae_run, "method.s1=20", "net.num_classes=0", "train.p_uncond=0",
                        "net.channel_mult=1", "net.attn_resolutions=7", preset="fmnist-ict", kimg=0.064) == 0
    return out


def test_latent_ict_trains_without_a_teacher_and_samples_in_one_step(latent_ict, tmp_path):
    model, config, _ = load_export(latent_ict)
    assert config.method.name == "ict" and (model.channels, model.resolution) == (4, 7)
    path = tmp_path / "s.npz"
    assert main(["sample", str(latent_ict), "--n", "2", "--out", str(path)]) == 0
    assert np.load(path)["images"].shape == (2, 28, 28, 1)


def test_a_student_adopts_its_latent_teachers_codec(latent_run, fmnist_subset, tmp_path, capsys):
    assert main(["train", "--preset", "fmnist-cd", "--out", str(tmp_path / "cd"), "--data", str(fmnist_subset),
                 "--teacher", str(latent_run), "--dry-run"]) == 0
    teacher = export_config(latent_run).data
    printed = capsys.readouterr().out
    assert teacher.codec in printed and teacher.codec_digest in printed


def test_mismatched_codecs_are_refused(latent_run, run_dir, ae_run, fmnist_subset, tmp_path, capsys):
    """A latent student of a pixel teacher, a student of another autoencoder than its teacher's: one line, and
    nothing written."""
    other = tmp_path / "ae2"
    assert train_ae(other, fmnist_subset, "seed=1") == 0
    capsys.readouterr()  # the fixtures' training output
    cases = [(run_dir, ae_run, "the teacher works in pixel space"),
             (latent_run, other, "the teacher works in an autoencoder's latent space")]
    for teacher, ae, message in cases:
        out = tmp_path / "student"
        assert exit_status(["train", "--preset", "fmnist-cd", "--out", str(out), "--data", str(fmnist_subset),
                            "--teacher", str(teacher), "--set", f"data.codec={ae}", "--kimg", "0.064"]) == 2
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1 and not out.exists()


def test_an_autoencoder_of_another_shape_or_a_changed_file_is_refused(ae_run, fmnist_subset, tmp_path, capsys):
    out = tmp_path / "run"
    assert train_latent(out, fmnist_subset, ae_run, "data.resolution=32") == 2
    err = capsys.readouterr().err
    assert "an autoencoder of 28x28 images with 1 channel(s) does not fit the data (32x32" in err
    assert len(err.strip().splitlines()) == 1 and not out.exists()
    copy = tmp_path / "ae.safetensors"
    shutil.copy(ae_run / EXPORT_NAME, copy)
    pinned = resolve_codec(DataConfig(codec=str(copy)))
    copy.write_bytes(copy.read_bytes()[:-4] + b"    ")  # the same size, other bytes
    with pytest.raises(CmkitError, match="sha256 is not data.codec_digest"):
        data_codec(pinned)
    with pytest.raises(CmkitError, match="not a cmkit autoencoder"):
        resolve_codec(DataConfig(codec=str(latent_export(tmp_path))))


def latent_export(tmp_path):
    """A safetensors file that is not an autoencoder."""
    from safetensors.torch import save_file

    path = tmp_path / "other.safetensors"
    save_file({"w": torch.zeros(1)}, str(path))
    return path


def test_unpinned_or_placeholder_codecs_are_refused(tiny_config, capsys):
    with pytest.raises(CmkitError, match="expected identity or an autoencoder pinned by its absolute path"):
        validate(replace(tiny_config, data=replace(tiny_config.data, codec="ae/autoencoder.safetensors")))
    with pytest.raises(CmkitError, match="data.codec=latent: this preset trains in an autoencoder's latent space"):
        data_codec(DataConfig(codec="latent"))


def test_editing_serving_and_diffusers_export_refuse_latent_models(latent_ict, tmp_path, capsys):
    """A latent consistency model has every capability but works on latents: pixel editing, the studio and a
    diffusers pipeline without an autoencoder refuse it in one line."""
    model, config, _ = load_export(latent_ict)
    with pytest.raises(CmkitError, match="zero-shot editing works on models with codec identity only, not on latent"):
        editing.check_codec(config.data.codec)
    with pytest.raises(CmkitError, match="the studio works on models with codec identity only"):
        check_models(Models(model, config))
    image = tmp_path / "x.png"
    assert main(["sample", str(latent_ict), "--n", "1", "--out", str(image)]) == 0
    capsys.readouterr()
    for argv in (["edit", "denoise", str(latent_ict), "--image", str(image), "--sigma", "1", "--out",
                  str(tmp_path / "e.png")], ["export", str(latent_ict), "--diffusers", str(tmp_path / "d")]):
        assert exit_status(argv) == 2
        err = capsys.readouterr().err
        assert "not on latent models" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "e.png").exists() and not (tmp_path / "d").exists()


def test_eval_scores_the_decoded_images_that_sample_writes(latent_run, fmnist_subset, classifier, tmp_path,
                                                           monkeypatch):
    """cmkit eval of a latent model decodes through its autoencoder: its FID equals the FID of the images
    cmkit sample writes for the same seeds and guidance."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    samples, a, b = tmp_path / "s.npz", tmp_path / "a.json", tmp_path / "b.json"
    assert main(["sample", str(latent_run), "--n", "20", "--steps", "2", "--guidance", "2", "--out",
                 str(samples)]) == 0
    common = ["--n", "20", "--weights", str(classifier), "--ref", str(fmnist_subset)]
    assert main(["eval", str(samples), *common, "--out", str(a)]) == 0
    assert main(["eval", str(latent_run), "--steps", "2", "--guidance", "2", *common, "--out", str(b)]) == 0
    fid_npz, fid_model = (json.loads(p.read_text())["results"][0]["fid"] for p in (a, b))
    assert fid_npz == pytest.approx(fid_model, rel=1e-6)


def test_tune_steps_scores_a_latent_consistency_model(latent_ict, fmnist_subset, classifier, tmp_path,
                                                      monkeypatch, capsys):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    model = tmp_path / "model.safetensors"
    shutil.copy(latent_ict / "model.safetensors", model)
    assert main(["tune-steps", str(model), "--n", "8", "--iters", "0", "--weights", str(classifier), "--ref",
                 str(fmnist_subset)]) == 0
    assert 2 in load_export(model).spec.tuned


def test_autoencoder_and_model_presets_point_to_their_commands(tmp_path, capsys):
    for argv, message in ((["train", "--preset", "fmnist-ae"], "train it with 'cmkit train-ae --preset fmnist-ae'"),
                          (["train-ae", "--preset", "fmnist-edm"], "train it with 'cmkit train --preset fmnist-edm'"),
                          (["train-ae", "--preset", "fmnist-ae", "--set", "z_channels=0"], "positive integers"),
                          (["train-ae", "--preset", "fmnist-ae", "--set", "depth=3"], "KEY one of source")):
        assert exit_status([*argv, "--out", str(tmp_path / "x")]) == 2
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "x").exists()
