import math
from dataclasses import replace

import pytest
import torch
from torch import nn

from cmkit.cond import Cond
from cmkit.config import Config, apply_overrides, validate
from cmkit.distances import huber_c
from cmkit.errors import CmkitError
from cmkit.losses import EDMLoss, replayed_randomness
from cmkit.methods import (
    REGISTRY,
    CDConfig,
    CTConfig,
    ECTConfig,
    ICTConfig,
    LCMConfig,
    MethodConfig,
    SCDConfig,
    SCTConfig,
    TCMConfig,
    TeacherRole,
    make_loss,
    method_entry,
)
from cmkit.precond import ConsistencyFunction, EDMDenoiser, MeanFlow, TrigFlow
from cmkit.rng import BatchNoise
from conftest import GaussianMeanFlow, GaussianOracle, GaussianTrigFlow

S = 0.5  # the Gaussian data's standard deviation in these tests
METHODS = {name: entry.config for name, entry in REGISTRY.items()}
# MeanFlow's loss has its own tests (tests/test_meanflow.py).
CONSISTENCY = [name for name, entry in REGISTRY.items() if entry.wrapper not in (EDMDenoiser, MeanFlow)]
SCM = [name for name, entry in REGISTRY.items() if entry.wrapper is TrigFlow]  # sCT, sCD


def loss_for(method: MethodConfig, *, dim: int = 16, total_images: int = 1000):
    """The method's loss; a method that takes a teacher gets the exact diffusion teacher of N(0, S^2) data. A
    method that guides its teacher (LCM) is called with class labels where a test passes none: the Gaussian
    teacher ignores them, so its guided step is the plain one (LCM's own tests: tests/test_lcm.py)."""
    role = method_entry(method.name).teacher
    kind = "consistency" if role is TeacherRole.STAGE_ONE else "edm"  # TCM's stage one: the exact consistency model
    teacher = GaussianOracle(S, kind=kind).requires_grad_(False) if role.takes_teacher else None
    loss = make_loss(method, dim=dim, total_images=total_images, teacher=teacher)
    if method.guidance_range is None:
        return loss

    def with_labels(model, x0, cond, **kw):
        return loss(model, x0, cond or Cond(labels=torch.zeros(len(x0), dtype=torch.int64)), **kw)

    return with_labels


def oracle_for(name: str, s: float = S) -> GaussianOracle:
    """The exact model of N(0, s^2) data of the parameterisation method ``name`` trains."""
    wrapper = REGISTRY[name].wrapper
    if wrapper is TrigFlow:
        return GaussianTrigFlow(s)
    if wrapper is MeanFlow:
        return GaussianMeanFlow(s)
    return GaussianOracle(s, kind="edm" if wrapper is EDMDenoiser else "consistency")


class Cheat(nn.Module):
    """Returns the clean batch it was told about, whatever it is asked: prediction and target always agree."""

    sigma_min, sigma_max = 0.002, 80.0

    def __init__(self, x0):
        super().__init__()
        self.x0 = x0

    def forward(self, x, sigma, cond=None):
        return self.x0


class Permuted:
    """A RowNoise whose row i gets the numbers row ``perm[i]`` of the unpermuted batch gets (seed ``seed``)."""

    def __init__(self, seed: int, perm: torch.Tensor) -> None:
        self.noise, self.perm = BatchNoise(seed, start=0, total=len(perm)), perm

    def randn(self, n, *shape, device="cpu"):
        return self.noise.randn(n, *shape, device=device)[self.perm]

    def rand(self, n, device="cpu"):
        return self.noise.rand(n, device=device)[self.perm]

    def randint(self, high, n):
        return self.noise.randint(high, n)[self.perm]

    def multinomial(self, probs, n):
        return self.noise.multinomial(probs, n)[self.perm]


class Scripted:
    """A RowNoise handing out prepared values, in the order the loss asks for them."""

    def __init__(self, *, randn=(), randint=()) -> None:
        self._randn, self._randint = list(randn), list(randint)

    def randn(self, n, *shape, device="cpu"):
        value = self._randn.pop(0)
        assert value.shape == (n, *shape)
        return value.to(device)

    def randint(self, high, n):
        value = self._randint.pop(0)
        assert value.shape == (n,) and value.max() < high
        return value


# --------------------------------------------------------------------- contracts of every method's loss

