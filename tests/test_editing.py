"""Zero-shot editing (CM paper, Alg. 4): transforms, the invariants of each task, slerp, batch independence."""

from __future__ import annotations

import functools
import math
import re

import pytest
import torch

from cmkit import editing
from cmkit.checkpoint import build_model
from cmkit.errors import CmkitError
from cmkit.sampling import SeededNoise, consistency_sample
from cmkit.transforms import Identity, LumaChroma, PatchBasis
from conftest import GaussianOracle, exit_status, train_tiny

TRANSFORMS = [Identity(), LumaChroma(), PatchBasis(2), PatchBasis(4)]
SIGMAS = [80.0, 10.0, 1.0, 0.1]


def oracle(channels: int = 1, resolution: int = 8) -> GaussianOracle:
    return GaussianOracle(0.5, kind="consistency", channels=channels, resolution=resolution).requires_grad_(False)


def noise_for(model, seeds=(0, 1, 2)) -> SeededNoise:
    return SeededNoise(seeds, (model.channels, model.resolution, model.resolution))


def images(n: int, channels: int, resolution: int = 8, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, channels, resolution, resolution, generator=torch.Generator().manual_seed(seed)) * 2 - 1


# ------------------------------------------------------------------------------------------- transforms

@pytest.mark.parametrize("t", TRANSFORMS, ids=lambda t: type(t).__name__ + str(getattr(t, "factor", "")))
def test_transform_is_orthogonal_and_inverts_exactly(t):
    x = images(2, 3, 8).double()
    a = t(x)
    assert a.shape == x.shape
    torch.testing.assert_close(t.inverse(a), x, rtol=0, atol=1e-12)
    torch.testing.assert_close(t(t.inverse(x)), x, rtol=0, atol=1e-12)
    torch.testing.assert_close(a.norm(), x.norm(), rtol=1e-12, atol=0)  # orthogonal maps keep lengths
    torch.testing.assert_close(t.inverse(t(x.float())), x.float(), rtol=0, atol=1e-6)
    if hasattr(t, "q"):
        eye = torch.eye(t.q.shape[0], dtype=torch.float64)
        torch.testing.assert_close(t.q.T @ t.q, eye, rtol=0, atol=1e-12)
        torch.testing.assert_close(t.q @ t.q.T, eye, rtol=0, atol=1e-12)


def test_first_columns_are_luma_and_patch_mean():
    w = torch.tensor(editing.LUMA, dtype=torch.float64)
    torch.testing.assert_close(LumaChroma().q[:, 0], w / w.norm(), rtol=0, atol=1e-15)
    x = images(2, 3, 8).double()
    torch.testing.assert_close(LumaChroma()(x)[:, 0], torch.einsum("nchw,c->nhw", x, w / w.norm()))
    for p in (2, 4):
        torch.testing.assert_close(PatchBasis(p).q[:, 0], torch.full((p * p,), 1.0 / p, dtype=torch.float64))
        torch.testing.assert_close(PatchBasis(p)(x)[:, :, ::p, ::p] / p, editing.patch_means(x, p))


def _superres_mask(p: int, resolution: int) -> torch.Tensor:
    """Omega of super-resolution: every coordinate but each p x p patch's first (its mean)."""
    mask = torch.ones(resolution, resolution, dtype=torch.bool)
    mask[::p, ::p] = False
    return mask


@pytest.mark.parametrize("t, keep", [(LumaChroma(), torch.tensor([True, False, False]).view(1, 3, 1, 1)),
                                     (PatchBasis(2), ~_superres_mask(2, 8)), (PatchBasis(4), ~_superres_mask(4, 8))],
                         ids=["luma", "patch2", "patch4"])
def test_box_projection_is_the_nearest_point_of_the_box_on_the_constraint(t, keep):
    """The result lies in [-1, 1], meets the kept coordinates, and is clip(x + lambda a) for one lambda per row a
    (the optimality condition of the nearest point)."""
    x = (images(4, 3, seed=1) * 1.6).clamp(-1, 1)  # many pixels at -1 and 1
    y = images(4, 3, seed=2)
    out = t.project(x, t(y), keep)
    keep = keep.expand_as(x)
    assert out.dtype == x.dtype and out.abs().max() <= 1
    row = t.inverse(keep.double())
    torch.testing.assert_close(t.groups(row * out.double()), t.groups(torch.where(keep, t(y).double(), 0)),
                               rtol=0, atol=1e-6)
    free = (out.abs() < 1 - 1e-6) & (row != 0)
    lam = t.groups(row * (out - x).double() * free) / t.groups(row**2 * free).clamp_min(1e-30)
    torch.testing.assert_close(out.double(), (x + t.spread(lam) * row).clamp(-1, 1), rtol=0, atol=1e-5)
    assert ((out - x).abs() > 1e-3).any()  # the constraint moved x


