"""Noise grids, curricula, EMA and learning-rate rules against values worked out by hand from the papers.

Papers: EDM (Karras et al. 2022, eq. 5 and its training loop), CM (Song et al. 2023, App. C), iCT (Song and
Dhariwal 2023, Sec. 3.4 and 3.5), ECT (Geng et al. 2024, its mapping function r(t)). Every expected value
below is either a number computed by hand (the arithmetic is in the comment) or an invariant the formula must
satisfy; none is the implementation's expression typed out again.
"""

import math
from statistics import NormalDist

import pytest
import torch

from cmkit import schedules

# ------------------------------------------------------------------------------------------ Karras grid
# EDM eq. 5: sigma_i = (sigma_min^(1/rho) + i/(N-1) (sigma_max^(1/rho) - sigma_min^(1/rho)))^rho, i = 0..N-1:
# the rho-th roots of the levels are evenly spaced from sigma_min^(1/rho) to sigma_max^(1/rho).


@pytest.mark.parametrize(("n", "rho", "lo", "hi", "expected"), [
    (4, 3.0, 1.0, 64.0, [1.0, 8.0, 27.0, 64.0]),  # cube roots 1, 2, 3, 4
    (5, 2.0, 1.0, 9.0, [1.0, 2.25, 4.0, 6.25, 9.0]),  # square roots 1, 1.5, 2, 2.5, 3
    (3, 1.0, 0.5, 2.5, [0.5, 1.5, 2.5]),  # rho = 1: a linear grid
    (2, 7.0, 0.002, 80.0, [0.002, 80.0]),
])
def test_karras_grid_at_hand_computed_values(n, rho, lo, hi, expected):
    s = schedules.karras_sigmas(n, sigma_min=lo, sigma_max=hi, rho=rho)
    assert s.dtype == torch.float64 and s.shape == (n,)
    torch.testing.assert_close(s, torch.tensor(expected, dtype=torch.float64), rtol=1e-12, atol=0)


@pytest.mark.parametrize("n", [2, 3, 11, 81, 1281])
def test_karras_grid_roots_evenly_spaced_and_ascending(n):
    s = schedules.karras_sigmas(n, sigma_min=0.002, sigma_max=80.0, rho=7.0)
    roots = s ** (1 / 7)
    step = (80.0 ** (1 / 7) - 0.002 ** (1 / 7)) / (n - 1)  # from the endpoints alone
    # every gap, the first and the last included, is the same step: endpoints and interior agree
    torch.testing.assert_close(roots[1:] - roots[:-1], torch.full((n - 1,), step, dtype=torch.float64),
                               rtol=1e-9, atol=0)
    assert roots[0].item() == pytest.approx(0.002 ** (1 / 7), rel=1e-12)
    assert (s[1:] > s[:-1]).all()


def test_karras_grid_needs_two_points():
    with pytest.raises(ValueError):
        schedules.karras_sigmas(1)


def test_edm_sampling_sigmas_descend():
    s = schedules.edm_sampling_sigmas(4, sigma_min=1.0, sigma_max=64.0, rho=3.0)
    torch.testing.assert_close(s, torch.tensor([64.0, 27.0, 8.0, 1.0], dtype=torch.float64), rtol=1e-12, atol=0)
    assert schedules.edm_sampling_sigmas(1).tolist() == [80.0]  # one step starts at sigma_max
    s = schedules.edm_sampling_sigmas(18)
    assert (s[1:] < s[:-1]).all() and s.shape == (18,)


# ------------------------------------------------------------------------------------------ CT curriculum
# CM paper, App. C: N(k) = ceil(sqrt(k/K ((s1 + 1)^2 - s0^2) + s0^2) - 1) + 1, mu(k) = exp(s0 ln(mu0) / N(k)).
# CIFAR-10: s0 = 2, s1 = 150, mu0 = 0.9, K = 800k. (s1 + 1)^2 - s0^2 = 22801 - 4 = 22797.


