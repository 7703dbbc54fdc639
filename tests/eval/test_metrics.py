"""Avg@K / Pass@K against hand-worked values and a brute-force float64 reference; filter bounds."""

from __future__ import annotations

import itertools
import math
from fractions import Fraction

import pytest

from tasks.evaluation import (
    DatasetScore,
    avg_at_k,
    format_table,
    mean_pass_at_k,
    pass_at_k,
    pass_at_k_curve,
    pass_rate_keep,
    score_dataset,
)


def brute_force_pass_at_k(n: int, c: int, k: int) -> float:
    """Fraction of all k-subsets of n samples (the first c correct) holding a correct sample."""
    subsets = list(itertools.combinations(range(n), k))
    hits = sum(any(i < c for i in s) for s in subsets)
    return float(Fraction(hits, len(subsets)))


@pytest.mark.parametrize("n", range(1, 11))
def test_pass_at_k_matches_subset_enumeration(n: int) -> None:
    for k in range(1, n + 1):
        for c in range(n + 1):
            assert pass_at_k(n, c, k) == pytest.approx(brute_force_pass_at_k(n, c, k), rel=1e-12, abs=1e-15)


@pytest.mark.parametrize(
    ("n", "c", "k", "expected"),
    [
        # 1 - C(3,2)/C(4,2) = 1 - 3/6
        (4, 1, 2, 0.5),
        # 1 - C(3,2)/C(5,2) = 1 - 3/10
        (5, 2, 2, 0.7),
        # Pass@1 is the plain accuracy c/n = 3/10
        (10, 3, 1, 0.3),
        # no correct sample: 1 - C(8,4)/C(8,4) = 0
        (8, 0, 4, 0.0),
        # only n - c = 1 wrong sample, every 2-subset holds a correct one
        (4, 3, 2, 1.0),
        # n = k: solved at least once or not
        (8, 1, 8, 1.0),
        # 1 - (100/200)(99/199)(98/198) = 1 - 970200/7880400 = 0.87688442211055276...
        (200, 3, 100, 1 - 970200 / 7880400),
    ],
)
def test_pass_at_k_hand_worked(n: int, c: int, k: int, expected: float) -> None:
    assert pass_at_k(n, c, k) == pytest.approx(expected, rel=1e-12, abs=1e-15)


def test_pass_at_k_is_stable_where_binomials_overflow_float64() -> None:
    # C(1024, 512) ~ 4.5e306 and C(2048, 1024) overflows float64 (max ~1.8e308);
    # 1 - C(2047,1024)/C(2048,1024) = 1 - (2048-1024)/2048 = 0.5 exactly.
    with pytest.raises(OverflowError):
        float(math.comb(2048, 1024))
    assert pass_at_k(2048, 1, 1024) == 0.5
    # The exact rational value for a less trivial case, compared in float64.
    exact = 1 - Fraction(math.comb(2048 - 5, 1000), math.comb(2048, 1000))
    assert pass_at_k(2048, 5, 1000) == pytest.approx(float(exact), rel=1e-12)


@pytest.mark.parametrize(
    ("n", "c", "k", "match"),
    [(3, 1, 4, "at least k=4 samples"), (4, 1, 0, "k >= 1"), (4, 5, 2, "c=5"), (4, -1, 2, "c=-1")],
)
def test_pass_at_k_rejects_bad_arguments(n: int, c: int, k: int, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        pass_at_k(n, c, k)


def test_avg_at_k_weighs_questions_equally() -> None:
    # (2/4 + 4/4 + 0/4) / 3 = 0.5
    assert avg_at_k([[1, 0, 0, 1], [1, 1, 1, 1], [0, 0, 0, 0]]) == 0.5
    # per question 1/1 and 2/3 -> (1 + 2/3) / 2 = 5/6; pooling samples would give 3/4
    assert avg_at_k([[True], [False, True, True]]) == pytest.approx(5 / 6)


def test_mean_pass_at_k_averages_over_questions() -> None:
    correct = [[1, 0, 0, 0], [0, 0, 0, 0], [1, 1, 0, 0]]
    # k=2: q0 1 - C(3,2)/C(4,2) = 1/2; q1 0; q2 1 - C(2,2)/C(4,2) = 5/6 -> (1/2 + 0 + 5/6)/3 = 4/9
    assert mean_pass_at_k(correct, 2) == pytest.approx(4 / 9)
    # k = n = 4: fraction of questions solved at least once = 2/3
    assert mean_pass_at_k(correct, 4) == pytest.approx(2 / 3)
    with pytest.raises(ValueError, match="at least k=5"):
        mean_pass_at_k(correct, 5)
    with pytest.raises(ValueError, match="no questions"):
        mean_pass_at_k([], 1)


def test_curve_starts_at_avg_and_never_decreases() -> None:
    correct = [[1, 0, 0, 0, 0, 0], [0, 1, 1, 0, 0, 1], [0] * 6]
    curve = pass_at_k_curve(correct)
    assert list(curve) == [1, 2, 4, 6]
    assert curve[1] == pytest.approx(avg_at_k(correct))
    values = list(curve.values())
    assert values == sorted(values)
    # k=6=n: two of three questions solved
    assert curve[6] == pytest.approx(2 / 3)


def test_score_dataset_and_table() -> None:
    score = score_dataset("toy", [[1, 0], [0, 0], [1, 1]], k=2)
    # Avg@2 = (1/2 + 0 + 1)/3 = 0.5; Pass@2 = (1 + 0 + 1)/3
    assert score == DatasetScore(
        name="toy",
        questions=3,
        k=2,
        avg_at_k=0.5,
        pass_at_k=pytest.approx(2 / 3),
        pass_at={1: 0.5, 2: pytest.approx(2 / 3)},
        correct_counts=[1, 0, 2],
    )
    table = format_table([score]).splitlines()
    assert table[0].split() == ["dataset", "questions", "K", "Avg@K", "Pass@K"]
    assert table[2].split() == ["toy", "3", "2", "0.5000", "0.6667"]
    with pytest.raises(ValueError, match="exactly K=2"):
        score_dataset("ragged", [[1, 0], [1]], k=2)


def test_pass_rate_bounds_are_strict() -> None:
    # K=16, keep 1/16 < c/16 < 15/16, i.e. c in 2..14
    counts = [0, 1, 2, 8, 14, 15, 16]
    assert pass_rate_keep(counts, 16, 1 / 16, 15 / 16) == [False, False, True, True, True, False, False]
