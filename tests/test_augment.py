import math
import shutil
from dataclasses import replace

import pytest
import torch
from torch import nn

from cmkit import augment as aug
from cmkit.checkpoint import list_states, load_state
from cmkit.config import Config, DataConfig, apply_overrides, validate
from cmkit.errors import CmkitError
from cmkit.losses import EDMLoss
from cmkit.methods import EDMConfig, make_loss
from cmkit.presets import preset
from cmkit.rng import BatchNoise
from conftest import TINY, train_tiny

# EDM's CIFAR-10 layout: xflip, yflip, scale, rotate_frac (cos - 1, sin), aniso (2), translate_frac (2)
XFLIP, YFLIP, SCALE, ROT, ANISO, SHIFT = 0, 1, 2, slice(3, 5), slice(5, 7), slice(7, 9)


def smooth(n: int = 2, size: int = 16) -> torch.Tensor:
    """Smooth images in [-1, 1], float32 [n, 3, size, size], different in every row."""
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, size), torch.linspace(-1, 1, size), indexing="ij")
    base = torch.stack([torch.sin(2 * xx + yy), 0.9 * torch.cos(3 * yy), xx * yy])
    return torch.stack([base * (1 - 0.5 * i / n) for i in range(n)])


def rough(n: int, size: int = 8, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def only(n: int, **fields) -> aug.Augmentation:
    """A draw doing only what ``fields`` say."""
    base = dict(xflip=torch.zeros(n, dtype=torch.bool), yflip=torch.zeros(n, dtype=torch.bool),
                quarter_turns=torch.zeros(n, dtype=torch.int64), shift=torch.zeros(n, 2, dtype=torch.int64),
                matrix=torch.eye(3).repeat(n, 1, 1), labels=torch.zeros(n, 0))
    return aug.Augmentation(**{**base, **fields})


def noise(total: int = 64, seed: int = 1, start: int = 0) -> BatchNoise:
    return BatchNoise(seed, start=start, total=total)


def test_edm_cifar10_setting_has_nine_labels():
    assert aug.AUGMENT_DIM == aug.label_dim(aug.EDM_CIFAR10) == 9
    assert aug.label_dim(replace(aug.EDM_CIFAR10, rotate_int=1, translate_int=1)) == 13
    _, labels = aug.augment(rough(5), noise(5), p=0.5)
    assert labels.shape == (5, 9) and labels.dtype == torch.float32


def test_off_pipeline_gives_zero_labels_and_the_same_images():
    x = rough(64)
    out, labels = aug.augment(x, noise(), p=0.0)
    assert torch.equal(out, x) and not labels.any()


def test_images_drawn_with_no_transform_come_back_unchanged_with_zero_labels():
    x = rough(64)
    out, labels = aug.augment(x, noise(), p=0.12)
    untouched = ~labels.any(1)
    assert 5 < untouched.sum() < 60  # about half are x-flipped, a third of the rest transformed otherwise
    assert torch.equal(out[untouched], x[untouched])


def test_each_label_entry_is_the_transform_applied():
    x = rough(256, seed=2)
    out, labels = aug.augment(x, noise(256, seed=3), p=0.3)
    nonzero = labels != 0
    pure_x = nonzero[:, XFLIP] & (nonzero.sum(1) == 1)
    pure_y = nonzero[:, YFLIP] & (nonzero.sum(1) == 1)
    pure_scale = nonzero[:, SCALE] & (nonzero.sum(1) == 1)
    assert pure_x.any() and pure_y.any() and pure_scale.any()
    assert torch.equal(labels[pure_x, XFLIP], torch.ones(int(pure_x.sum())))
    assert torch.equal(out[pure_x], x[pure_x].flip(3))
    assert torch.equal(out[pure_y], x[pure_y].flip(2))
    s = torch.exp2(0.2 * labels[pure_scale, SCALE])
    expected = aug.resample(x[pure_scale], torch.diag_embed(torch.stack([1 / s, 1 / s, torch.ones_like(s)], 1)))
    torch.testing.assert_close(out[pure_scale], expected)
    rotated = labels[:, ROT]  # (cos w - 1, sin w) lies on the unit circle shifted left by one
    torch.testing.assert_close((rotated[:, 0] + 1) ** 2 + rotated[:, 1] ** 2, torch.ones(256))


def test_pixel_moves_keep_the_values_and_range():
    pipe = aug.Pipeline(xflip=1, yflip=1, rotate_int=1, translate_int=1)
    x = rough(64)
    out, labels = aug.augment(x, noise(), p=1.0, pipe=pipe)
    assert labels.shape == (64, 6) and labels[:, 4:].abs().max() <= 1
    for a, b in zip(out, x, strict=True):  # each output value is one of the input's (mirrored edges repeat some)
        assert torch.isin(a, b).all()
    assert out.abs().max() <= 1


def test_xflip_twice_is_the_identity():
    x = rough(4)
    flip = only(4, xflip=torch.tensor([True, False, True, True]))
    assert torch.equal(aug.apply(aug.apply(x, flip), flip), x)


@pytest.mark.parametrize("k", [0, 1, 2, 3])
def test_quarter_turns_match_rot90(k):
    x = rough(3)
    out = aug.apply(x, only(3, quarter_turns=torch.full((3,), k)))
    assert torch.equal(out, torch.rot90(x, k, (2, 3)))


def test_integer_shift_moves_right_and_up_with_mirrored_edges():
    x = rough(1)
    out = aug.apply(x, only(1, shift=torch.tensor([[2, 1]])))
    assert torch.equal(out[..., :-1, 2:], x[..., 1:, :-2])  # right by 2, up by 1
    assert torch.equal(out[..., :, 0], out[..., :, 4]) and torch.equal(out[..., -1, :], out[..., -3, :])


def test_resampling_is_exact_at_the_identity_and_whole_pixel_shifts():
    x = smooth()
    torch.testing.assert_close(aug.resample(x, torch.eye(3).repeat(2, 1, 1)), x, atol=1e-5, rtol=0)
    right = torch.eye(3).repeat(2, 1, 1)
    right[:, 0, 2] = -1  # output pixel q reads input q - 1: the image moves one pixel right
    torch.testing.assert_close(aug.resample(x, right)[..., 1:], x[..., :-1], atol=1e-5, rtol=0)


def test_fractional_quarter_rotation_is_close_to_rot90():
    x, theta = smooth(), torch.full((2,), math.pi / 2)
    turned = aug.resample(x, aug._rotation(theta))  # EDM's rotate_frac convention: same sense as rotate_int k = 1
    assert (turned - torch.rot90(x, 1, (2, 3))).abs().max() < 0.05  # sym6 is not symmetric: not exact


def test_fractional_transforms_stay_near_the_range_on_smooth_images():
    """The sym6 filter's negative taps overshoot at sharp edges (as EDM's); smooth images stay within 5%."""
    x = smooth(64, size=32)
    out, labels = aug.augment(x, noise(), p=1.0)
    assert labels[:, SCALE].ne(0).all() and out.abs().max() < 1.05


def test_augmentation_does_not_depend_on_the_batch_split():
    x = rough(8)
    whole, whole_labels = aug.augment(x, noise(8, seed=7), p=0.5)
    parts = [aug.augment(x[i:i + 2], noise(8, seed=7, start=i), p=0.5) for i in range(0, 8, 2)]
    assert torch.equal(torch.cat([labels for _, labels in parts]), whole_labels)
    torch.testing.assert_close(torch.cat([images for images, _ in parts]), whole, atol=1e-6, rtol=0)


def test_probability_is_honoured():
    n, p = 4000, 0.3
    labels = aug.draw(noise(n, seed=11), (n, 3, 8, 8), p=p, pipe=aug.EDM_CIFAR10).labels
    tol = 4 * math.sqrt(p * (1 - p) / n)  # four standard deviations
    assert labels[:, XFLIP].mean().item() == pytest.approx(0.5, abs=tol)  # multiplier 1e8: always a fair coin
    assert labels[:, YFLIP].mean().item() == pytest.approx(p / 2, abs=tol)
    for entries in (SCALE, ROT, SHIFT):
        applied = labels[:, entries].reshape(n, -1).ne(0).any(1).float().mean().item()
        assert applied == pytest.approx(p, abs=tol)


def test_apply_computes_in_float32_under_autocast():
    x = smooth()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, _ = aug.augment(x, noise(2), p=1.0)
    assert out.dtype == torch.float32


class Stub(nn.Module):
    """A denoiser that accepts augment labels and lets them change its output."""

    def forward(self, x, sigma, cond=None):
        self.seen = cond.augment
        return 0.5 * x + cond.augment.sum(1).view(-1, 1, 1, 1)


def test_edm_loss_augments_and_passes_the_labels():
    loss = make_loss(EDMConfig(), dim=3 * 64, total_images=1, augment=0.12)
    model, x = Stub(), rough(8)
    value = loss(model, x, None, images_seen=0, noise=noise(8))
    assert value.shape == (8,) and model.seen.shape == (8, 9) and model.seen.dtype == torch.float32
    parts = [loss(model, x[i:i + 4], None, images_seen=0, noise=noise(8, start=i)) for i in (0, 4)]
    torch.testing.assert_close(torch.cat(parts), value)


def test_edm_loss_without_augmentation_passes_no_labels():
    class Plain(nn.Module):
        def forward(self, x, sigma, labels=None):
            return x

    assert make_loss(EDMConfig(), dim=3 * 64, total_images=1).augment == 0
    assert EDMLoss(p_mean=-1.2, p_std=1.2, sigma_data=0.5)(Plain(), rough(2), None, images_seen=0).shape == (2,)


def edm_config(**data) -> Config:
    c = preset("cifar10-edm")
    return replace(c, data=replace(c.data, xflip=False, **data))


@pytest.mark.parametrize("p", [-0.1, 1.5, float("nan")])
def test_probability_outside_0_1_is_refused(p):
    with pytest.raises(CmkitError, match="data.augment"):
        validate(edm_config(augment=p))


def test_augment_validation():
    validate(edm_config(augment=0.12))
    validate(edm_config(augment=1.0))
    assert DataConfig().augment == 0.0
    assert apply_overrides(edm_config(), ["data.augment=0.12"]).data.augment == 0.12
    with pytest.raises(CmkitError, match="data.xflip=false"):
        validate(replace(edm_config(augment=0.12), data=replace(edm_config().data, xflip=True, augment=0.12)))
    with pytest.raises(CmkitError, match="method ict"):
        ict = replace(edm_config(augment=0.12), method=preset("cifar10-ict").method)
        validate(replace(ict, train=replace(ict.train, loss_reduction="mean")))


def test_an_augmented_edm_run_trains_the_real_network_and_resumes_bit_exact(fmnist_subset, tmp_path):
    """fmnist-edm with EDM's pipeline on (p = 0.12 is raised to 0.5 so that a short run augments often) and the
    network's 9 augment inputs: the labels reach the U-Net, and an interrupted run resumes bit for bit."""
    settings = [s for s in TINY if not s.startswith("method.")]
    settings += ["data.augment=0.5", "data.xflip=false", "net.augment_dim=9"]
    straight, half = tmp_path / "straight", tmp_path / "half"
    assert train_tiny(straight, fmnist_subset, preset="fmnist-edm", settings=settings) == 0
    shutil.copytree(straight, half)
    list_states(half)[-1].unlink()
    (half / "model.safetensors").unlink()
    assert train_tiny(half, fmnist_subset, "--resume", preset="fmnist-edm", settings=settings) == 0
    a, b = load_state(list_states(straight)[-1]), load_state(list_states(half)[-1])
    for key in ("model", "ema", "optimizer"):
        torch.testing.assert_close(b[key], a[key], rtol=0, atol=0)
    weights = a["model"]["net.map_augment.weight"]
    assert weights.shape[1] == aug.AUGMENT_DIM and weights.abs().sum() > 0
