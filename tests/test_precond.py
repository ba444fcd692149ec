from dataclasses import replace

import pytest
import torch

from cmkit.checkpoint import build_model
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


def test_coefficients_match_recipes_at_known_values():
    net = torch.nn.Identity()
    cm = ConsistencyFunction(net, resolution=4, channels=1, sigma_data=0.5, sigma_min=0.002)
    edm = EDMDenoiser(net, resolution=4, channels=1, sigma_data=0.5)
    sigma = torch.tensor([0.5, 80.0])
    c_skip, c_out, c_in, c_noise = cm.coefficients(sigma)
    torch.testing.assert_close(c_skip, 0.25 / ((sigma - 0.002) ** 2 + 0.25))
    torch.testing.assert_close(c_out, 0.5 * (sigma - 0.002) / (sigma**2 + 0.25).sqrt())
    torch.testing.assert_close(c_in, 1 / (sigma**2 + 0.25).sqrt())
    torch.testing.assert_close(c_noise, sigma.log() / 4)
    e_skip, e_out, e_in, _ = edm.coefficients(torch.tensor([0.5]))
    torch.testing.assert_close(e_skip, torch.tensor([0.5]))  # sigma = sigma_data: half skip
    torch.testing.assert_close(e_out, torch.tensor([0.25 / 0.5**0.5]))
    torch.testing.assert_close(e_in, torch.tensor([1 / 0.5**0.5]))


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
        def forward(self, x, c_noise, labels):
            self.rows = (x.shape[0], c_noise.shape[0], labels.shape[0])
            return x

    probe = Probe()
    model = wrapper(probe, resolution=2, channels=1, num_classes=3)
    x, labels = torch.randn(5, 1, 2, 2), torch.arange(5) % 3
    for train_mode in (True, False):
        assert model.train(train_mode)(x, 1.0, labels).shape == x.shape
        assert probe.rows == (5, 5, 5)
