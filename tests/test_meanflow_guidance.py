"""MeanFlow's class-conditional form with guidance in training (Geng et al. 2025, Sec. 4.2): the guided velocity
``w v + (1 - w - kappa) u(z, t, t | null) + kappa u(z, t, t | c)`` replaces v on the labelled rows inside the guidance
interval, checked in closed form with a network whose prediction is a known multiple of z per class; guidance for an
unconditional model is refused in one line."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from cmkit.cond import NULL_LABEL, Cond
from cmkit.config import apply_overrides, validate
from cmkit.errors import CmkitError
from cmkit.methods import MeanFlowConfig, make_loss
from cmkit.presets import preset
from cmkit.rng import GlobalNoise
from conftest import TINY, exit_status, train_tiny

SCALES = torch.tensor([0.3, -0.5, 0.8])  # u = scale z for class 0, class 1 and the null label (last)


class PerClass(nn.Module):
    """u(z, r, t | c) = SCALES[c] z: the average velocity of a network that knows each class only by a scale."""

    def raw(self, z, r, t, cond=None):
        labels = cond.labels.clone()
        labels[labels == NULL_LABEL] = len(SCALES) - 1
        return SCALES[labels].view(-1, 1, 1, 1) * z


@pytest.mark.parametrize(("w", "kappa"), [(2.0, 0.0), (1.5, 0.5)])
def test_the_target_is_the_guided_velocity(w, kappa):
    """With r = t on every row (ratio 0) the target is the (guided) velocity itself, and with p = 0 the loss is
    ``||u - target||^2``: computed here from the same draws for the labelled rows inside the interval [0.2, 0.9],
    the dropped rows and the rows outside."""
    method = MeanFlowConfig(ratio=0.0, norm_p=0.0, guidance=w, guidance_mix=kappa, guidance_t_min=0.2,
                            guidance_t_max=0.9)
    loss = make_loss(method, dim=16, total_images=1000)
    n, x0 = 256, torch.randn(256, 1, 4, 4)
    labels = torch.tensor([0, 1, NULL_LABEL, 1]).repeat(n // 4)
    torch.manual_seed(0)
    per_sample = loss(PerClass(), x0, Cond(labels=labels), images_seen=0, noise=GlobalNoise())
    torch.manual_seed(0)
    r, t = loss.times(n, GlobalNoise(), x0.device)
    e = torch.randn(n, 1, 4, 4)
    assert torch.equal(r, t)
    t4 = t.view(-1, 1, 1, 1)
    z, v = (1 - t4) * x0 + t4 * e, e - x0
    scale = SCALES[torch.where(labels == NULL_LABEL, 2, labels)].view(-1, 1, 1, 1)
    guided = w * v + (1 - w - kappa) * SCALES[2] * z + kappa * scale * z
    inside = ((labels != NULL_LABEL) & (t >= 0.2) & (t <= 0.9)).view(-1, 1, 1, 1)
    target = torch.where(inside, guided, v)
    expected = (scale * z - target).flatten(1).pow(2).sum(1)
    torch.testing.assert_close(per_sample, expected, rtol=1e-5, atol=1e-5)
    assert inside.any() and (~inside).any()


def test_guidance_needs_a_conditional_model_with_label_dropout(fmnist_subset, tmp_path, capsys):
    base = preset("fmnist-meanflow")
    validate(apply_overrides(base, ["net.num_classes=10", "train.p_uncond=0.1", "method.guidance=2"]))
    for settings in (["method.guidance=2"], ["net.num_classes=10", "method.guidance_mix=0.5"]):
        with pytest.raises(CmkitError, match="guidance in training needs a class-conditional model trained with "
                                             "label dropout"):
            validate(apply_overrides(base, settings))
    out = tmp_path / "r"
    assert exit_status(["train", "--preset", "fmnist-meanflow", "--out", str(out), "--data", str(fmnist_subset),
                        "--kimg", "0.032", "--set", "method.guidance=2"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("cmkit: error: ") and "net.num_classes=0, train.p_uncond=0" in err
    assert len(err.strip().splitlines()) == 1 and not out.exists()


def test_a_guided_class_conditional_run_trains_and_samples_a_class(fmnist_subset, tmp_path):
    out = tmp_path / "guided"
    assert train_tiny(out, fmnist_subset, "net.num_classes=10", "train.p_uncond=0.1", "method.guidance=2",
                      "method.guidance_mix=0.5", preset="fmnist-meanflow", settings=[*TINY[:4], "train.batch=16"],
                      kimg=0.032) == 0
    sample = tmp_path / "s.npz"
    assert exit_status(["sample", str(out), "--n", "2", "--label", "3", "--out", str(sample)]) == 0