def test_box_projection_unreachable_targets_and_shared_rows():
    t, x = PatchBasis(2), images(1, 1, seed=3)
    keep = ~_superres_mask(2, 8)
    high = t.project(x, torch.full_like(x, 5.0), keep)  # a patch mean of 2.5: the nearest reachable is 1
    assert torch.equal(high, torch.ones_like(x))
    both = keep.clone()
    both[0::2, 1::2] = True  # two kept coefficients in each patch: rows share pixels
    out = t.project(x, t(images(1, 1, seed=4)), both)
    assert out.abs().max() <= 1  # the fallback keeps the range


def test_identity_projection_copies_the_known_pixels():
    x, y = images(2, 1, seed=5) * 2, images(2, 1, seed=6)
    keep = editing.box_mask((0, 0, 8, 3), resolution=8)
    out = Identity().project(x, y, keep)
    assert torch.equal(out[:, :, keep], y[:, :, keep]) and torch.equal(out[:, :, ~keep], x[:, :, ~keep].clamp(-1, 1))


# ------------------------------------------------------------------------------- Alg. 4 and the tasks

def test_inpainting_keeps_known_pixels_exactly():
    model, x = oracle(1), images(3, 1)
    mask = editing.box_mask((2, 1, 4, 5), resolution=8)
    out = editing.inpaint(model, x, mask, sigmas=SIGMAS, noise=noise_for(model))
    assert out.dtype == torch.float32 and out.shape == x.shape
    assert torch.equal(out[:, :, ~mask], x[:, :, ~mask])
    assert (out[:, :, mask] - x[:, :, mask]).abs().min() > 0  # the hole is generated, not copied


def test_colorization_keeps_the_luma_exactly():
    model, x = oracle(3), images(3, 3)
    out = editing.colorize(model, x, sigmas=SIGMAS, noise=noise_for(model))
    w = torch.tensor(editing.LUMA)
    gray_in, gray_out = (torch.einsum("nchw,c->nhw", v, w) for v in (x, out))
    torch.testing.assert_close(gray_out, gray_in, rtol=0, atol=1e-5)
    assert (out[:, 0] - out[:, 1]).abs().max() > 1e-3  # chroma was generated: not a gray image


def test_superresolution_keeps_each_patch_mean_exactly():
    model, low = oracle(3), images(3, 3, resolution=2)
    out = editing.superres(model, low, factor=4, sigmas=SIGMAS, noise=noise_for(model))
    assert out.shape == (3, 3, 8, 8)
    torch.testing.assert_close(editing.patch_means(out, 4), low, rtol=0, atol=1e-5)
    assert out.std(dim=(2, 3)).min() > 1e-3  # detail was generated: not pixel replication


class Recorder:
    """Standard-normal noise that remembers each batch it hands out."""

    def __init__(self, shape) -> None:
        self.inner, self.drawn = SeededNoise(range(shape[0]), shape[1:]), []

    def __call__(self) -> torch.Tensor:
        self.drawn.append(self.inner())
        return self.drawn[-1]


def test_edit_is_algorithm_1_in_the_hole_and_the_reference_elsewhere():
    """Alg. 4 with the exact consistency function of N(0, 0.1^2) data (per pixel, its samples well inside [-1, 1];
    sigma_min 0.15 so that each step's noise level sqrt(tau^2 - eps^2) differs from tau): the known pixels are the
    reference, and the hole is what Alg. 1 draws from the same noise, for a full mask and a partial one."""
    model = GaussianOracle(0.1, kind="consistency", resolution=8).requires_grad_(False)
    model.sigma_min = 0.15
    y, sigmas = images(3, 1), [80.0, 2.0, 0.5]
    sampled = consistency_sample(model, sigmas, noise_for(model))
    assert sampled.abs().max() < 1  # the clamp of Alg. 4 (as in the CM code) does not act here
    for mask in (torch.ones(8, 8, dtype=torch.bool), editing.box_mask((0, 0, 8, 4), resolution=8)):
        out = editing.inpaint(model, y, mask, sigmas=sigmas, noise=noise_for(model))
        torch.testing.assert_close(out, torch.where(mask, sampled, y), rtol=0, atol=1e-6)