@pytest.mark.parametrize("name", METHODS)
def test_loss_is_float32_per_sample(name):
    x0 = torch.rand(6, 1, 4, 4) * 2 - 1
    out = loss_for(METHODS[name]())(oracle_for(name, 0.7), x0, None, images_seen=0)
    assert out.shape == (6,) and out.dtype == torch.float32 and torch.isfinite(out).all() and (out > 0).all()


@pytest.mark.parametrize("name", [name for name in METHODS if name not in [*SCM, "meanflow"]])
def test_loss_is_zero_when_target_equals_prediction(name):
    """sCT and sCD have no target prediction to compare with: their statement is the next test's (MeanFlow's:
    tests/test_meanflow.py)."""
    x0 = torch.rand(6, 1, 4, 4) * 2 - 1
    assert torch.equal(loss_for(METHODS[name]())(Cheat(x0), x0, None, images_seen=0), torch.zeros(6))


@pytest.mark.parametrize("name", SCM)
def test_scm_loss_is_the_weighted_tangent_norm(name):
    """sCM's target is the student itself moved along the tangent g (F- + g), so where the ones above compare a
    prediction with its target, the sCM loss's value is e^w ||F - F- - g||^2 / D - w = e^w ||g||^2 / D - w
    (F = F- in value): never 0 for w = 0 and a tangent that is not. g is 0 where the model is consistent along
    the velocity field it is given (sCD's exact model of the teacher's ODE, warm-up done): the loss is then -w."""
    x0, z = torch.randn(6, 1, 4, 4) * S, torch.randn(6, 1, 4, 4)
    tau = torch.linspace(-3, 3, 6)  # t from 0.1 to 1.5
    loss, model = loss_for(METHODS[name](tangent_warmup_kimg=0)), oracle_for(name, 0.7)
    with torch.no_grad():
        model.logvar.fill_(0.3)
    out = loss(model, x0, None, images_seen=0, noise=Scripted(randn=[(tau - loss.p_mean) / loss.p_std, z]))
    t = torch.atan(tau.exp() / S)
    x_t = t.cos().view(-1, 1, 1, 1) * x0 + t.sin().view(-1, 1, 1, 1) * z * S
    g = loss.tangent(model, x_t, t, loss.velocity(x0, z * S, x_t, t, None), None, images_seen=0)
    torch.testing.assert_close(out.detach(), math.exp(0.3) * g.pow(2).flatten(1).mean(1) - 0.3)
    norm = g.flatten(1).norm(dim=1)
    assert (norm > 1e-3).all() and (norm < 1).all()  # normalised: ||g|| / (||g|| + c)
    if name == "scd":  # the exact teacher of N(0, S^2) data and the exact consistency model of its ODE
        exact = oracle_for(name, S)
        torch.testing.assert_close(loss(exact, x0, None, images_seen=0), torch.zeros(6), rtol=0, atol=1e-6)


@pytest.mark.parametrize("name", METHODS)
def test_gradient_reaches_the_student_only(name):
    """The target (a target network, or the student itself) is under stop-grad."""
    student, target = oracle_for(name, 0.7), oracle_for(name, 0.6)
    x0 = torch.randn(6, 1, 4, 4) * S
    loss_for(METHODS[name]())(student, x0, None, images_seen=0, target=target).mean().backward()
    assert student.log_s.grad is not None and student.log_s.grad != 0 and target.log_s.grad is None


@pytest.mark.parametrize("name", METHODS)
def test_loss_does_not_depend_on_batch_order(name):
    """Permuting the batch (and each sample's random numbers with it) permutes the losses, bit for bit."""
    loss, model = loss_for(METHODS[name]()), oracle_for(name, 0.7)
    x0 = torch.randn(12, 1, 4, 4) * S
    perm = torch.randperm(12, generator=torch.Generator().manual_seed(3))
    straight = loss(model, x0, None, images_seen=500, noise=Permuted(5, torch.arange(12)))
    shuffled = loss(model, x0[perm], None, images_seen=500, noise=Permuted(5, perm))
    assert torch.equal(shuffled, straight[perm])
    assert straight.unique().numel() == 12  # distinct per sample: the permutation is seen


