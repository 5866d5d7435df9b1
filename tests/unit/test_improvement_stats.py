"""Welch's t-test and the Student t distribution against reference values (scipy's)."""

from __future__ import annotations

import math

import pytest

from services.improvement.stats import student_t_cdf, variance, welch


@pytest.mark.parametrize(
    ("t", "df", "expected"),
    [
        (2.0, 10, 1 - 0.036694017385370),  # scipy.stats.t.cdf(2.0, 10)
        (1.812461, 10, 0.95),
        (-2.228139, 10, 0.025),
        (0.0, 5, 0.5),
        (-12.7062, 1, 0.025),
        (1.959964, 1e6, 0.975),
    ],
)
def test_student_t_cdf(t: float, df: float, expected: float):
    assert student_t_cdf(t, df) == pytest.approx(expected, abs=1e-5)


def test_welch_matches_reference():
    # scipy.stats.ttest_ind([1,2,3,4], [2,3,4,5,6], equal_var=False): t=-1.5667, p(2-sided)=0.1613
    r = welch([1, 2, 3, 4], [2, 3, 4, 5, 6])
    assert r.t == pytest.approx(-1.5667, abs=1e-4)
    assert r.df == pytest.approx(6.9808, abs=1e-3)
    assert r.p_less == pytest.approx(0.1613 / 2, abs=1e-4)
    assert r.p_less + r.p_greater == pytest.approx(1.0)


def test_welch_constant_samples_and_shift():
    assert welch([0.2, 0.2], [0.8, 0.8]).p_less == 0.0
    assert welch([0.8, 0.8], [0.2, 0.2]).p_greater == 0.0
    assert welch([0.5, 0.5], [0.5, 0.5]).p_less == 0.5
    # Shifted by the margin, equal samples become "not worse" with certainty.
    assert welch([0.5, 0.5], [0.5, 0.5], shift=0.05).p_greater == 0.0
    assert math.isclose(variance([1, 2, 3, 4]), 1.6666666, rel_tol=1e-6)
    with pytest.raises(ValueError):
        welch([1.0], [1.0, 2.0])
