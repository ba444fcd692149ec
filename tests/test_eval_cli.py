"""End to end: cmkit eval and tune-steps on the tiny real-data model, with a small fid-fmnist classifier."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from PIL import Image

from cmkit.checkpoint import load_export
from cmkit.cli import main
from cmkit.sampling import default_sigmas
from conftest import TINY


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))


def _eval(*argv: str) -> int:
    return main(["eval", *argv])


def test_eval_model_report_and_plot(run_dir, fmnist_subset, classifier, tmp_path):
    report, plot = tmp_path / "r.json", tmp_path / "q.png"
    assert _eval(str(run_dir), "--n", "40", "--steps", "1,2", "--weights", str(classifier), "--ref",
                 str(fmnist_subset), "--out", str(report), "--plot", str(plot)) == 0
    rows = json.loads(report.read_text())["results"]
    assert [(r["steps"], r["nfe"]) for r in rows] == [(1, 1), (2, 2)]
    assert all(np.isfinite([r["fid"], r["kid"], r["precision"], r["recall"]]).all() for r in rows)
    assert Image.open(plot).format == "PNG"
    assert list((tmp_path / "cache" / "cmkit" / "references").glob("*.npz"))  # reference cached


def test_eval_scores_an_npz_and_agrees_with_the_model_path(run_dir, fmnist_subset, classifier, tmp_path):
    samples, a, b = tmp_path / "s.npz", tmp_path / "a.json", tmp_path / "b.json"
    assert main(["sample", str(run_dir), "--n", "40", "--out", str(samples)]) == 0
    common = ["--n", "40", "--weights", str(classifier), "--ref", str(fmnist_subset)]
    assert _eval(str(samples), *common, "--out", str(a)) == 0
    assert _eval(str(run_dir), "--steps", "1", *common, "--out", str(b)) == 0
    fid_npz = json.loads(a.read_text())["results"][0]["fid"]
    fid_model = json.loads(b.read_text())["results"][0]["fid"]
    assert fid_npz == pytest.approx(fid_model, rel=1e-6)  # same seeds, same images, one path


@pytest.mark.parametrize("make, argv, message", [
    ("nan", ["--n", "40"], "NaN"),
    ("rgb32", ["--n", "40", "--metric", "fid-fmnist"], "32x32x3"),
    ("ok", ["--n", "1"], "at least 2"),
    ("ok", ["--n", "40", "--metric", "fid-inception", "--weights", "{tmp}/none.pt"], "none.pt"),
    ("ok", ["--n", "40", "--out", "{tmp}/r.txt"], ".json"),
])
def test_eval_bad_input(make, argv, message, fmnist_subset, classifier, tmp_path, capsys):
    path = tmp_path / "x.npz"
    images = {"nan": np.full((4, 28, 28, 1), np.nan, np.float32), "rgb32": np.zeros((4, 32, 32, 3), np.uint8),
              "ok": np.zeros((4, 28, 28, 1), np.uint8)}[make]
    np.savez(path, images=images)
    argv = [a.format(tmp=tmp_path) for a in argv]
    extra = [] if "--weights" in argv else ["--weights", str(classifier)]
    assert _eval(str(path), "--ref", "fashion-mnist" if make == "rgb32" else str(fmnist_subset), *extra,
                 *argv) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert not (tmp_path / "r.txt").exists()


@pytest.mark.parametrize("trained", ["run_dir", "sct_run"])  # iCT; sCT (TrigFlow)
def test_tune_steps_stores_the_sigma_that_sample_then_uses(trained, request, fmnist_subset, classifier, tmp_path,
                                                           capsys):
    run = tmp_path / "run"
    shutil.copytree(request.getfixturevalue(trained), run)
    assert main(["tune-steps", str(run), "--n", "20", "--iters", "2", "--weights", str(classifier), "--ref",
                 str(fmnist_subset)]) == 0
    out = capsys.readouterr().out
    assert "best 2-step sigma" in out
    # golden section: two first points and one per iteration (n=5), the 2 best again (n=20); the summary
    assert out.count("(n=5)") == 2 + 2 and out.count("(n=20)") == 2 and out.count("FID") == 4 + 2 + 1
    model, _, spec = load_export(run)
    (t, sigma), = [spec.tuned[2]]
    assert t == model.sigma_max and model.sigma_min < sigma < model.sigma_max / 2
    assert default_sigmas(spec, 2).tolist() == [t, sigma]
    assert main(["tune-steps", str(run), "--steps", "3"]) == 2
    assert main(["tune-steps", str(run), "--iters", "-1"]) == 2
    assert "--iters -1" in capsys.readouterr().err


def test_eval_scores_a_folder_and_refuses_mixed_sizes(fmnist_subset, classifier, tmp_path, capsys):
    folder = tmp_path / "imgs"
    folder.mkdir()
    for i in range(4):
        Image.new("L", (28, 28), 40 * i).save(folder / f"{i}.png")
    common = ["--n", "40", "--weights", str(classifier), "--ref", str(fmnist_subset)]
    assert _eval(str(folder), *common) == 0
    assert "4 images" in capsys.readouterr().out
    Image.new("L", (32, 32)).save(folder / "big.png")
    assert _eval(str(folder), *common) == 2
    assert "several sizes" in capsys.readouterr().err


def test_eval_refuses_a_run_directory_without_its_model(run_dir, fmnist_subset, classifier, tmp_path, capsys):
    # A run stopped before its export holds sample grids: they must not be scored as a folder of images.
    run = tmp_path / "run"
    shutil.copytree(run_dir, run)
    (run / "model.safetensors").unlink()
    assert list((run / "samples").glob("*.png"))
    common = ["--n", "40", "--weights", str(classifier), "--ref", str(fmnist_subset)]
    assert _eval(str(run), *common) == 2
    err = capsys.readouterr().err
    assert "run directory" in err and "model.safetensors" in err and "Traceback" not in err
    for keep in ("config.json", "checkpoints", "samples"):  # any one sign is enough
        only = tmp_path / f"only-{keep}"
        only.mkdir()
        shutil.copytree(run / keep, only / keep) if (run / keep).is_dir() else shutil.copy(run / keep, only)
        assert _eval(str(only), *common) == 2
        assert "run directory" in capsys.readouterr().err


def test_eval_scores_a_diffusion_model_with_heun_at_18_steps(fmnist_subset, classifier, tmp_path):
    # A tiny EDM teacher (the conftest TINY net, trained for two steps): eval's defaults are Heun over EDM's 18
    # Karras levels (35 network evaluations), the same images 'cmkit sample' draws by default.
    run, report, samples, again = tmp_path / "edm", tmp_path / "r.json", tmp_path / "s.npz", tmp_path / "a.json"
    net = [kv for kv in TINY if not kv.startswith("method.")]
    assert main(["train", "--preset", "fmnist-edm", "--out", str(run), "--data", str(fmnist_subset), "--kimg",
                 "0.064", "--ckpt-kimg", "0.064", "--seed", "3", "--set", *net]) == 0
    common = ["--n", "8", "--weights", str(classifier), "--ref", str(fmnist_subset)]
    assert _eval(str(run), *common, "--out", str(report)) == 0
    (row,) = json.loads(report.read_text())["results"]
    assert (row["steps"], row["nfe"]) == (18, 35)
    lo, hi = 0.002 ** (1 / 7), 80.0 ** (1 / 7)
    assert row["sigmas"] == pytest.approx([(hi + i / 17 * (lo - hi)) ** 7 for i in range(18)], rel=1e-9)
    assert all(np.isfinite([row["fid"], row["kid"], row["precision"], row["recall"]]))
    assert main(["sample", str(run), "--n", "8", "--out", str(samples)]) == 0
    assert _eval(str(samples), *common, "--out", str(again)) == 0
    assert json.loads(again.read_text())["results"][0]["fid"] == pytest.approx(row["fid"], rel=1e-6)
