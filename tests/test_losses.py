import pytest
import torch
from torch import nn

from cmkit.config import MethodConfig
from cmkit.distances import huber_c
from cmkit.errors import CmkitError
from cmkit.losses import ConsistencyLoss, EasyConsistencyTuningLoss, EDMLoss, make_loss, replayed_randomness
from conftest import GaussianOracle

METHODS = {
    "edm": MethodConfig(name="edm", p_mean=-1.2, p_std=1.2),
    "ct": MethodConfig(name="ct", curriculum="sqrt", s0=2, s1=150, mu0=0.9, index_sampling="uniform",
                       distance="l2", weighting="uniform"),
    "ict": MethodConfig(name="ict", s0=10, s1=80),
    "cd": MethodConfig(name="cd", curriculum="constant", s0=17, s1=17, index_sampling="uniform", distance="l2",
                       weighting="uniform"),
    # A stage every 1,000 images: at step k with batch 1, stage k // 1000.
    "ect": MethodConfig(name="ect", ect_stage_kimg=1.0),
}
S = 0.5  # the Gaussian data's standard deviation in these tests


def loss_for(name: str, dim: int, method: MethodConfig | None = None):
    """The method's loss; CD gets the exact diffusion teacher of N(0, S^2) data."""
    teacher = GaussianOracle(S, kind="edm").requires_grad_(False)
    return make_loss(method or METHODS[name], dim=dim, batch=1, teacher=teacher if name == "cd" else None)


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
    loss = loss_for(name, 16)
    model = Cheat(x0) if name in ("edm", "ect") else Constant()
    out = loss(model, x0, None, step=3, total_steps=10)
    assert out.shape == (6,) and out.dtype == torch.float32
    assert torch.equal(out, torch.zeros(6))


@pytest.mark.parametrize("name", METHODS)
def test_loss_of_one_sample_does_not_depend_on_the_others(name):
    model = GaussianOracle(0.7, kind="edm" if name == "edm" else "consistency")
    loss = loss_for(name, 16)
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


def _semi_gradient(loss, s_model: float, x0: torch.Tensor, step: int) -> float:
    model = GaussianOracle(s_model, kind="consistency")
    torch.manual_seed(0)
    loss(model, x0, None, step=step, total_steps=step + 1).mean().backward()
    return model.log_s.grad.item()


@pytest.mark.parametrize("name", ["ct", "ict", "cd", "ect"])
def test_consistency_targets_point_to_the_closed_form(name):
    """The stop-grad CT/iCT/CD/ECT update vanishes at the exact consistency function and pushes towards it.

    With data N(0, s^2 I), a model family f_a (the exact consistency function of scale a) trained by the
    loss must see a gradient ~0 at a = s, negative below (raise a) and positive above. CD takes its pairs
    with the exact teacher's Heun step; ECT is taken at stage 12, where t - r is about t / 1000.
    """
    method = METHODS[name].__class__(**{**METHODS[name].__dict__, "s0": 200, "s1": 200})
    loss = loss_for(name, 16, method)
    x0 = torch.randn(8192, 1, 4, 4, generator=torch.Generator().manual_seed(0)) * S
    step = 12_000 if name == "ect" else 0
    low, exact, high = (_semi_gradient(loss, a, x0, step) for a in (0.5 * S, S, 2 * S))
    assert low < 0 < high
    assert abs(exact) < 0.05 * min(-low, high)


def test_brief_distillation_moves_towards_the_closed_form():
    """80 CD steps from the exact teacher pull a wrong data scale most of the way to the true one (the
    remaining gap is Heun's error on the 18-point grid and the noise of the pairs)."""
    loss = loss_for("cd", 16)
    model = GaussianOracle(0.2, kind="consistency")
    optimizer = torch.optim.Adam(model.parameters(), lr=0.03)
    generator = torch.Generator().manual_seed(0)
    for step in range(80):
        torch.manual_seed(step)
        x0 = torch.randn(512, 1, 4, 4, generator=generator) * S
        optimizer.zero_grad()
        loss(model, x0, None, step=step, total_steps=80).mean().backward()
        optimizer.step()
    assert abs(model.log_s.exp().item() - S) < 0.15 * abs(0.2 - S)


