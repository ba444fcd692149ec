import math

import pytest
import torch

from cmkit import schedules


@pytest.mark.parametrize("n", [2, 11, 81, 1281])
def test_karras_grid_endpoints_and_monotone(n):
    s = schedules.karras_sigmas(n, sigma_min=0.002, sigma_max=80.0, rho=7.0)
    assert s.shape == (n,) and s[0] == 0.002 and s[-1] == 80.0
    assert (s[1:] > s[:-1]).all()


def test_karras_grid_formula_at_midpoint():
    s = schedules.karras_sigmas(3)
    assert s[1].item() == pytest.approx(((0.002 ** (1 / 7) + 80 ** (1 / 7)) / 2) ** 7, rel=1e-12)


def test_edm_sampling_sigmas_descend_from_sigma_max():
    s = schedules.edm_sampling_sigmas(18)
    assert s[0] == 80.0 and s[-1] == 0.002 and (s[1:] < s[:-1]).all()


def test_ct_curriculum_matches_paper():
    # CIFAR-10 settings: s0 = 2, s1 = 150, mu0 = 0.9, K = 800k.
    K = 800_000
    assert schedules.ct_num_scales(0, K, s0=2, s1=150) == 2
    assert schedules.ct_num_scales(K, K, s0=2, s1=150) == 151
    k = K // 2
    expected = math.ceil(math.sqrt(0.5 * (151**2 - 4) + 4) - 1) + 1
    assert schedules.ct_num_scales(k, K, s0=2, s1=150) == expected
    # mu(0) = exp(s0 ln mu0 / N(0)) = mu0 with the paper's N(k) (the code bases' N(k) - 1 would give 0.81)
    assert schedules.ct_target_decay(2, s0=2, mu0=0.9) == pytest.approx(0.9)
    assert schedules.ct_target_decay(151, s0=2, mu0=0.9) == pytest.approx(math.exp(2 * math.log(0.9) / 151))
    assert schedules.ct_target_decay(151, s0=2, mu0=0.0) == 0.0


def test_ict_curriculum_doubles_at_stage_boundaries():
    K, s0, s1 = 400_000, 10, 1280
    stage = K // 8  # K' = floor(K / (log2 floor(1280 / 10) + 1))
    values = [schedules.ict_num_scales(k, K, s0=s0, s1=s1) for k in (0, stage - 1, stage, 2 * stage, K - 1, K)]
    assert values == [11, 11, 21, 41, 1281, 1281]
    expected = [11, 21, 41, 81, 161, 321, 641, 1281]
    assert [schedules.ict_num_scales(i * stage, K, s0=s0, s1=s1) for i in range(8)] == expected


def test_lognormal_index_probs_follow_erf_formula():
    sigmas = schedules.karras_sigmas(11)
    p = schedules.lognormal_index_probs(sigmas, p_mean=-1.1, p_std=2.0)
    cdf = [math.erf((math.log(s) + 1.1) / (math.sqrt(2) * 2.0)) for s in sigmas.tolist()]
    raw = torch.tensor([b - a for a, b in zip(cdf[:-1], cdf[1:], strict=True)], dtype=torch.float64)
    torch.testing.assert_close(p, raw / raw.sum())
    assert p.shape == (10,) and p.sum().item() == pytest.approx(1.0)


def test_ema_beta_halflife_and_rampup():
    # after halflife images, the old weights count half
    beta = schedules.ema_beta(10**9, 100, halflife_kimg=1.0, rampup=0.0)
    assert beta**10 == pytest.approx(0.5)
    assert schedules.ema_beta(0, 100, halflife_kimg=1.0, rampup=0.05) == 0.0  # first step copies
    assert schedules.ema_beta(10_000, 100, halflife_kimg=1.0, rampup=0.05) == pytest.approx(0.5 ** (100 / 500))


def test_learning_rate_warmup():
    assert schedules.learning_rate(0, lr=1e-3, warmup_kimg=1) == 0
    assert schedules.learning_rate(500, lr=1e-3, warmup_kimg=1) == pytest.approx(5e-4)
    assert schedules.learning_rate(5000, lr=1e-3, warmup_kimg=1) == 1e-3
    assert schedules.learning_rate(0, lr=1e-3, warmup_kimg=0) == 1e-3


def test_ect_stage_advances_at_each_boundary():
    for k in range(4):
        assert schedules.ect_stage(k * 6000, stage_kimg=6) == k
        assert schedules.ect_stage(k * 6000 + 5999, stage_kimg=6) == k


def test_ect_r_at_known_values():
    t = torch.tensor([0.5, 1.0, 10.0, 80.0], dtype=torch.float64)
    sig = 1 / (1 + torch.exp(t))  # sigmoid(-t)
    for stage in (0, 1, 3):
        expected = (t * (1 - 2.0 ** -(stage + 1) * (1 + 8 * sig))).clamp(min=0)
        torch.testing.assert_close(schedules.ect_r(t, stage=stage, q=2.0), expected)
    # Stage 0: small t map to r = 0 (clean target); t = 10 to 10 (1 - 0.5 (1 + 8 sigmoid(-10))).
    r0 = schedules.ect_r(t, stage=0, q=2.0)
    assert r0[0] == 0 and r0[1] == 0
    assert r0[2].item() == pytest.approx(10 * (1 - 0.5 * (1 + 8 / (1 + math.exp(10)))))


def test_ect_gap_shrinks_by_q_per_stage_for_large_t():
    t = torch.tensor([40.0], dtype=torch.float64)
    gaps = [(t - schedules.ect_r(t, stage=s, q=3.0)).item() for s in range(4)]
    for a, b in zip(gaps, gaps[1:], strict=False):
        assert a / b == pytest.approx(3.0, rel=1e-6)
