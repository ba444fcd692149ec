import math
from dataclasses import replace

import pytest
import torch

from cmkit.checkpoint import build_model
from cmkit.cond import Cond
from cmkit.config import Config
from cmkit.methods import REGISTRY, method_class
from cmkit.precond import ConsistencyFunction, EDMDenoiser


def _model(tiny_config: Config, name: str, dropout: float = 0.3):
    return build_model(replace(tiny_config, net=replace(tiny_config.net, dropout=dropout),
                               method=method_class(name)()))


@pytest.mark.parametrize("train_mode", [True, False])
@pytest.mark.parametrize(("name", "boundary"), [("ict", 0.002), ("sct", 0.0)])  # TrigFlow: f(x, 0) = x
def test_consistency_boundary_is_exact(tiny_config, train_mode, name, boundary):
    model = _model(tiny_config, name).train(train_mode)
    with torch.no_grad():  # make the backbone's output non-zero so c_out = 0 matters
        for p in model.parameters():
            p.normal_(0, 0.1)
    x = torch.randn(4, 1, 28, 28) * 3
    out = model(x, torch.full((4,), boundary), None)
    assert torch.equal(out, x)
    assert not torch.equal(model(x, 1.0, None), x)


SIGMAS = torch.tensor([0.002, 0.01, 0.1, 0.5, 2.0, 80.0], dtype=torch.float64)


def test_edm_coefficients_meet_the_papers_conditions():
    """EDM (Karras et al. 2022, App. B.6) for data of std sigma_data: the network's input c_in (x0 + sigma n) and its
    training target (x0 - c_skip x) / c_out have unit variance, c_skip is the one that makes c_out least (the
    derivative of the target's variance vanishes), half skip at sigma = sigma_data; c_noise is 0 at sigma = 1 and
    1 at sigma = e^4."""
    sd, sigma = 0.5, SIGMAS
    c_skip, c_out, c_in, c_noise = EDMDenoiser(torch.nn.Identity(), resolution=4, channels=1,
                                               sigma_data=sd).coefficients(sigma)
    ones = torch.ones_like(sigma)
    torch.testing.assert_close(c_in**2 * (sd**2 + sigma**2), ones, rtol=1e-12, atol=0)
    torch.testing.assert_close(((1 - c_skip) ** 2 * sd**2 + c_skip**2 * sigma**2) / c_out**2, ones, rtol=1e-12,
                               atol=0)
    torch.testing.assert_close(c_skip * sigma**2 - (1 - c_skip) * sd**2, 0 * ones, rtol=0, atol=1e-12)
    assert c_skip[3] == 0.5
    _, _, _, known = EDMDenoiser(torch.nn.Identity(), resolution=4, channels=1).coefficients(
        torch.tensor([1.0, math.exp(4)], dtype=torch.float64))
    torch.testing.assert_close(known, torch.tensor([0.0, 1.0], dtype=torch.float64), rtol=0, atol=1e-12)


def test_consistency_coefficients_at_known_points():
    """CM (Song et al. 2023, App. C): c_skip(eps) = 1 and c_out(eps) = 0 exactly (the boundary condition), half
    skip at sigma = eps + sigma_data, c_skip -> 0 and c_out -> sigma_data as sigma grows, EDM's unit-variance
    input, EDM's coefficients exactly when eps = 0, and c_noise as EDM's."""
    sd, eps, sigma = 0.5, 0.002, SIGMAS
    cm = ConsistencyFunction(torch.nn.Identity(), resolution=4, channels=1, sigma_data=sd, sigma_min=eps)
    c_skip, c_out, c_in, c_noise = cm.coefficients(sigma)
    assert c_skip[0] == 1 and c_out[0] == 0
    assert (c_skip[1:] < 1).all() and (c_skip[1:] > 0).all() and (c_out[1:] > 0).all()
    assert (c_skip[1:] < c_skip[:-1]).all() and (c_out[1:] > c_out[:-1]).all()
    assert c_skip[-1] < 1e-4 and sd * (1 - 1e-4) < c_out[-1] < sd
    half = cm.coefficients(torch.tensor([eps + sd], dtype=torch.float64))[0]
    torch.testing.assert_close(half, torch.tensor([0.5], dtype=torch.float64), rtol=1e-12, atol=0)
    torch.testing.assert_close(c_in**2 * (sd**2 + sigma**2), torch.ones_like(sigma), rtol=1e-12, atol=0)
    edm = EDMDenoiser(torch.nn.Identity(), resolution=4, channels=1, sigma_data=sd).coefficients(sigma)
    at_zero = ConsistencyFunction(torch.nn.Identity(), resolution=4, channels=1, sigma_data=sd,
                                  sigma_min=0.0).coefficients(sigma)
    for ours, theirs in zip(at_zero, edm, strict=True):
        torch.testing.assert_close(ours, theirs, rtol=1e-12, atol=0)
    torch.testing.assert_close(c_noise, edm[3], rtol=0, atol=0)


def test_wrapper_feeds_scaled_input_to_backbone():
    class Probe(torch.nn.Module):
        def forward(self, x, c_noise, labels):
            self.seen = (x, c_noise)
            return torch.zeros_like(x)

    probe = Probe()
    edm = EDMDenoiser(probe, resolution=2, channels=1)
    x = torch.ones(2, 1, 2, 2)
    out = edm(x, torch.tensor([1.0, 2.0]))
    torch.testing.assert_close(probe.seen[0][1], x[1] / (4 + 0.25) ** 0.5)
    torch.testing.assert_close(probe.seen[1][1], torch.tensor(2.0).log() / 4)
    torch.testing.assert_close(out[0], x[0] * 0.25 / 1.25)


@pytest.mark.parametrize("wrapper", sorted({entry.wrapper for entry in REGISTRY.values()}, key=lambda w: w.__name__))
def test_the_backbone_sees_the_batch_as_it_is_in_both_modes(wrapper):
    """Padding for batch invariance belongs to sampling (cmkit.sampling.BatchInvariant), not to the wrapper."""
    class Probe(torch.nn.Module):
        def forward(self, x, c_noise, labels, time2_labels=None):  # MeanFlow's backbone takes a second time
            self.rows = (x.shape[0], c_noise.shape[0], labels.shape[0])
            return x

    probe = Probe()
    model = wrapper(probe, resolution=2, channels=1, num_classes=3)
    x, labels = torch.randn(5, 1, 2, 2), torch.arange(5) % 3
    for train_mode in (True, False):
        assert model.train(train_mode)(x, 1.0, Cond(labels=labels)).shape == x.shape
        assert probe.rows == (5, 5, 5)
