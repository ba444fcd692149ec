"""The conditioning contract (cmkit.cond): Cond's rows, padding and unconditional copy; classifier-free guidance
at known values; label dropout (train.p_uncond) and its independence of the batch split; the null label in the
U-Net; the one label check and the one seed -> class rule."""

from __future__ import annotations

import dataclasses
from dataclasses import replace

import pytest
import torch
from torch import nn

from cmkit import dist
from cmkit.cli import main
from cmkit.cond import NULL_LABEL, ClassifierFree, Cond, check_guidance, check_labels, drop_labels, seed_labels
from cmkit.config import validate
from cmkit.data import ImageData
from cmkit.errors import CmkitError
from cmkit.nets import UNet
from cmkit.rng import SeededNoise
from cmkit.sampling import generate
from cmkit.train import local_batch

# ------------------------------------------------------------------------------------------------ Cond


def _cond() -> Cond:
    return Cond(labels=torch.tensor([0, 1, 2]), augment=torch.arange(6.0).view(3, 2),
                guidance=torch.tensor([1.0, 2.0, 3.0]), time2=torch.tensor([0.1, 0.2, 0.3]))


def test_rows_select_every_field_and_leave_absent_ones_absent():
    got = _cond().rows(slice(1, 3))
    assert got.labels.tolist() == [1, 2] and got.augment.tolist() == [[2.0, 3.0], [4.0, 5.0]]
    assert got.guidance.tolist() == [2.0, 3.0] and got.time2.tolist() == pytest.approx([0.2, 0.3])
    assert got.text is None
    picked = _cond().rows(torch.tensor([2, 0]))
    assert picked.labels.tolist() == [2, 0] and picked.augment.tolist() == [[4.0, 5.0], [0.0, 1.0]]


def test_pad_repeats_the_last_row_of_every_field():
    got = _cond().pad(2)
    assert got.labels.tolist() == [0, 1, 2, 2, 2]
    assert got.augment.tolist() == [[0.0, 1.0], [2.0, 3.0], [4.0, 5.0], [4.0, 5.0], [4.0, 5.0]]
    assert got.guidance.tolist() == [1.0, 2.0, 3.0, 3.0, 3.0] and got.text is None


def test_unconditional_copy_nulls_the_labels_only():
    c = _cond()
    u = c.unconditional()
    assert u.labels.tolist() == [NULL_LABEL] * 3 and c.labels.tolist() == [0, 1, 2]
    assert u.augment is c.augment and u.guidance is c.guidance
    assert Cond().unconditional() == Cond()
    assert c.to("meta").labels.device.type == "meta" and c.to("meta").augment.device.type == "meta"
    with pytest.raises(dataclasses.FrozenInstanceError):
        c.labels = None


# -------------------------------------------------------------------------------------------- guidance

class LabelEcho(nn.Module):
    """A conditional consistency 'model' whose answer is its class label everywhere (the null label: -1)."""

    sigma_min, sigma_max, kind, channels, resolution, num_classes = 0.002, 80.0, "consistency", 1, 4, 10

    def __init__(self):
        super().__init__()
        self.unused = nn.Parameter(torch.zeros(()))

    def forward(self, x, sigma, cond=None):
        return cond.labels.float().view(-1, 1, 1, 1).expand(x.shape).clone()


@pytest.mark.parametrize(("w", "want"), [(1.0, [0.0, 3.0]), (0.0, [-1.0, -1.0]), (2.0, [1.0, 7.0]),
                                         (1.5, [0.5, 5.0])])
def test_guidance_is_uncond_plus_w_times_the_difference(w, want):
    """D_cond = the label, D_uncond = -1: D = -1 + w (label + 1); w = 1 is the conditional model exactly, w = 0
    the unconditional one."""
    x = torch.zeros(2, 1, 4, 4)
    got = ClassifierFree(LabelEcho(), w)(x, 1.0, Cond(labels=torch.tensor([0, 3])))
    assert torch.equal(got, torch.tensor(want).view(2, 1, 1, 1).expand(x.shape))


