"""Metrics against closed forms: Gaussian Frechet distances, KID on shifted samples, precision/recall on toy sets."""

from __future__ import annotations

import math

import numpy as np
import pytest

from cmkit.errors import CmkitError
from cmkit.eval.metrics import (
    check_features,
    compute_metrics,
    feature_stats,
    fid,
    frechet_distance,
    kid,
    knn_radii,
    precision_recall,
)


def _rotation(theta: float) -> np.ndarray:
    return np.array([[math.cos(theta), -math.sin(theta)], [math.sin(theta), math.cos(theta)]])


def _random_orthogonal(dim: int, seed: int) -> np.ndarray:
    q, _ = np.linalg.qr(np.random.default_rng(seed).standard_normal((dim, dim)))
    return q


# ----------------------------------------------------------------------------------------------------------------
# Frechet distance


def test_frechet_diagonal_closed_form() -> None:
    rng = np.random.default_rng(0)
    a, b = rng.uniform(0.1, 3.0, 6), rng.uniform(0.1, 3.0, 6)
    mu1, mu2 = rng.standard_normal(6), rng.standard_normal(6)
    expected = np.sum((mu1 - mu2) ** 2) + np.sum(a + b - 2 * np.sqrt(a * b))
    assert frechet_distance(mu1, np.diag(a), mu2, np.diag(b)) == pytest.approx(expected, rel=1e-10)


def test_frechet_rotated_2x2_closed_form() -> None:
    # For 2x2 M with positive eigenvalues, Tr sqrt(M) = sqrt(Tr M + 2 sqrt(det M)).
    s1 = np.array([[2.0, 0.5], [0.5, 1.0]])
    rot = _rotation(0.7)
    s2 = rot @ s1 @ rot.T
    m = s1 @ s2
    tr_sqrt = math.sqrt(np.trace(m) + 2 * math.sqrt(np.linalg.det(m)))
    mu1, mu2 = np.array([1.0, 2.0]), np.array([-0.5, 0.0])
    expected = 1.5**2 + 2.0**2 + np.trace(s1) + np.trace(s2) - 2 * tr_sqrt
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(expected, rel=1e-10)


def test_frechet_isotropic_vs_rotated_closed_form() -> None:
    # S1 = c I commutes with S2 = Q diag(b) Q^T, so Tr sqrt(S1 S2) = sqrt(c) sum sqrt(b).
    c, b = 1.7, np.array([0.2, 1.0, 2.5, 4.0, 0.01])
    q = _random_orthogonal(5, seed=1)
    s2 = q @ np.diag(b) @ q.T
    zero = np.zeros(5)
    expected = 5 * c + b.sum() - 2 * math.sqrt(c) * np.sqrt(b).sum()
    assert frechet_distance(zero, c * np.eye(5), zero, s2) == pytest.approx(expected, rel=1e-10)


def _frechet_by_eigvals(mu1: np.ndarray, s1: np.ndarray, mu2: np.ndarray, s2: np.ndarray) -> float:
    """The formula as the TTUR reference code evaluates it: Tr (S1 S2)^(1/2) from the eigenvalues of the
    non-symmetric product S1 S2 (cmkit instead takes a symmetric square root of S1 first)."""
    tr_sqrt = np.sqrt(np.linalg.eigvals(s1 @ s2).astype(complex)).real.sum()
    return float((mu1 - mu2) @ (mu1 - mu2) + np.trace(s1) + np.trace(s2) - 2 * tr_sqrt)


def test_frechet_general_covariances_match_the_eigvals_formula_both_ways() -> None:
    rng = np.random.default_rng(2)
    a, b = rng.standard_normal((8, 8)), rng.standard_normal((8, 8))
    s1, s2 = a @ a.T, b @ b.T + 0.1 * np.eye(8)
    mu1, mu2 = rng.standard_normal(8), rng.standard_normal(8)
    assert frechet_distance(mu1, s1, mu1, s1) == pytest.approx(0.0, abs=1e-9)
    expected = _frechet_by_eigvals(mu1, s1, mu2, s2)
    assert expected > 1
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(expected, rel=1e-9)
    assert frechet_distance(mu2, s2, mu1, s1) == pytest.approx(expected, rel=1e-9)


def test_frechet_singular_covariance() -> None:
    # 10 samples in 256-d: rank-9 covariances. Equal covariances leave only the mean term.
    x = np.random.default_rng(3).standard_normal((10, 256))
    shift = np.full(256, 0.1)
    mu, sigma = feature_stats(x)
    value = frechet_distance(mu, sigma, mu + shift, sigma)
    assert math.isfinite(value)
    assert value == pytest.approx(shift @ shift, abs=1e-3)
    other = fid(x, np.random.default_rng(4).standard_normal((10, 256)))
    assert math.isfinite(other) and other > 0