@pytest.mark.parametrize("name", METHODS)
def test_loss_of_one_sample_does_not_depend_on_the_others(name):
    model = oracle_for(name, 0.7)
    loss = loss_for(METHODS[name]())
    x0 = torch.randn(8, 1, 4, 4) * 0.5
    changed = x0.clone()
    changed[0] = 5.0
    torch.manual_seed(1)
    a = loss(model, x0, None, images_seen=0)
    torch.manual_seed(1)
    b = loss(model, changed, None, images_seen=0)
    assert not torch.equal(a[0], b[0])
    assert torch.equal(a[1:], b[1:])


# -------------------------------------------------------------------------------- closed forms

def test_edm_loss_with_exact_denoiser_is_one():
    # For x0 ~ N(0, sigma_data^2 I) the posterior variance per value is sd^2 s^2 / (sd^2 + s^2), and the
    # EDM weight is its inverse: the exact denoiser's expected loss is exactly 1 at every sigma.
    torch.manual_seed(0)
    loss = EDMLoss(p_mean=-1.2, p_std=1.2, sigma_data=0.5)
    x0 = torch.randn(20000, 1, 4, 4) * 0.5
    value = loss(GaussianOracle(0.5, kind="edm"), x0, None, images_seen=0).mean().item()
    assert value == pytest.approx(1.0, abs=0.02)


def test_cd_loss_vanishes_at_the_exact_consistency_function():
    """With the exact teacher, x at the lower level is the ODE solution up to Heun's local error O(h^3), so the
    exact consistency function's loss is O(h^6): a grid 4x finer (18 -> 72 levels) divides it by about 4^6,
    while a wrong data scale's loss (inconsistent by O(h) per pair) falls by about 4^2 only."""
    x0 = torch.randn(512, 1, 4, 4, generator=torch.Generator().manual_seed(0)) * S

    def mean_loss(levels: int, s: float) -> float:
        loss = loss_for(CDConfig(num_scales=levels))
        return loss(oracle_for("cd", s), x0, None, images_seen=0, noise=BatchNoise(1, start=0, total=512)).mean()

    exact, wrong = [mean_loss(n, S) for n in (18, 72)], [mean_loss(n, 0.8 * S) for n in (18, 72)]
    assert exact[1] < 1e-3 * wrong[1]
    assert exact[0] / exact[1] > 4**5 and wrong[0] / wrong[1] < 4**3  # measured: 6,600 and 32


def _semi_gradient(loss, name: str, s_model: float, x0: torch.Tensor, images_seen: int) -> float:
    model = oracle_for(name, s_model)
    torch.manual_seed(0)
    loss(model, x0, None, images_seen=images_seen).mean().backward()
    return model.log_s.grad.item()


FINE = {  # fine grids (about 200 levels), and ECT at stage 12 (t - r about t / 1000); sCM: continuous already
    "ct": CTConfig(s0=200, s1=200),
    "ict": ICTConfig(s0=200, s1=200),
    "cd": CDConfig(num_scales=201),
    "ect": ECTConfig(stage_kimg=1.0),
    "sct": SCTConfig(tangent_warmup_kimg=0),
    "scd": SCDConfig(tangent_warmup_kimg=0),
    "lcm": LCMConfig(num_scales=201, skip=1, solver="heun", distance="l2", mu=0.0),
    "tcm": TCMConfig(start_stage=12),
}


@pytest.mark.parametrize("name", CONSISTENCY)
def test_consistency_targets_point_to_the_closed_form(name):
    """The stop-grad update vanishes at the exact consistency function and pushes towards it.

    With data N(0, s^2 I), a model family f_a (the exact consistency function of scale a) trained by the
    loss must see a gradient ~0 at a = s, negative below (raise a) and positive above. CD takes its pairs
    with the exact teacher's Heun step; ECT is taken at stage 12 (12,000 images at 1,000 per stage). sCD's
    tangent vanishes at a = s (the exact teacher); sCT's, built from each sample's own velocity, averages to 0.
    """
    loss = loss_for(FINE[name], total_images=20_000)
    x0 = torch.randn(8192, 1, 4, 4, generator=torch.Generator().manual_seed(0)) * S
    images_seen = 12_000 if name == "ect" else 0
    low, exact, high = (_semi_gradient(loss, name, a, x0, images_seen) for a in (0.5 * S, S, 2 * S))
    assert low < 0 < high
    assert abs(exact) < 0.05 * min(-low, high)


