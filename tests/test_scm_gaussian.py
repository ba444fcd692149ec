"""sCM (sCT and sCD, Lu and Song 2024) on Gaussian data N(0, s^2 I), where everything has a closed form.

The oracle (test_scm.py's GaussianTrigFlowNet in TrigFlow) is the exact consistency function, scaled by ``a``.

- The oracle is where the probability-flow ODE of the exact denoiser takes x.
- The whole tangent of scaled models against hand-derived formulas, sCT's and sCD's velocities included.
- The exact model's tangent vanishes: sCD per sample, sCT in expectation.
- The loss gradient moves a perturbed model back: sCD per sample, sCT in expectation.

The oracle and the other helpers shared with test_scm.py (whose bad-input and adaptive-weighting tests use the
oracle too) are defined there and imported from it.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import Tensor

from cmkit.losses import data_velocity
from cmkit.rng import BatchNoise
from conftest import GaussianOracle
from test_scm import BIG, SD, S, col, gaussian_batch, gaussian_loss, normalised, norms, oracle

EPS32 = torch.finfo(torch.float32).eps


def closed_form_tangent(s: float, a: float, x_t: Tensor, t: Tensor, dxdt: Tensor) -> Tensor:
    """g = cos t df/dt (r = 1, unnormalised) for the scaled Gaussian model, float64, from hand-derived formulas.

    f_a(x_t, t) = phi(t) x_t with phi = (1 - a) cos t + a s / sqrt(V), so df/dt = phi dx_t/dt + phi' x_t with
    phi' = -(1 - a) sin t - a s cos t sin t (sd^2 - s^2) / V^(3/2).
    """
    x_t, dxdt, t = x_t.double(), dxdt.double(), col(t.double())
    cos, sin = t.cos(), t.sin()
    v = s**2 * cos**2 + SD**2 * sin**2
    phi = (1 - a) * cos + a * s / v.sqrt()
    dphi = -(1 - a) * sin - a * s * cos * sin * (SD**2 - s**2) / v**1.5
    return cos * (phi * dxdt + dphi * x_t)


def raw_norm(g_normalised: Tensor, c: float) -> Tensor:
    """||g|| [N] from the normalised tangent: ||g_n|| = ||g|| / (||g|| + c)."""
    n = norms(g_normalised.double())
    return c * n / (1 - n)


def test_gaussian_oracle_is_the_exact_consistency_function():
    """Through TrigFlow's denoiser contract the oracle is f*(x, sigma) = s x / sqrt(s^2 + sigma^2), which is where
    the probability-flow ODE of the exact denoiser D = s^2 x / (s^2 + sigma^2) takes x (Euler with 4,000 steps)."""
    model = oracle()
    x = torch.randn(3, 1, 4, 4)
    for sigma in (0.01, 0.3, 2.0, 40.0):
        expected = S * x / math.sqrt(S**2 + sigma**2)
        torch.testing.assert_close(model(x, sigma), expected, rtol=1e-5, atol=1e-6)
    teacher, y, sigmas = GaussianOracle(S, kind="edm"), x.double() * 5, torch.linspace(5, 0, 4001, dtype=torch.float64)
    with torch.no_grad():
        for hi, lo in zip(sigmas[:-1], sigmas[1:], strict=True):
            y = y + (lo - hi) * (y - teacher(y, hi)) / hi  # dx/dsigma = (x - D) / sigma
    torch.testing.assert_close(model(x * 5, 5.0).double(), y, rtol=2e-3, atol=0)


@pytest.mark.parametrize("s", [0.3, S])
@pytest.mark.parametrize("a", [0.9, 1.0, 1.1])
@pytest.mark.parametrize("method", ["sct", "scd"])
def test_tangent_of_gaussian_models_matches_the_closed_form(method, a, s):
    """The whole tangent (velocity, JVP, Eq. 6, normalisation) for a scaled exact model, at the loss's own t.

    The velocities are written here too: sCT's cos t z - sin t x0, and sCD's ODE velocity
    E[cos t z - sin t x0 | x_t] = cos t sin t (sd^2 - s^2) / V x_t. The teacher's, (cos t x_t - D) / sin t in
    float32, carries the rounding of its O(|x_t|) terms divided by sin t (3e-5 at t_min = atan(0.002 / sd)), so
    it is checked at that tolerance and the tangent is checked given the velocity the loss used."""
    loss = gaussian_loss(method, s)
    x0, z, x_t, t = gaussian_batch(256, s)
    velocity = loss.velocity(x0, z, x_t, t, None)
    cos, sin = col(t.double().cos()), col(t.double().sin())
    if method == "sct":
        exact_velocity = cos * z.double() - sin * x0.double()
        rounding = 4 * EPS32 * (x0.abs() + z.abs()).flatten(1).amax(1)
    else:
        exact_velocity = cos * sin * (SD**2 - s**2) / (s**2 * cos**2 + SD**2 * sin**2) * x_t.double()
        rounding = 8 * EPS32 * x_t.abs().flatten(1).amax(1) / t.sin()
    assert ((velocity - exact_velocity).flatten(1).abs().amax(1) <= rounding).all()
    g = loss.tangent(oracle(s, a), x_t, t, velocity, None, images_seen=BIG)
    expected = normalised(closed_form_tangent(s, a, x_t, t, velocity), 0.1)
    torch.testing.assert_close(g.double(), expected, rtol=0, atol=4e-6)  # measured 8e-7
    if a != 1.0 or method == "sct":
        assert norms(expected).median() > 0.1  # g is O(0.1-1): atol = 4e-6 is tight


def test_scd_tangent_of_the_exact_model_vanishes_per_sample():
    """The exact consistency function is constant along the teacher's ODE, so every sample's raw tangent is zero
    up to float32 rounding of its O(|x_t| + |dx_t/dt|) terms."""
    loss = gaussian_loss("scd")
    x0, z, x_t, t = gaussian_batch(512, S)
    dxdt = loss.velocity(x0, z, x_t, t, None)
    g = loss.tangent(oracle(), x_t, t, dxdt, None, images_seen=BIG)
    assert (raw_norm(g, 0.1) <= 1e-5 * (norms(x_t) + norms(dxdt))).all()
    exact, perturbed = (loss(oracle(a=a), x0, None, images_seen=BIG, noise=BatchNoise(0, start=0, total=512))
                        for a in (1.0, 1.05))
    assert (exact >= 0).all() and exact.max() < 1e-6 * perturbed.mean()  # e^0 ||g||^2 / D - 0 (measured 0.25e-6)


@pytest.mark.parametrize("a", [1.0, 0.8, 1.2])
def test_sct_tangent_of_the_exact_model_vanishes_in_expectation(a):
    """sCT's per-sample tangent uses the sample's own velocity cos t z - sin t x0, so it is not zero; its mean
    given x_t is (the velocity's conditional mean is the ODE's). Measured at fixed t over 8,192 samples by the
    projection <g, dF/da> / D, the direction the loss moves the scale a (the plain mean of g is zero for any a,
    by the symmetry g -> -g of Gaussian data): within 4 standard errors of 0 for the exact model, and more than
    10 of them (measured: 18 to 69) against a - 1 for a model scaled by 20%."""
    loss, n = gaussian_loss("sct"), 8192
    model = oracle(a=a)
    for time in (0.1, 0.5, 1.0, 1.4):
        x0, z, x_t, t = gaussian_batch(n, S, seed=int(time * 10), t=torch.full((n,), time))
        g = loss.tangent(model, x_t, t, data_velocity(x0, z, x_t, t, None), None, images_seen=BIG)
        if a == 1.0:
            assert norms(g).mean() > 0.3  # not zero per sample
        with torch.no_grad():
            f_star = model.raw(x_t / SD, t)[0] / a  # dF/da
        projection = (g * f_star).flatten(1).mean(1).double()
        z_score = projection.mean() / (projection.std() / math.sqrt(n))
        if a == 1.0:
            assert abs(z_score) < 4, (time, z_score)
        else:
            assert z_score * math.copysign(1, 1 - a) > 10, (time, z_score)


@pytest.mark.parametrize("s", [S, 0.3])
@pytest.mark.parametrize("a", [0.95, 1.05])
def test_scd_gradient_points_back_for_every_sample(a, s):
    """Per-sample gradients (a per-sample parameter a_i) against their closed form. With c = cos^2 t,
    g = (1 - a) cos t sin t (2 c (sd^2 - s^2) - sd^2) / V x_t (before normalisation) and
    dF/da = F* = x_t (cos t - s / sqrt(V)) / (sd sin t), where cos t - s / sqrt(V) has the sign of
    c (sd^2 - s^2) - s^2; so dL_i/da = -2 e^w / D <g_i, F*_i> has the sign of
    (a - 1) (2 c (sd^2 - s^2) - sd^2) (c (sd^2 - s^2) - s^2). For s >= sd / sqrt(2) both factors are negative at
    every t and each sample's gradient points back to a = 1; for smaller s the sign flips for t between their
    zeros (s = 0.3: t in (0.49, 0.72), 16% of these samples), a property of the objective, not of the code: the
    batch's gradient still points back."""
    n = 256
    model, loss = oracle(s, a, n=n), gaussian_loss("scd", s)
    x0, *_ = gaussian_batch(n, s)
    loss(model, x0, None, images_seen=BIG, noise=BatchNoise(4, start=0, total=n)).sum().backward()
    grad = model.net.a.grad.flatten()
    c = loss.times(n, BatchNoise(4, start=0, total=n), torch.device("cpu")).cos() ** 2  # the loss's t
    expected_sign = torch.sign((a - 1) * (2 * c * (SD**2 - s**2) - SD**2) * (c * (SD**2 - s**2) - s**2))
    assert torch.equal(torch.sign(grad), expected_sign)
    assert grad.sum() * (a - 1) > 0
    if s >= SD / math.sqrt(2):
        assert (grad * (a - 1) > 0).all()
    else:
        assert (grad * (a - 1) < 0).any()


@pytest.mark.parametrize("a", [1.0, 0.95, 1.05])
def test_sct_gradient_points_back_in_expectation(a):
    """The mean per-sample gradient over 8,192 samples: the sign of a - 1 (> 5 standard errors), and within 4
    standard errors of 0 for the exact model."""
    n = 8192
    model, loss = oracle(a=a, n=n), gaussian_loss("sct")
    x0, *_ = gaussian_batch(n, S)
    loss(model, x0, None, images_seen=BIG, noise=BatchNoise(5, start=0, total=n)).sum().backward()
    grad = model.net.a.grad.flatten().double()
    z_score = grad.mean() / (grad.std() / math.sqrt(n))
    if a == 1.0:
        assert abs(z_score) < 4
    else:
        assert z_score * math.copysign(1, a - 1) > 5