def test_guided_generate_returns_the_model_space_unclamped():
    """Label 3, w = 2: every value is -1 + 2 (3 + 1) = 7, outside [-1, 1]: generate does not clamp."""
    out = torch.cat(list(generate(LabelEcho(), [0, 1, 2], sigmas=[80.0], sampler="consistency", batch_size=2,
                                  label=3, guidance=2.0)))
    assert torch.equal(out, torch.full((3, 1, 4, 4), 7.0))
    plain = next(generate(LabelEcho(), [0], sigmas=[80.0], sampler="consistency", batch_size=1, label=3))
    assert torch.equal(plain, torch.full((1, 1, 4, 4), 3.0))


def test_guidance_needs_labels_and_a_model_that_learnt_the_null_label():
    with pytest.raises(CmkitError, match="expected class labels"):
        ClassifierFree(LabelEcho(), 2.0)(torch.zeros(1, 1, 4, 4), 1.0, None)
    with pytest.raises(CmkitError, match="--guidance 2: this model is not class-conditional"):
        check_guidance(2.0, num_classes=0, p_uncond=None)
    with pytest.raises(CmkitError, match="train.p_uncond=0"):
        check_guidance(2.0, num_classes=10, p_uncond=0.0)
    with pytest.raises(CmkitError, match="finite"):
        check_guidance(float("nan"), num_classes=10, p_uncond=0.1)
    check_guidance(None, num_classes=0, p_uncond=0.0)
    check_guidance(3.0, num_classes=10, p_uncond=0.1)
    check_guidance(3.0, num_classes=10, p_uncond=None)  # not known: the API's plain modules


# ------------------------------------------------------------------------------------- label dropout

def _labelled(n: int = 1000) -> ImageData:
    return ImageData(images=torch.zeros(n, 1, 28, 28, dtype=torch.uint8), labels=torch.arange(n) % 10,
                     num_classes=10, name="fake")


def _config(tiny_config, p_uncond: float, batch: int):
    return replace(tiny_config, net=replace(tiny_config.net, num_classes=10),
                   train=replace(tiny_config.train, batch=batch, p_uncond=p_uncond))


def test_p_uncond_drops_the_expected_fraction_of_labels(tiny_config):
    """Over 20 steps of 400 rows, the share of null labels is 0.25 within 3 standard deviations (0.0108); the
    other labels are the dataset's."""
    config, data = _config(tiny_config, 0.25, 400), _labelled()
    dropped = kept = 0
    for step in range(20):
        _, labels = local_batch(config, data, step, torch.device("cpu"))
        dropped += int((labels == NULL_LABEL).sum())
        kept += int(((labels >= 0) & (labels < 10)).sum())
    assert dropped + kept == 8000 and abs(dropped / 8000 - 0.25) < 3 * (0.25 * 0.75 / 8000) ** 0.5
    _, plain = local_batch(_config(tiny_config, 0.0, 400), data, 0, torch.device("cpu"))
    assert (plain >= 0).all()


def test_p_uncond_does_not_depend_on_the_number_of_processes(tiny_config, monkeypatch):
    """Rank r of W processes gets rows [r B / W, (r + 1) B / W) of the one-process batch, null labels included.
    (Micro-batches are row slices of a process's rows, so they see the same labels.)"""
    config, data = _config(tiny_config, 0.5, 64), _labelled()
    _, whole = local_batch(config, data, 3, torch.device("cpu"))
    monkeypatch.setattr(dist, "world_size", lambda: 4)
    parts = []
    for r in range(4):
        monkeypatch.setattr(dist, "rank", lambda r=r: r)
        parts.append(local_batch(config, data, 3, torch.device("cpu"))[1])
    assert torch.equal(torch.cat(parts), whole) and (whole == NULL_LABEL).any() and (whole >= 0).any()


