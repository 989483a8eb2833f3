"""Numbers with their error bars: the statistics evaluate reports.

A figure people compare runs by must come with how much it would move on another
sampling. Everything here is pure Python on lists, unit-tested by hand:

- `mean_se`: the mean over units (held-out queries, rows) and its standard error,
  sd / sqrt(n) with the n-1 sample deviation; each unit may itself be the mean of K
  samples, which is what makes the error shrink as K grows.
- `paired`: the mean of per-unit differences b - a and its standard error. The two
  sides are measured on the same units with the same random numbers, so what they
  share cancels: the error of a gain is far smaller than either side's.
- `ratio`: a token-weighted mean (sum of losses / sum of tokens over rows) and its
  standard error by the delta method, treating rows as the units; `paired_ratio` the
  same for the change between two models on the same rows.
- `within_noise`: whether two independent figures differ by less than twice the
  standard error of their difference.
"""
from __future__ import annotations

import math


def mean(xs: list[float]) -> float:
    return sum(xs) / len(xs) if xs else float("nan")


def mean_se(xs: list[float]) -> tuple[float, float]:
    """(mean, standard error of the mean); the error is nan for fewer than two units."""
    n = len(xs)
    m = mean(xs)
    if n < 2:
        return m, float("nan")
    var = sum((x - m) ** 2 for x in xs) / (n - 1)
    return m, math.sqrt(var / n)


def paired(a: list[float], b: list[float]) -> tuple[float, float]:
    """Mean and standard error of b - a over units measured on both sides."""
    if len(a) != len(b):
        raise ValueError(f"paired needs the same units on both sides ({len(a)} vs {len(b)})")
    return mean_se([y - x for x, y in zip(a, b)])


def ratio(sums: list[float], counts: list[float]) -> tuple[float, float]:
    """sum(sums) / sum(counts) and its delta-method standard error over the units:
    se = sqrt(sum((s_i - r c_i)^2) / (n (n - 1))) / mean(c)."""
    n, total = len(sums), sum(counts)
    if n == 0 or total == 0:
        return float("nan"), float("nan")
    r = sum(sums) / total
    if n < 2:
        return r, float("nan")
    resid = sum((s - r * c) ** 2 for s, c in zip(sums, counts))
    return r, math.sqrt(resid / (n * (n - 1))) / (total / n)


def paired_ratio(sums_a: list[float], sums_b: list[float], counts: list[float]) -> tuple[float, float]:
    """The change of a token-weighted mean between two models scored on the same rows."""
    return ratio([b - a for a, b in zip(sums_a, sums_b)], counts)


def within_noise(a: float, se_a: float, b: float, se_b: float, z: float = 2.0) -> bool | None:
    """|b - a| < z * sqrt(se_a^2 + se_b^2); None where an error bar is missing."""
    if any(v is None or math.isnan(v) for v in (se_a, se_b)):
        return None
    return abs(b - a) < z * math.sqrt(se_a ** 2 + se_b ** 2)