@pytest.mark.parametrize(("k", "expected"), [
    (0, 2),  # sqrt(4) = 2 -> ceil(1) + 1
    (1, 3),  # sqrt(22797 / 800000 + 4) = 2.00711 -> ceil(1.00711) + 1: N leaves 2 at the first step
    (200_000, 76),  # sqrt(22797 / 4 + 4) = sqrt(5703.25) = 75.520 -> ceil(74.520) + 1
    (400_000, 107),  # sqrt(22797 / 2 + 4) = sqrt(11402.5) = 106.782 -> ceil(105.782) + 1
    (800_000, 151),  # sqrt(151^2) = 151 -> 150 + 1 = s1 + 1
    (900_000, 151),  # past K it stays at s1 + 1
])
def test_ct_num_scales_at_hand_computed_values(k, expected):
    assert schedules.ct_num_scales(k, 800_000, s0=2, s1=150) == expected


def test_ct_num_scales_monotone_from_s0_to_s1_plus_one():
    values = [schedules.ct_num_scales(k, 10_000, s0=2, s1=200) for k in range(0, 10_001, 50)]
    assert values[0] == 2 and values[-1] == 201  # ImageNet-64's s1 = 200
    assert all(a <= b for a, b in zip(values, values[1:], strict=False))


@pytest.mark.parametrize(("num_scales", "expected"), [
    (2, 0.9),  # N(0) = s0 = 2: exp(2 ln 0.9 / 2) = mu0 exactly (N(k) - 1 in the denominator would give 0.81)
    (3, 0.9321698),  # 0.9^(2/3)
    (107, 0.9980326),  # 0.9^(2/107)
    (151, 0.9986055),  # 0.9^(2/151)
])
def test_ct_target_decay_at_hand_computed_values(num_scales, expected):
    assert schedules.ct_target_decay(num_scales, s0=2, mu0=0.9) == pytest.approx(expected, abs=1e-7)


def test_ct_target_decay_rises_with_n_and_zero_stays_zero():
    mus = [schedules.ct_target_decay(n, s0=2, mu0=0.95) for n in range(2, 202)]
    assert mus[0] == pytest.approx(0.95) and all(a < b < 1 for a, b in zip(mus, mus[1:], strict=False))
    assert schedules.ct_target_decay(151, s0=2, mu0=0.0) == 0.0  # mu0 = 0: the target is the student


# ------------------------------------------------------------------------------------------ iCT curriculum
# iCT paper, Sec. 3.4: N(k) = min(s0 2^floor(k / K'), s1) + 1, K' = floor(K / (log2 floor(s1 / s0) + 1)).


def test_ict_num_scales_doubles_at_the_stage_boundaries():
    # s0 = 10, s1 = 1280, K = 400k: floor(1280 / 10) = 128, log2 128 = 7, K' = floor(400000 / 8) = 50000.
    def n(k):
        return schedules.ict_num_scales(k, 400_000, s0=10, s1=1280)

    assert [n(k) for k in (0, 1, 49_999)] == [11, 11, 11]
    assert [n(50_000 * i) for i in range(8)] == [11, 21, 41, 81, 161, 321, 641, 1281]
    assert [n(50_000 * i - 1) for i in range(2, 8)] == [21, 41, 81, 161, 321, 641]  # the step before
    assert [n(k) for k in (399_999, 400_000, 10**7)] == [1281, 1281, 1281]  # 10 * 2^8 = 2560 is capped


def test_ict_num_scales_when_s1_is_not_s0_times_a_power_of_two():
    # s0 = 10, s1 = 150: floor(15) = 15, log2 15 = 3.90689, K' = floor(400000 / 4.90689) = floor(81518.02) = 81518;
    # N = 11, 21, 41, 81, then min(160, 150) + 1 = 151 from k = 4 K' = 326072 on.
    def n(k):
        return schedules.ict_num_scales(k, 400_000, s0=10, s1=150)

    boundaries = [0, 81_518, 163_036, 244_554, 326_072]
    assert [n(k) for k in boundaries] == [11, 21, 41, 81, 151]
    assert [n(k - 1) for k in boundaries[1:]] == [11, 21, 41, 81]
    assert n(400_000) == 151


# ------------------------------------------------------------------------------------------ iCT lognormal
# iCT paper, Sec. 3.5: p(i) ~ erf((ln sigma_{i+1} - P_mean) / (sqrt 2 P_std)) - erf((ln sigma_i - P_mean) / ...),
# i.e. the N(P_mean, P_std^2) probability of ln sigma falling between adjacent levels, normalised.