def test_p_uncond_needs_a_class_conditional_model_and_a_probability(tiny_config):
    with pytest.raises(CmkitError, match=r"train.p_uncond=0.1: label dropout needs a class-conditional model"):
        validate(replace(tiny_config, train=replace(tiny_config.train, p_uncond=0.1)))
    with pytest.raises(CmkitError, match=r"train.p_uncond: expected a probability in \[0, 1\), got 1.0"):
        validate(_config(tiny_config, 1.0, 128))
    validate(_config(tiny_config, 0.1, 128))


def test_drop_labels_puts_the_null_label_where_asked():
    got = drop_labels(torch.tensor([4, 5, 6]), torch.tensor([True, False, True]))
    assert got.tolist() == [NULL_LABEL, 5, NULL_LABEL]


def test_the_null_label_is_a_zero_one_hot():
    """At the null label the output does not depend on the label layer's weights (a zero one-hot reaches it);
    at a class it does."""
    torch.manual_seed(0)
    net = UNet(resolution=8, in_channels=1, out_channels=1, model_channels=8, channel_mult=(1,), num_blocks=1,
               attn_resolutions=(), num_classes=3).eval()
    x, c = torch.randn(2, 1, 8, 8), torch.zeros(2)
    null, cls = torch.full((2,), NULL_LABEL), torch.tensor([2, 2])
    before = net(x, c, null), net(x, c, cls)
    with torch.no_grad():
        net.map_label.weight.add_(torch.randn_like(net.map_label.weight))
    assert torch.equal(net(x, c, null), before[0]) and not torch.equal(net(x, c, cls), before[1])


# --------------------------------------------------------------------------------------------- labels

def test_the_seed_rule_draws_then_replaces():
    """A class is drawn from each seed first, so the noise after it is the same with or without a label."""
    drawn = SeededNoise([5, 6], (1, 2, 2)).labels(10)
    with_label, without = SeededNoise([5, 6], (1, 2, 2)), SeededNoise([5, 6], (1, 2, 2))
    assert seed_labels(with_label, 10, 3).tolist() == [3, 3]
    assert torch.equal(seed_labels(without, 10), drawn)
    assert torch.equal(with_label(), without())
    assert seed_labels(SeededNoise([5], (1, 2, 2)), 0) is None
    assert seed_labels(SeededNoise([5, 6], (1, 2, 2)), 10, torch.tensor([1, 8])).tolist() == [1, 8]


def test_the_label_check():
    check_labels(10, None)
    check_labels(10, 9)
    check_labels(0, None)
    with pytest.raises(CmkitError, match="--label 0: this model is not class-conditional"):
        check_labels(0, 0)
    with pytest.raises(CmkitError, match=r"--label 10: expected a class in \[0, 10\)"):
        check_labels(10, 10)
    with pytest.raises(CmkitError, match=r"--label -1: expected a class in \[0, 10\)"):
        check_labels(10, -1)  # the null label is not a user's class
    with pytest.raises(CmkitError, match=r"one per image \[2\]"):
        check_labels(10, torch.tensor([1, 2, 3]), 2)


@pytest.mark.parametrize(("model", "args", "message"), [
    ("gray", ["--label", "0"], "--label 0: this model is not class-conditional"),
    ("rgb", ["--label", "10"], r"--label 10: expected a class in [0, 10)"),
    ("gray", ["--guidance", "2"], "--guidance 2: this model is not class-conditional"),
    ("rgb", ["--guidance", "2"], "train.p_uncond=0"),
])
def test_sample_and_eval_refuse_bad_labels_and_guidance(studio_files, tmp_path, capsys, model, args, message):
    """`cmkit sample --label 0` on an unconditional model was accepted silently (issue 24)."""
    out = str(tmp_path / "x.png")
    assert main(["sample", str(studio_files[model]), "--n", "1", "--out", out, *args]) == 2
    assert message in capsys.readouterr().err
    if args[0] == "--guidance":
        assert main(["eval", str(studio_files[model]), "--n", "2", "--ref", "cifar10", *args]) == 2
        assert message in capsys.readouterr().err
