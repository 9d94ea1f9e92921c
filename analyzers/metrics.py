"""Latency distributions: percentiles with sample counts and 95% confidence intervals.

Why the confidence intervals are computed, not resampled: the percentile
bootstrap of a sample quantile has a closed form. Resampling n values from the
sample, the number that fall at or below the j-th smallest value is
Binomial(n, j/n), so the resampled k-th order statistic is <= x(j) exactly when
that count reaches k. The bootstrap distribution is therefore
P(x*(k) <= x(j)) = P(Binomial(n, j/n) >= k), which we evaluate (vectorized,
scipy's binomial survival function) only over the ranks near k. This is the
limit of infinitely many resamples, is deterministic (two reports of one run
agree), and costs one `np.partition` instead of B x n random draws: pooled ITL
over a 100k-request run is millions of gaps.
"""

from __future__ import annotations

import math
from typing import Any, Callable

import numpy as np
from scipy import stats as sps

PERCENTILES: tuple[tuple[str, float], ...] = (
    ("p50", 0.50), ("p90", 0.90), ("p95", 0.95), ("p99", 0.99), ("p99.9", 0.999),
)
STAT_NAMES = ("mean",) + tuple(name for name, _ in PERCENTILES)
# Below this many samples a percentile is shown with a warning instead of confidence.
MIN_SAMPLES = 20
CONFIDENCE = 0.95


def percentile_rank(n: int, q: float) -> int:
    """0-based index of the order statistic that is the q-quantile (nearest-rank)."""
    return min(n - 1, max(0, math.ceil(q * n) - 1))


def bootstrap_rank_interval(n: int, q: float, confidence: float = CONFIDENCE) -> tuple[int, int]:
    """0-based ranks bounding the percentile-bootstrap CI of the q-quantile of n values."""
    k = percentile_rank(n, q) + 1  # 1-based rank of the estimate
    spread = 6.0 * math.sqrt(n * q * (1 - q)) + 3
    j = np.arange(max(1, int(k - spread)), min(n, int(k + spread)) + 1)
    cdf = sps.binom.sf(k - 1, n, j / n)  # P(resampled k-th value <= x(j))
    alpha = (1 - confidence) / 2
    lo = j[min(np.searchsorted(cdf, alpha), len(j) - 1)]
    hi = j[min(np.searchsorted(cdf, 1 - alpha), len(j) - 1)]
    return int(lo) - 1, int(hi) - 1


def describe(values: np.ndarray | Any, *, with_ci: bool = True) -> dict[str, Any]:
    """`{"n", "mean", "p50", ..., "p99.9", "ci95": {...}, "low_n"}` of the finite values.

    Percentiles are nearest-rank order statistics (an observed latency, never an
    interpolation between two). With no values every statistic is None.
    """
    arr = np.asarray(values, dtype=np.float64)
    arr = arr[np.isfinite(arr)]
    n = int(arr.size)
    if n == 0:
        return describe_ranked(0, None, lambda rank: 0.0, with_ci=with_ci)
    needed = sorted(set(_ranks_needed(n, with_ci)))
    part = np.partition(arr, needed)  # O(n): only the ranks we report get sorted into place
    return describe_ranked(n, float(arr.mean()), lambda rank: float(part[rank]), with_ci=with_ci)


def _ranks_needed(n: int, with_ci: bool) -> list[int]:
    ranks = [percentile_rank(n, q) for _, q in PERCENTILES]
    if with_ci:
        ranks += [r for _, q in PERCENTILES for r in bootstrap_rank_interval(n, q)]
    return ranks


def describe_ranked(n: int, mean: float | None, value_at: Callable[[int], float], *, with_ci: bool = True) -> dict[str, Any]:
    """`describe`'s dict from a sample whose k-th smallest value `value_at(k)` is at hand.

    For callers that already hold the values in order (e.g. every inter-token
    gap of a run sorted once, then split by slice): no copy, no partition.
    """
    out: dict[str, Any] = {"n": n}
    if n == 0:
        out.update({name: None for name in STAT_NAMES})
        out["ci95"] = {}
        out["low_n"] = True
        return out
    out["mean"] = mean
    for name, q in PERCENTILES:
        out[name] = value_at(percentile_rank(n, q))
    intervals = {name: bootstrap_rank_interval(n, q) for name, q in PERCENTILES} if with_ci else {}
    out["ci95"] = {name: [value_at(lo), value_at(hi)] for name, (lo, hi) in intervals.items()}
    out["low_n"] = n < MIN_SAMPLES
    return out


def quantile(values: np.ndarray, q: float) -> float | None:
    """One nearest-rank quantile of the finite values (None when there are none)."""
    arr = np.asarray(values, dtype=np.float64)
    arr = arr[np.isfinite(arr)]
    if arr.size == 0:
        return None
    return float(np.partition(arr, percentile_rank(arr.size, q))[percentile_rank(arr.size, q)])
