"""The evaluation pipeline's parts: the golden-section search behind tune-steps, the reference cache."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from cmkit.errors import CmkitError
from cmkit.eval import evaluate
from cmkit.eval.evaluate import INV_PHI, golden_section_search, reference_features
from cmkit.eval.features import get_extractor, weights_digest


def _counting(f):
    calls = []

    def score(x: float) -> float:
        calls.append(x)
        return f(x)

    return score, calls


@pytest.mark.parametrize("iters", [0, 1, 5, 10, 30])
def test_golden_section_finds_a_known_minimum_within_its_bracket(iters: int) -> None:
    # exp(x - m) - x is convex and asymmetric with its minimum at x = m.
    m, lo, hi = 1.234, -3.0, 5.0
    score, calls = _counting(lambda x: math.exp(x - m) - x)
    best, history = golden_section_search(score, lo, hi, iters=iters)
    assert len(calls) == iters + 2 and [x for x, _ in history] == calls  # one new evaluation per iteration
    assert abs(best - m) <= (hi - lo) * INV_PHI ** (iters + 1)
    assert dict(history)[best] == min(v for _, v in history)


def test_golden_section_converges_to_the_minimiser() -> None:
    best, _ = golden_section_search(lambda x: (x - 0.3) ** 2, -2.0, 3.0, iters=40)
    assert best == pytest.approx(0.3, abs=1e-7)


@pytest.mark.parametrize("slope, end", [(1.0, -1.0), (-1.0, 2.0)])
def test_golden_section_monotone_score_goes_to_the_end(slope: float, end: float) -> None:
    best, _ = golden_section_search(lambda x: slope * x, -1.0, 2.0, iters=25)
    assert best == pytest.approx(end, abs=3.0 * INV_PHI**26)


def test_golden_section_rejects_an_empty_bracket() -> None:
    with pytest.raises(CmkitError, match="lo < hi"):
        golden_section_search(abs, 1.0, 1.0, iters=3)


# ----------------------------------------------------------------------------------------------------------
# Reference features: a cached larger set is reused


def test_reference_features_reuse_the_first_rows_of_a_larger_cache(fmnist_subset, classifier, tmp_path,
                                                                    monkeypatch) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    extractor = get_extractor("fid-fmnist", weights=classifier)
    ref = str(fmnist_subset)
    forty = reference_features(ref, extractor, n=40, resolution=28, channels=1)

    def no_images(*args, **kwargs):
        raise AssertionError("reference images were featurised again")

    monkeypatch.setattr(evaluate.data, "load_dataset", no_images)
    # The reference images are the first n of one fixed permutation: 20 of them are the first 20 of the 40.
    np.testing.assert_array_equal(reference_features(ref, extractor, n=20, resolution=28, channels=1), forty[:20])
    with pytest.raises(AssertionError, match="featurised again"):
        reference_features(ref, extractor, n=41, resolution=28, channels=1)
    other = get_extractor("fid-fmnist", weights=classifier)  # another classifier: its own features, never these
    with torch.no_grad():
        next(other.net.parameters()).add_(1.0)
    other.weights = weights_digest(other.net)
    assert other.weights != extractor.weights
    with pytest.raises(AssertionError, match="featurised again"):
        reference_features(ref, other, n=20, resolution=28, channels=1)