def test_brief_distillation_moves_towards_the_closed_form():
    """80 CD steps from the exact teacher pull a wrong data scale most of the way to the true one (the
    remaining gap is Heun's error on the 18-point grid and the noise of the pairs)."""
    loss = loss_for(CDConfig())
    model = GaussianOracle(0.2, kind="consistency")
    optimizer = torch.optim.Adam(model.parameters(), lr=0.03)
    generator = torch.Generator().manual_seed(0)
    for step in range(80):
        torch.manual_seed(step)
        x0 = torch.randn(512, 1, 4, 4, generator=generator) * S
        optimizer.zero_grad()
        loss(model, x0, None, images_seen=step * 512).mean().backward()
        optimizer.step()
    assert abs(model.log_s.exp().item() - S) < 0.15 * abs(0.2 - S)


@pytest.mark.parametrize(("solver", "order"), [("heun", 3), ("euler", 2)])
def test_cd_target_point_is_the_teacher_ode_step(solver, order):
    """With the exact teacher, CD's x_hat matches the exact ODE solution x sqrt(s^2 + lo^2) / sqrt(s^2 + hi^2)
    to the solver's accuracy: halving the step divides the local error by about 2^3 (Heun) or 2^2 (Euler)."""
    x0 = torch.randn(64, 1, 4, 4, generator=torch.Generator().manual_seed(1)) * S
    z = torch.randn(64, 1, 4, 4, generator=torch.Generator().manual_seed(2))
    loss = loss_for(CDConfig(solver=solver))
    errors = []
    for h in (0.2, 0.1, 0.05):
        lo, hi = torch.full((64,), 1.0), torch.full((64,), 1.0 + h)
        x_next = x0 + hi.view(-1, 1, 1, 1) * z
        exact = x_next * ((S**2 + 1.0) / (S**2 + (1.0 + h) ** 2)) ** 0.5
        errors.append((loss.point(x0, x_next, z, lo, hi, None) - exact).abs().max().item())
    for big, small in zip(errors, errors[1:], strict=False):
        assert 0.8 * 2**order < big / small < 1.1 * 2**order


def test_cd_needs_a_teacher():
    with pytest.raises(CmkitError, match="teacher"):
        make_loss(CDConfig(), dim=16, total_images=1)


# ----------------------------------------------------------------------- the target, at hand-made noise

class ConstantNet(nn.Module):
    """A backbone answering 0.3 everywhere: wrapped, a consistency model with f(x, sigma_min) = x exactly."""

    def forward(self, x, c_noise, labels=None):  # a backbone: class labels as they are
        return torch.full_like(x, 0.3)


def test_ect_target_is_the_clean_image_where_r_is_zero():
    """At stage 0, r(t) = 0 for t below about 1.9: the target is f(x0, sigma_min) = x0 and the weight 1 / t.

    t = 5 pairs with r = 5 (1 - (1 + 8 sigmoid(-5)) / 2) = 2.366: the target is f(x0 + r z, r), weight 1 / (t - r).
    """
    loss = loss_for(ECTConfig())
    assert loss.target_decay(0) is None and loss.stats(0)["stage"] == 0
    model = ConsistencyFunction(ConstantNet(), resolution=4, channels=1)
    t = torch.tensor([0.01, 0.3, 1.0, 5.0])
    x0, z = torch.randn(4, 1, 4, 4), torch.randn(4, 1, 4, 4)
    noise = Scripted(randn=[(t.log() + 1.1) / 2.0, z])  # ln t = -1.1 + 2 u
    out = loss(model, x0, None, images_seen=0, noise=noise)

    r = 5 * (1 - (1 + 8 / (1 + math.exp(5))) / 2)
    with torch.no_grad():
        prediction = model(x0 + t.view(-1, 1, 1, 1) * z, t)
        goal = torch.cat([x0[:3], model(x0[3:] + r * z[3:], r)])
    c = huber_c(16)
    distance = ((prediction - goal).flatten(1).pow(2).sum(1) + c**2).sqrt() - c
    torch.testing.assert_close(out, distance / torch.cat([t[:3], t[3:] - r]), rtol=1e-5, atol=0)


