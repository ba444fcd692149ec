"""The evaluation pipeline's parts: the golden-section search behind tune-steps."""

from __future__ import annotations

import math

import pytest

from cmkit.errors import CmkitError
from cmkit.eval.evaluate import INV_PHI, golden_section_search


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

