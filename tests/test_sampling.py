import math

import pytest
import torch

from cmkit.checkpoint import build_model
from cmkit.errors import CmkitError
from cmkit.sampling import (
    SeededNoise,
    check_sigmas,
    consistency_sample,
    default_sigmas,
    euler_sample,
    generate,
    heun_sample,
)
from cmkit.schedules import edm_sampling_sigmas
from conftest import GaussianOracle

S = 0.5


def _fixed_noise(z_list):
    it = iter(z_list)
    return lambda: next(it)


def test_one_step_returns_the_oracle_answer():
    model = GaussianOracle(S, kind="consistency")
    z = torch.randn(3, 1, 4, 4)
    out = consistency_sample(model, [80.0], _fixed_noise([z]))
    torch.testing.assert_close(out, model(80.0 * z, 80.0))
    # the exact consistency function maps T z to the ODE solution at sigma_min
    torch.testing.assert_close(out, 80 * z * math.sqrt(S**2 + 0.002**2) / math.sqrt(S**2 + 80**2))


def test_multistep_follows_algorithm_1():
    model = GaussianOracle(S, kind="consistency")
    z1, z2 = torch.randn(2, 3, 1, 4, 4)
    out = consistency_sample(model, [80.0, 0.821], _fixed_noise([z1, z2]))
    x = model(80 * z1, 80.0)
    expected = model(x + math.sqrt(0.821**2 - 0.002**2) * z2, 0.821)
    torch.testing.assert_close(out, expected)


@pytest.mark.parametrize("sampler", [heun_sample, euler_sample])
def test_ode_samplers_solve_the_gaussian_ode(sampler):
    # x / sqrt(s^2 + sigma^2) is constant along the exact ODE: from T z the solution at 0 is T z s / sqrt(s^2+T^2)
    model = GaussianOracle(S, kind="edm")
    z = torch.randn(4, 1, 4, 4, dtype=torch.float64)
    exact = 80 * z * S / math.sqrt(S**2 + 80**2)
    errors = []
    for steps in (18, 72):
        out = sampler(model, edm_sampling_sigmas(steps), _fixed_noise([z]))
        errors.append(((out - exact).abs().max() / exact.abs().max()).item())
    order = math.log2(errors[0] / errors[1]) / 2  # 4x the steps
    assert errors[1] < errors[0]
    # Heun is 2nd order (error /16 for 4x the steps), Euler 1st order (/4); at 18 steps the
    # relative errors are about 5.5% and 15% on this range (80 -> 0.002, rho = 7).
    if sampler is heun_sample:
        assert errors[0] < 0.06 and 1.9 < order < 2.2
    else:
        assert errors[0] < 0.16 and 0.9 < order < 1.1


def test_heun_evaluation_count():
    calls = []
    oracle = GaussianOracle(S, kind="edm")

    class Counting(torch.nn.Module):
        sigma_min, sigma_max = 0.002, 80.0

        def forward(self, x, sigma, labels=None):
            calls.append(sigma)
            return oracle(x, sigma)

    heun_sample(Counting(), edm_sampling_sigmas(18), _fixed_noise([torch.randn(1, 1, 2, 2)]))
    assert len(calls) == 35


@pytest.mark.parametrize("bad", [[0.5, 2.0], [80.0, 80.0], [100.0], [80.0, 0.001], [], [float("nan")]])
def test_bad_sigma_lists_are_refused(bad):
    with pytest.raises(CmkitError, match="sigmas"):
        check_sigmas(bad, sigma_min=0.002, sigma_max=80.0)


def test_default_sigmas():
    cm, edm = GaussianOracle(S, kind="consistency"), GaussianOracle(S, kind="edm")
    assert default_sigmas(cm, 1).tolist() == [80.0]
    assert default_sigmas(cm, 2).tolist() == [80.0, 0.821]
    four = default_sigmas(cm, 4)
    assert four.shape == (4,) and four[0] == 80.0 and (four[1:] < four[:-1]).all() and four[-1] > 0.002
    assert default_sigmas(edm, 18).shape == (18,)
    with pytest.raises(CmkitError):
        default_sigmas(cm, 0)


def test_a_seed_identifies_a_sample_whatever_the_batch():
    model = GaussianOracle(S, kind="consistency")
    seeds = list(range(10, 17))
    one = torch.cat(list(generate(model, seeds, sigmas=[80.0, 0.821], sampler="consistency", batch_size=7)))
    many = torch.cat(list(generate(model, seeds, sigmas=[80.0, 0.821], sampler="consistency", batch_size=3)))
    assert torch.equal(one, many)
    alone = next(generate(model, [13], sigmas=[80.0, 0.821], sampler="consistency", batch_size=1))
    assert torch.equal(alone[0], one[3])


def test_a_real_network_gives_the_same_images_at_any_batch_size(tiny_config):
    """With the U-Net (whose BLAS kernels round differently for small batches), the images of 20 seeds are the
    same, bit for bit, in one batch, in batches of 7 or 3, and one at a time."""
    torch.manual_seed(0)
    model = build_model(tiny_config).eval()
    seeds = list(range(20))
    runs = [torch.cat(list(generate(model, seeds, sigmas=[80.0, 0.821], sampler="consistency", batch_size=b)))
            for b in (20, 7, 3, 1)]
    for other in runs[1:]:
        assert torch.equal(other, runs[0])


def test_seeded_noise_labels_are_per_seed():
    a = SeededNoise([1, 2, 3], (1, 2, 2)).labels(10)
    b = SeededNoise([3], (1, 2, 2)).labels(10)
    assert a.shape == (3,) and a[2] == b[0]