def test_ct_loss_measures_the_distance_to_the_target_network():
    """With a target network other than the student, CT's loss is ||f(x0 + hi z, hi) - f_target(x0 + lo z, lo)||^2
    / D at the drawn pair; at the end of a run of 1,000 images the grid has N = 151 levels (sqrt(151^2) = 151)."""
    loss = loss_for(CTConfig())
    student, target = GaussianOracle(S, kind="consistency"), GaussianOracle(2.0, kind="consistency")
    idx = torch.tensor([0, 40, 100, 149])
    x0, z = torch.randn(4, 1, 4, 4) * S, torch.randn(4, 1, 4, 4)
    out = loss(student, x0, None, images_seen=1000, target=target, noise=Scripted(randint=[idx], randn=[z]))

    grid = torch.tensor([(0.002 ** (1 / 7) + i / 150 * (80 ** (1 / 7) - 0.002 ** (1 / 7))) ** 7 for i in range(151)])
    lo, hi = grid[idx], grid[idx + 1]
    with torch.no_grad():
        expected = (student(x0 + hi.view(-1, 1, 1, 1) * z, hi) - target(x0 + lo.view(-1, 1, 1, 1) * z, lo))
    torch.testing.assert_close(out, expected.pow(2).flatten(1).mean(1), rtol=1e-5, atol=1e-7)
    itself = loss(student, x0, None, images_seen=1000, noise=Scripted(randint=[idx], randn=[z]))
    # At sigma_lo = sigma_min every consistency function is the identity: the target network makes no difference;
    # above it, the student is much closer to itself than to a target of scale 2.
    torch.testing.assert_close(itself[0], out[0])
    assert (itself[1:] < 0.5 * out[1:]).all()


def test_target_decay_of_each_method():
    """CT: mu(k) = exp(s0 ln mu0 / N(k)), so mu0 at N = s0 and mu0^(2/151) at the end (N = 151); CD: its fixed mu;
    iCT and ECT (and mu = 0): no target network."""
    ct = loss_for(CTConfig(s0=2, s1=150, mu0=0.9))
    assert ct.target_decay(0) == pytest.approx(0.9)
    assert ct.target_decay(1000) == pytest.approx(0.9 ** (2 / 151))
    assert loss_for(CTConfig(mu0=0.0)).target_decay(500) is None
    assert loss_for(ICTConfig()).target_decay(500) is None
    assert loss_for(CDConfig(mu=0.95)).target_decay(7) == 0.95
    assert loss_for(CDConfig(mu=0.0)).target_decay(7) is None


# ------------------------------------------------------------------------- the pairs' index distribution

def _chi_square(counts: torch.Tensor, probs: list[float]) -> float:
    expected = torch.tensor(probs, dtype=torch.float64) * counts.sum()
    return ((counts - expected) ** 2 / expected).sum().item()


def _drawn_indices(loss, images_seen: int, levels: int, n: int) -> torch.Tensor:
    """The pair indices i of ``n`` draws, read back from (sigma_i, sigma_{i+1}) on the ascending grid."""
    grid = torch.tensor([(0.002 ** (1 / 7) + i / (levels - 1) * (80 ** (1 / 7) - 0.002 ** (1 / 7))) ** 7
                         for i in range(levels)])
    lo, hi = loss.pairs(n, images_seen, BatchNoise(0, start=0, total=n), torch.device("cpu"))
    idx = (lo[:, None] - grid).abs().argmin(1)
    torch.testing.assert_close(lo, grid[idx])
    torch.testing.assert_close(hi, grid[idx + 1])
    return torch.bincount(idx, minlength=levels - 1).double()


def _lognormal_probs(levels: int, p_mean: float, p_std: float) -> list[float]:
    """iCT's p(i) over the pairs of a Karras grid: the N(p_mean, p_std^2) mass of ln sigma in [ln s_i, ln s_{i+1}]."""
    grid = [(0.002 ** (1 / 7) + i / (levels - 1) * (80 ** (1 / 7) - 0.002 ** (1 / 7))) ** 7 for i in range(levels)]
    cdf = [0.5 * (1 + math.erf((math.log(s) - p_mean) / (p_std * math.sqrt(2)))) for s in grid]
    mass = [b - a for a, b in zip(cdf, cdf[1:], strict=False)]
    return [m / sum(mass) for m in mass]


def test_ict_pair_index_follows_the_lognormal():
    """20,000 draws from iCT's 11-level grid (N(0) = s0 + 1): chi-square against the lognormal p(i) below the
    0.999 quantile of chi^2 with 9 degrees of freedom (27.88); the uniform distribution is rejected."""
    counts = _drawn_indices(loss_for(ICTConfig()), 0, 11, 20_000)
    assert _chi_square(counts, _lognormal_probs(11, -1.1, 2.0)) < 27.88
    assert _chi_square(counts, [1 / 10] * 10) > 10 * 27.88