def test_lognormal_index_probs_at_standard_normal_table_values():
    # Levels at P_mean + P_std * (-1, 0, 1, 2) in log space: masses Phi(0) - Phi(-1) = 0.3413447,
    # Phi(1) - Phi(0) = 0.3413447, Phi(2) - Phi(1) = 0.9772499 - 0.8413447 = 0.1359052; sum 0.8185946.
    sigmas = torch.exp(-1.1 + 2.0 * torch.tensor([-1.0, 0.0, 1.0, 2.0], dtype=torch.float64))
    p = schedules.lognormal_index_probs(sigmas, p_mean=-1.1, p_std=2.0)
    expected = torch.tensor([0.3413447, 0.3413447, 0.1359052], dtype=torch.float64) / 0.8185946
    torch.testing.assert_close(p, expected, rtol=0, atol=1e-6)


def test_lognormal_index_probs_match_the_normal_distribution_on_a_karras_grid():
    sigmas = schedules.karras_sigmas(11)
    p = schedules.lognormal_index_probs(sigmas, p_mean=-1.1, p_std=2.0)
    dist = NormalDist(-1.1, 2.0)  # the standard library's normal CDF, an independent implementation
    mass = [dist.cdf(math.log(b)) - dist.cdf(math.log(a)) for a, b in zip(sigmas[:-1].tolist(), sigmas[1:].tolist(),
                                                                            strict=True)]
    expected = torch.tensor(mass, dtype=torch.float64) / sum(mass)
    assert p.shape == (10,) and p.dtype == torch.float64 and (p > 0).all()
    torch.testing.assert_close(p, expected, rtol=1e-9, atol=1e-12)


# ------------------------------------------------------------------------------------------ EMA and LR
# EDM training loop: half-life h = min(ema_halflife_kimg * 1000, ema_rampup_ratio * images seen) images, and
# beta = 0.5^(batch / h) per step: after h images of updates, the old average carries weight 0.5.


def _old_weight(beta: float, steps: int) -> float:
    """Weight of the initial average after ``steps`` EMA updates ema <- beta ema + (1 - beta) new."""
    ema = 1.0
    for _ in range(steps):
        ema = beta * ema + (1 - beta) * 0.0
    return ema


@pytest.mark.parametrize(("batch", "steps"), [(100, 10), (250, 4), (1000, 1)])  # 1000 images each
def test_ema_half_life_means_half_after_that_many_images(batch, steps):
    beta = schedules.ema_beta(10**9, batch, halflife_kimg=1.0, rampup=0.0)
    assert _old_weight(beta, steps) == pytest.approx(0.5, rel=1e-12)
    assert _old_weight(beta, 2 * steps) == pytest.approx(0.25, rel=1e-12)  # two half-lives


def test_ema_rampup_shortens_the_half_life_early():
    # 10000 images seen, ratio 0.05: half-life min(1000, 500) = 500 images = 5 steps of 100.
    beta = schedules.ema_beta(10_000, 100, halflife_kimg=1.0, rampup=0.05)
    assert _old_weight(beta, 5) == pytest.approx(0.5, rel=1e-12)
    # 10^6 images: min(1000, 50000) = 1000, the configured half-life again.
    beta = schedules.ema_beta(10**6, 100, halflife_kimg=1.0, rampup=0.05)
    assert _old_weight(beta, 10) == pytest.approx(0.5, rel=1e-12)
    assert schedules.ema_beta(0, 100, halflife_kimg=1.0, rampup=0.05) == 0.0  # the first step copies


@pytest.mark.parametrize(("images", "expected"), [
    (0, 0.0), (250, 2.5e-4), (500, 5e-4), (999, 9.99e-4), (1000, 1e-3), (5000, 1e-3)])
def test_learning_rate_linear_warmup(images, expected):
    # lr 1e-3 reached linearly over the first 1000 images, constant after.
    assert schedules.learning_rate(images, lr=1e-3, warmup_kimg=1) == pytest.approx(expected, rel=1e-12, abs=0)


def test_learning_rate_without_warmup():
    assert schedules.learning_rate(0, lr=1e-3, warmup_kimg=0) == 1e-3


@pytest.mark.parametrize(("images", "warmup_kimg", "expected"), [
    (0, 0, 2e-3), (999, 0, 2e-3), (1000, 0, 4e-4), (5000, 0, 4e-4),  # the warm-start's rate, then the run's
    (0, 2, 0.0), (500, 2, 5e-4), (1000, 2, 2e-4), (2000, 2, 4e-4)])  # one linear warm-up from the run's start