def test_edit_clamps_each_step_to_the_image_range():
    """With N(0, 0.5^2) data about 5% of the one-step values lie outside [-1, 1]: every result is inside."""
    model, y = oracle(1), images(8, 1)
    assert (consistency_sample(model, [80.0], noise_for(model, range(8))).abs() > 1).float().mean() > 0.02
    out = editing.inpaint(model, y, torch.ones(8, 8, dtype=torch.bool), sigmas=[80.0, 2.0],
                          noise=noise_for(model, range(8)))
    assert out.abs().max() <= 1 and (out.abs() == 1).any()


def test_stroke_is_two_step_sdedit_from_the_painting():
    """SDEdit from tau = 5.38, then 2.24 (two noise draws). With the exact, linear consistency function of
    N(0, 0.2^2) data, f(x, sigma) = x sqrt(s^2 + eps^2) / sqrt(s^2 + sigma^2): from a blank painting it is Alg. 1
    from 5.38, and a painting x adds x times both levels' factors."""
    s, eps = 0.2, 0.002
    model = GaussianOracle(s, kind="consistency", channels=3, resolution=8).requires_grad_(False)
    strokes = images(2, 3) * 0.5
    noise = Recorder(strokes.shape)
    out = editing.stroke(model, strokes, noise=noise)
    assert editing.STROKE_SIGMAS == (5.38, 2.24) and len(noise.drawn) == 2
    blank = editing.stroke(model, torch.zeros_like(strokes), noise=Recorder(strokes.shape))
    torch.testing.assert_close(blank, consistency_sample(model, [5.38, 2.24], Recorder(strokes.shape)),
                               rtol=0, atol=1e-6)
    factor = math.prod(math.sqrt((s**2 + eps**2) / (s**2 + sigma**2)) for sigma in (5.38, 2.24))
    torch.testing.assert_close(out - blank, factor * strokes, rtol=0, atol=1e-6)


def test_denoise_is_one_call():
    model, noisy = oracle(1), images(2, 1)
    torch.testing.assert_close(editing.denoise(model, noisy, sigma=0.7), model(noisy, 0.7), rtol=0, atol=0)
    for sigma in (0.002, 0.0, 81.0):
        with pytest.raises(CmkitError, match="noise level in"):
            editing.denoise(model, noisy, sigma=sigma)


def test_default_editing_sigmas_are_40_karras_levels_descending():
    s = editing.editing_sigmas(oracle())
    assert len(s) == 40 and s[0] == 80.0 and (s[1:] < s[:-1]).all() and s[-1] > 0.002
    ratios = (s ** (1 / 7))[:-1] - (s ** (1 / 7))[1:]
    torch.testing.assert_close(ratios, ratios.mean().expand(39), rtol=1e-9, atol=0)


# -------------------------------------------------------------------------------------- interpolation

def test_slerp_returns_each_pairs_endpoints_exactly():
    z0, z1 = torch.randn(4, 1, 8, 8), torch.randn(4, 1, 8, 8)
    assert torch.equal(editing.slerp(z0, z1, 0.0), z0) and torch.equal(editing.slerp(z0, z1, 1.0), z1)
    torch.testing.assert_close(editing.slerp(z0, z0, 0.5), z0)  # identical pair: no 0 / 0


def test_slerp_angle_is_per_sample():
    e = torch.eye(2)
    near = torch.tensor([math.cos(0.1), math.sin(0.1)])
    z0, z1 = torch.stack([e[0], e[0]]), torch.stack([e[1], near])  # angles pi/2 and 0.1
    mid = editing.slerp(z0, z1, 0.5)
    torch.testing.assert_close(mid[0], torch.tensor([1.0, 1.0]) / math.sqrt(2))
    torch.testing.assert_close(mid[1], torch.tensor([math.cos(0.05), math.sin(0.05)]))
    for i in range(2):  # the same as interpolating the pair on its own
        torch.testing.assert_close(mid[i:i + 1], editing.slerp(z0[i:i + 1], z1[i:i + 1], 0.5))
    scaled = editing.slerp(z0, 3 * z1, 0.5)  # the angle is taken from the pair's directions
    torch.testing.assert_close(scaled[0], (torch.tensor([1.0, 3.0])) / math.sqrt(2))


