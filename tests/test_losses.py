import pytest
import torch
from torch import nn

from cmkit.config import MethodConfig
from cmkit.losses import ConsistencyTrainingLoss, EDMLoss, make_loss, replayed_randomness
from conftest import GaussianOracle

METHODS = {
    "edm": MethodConfig(name="edm", p_mean=-1.2, p_std=1.2),
    "ct": MethodConfig(name="ct", curriculum="sqrt", s0=2, s1=150, mu0=0.9, index_sampling="uniform",
                       distance="l2", weighting="uniform"),
    "ict": MethodConfig(name="ict", s0=10, s1=80),
}


class Constant(nn.Module):
    """A 'model' whose answer ignores its input: student and target always agree."""

    sigma_min, sigma_max = 0.002, 80.0

    def forward(self, x, sigma, labels=None):
        return torch.zeros_like(x) + 0.25


class Cheat(nn.Module):
    """Returns the clean image it was told about: a perfect denoiser for one batch."""

    def __init__(self, x0):
        super().__init__()
        self.x0 = x0

    def forward(self, x, sigma, labels=None):
        return self.x0


@pytest.mark.parametrize("name", METHODS)
def test_loss_is_per_sample_and_zero_when_target_equals_prediction(name):
    x0 = torch.rand(6, 1, 4, 4) * 2 - 1
    loss = make_loss(METHODS[name], dim=16)
    model = Cheat(x0) if name == "edm" else Constant()
    out = loss(model, x0, None, step=3, total_steps=10)
    assert out.shape == (6,) and out.dtype == torch.float32
    assert torch.equal(out, torch.zeros(6))


@pytest.mark.parametrize("name", METHODS)
def test_loss_of_one_sample_does_not_depend_on_the_others(name):
    model = GaussianOracle(0.7, kind="edm" if name == "edm" else "consistency")
    loss = make_loss(METHODS[name], dim=16)
    x0 = torch.randn(8, 1, 4, 4) * 0.5
    changed = x0.clone()
    changed[0] = 5.0
    torch.manual_seed(1)
    a = loss(model, x0, None, step=0, total_steps=10)
    torch.manual_seed(1)
    b = loss(model, changed, None, step=0, total_steps=10)
    assert not torch.equal(a[0], b[0])
    assert torch.equal(a[1:], b[1:])


def test_edm_loss_with_exact_denoiser_is_one():
    # For x0 ~ N(0, sigma_data^2 I) the posterior variance per value is sd^2 s^2 / (sd^2 + s^2), and the
    # EDM weight is its inverse: the exact denoiser's expected loss is exactly 1 at every sigma.
    torch.manual_seed(0)
    loss = EDMLoss(p_mean=-1.2, p_std=1.2, sigma_data=0.5)
    x0 = torch.randn(20000, 1, 4, 4) * 0.5
    value = loss(GaussianOracle(0.5, kind="edm"), x0, None, step=0, total_steps=1).mean().item()
    assert value == pytest.approx(1.0, abs=0.02)


def _semi_gradient(loss, s_model: float, x0: torch.Tensor) -> float:
    model = GaussianOracle(s_model, kind="consistency")
    torch.manual_seed(0)
    loss(model, x0, None, step=0, total_steps=1).mean().backward()
    return model.log_s.grad.item()


@pytest.mark.parametrize("name", ["ct", "ict"])
def test_consistency_targets_point_to_the_closed_form(name):
    """The stop-grad CT/iCT update vanishes at the exact consistency function and pushes towards it.

    With data N(0, s^2 I), a model family f_a (the exact consistency function of scale a) trained by the
    loss must see a gradient ~0 at a = s, negative below (raise a) and positive above.
    """
    s = 0.5
    method = METHODS[name].__class__(**{**METHODS[name].__dict__, "s0": 200, "s1": 200})
    loss = make_loss(method, dim=16)
    x0 = torch.randn(8192, 1, 4, 4, generator=torch.Generator().manual_seed(0)) * s
    low, exact, high = (_semi_gradient(loss, a, x0) for a in (0.5 * s, s, 2 * s))
    assert low < 0 < high
    assert abs(exact) < 0.05 * min(-low, high)


def test_ct_loss_uses_target_network_and_decay():
    loss = make_loss(METHODS["ct"], dim=16)
    assert isinstance(loss, ConsistencyTrainingLoss)
    assert loss.target_decay(0, 100) == pytest.approx(0.9)
    assert make_loss(METHODS["ict"], dim=16).target_decay(0, 100) is None
    x0 = torch.randn(4, 1, 4, 4) * 0.5
    target = GaussianOracle(5.0, kind="consistency")
    with_target = loss(GaussianOracle(0.5, kind="consistency"), x0, None, step=0, total_steps=1, target=target)
    assert with_target.shape == (4,) and (with_target > 0).all()


class DropoutOnly(nn.Module):
    """Output = dropout(ones): equal for student and target exactly when they share the mask."""

    sigma_min, sigma_max = 0.002, 80.0

    def __init__(self):
        super().__init__()
        self.drop = nn.Dropout(0.5)

    def forward(self, x, sigma, labels=None):
        return self.drop(torch.ones_like(x))


@pytest.mark.parametrize("name", ["ct", "ict"])
def test_student_and_target_share_the_dropout_mask(name):
    loss = make_loss(METHODS[name], dim=64)
    x0 = torch.zeros(16, 1, 8, 8)
    model = DropoutOnly().train()
    out = loss(model, x0, None, step=0, total_steps=1, target=DropoutOnly().train())
    assert torch.equal(out, torch.zeros(16))
    drop = nn.Dropout(0.5)
    with replayed_randomness(torch.device("cpu")):
        first = drop(torch.ones(100))
    assert torch.equal(first, drop(torch.ones(100)))
    assert not torch.equal(first, drop(torch.ones(100)))  # outside the fork the stream moves on
