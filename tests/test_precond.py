import pytest
import torch

from cmkit.checkpoint import build_model
from cmkit.config import Config, MethodConfig, NetConfig
from cmkit.precond import BATCH_QUANTUM, ConsistencyFunction, EDMDenoiser


def _model(tiny_config: Config, name: str, dropout: float = 0.3):
    cfg = Config(net=NetConfig(**{**tiny_config.net.__dict__, "dropout": dropout}),
                 data=tiny_config.data, method=MethodConfig(name=name), train=tiny_config.train)
    return build_model(cfg)


@pytest.mark.parametrize("train_mode", [True, False])
def test_consistency_boundary_is_exact(tiny_config, train_mode):
    model = _model(tiny_config, "ict").train(train_mode)
    with torch.no_grad():  # make the backbone's output non-zero so c_out = 0 matters
        for p in model.parameters():
            p.normal_(0, 0.1)
    x = torch.randn(4, 1, 28, 28) * 3
    out = model(x, torch.full((4,), model.sigma_min), None)
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


def test_in_eval_mode_a_row_does_not_depend_on_its_batch(tiny_config):
    """Bit-identical rows for batches of 20, 7, 3 and 1 (CPU BLAS rounds small batches differently)."""
    torch.manual_seed(0)
    model = _model(tiny_config, "ict", dropout=0.0).eval()
    x, sigma = torch.randn(20, 1, 28, 28) * 5, torch.rand(20) * 10 + 0.01
    with torch.no_grad():
        full = model(x, sigma)
        for b in (7, 3, 1):
            assert torch.equal(torch.cat([model(x[i:i + b], sigma[i:i + b]) for i in range(0, 20, b)]), full)


def test_the_backbone_sees_padded_batches_in_eval_mode_only():
    class Probe(torch.nn.Module):
        def forward(self, x, c_noise, labels):
            self.rows = (x.shape[0], c_noise.shape[0], labels.shape[0])
            return x

    probe = Probe()
    cm = ConsistencyFunction(probe, resolution=2, channels=1, num_classes=3)
    x, labels = torch.randn(5, 1, 2, 2), torch.arange(5) % 3
    train_out = cm.train()(x, 1.0, labels)
    assert probe.rows == (5, 5, 5)
    eval_out = cm.eval()(x, 1.0, labels)
    assert probe.rows == (BATCH_QUANTUM,) * 3
    assert eval_out.shape == x.shape and torch.equal(eval_out, train_out)