def test_frechet_shape_mismatch_raises() -> None:
    with pytest.raises(CmkitError, match="covariance"):
        frechet_distance(np.zeros(3), np.eye(3), np.zeros(3), np.eye(4))


def test_feature_stats_unbiased_float64() -> None:
    x = np.random.default_rng(5).standard_normal((50, 3)).astype(np.float32)
    mu, sigma = feature_stats(x)
    assert mu.dtype == np.float64 and sigma.dtype == np.float64 and sigma.shape == (3, 3)
    np.testing.assert_allclose(sigma, np.cov(x.astype(np.float64), rowvar=False), rtol=1e-12)
    np.testing.assert_allclose(mu, x.astype(np.float64).mean(0), rtol=1e-12)


def test_fid_of_gaussian_samples() -> None:
    n, dim = 40_000, 4
    rng = np.random.default_rng(6)
    m = np.array([1.0, -2.0, 0.5, 0.0])
    a, b = rng.standard_normal((n, dim)), rng.standard_normal((n, dim))
    # Estimation bias and noise are O(D^2 / N) and O(||m|| / sqrt(N)) respectively.
    assert fid(a, b) < 0.01
    assert fid(a, b + m) == pytest.approx(m @ m, abs=0.1)


# ----------------------------------------------------------------------------------------------------------------
# KID


def test_kid_same_and_shifted() -> None:
    rng = np.random.default_rng(7)
    a, b = rng.standard_normal((600, 16)), rng.standard_normal((600, 16))
    mean, std = kid(a, b, num_subsets=20, subset_size=300)
    assert abs(mean) < max(3 * std, 1e-3)
    shifted_mean, shifted_std = kid(a, b + 1.0, num_subsets=20, subset_size=300)
    assert shifted_mean > 0.1 and shifted_mean > 10 * shifted_std


def _k(u: np.ndarray, v: np.ndarray) -> float:
    """The cubic polynomial kernel of KID, one pair of rows at a time."""
    return (float(u @ v) / len(u) + 1.0) ** 3