def test_ct_pair_index_is_uniform():
    """16,000 draws from CT's grid at the end of its curriculum (s1 = 16: N = 17 levels, 16 pairs): chi-square
    against uniform below the 0.999 quantile of chi^2 with 15 degrees of freedom (37.70); iCT's lognormal
    probabilities on the same grid are rejected."""
    counts = _drawn_indices(loss_for(CTConfig(s1=16)), 1000, 17, 16_000)
    assert _chi_square(counts, [1 / 16] * 16) < 37.70
    assert _chi_square(counts, _lognormal_probs(17, -1.1, 2.0)) > 10 * 37.70


# -------------------------------------------------------------------------------------------- distances

def test_ect_huber_c_zero_is_the_plain_l2_norm():
    """``--set method.huber_c=0`` is accepted and means c = 0: the pseudo-Huber distance is then ||a - b||_2
    (not the automatic c = 0.00054 sqrt(D), which is what 0 meant in configs written before 0.2)."""
    config = apply_overrides(Config(method=ECTConfig()), ["method.huber_c=0"])
    validate(config)
    assert config.method.huber_c == 0
    loss = loss_for(config.method, dim=48)
    a, b = torch.randn(5, 3, 4, 4), torch.randn(5, 3, 4, 4)
    b[0] = a[0]
    expected = torch.tensor([math.sqrt(sum(v * v for v in (a[i] - b[i]).flatten().tolist())) for i in range(5)])
    torch.testing.assert_close(loss.distance(a, b), expected)
    assert loss.distance(a, b)[0] == 0
    with_auto = loss_for(replace(config.method, huber_c=None), dim=48).distance(a, b)
    assert (with_auto[1:] < expected[1:]).all()  # sqrt(d^2 + c^2) - c < d for c > 0


def test_negative_huber_c_is_refused():
    with pytest.raises(CmkitError, match="huber_c"):
        validate(Config(method=ECTConfig(huber_c=-0.1)))


# ------------------------------------------------------------------------------------------ dropout

class DropoutOnly(nn.Module):
    """Output = dropout(ones): equal for student and target exactly when they share the mask. Called through
    ``raw`` (as sCM's JVP and gradient passes call a TrigFlow model): (dropout(ones) * y, w = 0), and the
    mask is kept in ``masks``."""

    sigma_min, sigma_max = 0.002, 80.0

    def __init__(self):
        super().__init__()
        self.drop, self.masks = nn.Dropout(0.5), []

    def forward(self, x, sigma, cond=None):
        return self.drop(torch.ones(x.shape))

    def raw(self, x, t, cond=None):
        mask = self.drop(torch.ones(x.shape))
        self.masks.append(mask)
        return mask * x, torch.zeros(x.shape[0])


# TCM's target below its truncation time t' is its frozen stage one's, not the student's: a t' at sigma_min's edge,
# (almost) no boundary rows and a late stage keep every pair above t'.
ABOVE_T = {"tcm": TCMConfig(transition=0.00201, boundary_prob=1e-9, start_stage=20)}


@pytest.mark.parametrize("name", CONSISTENCY)
def test_student_and_target_share_the_dropout_mask(name):
    """sCT and sCD: the forward-mode JVP pass (F-, dF-/dt) and the gradient pass (F) draw the same mask."""
    loss, model = loss_for(ABOVE_T.get(name, METHODS[name]()), dim=64), DropoutOnly().train()
    x0 = torch.zeros(16, 1, 8, 8)
    out = loss(model, x0, None, images_seen=0, target=DropoutOnly().train())
    if name in SCM:
        jvp_pass, gradient_pass = model.masks
        assert torch.equal(jvp_pass, gradient_pass) and 0.3 < (jvp_pass == 0).float().mean() < 0.7
    else:
        assert torch.equal(out, torch.zeros(16))
    drop = nn.Dropout(0.5)
    with replayed_randomness(torch.device("cpu")):
        first = drop(torch.ones(100))
    assert torch.equal(first, drop(torch.ones(100)))
    assert not torch.equal(first, drop(torch.ones(100)))  # outside the fork the stream moves on