def test_interpolate_ends_at_the_two_noises():
    model = oracle(1)
    z0, z1 = torch.randn(2, 1, 8, 8), torch.randn(2, 1, 8, 8)
    frames = editing.interpolate(model, z0, z1, frames=5)
    assert frames.shape == (2, 5, 1, 8, 8)
    assert torch.equal(frames[:, 0], model(80.0 * z0, 80.0).clamp(-1, 1))
    assert torch.equal(frames[:, -1], model(80.0 * z1, 80.0).clamp(-1, 1))


# ------------------------------------------------------------------------------------ batch, refusals

@pytest.mark.parametrize("task", ["inpaint", "colorize", "superres", "stroke", "denoise"])
def test_results_do_not_depend_on_batch_size(task):
    model = oracle(3)
    x = images(5, 3, resolution=4 if task == "superres" else 8)
    options = {"mask": editing.box_mask((1, 1, 3, 3), resolution=8), "factor": 2, "sigma": 0.5,
               "sigmas": editing.STROKE_SIGMAS if task == "stroke" else SIGMAS}
    seeds = list(range(10, 15))
    one = torch.cat(list(editing.run_task(task, model, x, seeds, batch=5, **options)))
    split = torch.cat(list(editing.run_task(task, model, x, seeds, batch=2, **options)))
    assert torch.equal(one, split)
    alone = next(editing.run_task(task, model, x[3:4], seeds[3:4], batch=1, **options))
    assert torch.equal(alone[0], one[3])


@pytest.mark.parametrize("task", ["inpaint", "superres", "denoise"])
def test_a_real_network_edits_the_same_at_any_batch_size(task, tiny_config):
    """With the U-Net, whose BLAS kernels round differently for small batches, results are bit-identical for
    batches of 20, 7 and 1."""
    torch.manual_seed(0)
    model = build_model(tiny_config).eval().requires_grad_(False)
    x = images(20, 1, resolution=7 if task == "superres" else 28)
    options = {"mask": editing.box_mask((0, 14, 28, 14), resolution=28), "factor": 4, "sigma": 0.5,
               "sigmas": SIGMAS}
    runs = [torch.cat(list(editing.run_task(task, model, x, list(range(20)), batch=b, **options)))
            for b in (20, 7, 1)]
    assert torch.equal(runs[1], runs[0]) and torch.equal(runs[2], runs[0])


def test_refusals():
    gray, edm = oracle(1), GaussianOracle(0.5, kind="edm", resolution=8)
    noise = noise_for(gray)
    with pytest.raises(CmkitError, match="zero-shot editing needs a model with the 'edit' capability .*; this model "
                                         "was trained with edm"):
        editing.inpaint(edm, images(3, 1), torch.ones(8, 8, dtype=torch.bool), sigmas=SIGMAS, noise=noise)
    with pytest.raises(CmkitError, match="RGB"):
        editing.colorize(gray, images(3, 1), sigmas=SIGMAS, noise=noise)
    with pytest.raises(CmkitError, match="divides the model's resolution 8"):
        editing.superres(gray, images(3, 1, 3), factor=3, sigmas=SIGMAS, noise=noise)
    with pytest.raises(CmkitError, match="descending"):
        editing.inpaint(gray, images(3, 1), torch.ones(8, 8, dtype=torch.bool), sigmas=[1.0, 2.0], noise=noise)
    with pytest.raises(CmkitError, match=r"expected \[N, 1, 8, 8\]"):
        editing.inpaint(gray, images(3, 1, 6), torch.ones(8, 8, dtype=torch.bool), sigmas=SIGMAS, noise=noise)
    with pytest.raises(CmkitError, match="inside the 8x8"):
        editing.box_mask((4, 4, 5, 2), resolution=8)


REFUSALS = [  # (task, options, what the one check says), the same on every path
    ("inpaint", {}, "expected --mask M.png or --box"),
    ("inpaint", {"mask": torch.ones(6, 6, dtype=torch.bool)}, "mask of shape (6, 6)"),
    ("inpaint", {"mask": torch.ones(8, 8, dtype=torch.bool), "sigmas": [1.0, 2.0]}, "descending"),
    ("colorize", {}, "needs an RGB (3-channel) model; this model has 1 channel(s)"),
    ("superres", {}, "expected --factor p"),
    ("superres", {"factor": 1}, "factor 1: expected an integer >= 2"),
    ("superres", {"factor": 3}, "divides the model's resolution 8"),
    ("denoise", {}, "expected --sigma s"),
    ("denoise", {"sigma": 100.0}, "noise level in"),
]


