"""Welch's t-test with an exact Student t distribution, small enough to carry without scipy."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

__all__ = ["WelchResult", "mean", "student_t_cdf", "variance", "welch"]


def mean(xs: Sequence[float]) -> float:
    return sum(xs) / len(xs) if xs else 0.0


def variance(xs: Sequence[float]) -> float:
    """Sample variance (n - 1 in the denominator); 0 for fewer than two values."""
    if len(xs) < 2:
        return 0.0
    m = mean(xs)
    return sum((x - m) ** 2 for x in xs) / (len(xs) - 1)


def _betacf(a: float, b: float, x: float) -> float:
    # Continued fraction of the incomplete beta function (modified Lentz).
    tiny = 1e-300
    qab, qap, qam = a + b, a + 1.0, a - 1.0
    c, d = 1.0, 1.0 - qab * x / qap
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 300):
        m2 = 2 * m
        aa = m * (b - m) * x / ((qam + m2) * (a + m2))
        d = 1.0 + aa * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + aa / c
        c = c if abs(c) > tiny else tiny
        h *= d * c
        aa = -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2))
        d = 1.0 + aa * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + aa / c
        c = c if abs(c) > tiny else tiny
        delta = d * c
        h *= delta
        if abs(delta - 1.0) < 1e-14:
            break
    return h


def _betainc(a: float, b: float, x: float) -> float:
    """The regularized incomplete beta function I_x(a, b)."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    log_front = (
        math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
    )
    front = math.exp(log_front)
    # The fraction converges fast only on one side of the mean; use the symmetry otherwise.
    if x < (a + 1.0) / (a + b + 2.0):
        return front * _betacf(a, b, x) / a
    return 1.0 - front * _betacf(b, a, 1.0 - x) / b


def student_t_cdf(t: float, df: float) -> float:
    """P(T <= t) for Student's t with ``df`` degrees of freedom."""
    if math.isinf(t):
        return 1.0 if t > 0 else 0.0
    tail = 0.5 * _betainc(df / 2.0, 0.5, df / (df + t * t))
    return tail if t < 0 else 1.0 - tail


@dataclass(frozen=True)
class WelchResult:
    """``p_less``: one-sided p-value for "mean of a < mean of b"; ``p_greater`` the other side."""

    t: float
    df: float
    p_less: float
    p_greater: float


def welch(a: Sequence[float], b: Sequence[float], *, shift: float = 0.0) -> WelchResult:
    """Welch's unequal-variance t-test of ``a + shift`` against ``b``.

    ``shift`` turns it into a non-inferiority test: with ``shift = margin``,
    a small ``p_greater`` says a is not worse than b by more than the margin.
    """
    if len(a) < 2 or len(b) < 2:
        raise ValueError("Welch's test needs at least two values on each side")
    va, vb = variance(a) / len(a), variance(b) / len(b)
    diff = mean(a) + shift - mean(b)
    se2 = va + vb
    if se2 <= 0.0:
        # Both sides constant: the difference is certain, whatever its size.
        if diff == 0.0:
            return WelchResult(0.0, math.inf, 0.5, 0.5)
        less = 0.0 if diff < 0 else 1.0
        return WelchResult(math.copysign(math.inf, diff), math.inf, less, 1.0 - less)
    t = diff / math.sqrt(se2)
    df = se2**2 / ((va**2 / (len(a) - 1) if va else 0.0) + (vb**2 / (len(b) - 1) if vb else 0.0))
    p_less = student_t_cdf(t, df)
    return WelchResult(t, df, p_less, 1.0 - p_less)
