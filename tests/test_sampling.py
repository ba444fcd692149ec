import inspect
import math

import pytest
import torch

from cmkit.checkpoint import build_model
from cmkit.cond import Cond
from cmkit.errors import CmkitError
from cmkit.methods import REGISTRY, method_class, sampling_spec
from cmkit.sampling import (
    INVARIANT_ROWS,
    SAMPLERS,
    BatchInvariant,
    SamplingSpec,
    SeededNoise,
    check_sigmas,
    consistency_sample,
    default_sigmas,
    euler_sample,
    generate,
    heun_sample,
    ode_step,
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


def test_multistep_keeps_the_data_distribution_at_every_step():
    """Alg. 1 with the exact consistency function f of N(0, S^2) data, whose outputs are N(0, S^2 + eps^2): adding
    sqrt(tau^2 - eps^2) z gives the marginal at tau (variance S^2 + tau^2), so every step's samples have variance
    S^2 + eps^2 again, and each step's correlate with the previous step's by f's factor sqrt((S^2 + eps^2) /
    (S^2 + tau^2)). eps = sigma_min = 0.3 makes the eps^2 in the noise level matter (the wrong level sigma, or no
    fresh noise, moves the variance after tau = 0.821 by 10% or more; the sampling error here is 0.6%)."""
    model, eps = GaussianOracle(S, kind="consistency"), 0.3
    model.sigma_min = eps
    sigmas = [80.0, 2.0, 0.821]
    zs = torch.randn(len(sigmas), 4096, 1, 4, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    steps = [consistency_sample(model, sigmas[:k], _fixed_noise(zs[:k])) for k in range(1, len(sigmas) + 1)]
    for k, x in enumerate(steps):
        assert abs(x.mean().item()) < 0.01
        assert x.var().item() == pytest.approx(S**2 + eps**2, rel=0.03), k
    for k in (1, 2):
        corr = torch.corrcoef(torch.stack([steps[k - 1].flatten(), steps[k].flatten()]))[0, 1].item()
        assert corr == pytest.approx(math.sqrt((S**2 + eps**2) / (S**2 + sigmas[k] ** 2)), abs=0.02), k


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

        def forward(self, x, sigma, cond=None):
            calls.append(sigma)
            return oracle(x, sigma)

    heun_sample(Counting(), edm_sampling_sigmas(18), _fixed_noise([torch.randn(1, 1, 2, 2)]))
    assert len(calls) == 35


@pytest.mark.parametrize("bad", [[0.5, 2.0], [80.0, 80.0], [100.0], [80.0, 0.001], [], [float("nan")]])
def test_bad_sigma_lists_are_refused(bad):
    with pytest.raises(CmkitError, match="sigmas"):
        check_sigmas(bad, sigma_min=0.002, sigma_max=80.0)


def test_default_sigmas():
    """1 step: sigma_max; 2: the published level (iCT's 0.821); K > 2: the first K of a (K + 1)-point Karras
    grid; an EDM model: EDM's K Karras levels."""
    cm, edm = (sampling_spec(method_class(name)()) for name in ("ict", "edm"))
    assert default_sigmas(cm, 1).tolist() == [80.0]
    assert default_sigmas(cm, 2).tolist() == [80.0, 0.821]
    four = default_sigmas(cm, 4)
    assert four.shape == (4,) and four[0] == 80.0 and (four[1:] < four[:-1]).all() and four[-1] > 0.002
    assert torch.equal(default_sigmas(edm, 18), edm_sampling_sigmas(18, sigma_min=0.002, sigma_max=80.0, rho=7.0))
    with pytest.raises(CmkitError):
        default_sigmas(cm, 0)


def test_the_two_step_level_of_each_parameterisation():
    """The published 2-step levels, one source (the method's policy): 0.821 for the CM parameterisation (iCT and
    ECT's CIFAR-10 value; TCM's official evaluation), sCM's t = 1.1 (sigma_data tan 1.1) for TrigFlow, none for EDM;
    MeanFlow's t = 1/2 (sigma 1, whatever sigma_data)."""
    levels = {name: sampling_spec(method_class(name)(sigma_data=0.25)).two_step_sigma for name in REGISTRY}
    assert levels == {"edm": None, "ct": 0.821, "ict": 0.821, "cd": 0.821, "ect": 0.821,
                      "sct": 0.25 * math.tan(1.1), "scd": 0.25 * math.tan(1.1), "lcm": 0.821, "meanflow": 1.0,
                      "tcm": 0.821}


def test_tuned_sigmas_come_first():
    spec = sampling_spec(method_class("ict")()).with_tuned(2, [80.0, 1.5])
    assert default_sigmas(spec, 2).tolist() == [80.0, 1.5] and default_sigmas(spec, 1).tolist() == [80.0]
    with pytest.raises(CmkitError, match="expected 2 levels"):
        spec.with_tuned(2, [80.0, 2.0, 1.0])
    with pytest.raises(CmkitError, match="descending"):
        spec.with_tuned(2, [1.0, 80.0])


def test_sampling_spec_json_round_trip():
    spec = sampling_spec(method_class("sct")()).with_tuned(2, [80.0, 0.75]).with_tuned(3, [80.0, 2.0, 0.1])
    assert SamplingSpec.from_json(spec.to_json(), where="x") == spec
    for bad in ("[]", '{"sampler": "consistency"}', spec.to_json().replace('"consistency"', '"magic"')):
        with pytest.raises(CmkitError, match="x: metadata 'sampling'"):
            SamplingSpec.from_json(bad, where="x")


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
    same, bit for bit, one at a time and in batches of 7, 16 and 17 (padded remainders of 6, 4 and 3 rows)."""
    torch.manual_seed(0)
    model = build_model(tiny_config).eval()
    seeds = list(range(20))
    runs = [torch.cat(list(generate(model, seeds, sigmas=[80.0, 0.821], sampler="consistency", batch_size=b)))
            for b in (1, 7, 16, 17)]
    for other in runs[1:]:
        assert torch.equal(other, runs[0])


class RowProbe(torch.nn.Module):
    """A denoiser that keeps the inputs it was called with and answers row by row: 2 x + sigma + label."""

    sigma_min, sigma_max, method_name = 0.002, 80.0, "ict"

    def __init__(self):
        super().__init__()
        self.calls = []

    def forward(self, x, sigma, cond=None):
        self.calls.append((x, sigma, cond.labels))
        sigma = torch.as_tensor(sigma, dtype=x.dtype, device=x.device).reshape(-1, 1, 1, 1)
        return 2 * x + sigma + cond.labels.view(-1, 1, 1, 1)


@pytest.mark.parametrize("n", [1, 5, INVARIANT_ROWS - 1])
def test_batch_invariant_pads_small_cpu_batches(n):
    """Under 16 rows on the CPU the model sees 16 (x, sigma and labels padded with copies of the last row) and
    the caller gets its n rows back; attributes are the model's."""
    probe = RowProbe()
    x, sigma, labels = torch.randn(n, 1, 2, 2), torch.rand(n) + 0.5, torch.arange(n) % 3
    out = BatchInvariant(probe)(x, sigma, Cond(labels=labels))
    seen_x, seen_sigma, seen_labels = probe.calls[-1]
    assert seen_x.shape[0] == seen_sigma.shape[0] == seen_labels.shape[0] == INVARIANT_ROWS
    assert torch.equal(seen_x[:n], x) and (seen_x[n:] == x[-1]).all()
    assert torch.equal(seen_sigma[n:], sigma[-1].expand(INVARIANT_ROWS - n))
    assert torch.equal(out, 2 * x + sigma.view(-1, 1, 1, 1) + labels.view(-1, 1, 1, 1))
    assert BatchInvariant(probe).sigma_min == 0.002 and BatchInvariant(probe).method_name == "ict"


def test_batch_invariant_padding_takes_a_scalar_sigma():
    probe = RowProbe()
    x = torch.randn(3, 1, 2, 2)
    out = BatchInvariant(probe)(x, 0.5, Cond(labels=torch.zeros(3, dtype=torch.long)))
    assert probe.calls[-1][1].shape == (INVARIANT_ROWS,) and torch.equal(out, 2 * x + 0.5)


@pytest.mark.parametrize(("n", "device"), [(INVARIANT_ROWS, "cpu"), (40, "cpu"), (3, "meta")])
def test_batch_invariant_passes_large_batches_and_other_devices_as_they_are(n, device):
    probe = RowProbe()
    x, labels = torch.randn(n, 1, 2, 2, device=device), torch.zeros(n, dtype=torch.long, device=device)
    out = BatchInvariant(probe)(x, 0.5, Cond(labels=labels))
    seen_x, seen_sigma, seen_labels = probe.calls[-1]
    assert seen_x is x and seen_sigma == 0.5 and seen_labels is labels and out.shape == x.shape


# ------------------------------------------------------------------------- contracts of every sampler

def _oracle_for(sampler: str) -> GaussianOracle:
    """The exact model of N(0, S^2) data: the EDM denoiser for the samplers of EDM's policy, else the
    consistency function."""
    return GaussianOracle(S, kind="edm" if sampler in REGISTRY["edm"].policy.samplers else "consistency")


def test_every_sampler_belongs_to_a_policy():
    assert {name for entry in REGISTRY.values() for name in entry.policy.samplers} == set(SAMPLERS)


@pytest.mark.parametrize("name", SAMPLERS)
def test_sampler_signature(name):
    params = inspect.signature(SAMPLERS[name]).parameters
    assert list(params) == ["model", "sigmas", "noise", "cond"] and params["cond"].default is None


@pytest.mark.parametrize("name", SAMPLERS)
def test_sampler_with_one_sigma_returns_the_model_answer(name):
    """From sigma z, one consistency step, one Euler step to 0 and Heun (no correction at 0) all give D(sigma z):
    float32 [N, C, H, W], drawn from ``noise`` alone (the global generator is left untouched)."""
    model = _oracle_for(name)
    state = torch.get_rng_state()
    out = SAMPLERS[name](model, [80.0], SeededNoise([1, 2, 3], (1, 4, 4)))
    assert torch.equal(torch.get_rng_state(), state)
    assert out.shape == (3, 1, 4, 4) and out.dtype == torch.float32
    z = SeededNoise([1, 2, 3], (1, 4, 4))()
    torch.testing.assert_close(out, model(80.0 * z, 80.0))


@pytest.mark.parametrize("name", SAMPLERS)
def test_sampler_takes_descending_sigmas_within_range(name):
    model = _oracle_for(name)
    out = SAMPLERS[name](model, [80.0, 10.0, 0.5], SeededNoise([4, 5], (1, 4, 4)))
    again = SAMPLERS[name](model, [80.0, 10.0, 0.5], SeededNoise([4, 5], (1, 4, 4)))
    assert out.shape == (2, 1, 4, 4) and out.dtype == torch.float32 and torch.equal(out, again)
    for bad in ([0.5, 10.0, 80.0], [80.0, 80.0], [100.0], [80.0, 0.001]):
        with pytest.raises(CmkitError, match="sigmas"):
            SAMPLERS[name](model, bad, SeededNoise([4, 5], (1, 4, 4)))


def test_default_two_step_sigma_is_checked_against_the_model_range():
    """The published 0.821 lies below a model whose sigma_min is 0.9: refused, with the way out."""
    spec = sampling_spec(method_class("ict")(sigma_min=0.9))
    assert default_sigmas(spec, 1).tolist() == [80.0]
    with pytest.raises(CmkitError, match="default 2-step schedule does not fit this model.*0.821"):
        default_sigmas(spec, 2)


def test_seeded_noise_labels_are_per_seed():
    a = SeededNoise([1, 2, 3], (1, 2, 2)).labels(10)
    b = SeededNoise([3], (1, 2, 2)).labels(10)
    assert a.shape == (3,) and a[2] == b[0]


# ------------------------------------------------------------------------------------------------ ode_step

class AffineVelocity(torch.nn.Module):
    """The denoiser of the ODE dx/dsigma = a + b sigma: D(x, sigma) = x - sigma (a + b sigma). Its solution is
    x(sigma') = x(sigma) + a (sigma' - sigma) + b (sigma'^2 - sigma^2) / 2, which Heun's trapezoid rule follows
    exactly (the velocity is linear in sigma) and Euler does not; at sigma = 0 the velocity is 0 / 0."""

    a, b = 0.3, -0.2

    def forward(self, x, sigma, labels=None):
        sigma = torch.as_tensor(sigma, dtype=x.dtype).expand(x.shape[0]).view(-1, 1, 1, 1)
        return x - sigma * (self.a + self.b * sigma)


def _affine_expected(x, sigma, sigma_next):
    """Per row: the exact solution where sigma_next > 0, D(x, sigma) (Euler's landing point) where it is 0."""
    a, b = AffineVelocity.a, AffineVelocity.b
    rows = torch.as_tensor(sigma_next, dtype=torch.float64).expand(len(x)).tolist()
    return torch.stack([x[i] - sigma * (a + b * sigma) if nxt == 0 else
                        x[i] + a * (nxt - sigma) + b * (nxt**2 - sigma**2) / 2 for i, nxt in enumerate(rows)])


@pytest.mark.parametrize("sigma_next", [0.0, 0, torch.tensor(0.0), torch.tensor(0), torch.zeros(4),
                                        torch.tensor([0.0, 0.5, 0.0, 1.5]), 0.5, torch.full((4,), 1.5)],
                         ids=["float", "int", "tensor", "int-tensor", "rows", "mixed-rows", "float-0.5", "rows-1.5"])
def test_ode_step_skips_heun_where_sigma_next_is_zero_whatever_its_type(sigma_next):
    """Rows going to 0 land on D(x, sigma) = x - 2 (0.3 - 0.4) = x + 0.2 (no NaN); the others take the exact
    Heun step, e.g. from 2 to 0.5: x + 0.3 (-1.5) - 0.1 (0.25 - 4) = x - 0.075."""
    x = torch.arange(4 * 4, dtype=torch.float32).view(4, 1, 2, 2) / 10
    out = ode_step(AffineVelocity(), x, 2.0, sigma_next, heun=True)
    torch.testing.assert_close(out, _affine_expected(x, 2.0, sigma_next), rtol=0, atol=1e-6)
    if isinstance(sigma_next, torch.Tensor) and sigma_next.ndim and (sigma_next == 0.5).any():
        torch.testing.assert_close(out[1], x[1] - 0.075, rtol=0, atol=1e-6)


def test_ode_step_heun_differs_from_euler_away_from_zero_and_not_at_it():
    """Euler from 2 to 0.5 lands on x + 1.5 * 0.1 = x + 0.15, -b h^2 / 2 = 0.225 above the exact x - 0.075 that
    Heun reaches; to 0 both land on D(x, 2)."""
    x, model = torch.zeros(2, 1, 2, 2), AffineVelocity()
    euler, heun = (ode_step(model, x, 2.0, 0.5, heun=h) for h in (False, True))
    torch.testing.assert_close(euler - heun, torch.full_like(x, 0.225), rtol=0, atol=1e-6)
    torch.testing.assert_close(ode_step(model, x, 2.0, 0, heun=True), ode_step(model, x, 2.0, 0, heun=False),
                               rtol=0, atol=0)