def _mmd2_by_loops(x: np.ndarray, y: np.ndarray) -> float:
    """Unbiased MMD^2 (Binkowski et al. 2018, eq. 2) by explicit sums; x [m, D], y [n, D] may differ in size."""
    m, n = len(x), len(y)
    xx = sum(_k(x[i], x[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    yy = sum(_k(y[i], y[j]) for i in range(n) for j in range(n) if i != j) / (n * (n - 1))
    xy = sum(_k(x[i], y[j]) for i in range(m) for j in range(n)) / (m * n)
    return xx + yy - 2 * xy


def test_kid_single_subset_matches_explicit_sums() -> None:
    rng = np.random.default_rng(9)
    x, y = rng.standard_normal((7, 3)), rng.standard_normal((7, 3)) + 0.3
    mean, std = kid(x, y, num_subsets=1, subset_size=7)  # full sets: the permutation does not matter
    assert mean == pytest.approx(_mmd2_by_loops(x, y), rel=1e-10) and std == 0.0


def test_kid_subset_size_capped_to_the_sets_matches_explicit_sums() -> None:
    # subset_size 1000 > 6 rows: every subset is the whole of both sets, so each of the 5 subsets gives the
    # explicit-sum MMD^2 and the spread over subsets is 0.
    rng = np.random.default_rng(10)
    x, y = rng.standard_normal((6, 3)), rng.standard_normal((6, 3)) - 0.2
    mean, std = kid(x, y, num_subsets=5, subset_size=1000)
    assert mean == pytest.approx(_mmd2_by_loops(x, y), rel=1e-10)
    assert std == pytest.approx(0.0, abs=1e-12)


def test_kid_mean_over_subsets_estimates_the_full_sample_mmd() -> None:
    # Subsets of 5 from 9 real and 7 fake rows: a random subset's unbiased MMD^2 has expectation the unbiased
    # MMD^2 of the full sets (every pair is equally likely to be drawn), computed here by explicit sums.
    rng = np.random.default_rng(8)
    x, y = rng.standard_normal((9, 4)), rng.standard_normal((7, 4)) + 0.5
    subsets = 4000
    mean, std = kid(x, y, num_subsets=subsets, subset_size=5, seed=3)
    assert std > 0
    assert abs(mean - _mmd2_by_loops(x, y)) < 4 * std / math.sqrt(subsets)


# ----------------------------------------------------------------------------------------------------------------
# Precision and recall


def test_knn_radii_hand_computed() -> None:
    x = np.array([[0.0], [1.0], [3.0], [7.0]])
    np.testing.assert_allclose(knn_radii(x, k=1), [1.0, 1.0, 2.0, 4.0])
    np.testing.assert_allclose(knn_radii(x, k=2, batch=3), [3.0, 2.0, 3.0, 6.0])


def test_precision_recall_hand_computed() -> None:
    real = np.array([[0.0], [1.0], [3.0], [7.0]])  # k=1 radii 1, 1, 2, 4
    fake = np.array([[0.5], [4.5], [12.0], [-2.0]])  # k=1 radii 2.5, 4, 7.5, 2.5
    # Inside real: 0.5 (ball at 0), 4.5 (ball at 3); outside: 12 (7 +- 4), -2.
    # Inside fake: 0, 1 (ball at 0.5), 3, 7 (ball at 4.5); all four.
    assert precision_recall(real, fake, k=1) == pytest.approx((0.5, 1.0))


def test_precision_recall_identical_and_far() -> None:
    x = np.random.default_rng(10).standard_normal((200, 8))
    assert precision_recall(x, x.copy()) == (1.0, 1.0)
    assert precision_recall(x, x + 100.0) == (0.0, 0.0)


def test_precision_recall_half_modes() -> None:
    rng = np.random.default_rng(11)
    plus = rng.standard_normal((150, 4)) + np.array([20.0, 0, 0, 0])
    minus = rng.standard_normal((150, 4)) - np.array([20.0, 0, 0, 0])
    real = np.concatenate([plus, minus])
    # Fake = the real samples of one mode exactly: precision 1, recall exactly 1/2.
    assert precision_recall(real, plus.copy()) == (1.0, 0.5)
    # Fresh samples from that mode: precision ~1, recall ~1/2.
    fresh = rng.standard_normal((150, 4)) + np.array([20.0, 0, 0, 0])
    precision, recall = precision_recall(real, fresh)
    assert precision > 0.85
    assert 0.4 < recall <= 0.5


def _manifold_fraction_by_loops(query: np.ndarray, ref: np.ndarray, k: int) -> float:
    """Kynkaanniemi et al. 2019, eq. 1-2, literally: the fraction of query rows within the k-NN radius of some
    ref row, distances in float64 one pair at a time."""
    def dist(u: np.ndarray, v: np.ndarray) -> float:
        return math.sqrt(sum((p - q) ** 2 for p, q in zip(u, v, strict=True)))

    radii = [sorted(dist(r, o) for j, o in enumerate(ref) if j != i)[k - 1] for i, r in enumerate(ref)]
    inside = [any(dist(q, r) <= radius for r, radius in zip(ref, radii, strict=True)) for q in query]
    return sum(inside) / len(query)


@pytest.mark.parametrize("batch", [7, 1000])
def test_precision_recall_match_explicit_loops_at_any_batch(batch: int) -> None:
    rng = np.random.default_rng(12)
    real, fake = rng.standard_normal((47, 6)), rng.standard_normal((33, 6)) * 0.7 + 0.4
    expected = (_manifold_fraction_by_loops(fake, real, 3), _manifold_fraction_by_loops(real, fake, 3))
    assert 0 < expected[0] < 1 and 0 < expected[1] < 1
    assert precision_recall(real, fake, k=3, batch=batch) == pytest.approx(expected)


# ----------------------------------------------------------------------------------------------------------------
# Input checks and the combined entry point


def test_check_features_errors() -> None:
    good = np.zeros((5, 3), dtype=np.float32)
    check_features(good, name="real", min_count=5)
    with pytest.raises(CmkitError, match="real needs at least 6 images, got 5"):
        check_features(good, name="real", min_count=6)
    with pytest.raises(CmkitError, match="shape"):
        check_features(np.zeros(5), name="real", min_count=1)
    with pytest.raises(CmkitError, match="dtype"):
        check_features(np.zeros((5, 3), dtype=np.int64), name="real", min_count=1)
    for bad in (np.nan, np.inf):
        arr = good.copy()
        arr[2, 1] = bad
        with pytest.raises(CmkitError, match="fake.*NaN"):
            check_features(arr, name="fake", min_count=1)


def test_compute_metrics() -> None:
    rng = np.random.default_rng(13)
    real, fake = rng.standard_normal((60, 8)), rng.standard_normal((40, 8)) + 0.5
    out = compute_metrics(real, fake)
    assert set(out) == {"fid", "kid", "kid_std", "precision", "recall"}
    assert all(isinstance(v, float) and math.isfinite(v) for v in out.values())
    assert out["fid"] > 0 and 0 <= out["precision"] <= 1 and 0 <= out["recall"] <= 1


def test_compute_metrics_rejects_bad_input() -> None:
    rng = np.random.default_rng(14)
    real = rng.standard_normal((20, 4))
    with pytest.raises(CmkitError, match="FID.*fake.*at least 2 images, got 1"):
        compute_metrics(real, rng.standard_normal((1, 4)))
    with pytest.raises(CmkitError, match="precision/recall.*at least 6 images, got 4"):
        compute_metrics(real, rng.standard_normal((4, 4)), k=5)
    with pytest.raises(CmkitError, match="D=4.*D=3"):
        compute_metrics(real, rng.standard_normal((20, 3)))