def _call_task(task: str, model, x: torch.Tensor, options: dict) -> torch.Tensor:
    """The task function itself (the API), with ``options`` as run_task and edit_files take them."""
    noise, sigmas = noise_for(model, range(len(x))), options.get("sigmas", SIGMAS)
    if task == "inpaint":
        return editing.inpaint(model, x, options.get("mask"), sigmas=sigmas, noise=noise)
    if task == "colorize":
        return editing.colorize(model, x, sigmas=sigmas, noise=noise)
    if task == "superres":
        return editing.superres(model, x, factor=options.get("factor"), sigmas=sigmas, noise=noise)
    return editing.denoise(model, x, sigma=options.get("sigma"))


@pytest.mark.parametrize("task, options, message", REFUSALS)
def test_each_check_says_the_same_on_every_path(task, options, message, tmp_path):
    """The task function (API), run_task and edit_files (CLI) refuse bad options with the same one check;
    edit_files before it looks at its input and output paths."""
    model, x = oracle(1), images(2, 1)
    with pytest.raises(CmkitError, match=re.escape(message)):
        _call_task(task, model, x, options)
    with pytest.raises(CmkitError, match=re.escape(message)):
        editing.run_task(task, model, x, [0, 1], batch=2, **options)
    with pytest.raises(CmkitError, match=re.escape(message)):
        editing.edit_files(task, model, tmp_path / "missing.png", tmp_path / "missing" / "out.png", **options)


def test_run_task_checks_task_and_batch_at_once_and_defaults_stroke_to_its_levels():
    model, x = oracle(1), images(2, 1)
    with pytest.raises(CmkitError, match="batch 0: expected a positive number"):
        editing.run_task("denoise", model, x, [0, 1], batch=0, sigma=0.5)  # before the first batch is asked for
    with pytest.raises(CmkitError, match="task 'interpolate': expected one of inpaint, colorize, superres"):
        editing.run_task("interpolate", model, x, [0, 1], batch=2)
    default = next(editing.run_task("stroke", model, x, [0, 1], batch=2))
    torch.testing.assert_close(default, editing.stroke(model, x, noise=noise_for(model, [0, 1])), rtol=0, atol=0)


def test_superres_checks_the_low_resolution_size():
    model = oracle(1)
    with pytest.raises(CmkitError, match=re.escape("expected [N, 1, 2, 2]")):
        editing.superres(model, images(2, 1, 3), factor=4, sigmas=SIGMAS, noise=noise_for(model))


# ------------------------------------------------------------------------- the CLI on a trained model

@functools.cache
def _fmnist_test_images() -> torch.Tensor:
    """The first 8 Fashion-MNIST test images, uint8 [8, 1, 28, 28], decoded once for every test here."""
    from cmkit.data import load_dataset

    return load_dataset("fashion-mnist", resolution=28, channels=1, split="test").images[:8].clone()


def _fmnist_pngs(folder, n: int = 3):
    from PIL import Image

    folder.mkdir()
    data = _fmnist_test_images()[:n]
    for i, img in enumerate(data):
        Image.fromarray(img[0].numpy()).save(folder / f"{i}.png")
    return data


def _read(path):
    import numpy as np
    from PIL import Image

    return np.asarray(Image.open(path))


