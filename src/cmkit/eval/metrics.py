"""Sample-quality metrics on feature arrays: FID, KID, improved precision and recall.

Every function takes features as numpy arrays of shape [N, D] (one row per image, any float dtype) and
returns plain Python floats. FID and KID are computed in float64 with numpy; precision and recall use
batched float32 pairwise distances in torch so that 10k x 10k sets in 2048-d fit in memory.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from cmkit.errors import CmkitError


def check_features(features: np.ndarray, *, name: str, min_count: int) -> None:
    """Raise :class:`CmkitError` naming ``name`` unless ``features`` is a finite float array [N, D], N >= min_count."""
    if not isinstance(features, np.ndarray):
        raise CmkitError(f"{name}: expected a numpy array of features, got {type(features).__name__}")
    if features.ndim != 2:
        raise CmkitError(f"{name}: expected features of shape [N, D], got shape {tuple(features.shape)}")
    if not np.issubdtype(features.dtype, np.floating):
        raise CmkitError(f"{name}: expected float features, got dtype {features.dtype}")
    if features.shape[1] < 1:
        raise CmkitError(f"{name}: expected at least 1 feature per image, got shape {tuple(features.shape)}")
    if features.shape[0] < min_count:
        raise CmkitError(f"{name} needs at least {min_count} images, got {features.shape[0]}")
    if not np.isfinite(features).all():
        raise CmkitError(f"{name}: features contain NaN or inf")


def _check_same_dim(real: np.ndarray, fake: np.ndarray) -> None:
    """Raise :class:`CmkitError` unless both [N, D] arrays have the same D."""
    if real.shape[1:] != fake.shape[1:]:
        raise CmkitError(f"real features have D={real.shape[1]}, fake features D={fake.shape[1]}; expected equal D")


# ----------------------------------------------------------------------------------------------------------------
# FID


def _psd_sqrt(sigma: np.ndarray) -> np.ndarray:
    """Symmetric square root of a symmetric PSD [D, D] matrix via eigh; tiny negative eigenvalues clip to 0."""
    sym = (sigma + sigma.T) / 2
    vals, vecs = np.linalg.eigh(sym)
    return (vecs * np.sqrt(np.clip(vals, 0.0, None))) @ vecs.T


def _trace_sqrt_product(sigma1: np.ndarray, sigma2: np.ndarray) -> float:
    """Tr((S1 S2)^(1/2)) for PSD S1, S2 [D, D], float64.

    S1 S2 is similar to sqrt(S1) S2 sqrt(S1), which is symmetric PSD, so the trace is the sum of the square roots
    of that matrix's (clipped at 0) eigenvalues. Works for singular covariances (fewer samples than dimensions).
    """
    root1 = _psd_sqrt(sigma1)
    inner = root1 @ sigma2 @ root1
    vals = np.linalg.eigvalsh((inner + inner.T) / 2)
    return float(np.sqrt(np.clip(vals, 0.0, None)).sum())


def _check_stats(mu: np.ndarray, sigma: np.ndarray, dim: int, which: str) -> None:
    """Raise :class:`CmkitError` unless mu is [dim] and sigma is [dim, dim]."""
    if mu.shape != (dim,) or sigma.shape != (dim, dim):
        raise CmkitError(
            f"{which}: expected mean [{dim}] and covariance [{dim}, {dim}], got {mu.shape} and {sigma.shape}"
        )


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """Frechet distance between N(mu1, S1) and N(mu2, S2) (Heusel et al. 2017, "GANs trained by a two time-scale ...").

    d^2 = ||mu1 - mu2||^2 + Tr(S1 + S2 - 2 (S1 S2)^(1/2)), computed in float64. Means are [D], covariances
    [D, D] symmetric PSD (possibly singular). Returns a float >= 0 (rounding below 0 is clipped).
    """
    mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
    sigma1, sigma2 = np.asarray(sigma1, np.float64), np.asarray(sigma2, np.float64)
    dim = mu1.shape[0] if mu1.ndim == 1 else -1
    _check_stats(mu1, sigma1, dim, "first statistics")
    _check_stats(mu2, sigma2, dim, "second statistics")
    diff = mu1 - mu2
    value = diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * _trace_sqrt_product(sigma1, sigma2)
    return max(float(value), 0.0)


def feature_stats(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean [D] and unbiased covariance [D, D] (divided by N - 1) of features [N, D], N >= 2, both float64."""
    check_features(features, name="feature statistics", min_count=2)
    x = features.astype(np.float64)
    mu = x.mean(axis=0)
    centred = x - mu
    return mu, centred.T @ centred / (x.shape[0] - 1)