@pytest.mark.parametrize(("solver", "order"), [("heun", 3), ("euler", 2)])
def test_cd_target_point_is_the_teacher_ode_step(solver, order):
    """With the exact teacher, CD's x_hat matches the exact ODE solution x sqrt(s^2 + lo^2) / sqrt(s^2 + hi^2)
    to the solver's accuracy: halving the step divides the local error by about 2^3 (Heun) or 2^2 (Euler)."""
    x0 = torch.randn(64, 1, 4, 4, generator=torch.Generator().manual_seed(1)) * S
    z = torch.randn(64, 1, 4, 4, generator=torch.Generator().manual_seed(2))
    loss = loss_for("cd", 16, MethodConfig(name="cd", curriculum="constant", s1=17, solver=solver))
    errors = []
    for h in (0.2, 0.1, 0.05):
        lo, hi = torch.full((64,), 1.0), torch.full((64,), 1.0 + h)
        x_next = x0 + hi.view(-1, 1, 1, 1) * z
        exact = x_next * ((S**2 + 1.0) / (S**2 + (1.0 + h) ** 2)) ** 0.5
        errors.append((loss.target_point(x0, x_next, z, lo, hi, None) - exact).abs().max().item())
    for big, small in zip(errors, errors[1:], strict=False):
        assert 0.8 * 2**order < big / small < 1.1 * 2**order


def test_cd_needs_a_teacher():
    with pytest.raises(CmkitError, match="teacher"):
        make_loss(METHODS["cd"], dim=16, batch=1)


def test_ect_target_is_the_clean_image_where_r_is_zero():
    """At stage 0 every small t maps to r = 0: the target is x0 and the weight 1 / t (diffusion training)."""
    loss = loss_for("ect", 16)
    assert isinstance(loss, EasyConsistencyTuningLoss) and loss.target_decay(0, 1) is None
    x0 = torch.randn(4, 1, 4, 4)
    torch.manual_seed(0)
    t = (torch.randn(4) * 2.0 - 1.1).exp().clamp(0.002, 80)
    torch.manual_seed(0)
    out = loss(Constant(), x0, None, step=0, total_steps=10)
    c = huber_c(16)
    expected = ((0.25 - x0).flatten(1).pow(2).sum(1) + c**2).sqrt() - c
    small = t < 1
    assert small.any()
    torch.testing.assert_close(out[small], (expected / t)[small])


def test_ct_loss_uses_target_network_and_decay():
    loss = loss_for("ct", 16)
    assert isinstance(loss, ConsistencyLoss)
    assert loss.target_decay(0, 100) == pytest.approx(0.9)
    assert loss_for("ict", 16).target_decay(0, 100) is None
    assert loss_for("cd", 16, MethodConfig(name="cd", curriculum="constant", mu0=0.95)).target_decay(7, 100) == 0.95
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


@pytest.mark.parametrize("name", ["ct", "ict", "cd", "ect"])
def test_student_and_target_share_the_dropout_mask(name):
    loss = loss_for(name, 64)
    x0 = torch.zeros(16, 1, 8, 8)
    model = DropoutOnly().train()
    step = 20_000 if name == "ect" else 0  # late enough that no ECT target is the clean image
    out = loss(model, x0, None, step=step, total_steps=step + 1, target=DropoutOnly().train())
    assert torch.equal(out, torch.zeros(16))
    drop = nn.Dropout(0.5)
    with replayed_randomness(torch.device("cpu")):
        first = drop(torch.ones(100))
    assert torch.equal(first, drop(torch.ones(100)))
    assert not torch.equal(first, drop(torch.ones(100)))  # outside the fork the stream moves on