def test_cli_runs_every_task(run_dir, tmp_path, capsys):
    import numpy as np
    from PIL import Image

    from cmkit.cli import main

    data = _fmnist_pngs(tmp_path / "in")
    src = str(tmp_path / "in" / "0.png")
    Image.fromarray(data[0, 0].numpy()).resize((7, 7), Image.Resampling.BOX).save(tmp_path / "low.png")
    Image.fromarray(data[0, 0].numpy()).resize((56, 56)).save(tmp_path / "big.png")
    mask = np.zeros((28, 28), np.uint8)
    mask[:, :10] = 255
    Image.fromarray(mask).save(tmp_path / "mask.png")
    runs = {
        "inpaint": ["--image", src, "--mask", str(tmp_path / "mask.png"), "--sigmas", "80,10,1"],
        "colorize": None,
        "superres": ["--image", str(tmp_path / "low.png"), "--factor", "4", "--sigmas", "80,10,1"],
        "stroke": ["--image", str(tmp_path / "big.png")],
        "denoise": ["--image", src, "--sigma", "0.5", "--seed", "7"],
        "interpolate": ["--seeds", "1,2", "--frames", "5"],
    }
    for task, extra in runs.items():
        if extra is None:
            continue
        out = tmp_path / f"{task}.png"
        assert main(["edit", task, str(run_dir), "--out", str(out), *extra]) == 0, task
        assert _read(out).shape == ((2 + 5 * 30, 2 + 30)[::-1] if task == "interpolate" else (28, 28)), task
    assert "resized and centre-cropped" in capsys.readouterr().err  # the stroke painting was 56x56
    kept = _read(tmp_path / "inpaint.png")
    assert np.array_equal(kept[:, 10:], data[0, 0, :, 10:].numpy())  # known pixels survive the uint8 round trip
    assert not np.array_equal(kept[:, :10], data[0, 0, :, :10].numpy())
    low = _read(tmp_path / "low.png").astype(float)
    patches = _read(tmp_path / "superres.png").astype(float).reshape(7, 4, 7, 4)
    assert np.abs(patches.mean(axis=(1, 3)) - low).max() <= 0.5  # every mean survives up to rounding


def test_cli_folder_in_folder_out_does_not_depend_on_batch(run_dir, tmp_path):
    import numpy as np

    from cmkit.cli import main

    _fmnist_pngs(tmp_path / "in", n=3)
    for batch, out in (("3", "a"), ("1", "b")):
        assert main(["edit", "inpaint", str(run_dir), "--image", str(tmp_path / "in"), "--out", str(tmp_path / out),
                     "--box", "4,4,12,12", "--sigmas", "80,5,0.5", "--batch", batch, "--seed", "3"]) == 0
    for i in range(3):
        a, b = _read(tmp_path / "a" / f"{i}.png"), _read(tmp_path / "b" / f"{i}.png")
        assert a.shape == (28, 28) and np.abs(a.astype(int) - b.astype(int)).max() <= 1  # network rounding only