def fid(real: np.ndarray, fake: np.ndarray) -> float:
    """FID between feature sets real [N, D] and fake [M, D] (N, M >= 2): :func:`frechet_distance` of their stats."""
    check_features(real, name="FID (real features)", min_count=2)
    check_features(fake, name="FID (fake features)", min_count=2)
    _check_same_dim(real, fake)
    return frechet_distance(*feature_stats(real), *feature_stats(fake))


# ----------------------------------------------------------------------------------------------------------------
# KID


def _poly_kernel(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Cubic polynomial kernel k(x, y) = (x.y / D + 1)^3 (Binkowski et al. 2018) for x [n, D], y [m, D] -> [n, m]."""
    return (x @ y.T / x.shape[1] + 1.0) ** 3


def _mmd2_unbiased(x: np.ndarray, y: np.ndarray) -> float:
    """Unbiased MMD^2 estimate between equal-size samples x, y [m, D] (Binkowski et al. 2018, eq. 2 / KID).

    MMD^2 = sum_{i != j} k(x_i, x_j) / (m (m - 1)) + sum_{i != j} k(y_i, y_j) / (m (m - 1)) - 2 mean k(x_i, y_j).
    """
    m = x.shape[0]
    kxx, kyy, kxy = _poly_kernel(x, x), _poly_kernel(y, y), _poly_kernel(x, y)
    within = (kxx.sum() - np.trace(kxx) + kyy.sum() - np.trace(kyy)) / (m * (m - 1))
    return float(within - 2 * kxy.mean())


def kid(
    real: np.ndarray, fake: np.ndarray, *, num_subsets: int = 100, subset_size: int = 1000, seed: int = 0
) -> tuple[float, float]:
    """Kernel Inception Distance (Binkowski et al. 2018, "Demystifying MMD GANs"): (mean, std) over subsets.

    real [N, D], fake [M, D] (N, M >= 2). Each of ``num_subsets`` rounds draws min(subset_size, N, M) rows
    without replacement from each set (numpy generator seeded by ``seed``) and computes the unbiased MMD^2 with
    the cubic polynomial kernel in float64. The std is the population std over subsets (0 for one subset).
    """
    check_features(real, name="KID (real features)", min_count=2)
    check_features(fake, name="KID (fake features)", min_count=2)
    _check_same_dim(real, fake)
    if num_subsets < 1:
        raise CmkitError(f"KID num_subsets must be >= 1, got {num_subsets}")
    if subset_size < 2:
        raise CmkitError(f"KID subset_size must be >= 2, got {subset_size}")
    size = min(subset_size, real.shape[0], fake.shape[0])
    rng = np.random.default_rng(seed)
    x_all, y_all = real.astype(np.float64), fake.astype(np.float64)
    values = np.empty(num_subsets)
    for i in range(num_subsets):
        x = x_all[rng.choice(x_all.shape[0], size, replace=False)]
        y = y_all[rng.choice(y_all.shape[0], size, replace=False)]
        values[i] = _mmd2_unbiased(x, y)
    return float(values.mean()), float(values.std())


# ----------------------------------------------------------------------------------------------------------------
# Improved precision and recall


def _sq_dists(a: Tensor, b: Tensor, b_sq: Tensor) -> Tensor:
    """Squared Euclidean distances [n, m] between a [n, D] and b [m, D] (b_sq = ||b||^2 [m]), clamped at 0."""
    return (a.pow(2).sum(1, keepdim=True) - 2 * a @ b.T + b_sq).clamp_min_(0.0)


def _kth_sq_radii(x: Tensor, k: int, batch: int) -> Tensor:
    """Squared distance [N] from each row of x [N, D] to its k-th nearest other row (the point itself excluded)."""
    x_sq = x.pow(2).sum(1)
    out = torch.empty(x.shape[0], dtype=x.dtype)
    for start in range(0, x.shape[0], batch):
        d = _sq_dists(x[start : start + batch], x, x_sq)
        rows = torch.arange(d.shape[0])
        d[rows, rows + start] = float("inf")
        out[start : start + batch] = d.kthvalue(k, dim=1).values
    return out


def _inside_fraction(query: Tensor, ref: Tensor, ref_sq_radii: Tensor, batch: int) -> float:
    """Fraction of rows of query [n, D] within distance radius_j of some row ref_j of ref [m, D] (closed balls)."""
    ref_sq = ref.pow(2).sum(1)
    inside = 0
    for start in range(0, query.shape[0], batch):
        d = _sq_dists(query[start : start + batch], ref, ref_sq)
        inside += int((d <= ref_sq_radii).any(dim=1).sum())
    return inside / query.shape[0]


def _centred_tensor(features: np.ndarray, shift: np.ndarray) -> Tensor:
    """features - shift as a float32 tensor; shifting by a common mean keeps distances and shrinks rounding error."""
    return torch.from_numpy(np.ascontiguousarray(features.astype(np.float64) - shift, dtype=np.float32))


def _check_pr_args(k: int, batch: int) -> None:
    """Raise :class:`CmkitError` unless k >= 1 and batch >= 1."""
    if k < 1:
        raise CmkitError(f"precision/recall k must be >= 1, got {k}")
    if batch < 1:
        raise CmkitError(f"precision/recall batch must be >= 1, got {batch}")


def knn_radii(features: np.ndarray, *, k: int = 3, batch: int = 1000) -> np.ndarray:
    """Distance [N] float32 from each row of features [N, D] (N > k) to its k-th nearest neighbour in the set.

    The point itself is excluded, duplicates are not. These are the ball radii of the manifold estimate of
    Kynkaanniemi et al. 2019. At most batch x N distances are held at once.
    """
    _check_pr_args(k, batch)
    check_features(features, name=f"k-NN radii with k={k}", min_count=k + 1)
    x = _centred_tensor(features, features.astype(np.float64).mean(axis=0))
    with torch.no_grad():
        return _kth_sq_radii(x, k, batch).sqrt().numpy()


def precision_recall(real: np.ndarray, fake: np.ndarray, *, k: int = 3, batch: int = 1000) -> tuple[float, float]:
    """Improved precision and recall (Kynkaanniemi et al. 2019, eq. 1-3) of fake [M, D] against real [N, D].

    Each set's manifold is the union of closed balls around its points with radius the distance to the point's
    k-th nearest neighbour within the set. Precision = fraction of fake rows inside the real manifold; recall =
    fraction of real rows inside the fake manifold. Needs N, M > k. Distances are float32, computed batch rows at
    a time (memory O(batch x max(N, M))).
    """
    _check_pr_args(k, batch)
    check_features(real, name=f"precision/recall with k={k} (real features)", min_count=k + 1)
    check_features(fake, name=f"precision/recall with k={k} (fake features)", min_count=k + 1)
    _check_same_dim(real, fake)
    shift = real.astype(np.float64).mean(axis=0)
    x, y = _centred_tensor(real, shift), _centred_tensor(fake, shift)
    with torch.no_grad():
        precision = _inside_fraction(y, x, _kth_sq_radii(x, k, batch), batch)
        recall = _inside_fraction(x, y, _kth_sq_radii(y, k, batch), batch)
    return precision, recall


# ----------------------------------------------------------------------------------------------------------------
# All together


def compute_metrics(real: np.ndarray, fake: np.ndarray, *, k: int = 3) -> dict[str, float]:
    """FID, KID (mean and std) and improved precision/recall of fake [M, D] against real [N, D] features.

    Returns {"fid", "kid", "kid_std", "precision", "recall"}. Both arrays are checked first: finite float [*, D]
    with the same D and at least max(2, k + 1) rows.
    """
    for which, arr in (("real", real), ("fake", fake)):
        check_features(arr, name=f"FID/KID ({which} features)", min_count=2)
        check_features(arr, name=f"precision/recall with k={k} ({which} features)", min_count=k + 1)
    _check_same_dim(real, fake)
    kid_mean, kid_std = kid(real, fake)
    precision, recall = precision_recall(real, fake, k=k)
    return {"fid": fid(real, fake), "kid": kid_mean, "kid_std": kid_std, "precision": precision, "recall": recall}