def test_learning_rate_of_a_warm_start_phase(images, warmup_kimg, expected):
    rate = schedules.learning_rate(images, lr=4e-4, warmup_kimg=warmup_kimg, warm_start_images=1000,
                                   warm_start_lr=2e-3)
    assert rate == pytest.approx(expected, rel=1e-12, abs=0)
    # without a rate of its own the warm-start trains at the run's rate
    assert schedules.learning_rate(images, lr=4e-4, warmup_kimg=warmup_kimg, warm_start_images=1000) == \
        schedules.learning_rate(images, lr=4e-4, warmup_kimg=warmup_kimg)


# ------------------------------------------------------------------------------------------ ECT
# ECT paper (Geng et al. 2024), the mapping function: r = max(0, t (1 - q^-a n(t))), n(t) = 1 + 8 sigmoid(-t),
# with a = stage + 1 here; the stage advances every method.stage_kimg thousand images.


def test_ect_stage_at_the_boundaries():
    stage = [schedules.ect_stage(i, stage_kimg=6) for i in (0, 5_999, 6_000, 11_999, 12_000, 47_999, 48_000)]
    assert stage == [0, 0, 1, 1, 2, 7, 8]
    assert schedules.ect_stage(3_200_000, stage_kimg=3200) == 1  # CIFAR-10: 25k iterations x batch 128


def test_ect_r_at_hand_computed_values():
    ln3, ln7 = math.log(3.0), math.log(7.0)
    # t = ln 3: sigmoid(-t) = 1 / (1 + 3) = 1/4, n = 1 + 8/4 = 3.
    #   q = 2: stage 0: 1 - 3/2 < 0 -> r = 0; stage 1: 1 - 3/4 -> t/4; stage 2: 1 - 3/8 -> 5t/8.
    # t = ln 7: sigmoid(-t) = 1/8, n = 2.  q = 2, stage 1: t/2;  q = 4, stage 0: 1 - 2/4 -> t/2;
    #   q = 4, stage 1: 1 - 2/16 -> 7t/8.
    # t = 80: sigmoid(-80) ~ 2e-35, n = 1.  q = 2: stage 0, 1, 2 -> 80 (1/2, 3/4, 7/8) = 40, 60, 70.
    cases = [(ln3, 2.0, 0, 0.0), (ln3, 2.0, 1, ln3 / 4), (ln3, 2.0, 2, 5 * ln3 / 8),
             (ln7, 2.0, 1, ln7 / 2), (ln7, 4.0, 0, ln7 / 2), (ln7, 4.0, 1, 7 * ln7 / 8),
             (80.0, 2.0, 0, 40.0), (80.0, 2.0, 1, 60.0), (80.0, 2.0, 2, 70.0)]
    for t, q, stage, expected in cases:
        r = schedules.ect_r(torch.tensor([t], dtype=torch.float64), stage=stage, q=q)
        assert r.item() == pytest.approx(expected, rel=1e-12, abs=1e-15), (t, q, stage)


def test_ect_r_bounds_and_stages():
    t = torch.logspace(-3, math.log10(80), 200, dtype=torch.float64)
    previous = torch.zeros_like(t)
    for stage in range(8):
        r = schedules.ect_r(t, stage=stage, q=2.0)
        assert r.shape == t.shape and r.dtype == t.dtype
        assert (r >= 0).all() and (r < t).all()
        assert (r >= previous).all()  # later stages pair t with a closer r
        previous = r
    # stage 0, q = 2: r = 0 wherever n(t) >= 2, i.e. sigmoid(-t) >= 1/8, t <= ln 7 (the clean-image target)
    r0 = schedules.ect_r(t, stage=0, q=2.0)
    assert (r0[t < math.log(7.0) - 1e-9] == 0).all() and (r0[t > math.log(7.0) + 1e-9] > 0).all()


def test_ect_gap_shrinks_by_q_per_stage_for_large_t():
    # For t >> 1, n(t) -> 1 and t - r = t q^-(stage+1): the ratio between consecutive stages is q.
    t = torch.tensor([40.0], dtype=torch.float64)
    gaps = [(t - schedules.ect_r(t, stage=s, q=3.0)).item() for s in range(4)]
    assert gaps[0] == pytest.approx(40.0 / 3, rel=1e-12)
    for a, b in zip(gaps, gaps[1:], strict=False):
        assert a / b == pytest.approx(3.0, rel=1e-9)