@pytest.mark.parametrize("args, message", [
    (["colorize", "--image", "{img}"], "needs an RGB (3-channel) model"),
    (["superres", "--image", "{img}", "--factor", "3"], "divides the model's resolution 28"),
    (["inpaint", "--image", "{img}"], "--mask M.png or --box"),
    (["inpaint", "--image", "{img}", "--mask", "{small}"], "expected the model's 28x28"),
    (["inpaint", "--image", "{img}", "--mask", "{gray}"], "other than 0 and 255"),
    (["inpaint", "--image", "{img}", "--mask", "{mask}", "--box", "0,0,2,2"], "give one of them"),
    (["inpaint", "--image", "{img}", "--box", "20,20,10,2"], "inside the 28x28"),
    (["inpaint", "--image", "{big}", "--box", "0,0,2,2"], "inpaint expects 28x28"),
    (["superres", "--image", "{big}", "--factor", "4"], "7x7 (low resolution) or 28x28"),
    (["denoise", "--image", "{img}"], "expected --sigma"),
    (["denoise", "--image", "{img}", "--sigma", "100"], "noise level in"),
    (["stroke", "--image", "{img}", "--factor", "2"], "not an option of 'edit stroke'"),
    (["stroke", "--image", "{img}", "--sigmas", "2,5"], "descending"),
    (["interpolate", "--image", "{img}"], "not used by"),
    (["interpolate", "--seeds", "1"], "2 comma-separated integers"),
    (["interpolate", "--frames", "1"], "at least 2"),
    (["interpolate", "--frames", "0"], "--frames 0: expected a positive integer"),
    (["interpolate", "--frames", "-3"], "--frames -3: expected a positive integer"),
    (["superres", "--image", "{img}", "--factor", "0"], "--factor 0: expected a positive integer"),
    (["denoise", "--image", "{img}", "--sigma", "0"], "--sigma 0: expected a positive number"),
    (["denoise", "--image", "{img}", "--sigma", "0.5", "--batch", "0"], "--batch 0: expected a positive integer"),
    (["stroke", "--image", "{tmp}/in"], "a folder of input images needs an output folder"),
])
def test_cli_bad_input_gets_one_clear_line(args, message, run_dir, tmp_path, capsys):
    import numpy as np
    from PIL import Image

    _fmnist_pngs(tmp_path / "in", n=2)
    Image.new("L", (56, 56), 0).save(tmp_path / "big.png")
    Image.new("L", (14, 14), 0).save(tmp_path / "small.png")
    Image.fromarray(np.full((28, 28), 128, np.uint8)).save(tmp_path / "gray.png")
    Image.new("L", (28, 28), 255).save(tmp_path / "mask.png")
    (tmp_path / "x.png").write_bytes(b"")
    names = {"img": tmp_path / "in" / "0.png", "tmp": tmp_path, **{k: tmp_path / f"{k}.png" for k in
                                                                  ("big", "small", "gray", "mask")}}
    args = [a.format(**names) for a in args]
    out = tmp_path / "out.png"
    assert exit_status(["edit", args[0], str(run_dir), *args[1:], "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and "Traceback" not in err and len(err.splitlines()) == 1, err
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == sorted(
        ["in", "big.png", "small.png", "gray.png", "mask.png", "x.png"])


# ------------------------------------------------------- what a task keeps survives the saved uint8 image

@pytest.fixture(scope="module")
def rgb_model(tmp_path_factory):
    """An untrained tiny RGB consistency model, exported: colorization needs 3 channels."""
    from cmkit.checkpoint import build_model, save_export
    from cmkit.config import apply_overrides
    from cmkit.presets import preset
    from conftest import TINY

    config = apply_overrides(preset("fmnist-ict"), [*TINY, "data.channels=3"])
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("rgb") / "model.safetensors"
    save_export(build_model(config).eval(), config, path)
    return path


def test_saved_edits_keep_their_constraints(run_dir, rgb_model, tmp_path):
    """On real Fashion-MNIST test images, through `cmkit edit`, whatever the (tiny) model generates: known pixels
    are identical in the PNG, each patch mean and each pixel's luma within uint8 rounding (half a level) of the
    input's, and no task's result needed clipping to be saved."""
    import numpy as np
    from PIL import Image

    from cmkit.checkpoint import load_export
    from cmkit.cli import main

    data = _fmnist_pngs(tmp_path / "gray", n=8).numpy()[:, 0]  # uint8 [8, 28, 28]
    low = np.round(data.reshape(8, 7, 4, 7, 4).mean(axis=(2, 4))).astype(np.uint8)
    rgb = np.round(data[..., None] * np.array([1.0, 0.75, 0.45])).astype(np.uint8)  # a colour version
    for name, arr in (("low", low), ("rgb", rgb)):
        (tmp_path / name).mkdir()
        for i, a in enumerate(arr):
            Image.fromarray(a).save(tmp_path / name / f"{i}.png")
    fast = ["--sigmas", "80,10,2,0.5"]

    def edit(task, model, image, *extra):
        out = tmp_path / f"out-{task}"
        assert main(["edit", task, str(model), "--image", str(tmp_path / image), "--out", str(out), *extra]) == 0
        return np.stack([_read(out / f"{i}.png") for i in range(8)]).astype(float)

    filled = edit("inpaint", run_dir, "gray", "--box", "0,14,28,14", *fast)
    assert np.array_equal(filled[:, :14], data[:, :14])
    high = edit("superres", run_dir, "low", "--factor", "4", *fast)
    drift = np.abs(high.reshape(8, 7, 4, 7, 4).mean(axis=(2, 4)) - low)
    assert drift.max() <= 0.5 + 1e-9, drift.max()  # up to 43 levels when the projection was followed by a clip
    colored = edit("colorize", rgb_model, "rgb", *fast)
    w = np.array(editing.LUMA) / sum(editing.LUMA)
    drift = np.abs(colored @ w - rgb @ w)
    assert drift.max() <= 0.5 + 1e-9, drift.max()  # up to 73 levels before
    assert (np.abs(colored[..., 0] - colored[..., 2]) > 8).mean() > 0.1  # colours were generated, not gray

    model, _, _ = load_export(run_dir)
    x = torch.from_numpy(data[:, None]).float() / 127.5 - 1
    seeds = list(range(8))
    results = [next(editing.run_task(task, model, x, seeds, batch=8, sigma=1.0)) for task in ("stroke", "denoise")]
    results.append(editing.interpolate(model, *(SeededNoise(s, x.shape[1:])() for s in (seeds, seeds[::-1])),
                                       frames=3))
    assert all(r.abs().max() <= 1 for r in results)  # in range: saved without a clip


# ------------------------------------------------------------------------------ class-conditional models

@pytest.fixture(scope="session")
def conditional_run(fmnist_subset, tmp_path_factory):
    """A tiny class-conditional iCT model (10 Fashion-MNIST classes), trained for 8 steps."""
    out = tmp_path_factory.mktemp("runs") / "conditional"
    assert train_tiny(out, fmnist_subset, "net.num_classes=10") == 0
    return out


def test_edit_label_is_the_api_labels(conditional_run, tmp_path):
    """`cmkit edit ... --label K` gives the API's result with labels=K (same noise as without --label), and
    another class gives another image."""
    from cmkit.checkpoint import load_export
    from cmkit.cli import main
    from cmkit.data import read_image, to_model_range
    from cmkit.images import to_numpy_images

    _fmnist_pngs(tmp_path / "in", n=2)
    model, _, _ = load_export(conditional_run)
    x = to_model_range(torch.stack([torch.from_numpy(read_image(tmp_path / "in" / f"{i}.png", channels=1))
                                    for i in range(2)]))
    for k in (3, 4):
        assert main(["edit", "denoise", str(conditional_run), "--image", str(tmp_path / "in"), "--sigma", "2",
                     "--seed", "5", "--label", str(k), "--out", str(tmp_path / f"d{k}")]) == 0
        api = to_numpy_images(next(editing.run_task("denoise", model, x, [5, 6], batch=2, sigma=2.0, labels=k)))
        for i in range(2):
            assert (_read(tmp_path / f"d{k}" / f"{i}.png") == api[i, ..., 0]).all()
    assert (_read(tmp_path / "d3" / "0.png") != _read(tmp_path / "d4" / "0.png")).any()
    for k in (3, 4):
        assert main(["edit", "interpolate", str(conditional_run), "--seeds", "1,2", "--frames", "3", "--label", str(k),
                     "--out", str(tmp_path / f"i{k}.png")]) == 0
    editing.interpolate_file(model, tmp_path / "api.png", seeds=(1, 2), frames=3, labels=3)
    assert (_read(tmp_path / "i3.png") == _read(tmp_path / "api.png")).all()
    assert (_read(tmp_path / "i3.png") != _read(tmp_path / "i4.png")).any()


def test_labels_per_image_and_their_refusals(conditional_run):
    from cmkit.checkpoint import load_export

    model, _, _ = load_export(conditional_run)
    x, seeds = images(2, 1, 28), [5, 6]
    both = next(editing.run_task("denoise", model, x, seeds, batch=2, sigma=1.0, labels=torch.tensor([2, 7])))
    for i, k in enumerate((2, 7)):
        alone = next(editing.run_task("denoise", model, x[i:i + 1], seeds[i:i + 1], batch=1, sigma=1.0, labels=k))
        assert torch.equal(alone[0], both[i])
    with pytest.raises(CmkitError, match=r"--label 10: expected a class in \[0, 10\)"):
        next(editing.run_task("denoise", model, x, seeds, batch=2, sigma=1.0, labels=10))
    with pytest.raises(CmkitError, match=r"expected one class, or one per image \[2\]"):
        editing.run_task("denoise", model, x, seeds, batch=2, sigma=1.0, labels=torch.tensor([1, 2, 3]))
    with pytest.raises(CmkitError, match="class-conditional: expected labels"):
        editing.denoise(model, x, sigma=1.0)
    with pytest.raises(CmkitError, match="not class-conditional"):
        editing.denoise(oracle(1, 28), x, sigma=1.0, labels=3)


@pytest.mark.parametrize("model, args, message", [
    ("conditional", ["denoise", "--image", "{img}", "--sigma", "1", "--label", "10"],
     "--label 10: expected a class in [0, 10)"),
    ("conditional", ["interpolate", "--label", "-1"], "--label -1: expected a class in [0, 10)"),
    ("plain", ["denoise", "--image", "{img}", "--sigma", "1", "--label", "0"],
     "--label 0: this model is not class-conditional"),
])
def test_cli_label_refusals(model, args, message, conditional_run, run_dir, tmp_path, capsys):
    from cmkit.cli import main

    _fmnist_pngs(tmp_path / "in", n=1)
    path = conditional_run if model == "conditional" else run_dir
    args = [a.format(img=tmp_path / "in" / "0.png") for a in args]
    assert main(["edit", args[0], str(path), *args[1:], "--out", str(tmp_path / "o.png")]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1, err
    assert not (tmp_path / "o.png").exists()
