"""Regression statistics: is a candidate's figure really different from the baseline's?

Every comparison here works on *groups*: one array of samples per run. A
single run is a group of one; `servescope run --repeat N` gives N. The
confidence interval comes from a hierarchical bootstrap (resample the runs,
then the samples within each chosen run), so run-to-run spread widens the
interval and two runs of the same build do not look different merely because
each holds thousands of requests. With repeated runs the estimate of a
statistic is the mean of its per-run values, which is what that bootstrap
resamples.

Why the bootstrap is hand-written rather than `scipy.stats.bootstrap`: scipy
materializes B x n resamples and sorts each, which is seconds per metric for
pooled inter-token latencies (10^5 samples) and minutes over every slice. A
quantile of a resample depends only on two order statistics, and the k-th
order statistic of n uniform draws has a known Beta law, so a bootstrap
replicate of a quantile costs O(1) instead of O(n log n) and is exact (see
`quantile_replicates`). The rank test itself is scipy's Mann-Whitney U.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
from scipy import stats as sps

from servescope.analyzers.metrics import percentile_rank

# Statistics a comparison can be asked for: percentiles by name, and the mean.
PERCENTILES: dict[str, float] = {"p50": 0.50, "p90": 0.90, "p95": 0.95, "p99": 0.99, "p99.9": 0.999}
STATS: tuple[str, ...] = (*PERCENTILES, "mean")

# Beyond this many draws (replicates x samples) a bootstrap replicate of the mean
# comes from its normal limit: with thousands of samples the two are
# indistinguishable, and exact resampling would cost seconds per metric.
_EXACT_MEAN_MAX_DRAWS = 1_000_000


def point_stat(x: np.ndarray, stat: str) -> float:
    """The statistic of one sample; percentiles are nearest-rank, as in summary.json."""
    if stat == "mean":
        return float(np.mean(x))
    rank = percentile_rank(len(x), _quantile_of(stat))
    return float(np.partition(x, rank)[rank])


def quantile_replicates(sorted_x: np.ndarray, q: float, n_rep: int, rng: np.random.Generator) -> np.ndarray:
    """Bootstrap replicates of the nearest-rank q-quantile of `sorted_x`, in O(n_rep).

    A bootstrap resample is n indices drawn uniformly from 0..n-1; its k-th
    smallest index is floor(n * U_(k)), where U_(k), the k-th order statistic
    of n continuous uniforms, follows Beta(k, n - k + 1). The nearest-rank
    quantile is exactly that k-th smallest value, so this is the bootstrap
    itself, not an approximation of it.
    """
    n = len(sorted_x)
    k = percentile_rank(n, q) + 1  # 1-based rank
    if n == 1:
        return np.full(n_rep, float(sorted_x[0]))
    u_k = rng.beta(k, n - k + 1, size=n_rep)
    return sorted_x[np.minimum((u_k * n).astype(np.int64), n - 1)].astype(float)


def mean_replicates(x: np.ndarray, n_rep: int, rng: np.random.Generator) -> np.ndarray:
    """Bootstrap replicates of the mean: exact resampling for small samples, the normal limit for large ones."""
    n = len(x)
    if n == 1:
        return np.full(n_rep, float(x[0]))
    if n * n_rep > _EXACT_MEAN_MAX_DRAWS:
        return float(np.mean(x)) + rng.standard_normal(n_rep) * float(np.std(x)) / np.sqrt(n)
    # Chunked so a replicate block stays around a few million draws.
    out = np.empty(n_rep)
    block = max(1, 2_000_000 // n)
    for start in range(0, n_rep, block):
        stop = min(n_rep, start + block)
        out[start:stop] = x[rng.integers(0, n, size=(stop - start, n))].mean(axis=1)
    return out


def stat_replicates(x: np.ndarray, stat: str, n_rep: int, rng: np.random.Generator) -> np.ndarray:
    """Bootstrap replicates of `stat` over one run's samples."""
    if stat == "mean":
        return mean_replicates(x, n_rep, rng)
    return quantile_replicates(np.sort(x), _quantile_of(stat), n_rep, rng)


def group_estimate(groups: Sequence[np.ndarray], stat: str) -> float:
    """The statistic of a group of runs: the mean of the per-run values."""
    return float(np.mean([point_stat(g, stat) for g in groups]))


def hierarchical_replicates(
    groups: Sequence[np.ndarray], stat: str, n_rep: int, rng: np.random.Generator
) -> np.ndarray:
    """Bootstrap replicates of `group_estimate`: resample runs, then samples within each run.

    Each of the R slots of a replicate picks a run at random and takes an
    independent within-run replicate of it, so a run drawn twice is not
    counted as the same value twice.
    """
    r = len(groups)
    # per_run[j, b, s]: within-run replicate b of run j, for slot s.
    per_run = np.stack([stat_replicates(g, stat, n_rep * r, rng).reshape(n_rep, r) for g in groups])
    if r == 1:
        return per_run[0, :, 0]
    pick = rng.integers(0, r, size=(n_rep, r))
    values = per_run[pick, np.arange(n_rep)[:, None], np.arange(r)[None, :]]
    return values.mean(axis=1)


@dataclass(frozen=True)
class ChangeEstimate:
    """How a statistic moved from baseline to candidate, with its uncertainty.

    `change` is relative (cand / base - 1) when `relative`, else absolute
    (cand - base). The interval is the (1 - alpha) percentile-bootstrap
    interval of that change; `p_value` is from a rank test or exact test when
    one applies, else the bootstrap's two-sided tail probability of no change.
    """

    base: float
    cand: float
    change: float
    ci_low: float
    ci_high: float
    p_value: float
    relative: bool
    n_base: int
    n_cand: int
    between_run_p: float | None = None  # Welch t-test over per-run values; None with one run a side

    def __post_init__(self) -> None:
        if not (0.0 <= self.p_value <= 1.0) and not np.isnan(self.p_value):
            raise ValueError(f"p_value must lie in [0, 1], got {self.p_value}")

    def excludes_zero(self) -> bool:
        """True when the confidence interval lies wholly on one side of 'no change'."""
        return bool(self.ci_low > 0.0 or self.ci_high < 0.0)

    def significant(self, alpha: float) -> bool:
        """The interval excludes zero and, with repeated runs, the per-run values differ too.

        Why both: resampling three runs gives a coarse, too-narrow picture of
        between-run spread (a bootstrap over three values), so with repeated
        runs the per-run statistics must also pass a Welch t-test, which is
        calibrated for few samples.
        """
        if not self.excludes_zero():
            return False
        return self.between_run_p is None or self.between_run_p < alpha


def compare_stat(
    base: Sequence[np.ndarray],
    cand: Sequence[np.ndarray],
    stat: str,
    *,
    alpha: float = 0.05,
    relative: bool = True,
    n_boot: int = 2000,
    rng: np.random.Generator | None = None,
) -> ChangeEstimate:
    """Change of `stat` between two groups of runs, with a hierarchical-bootstrap interval."""
    _check_groups(base, "baseline")
    _check_groups(cand, "candidate")
    rng = rng if rng is not None else np.random.default_rng(0)
    b_hat, c_hat = group_estimate(base, stat), group_estimate(cand, stat)
    b_rep = hierarchical_replicates(base, stat, n_boot, rng)
    c_rep = hierarchical_replicates(cand, stat, n_boot, rng)
    if relative:
        if b_hat <= 0.0:
            change, d_rep = float("nan"), np.full(n_boot, np.nan)
        else:
            change = c_hat / b_hat - 1.0
            with np.errstate(divide="ignore", invalid="ignore"):
                d_rep = c_rep / b_rep - 1.0
    else:
        change, d_rep = c_hat - b_hat, c_rep - b_rep
    d_rep = d_rep[np.isfinite(d_rep)]
    if len(d_rep) < n_boot // 2:  # the baseline statistic is (nearly always) zero: no relative change
        lo = hi = p = float("nan")
    else:
        lo, hi = (float(v) for v in np.quantile(d_rep, [alpha / 2, 1 - alpha / 2]))
        # Two-sided bootstrap tail probability, floored at the resolution of n_boot replicates.
        tail = min(np.mean(d_rep <= 0.0), np.mean(d_rep >= 0.0))
        p = float(min(1.0, max(2.0 * tail, 1.0 / len(d_rep))))
    between = between_run_test([point_stat(g, stat) for g in base], [point_stat(g, stat) for g in cand])
    return ChangeEstimate(
        base=b_hat, cand=c_hat, change=float(change), ci_low=lo, ci_high=hi,
        p_value=p if between is None or not np.isfinite(p) else max(p, between),
        relative=relative, n_base=sum(len(g) for g in base), n_cand=sum(len(g) for g in cand),
        between_run_p=between,
    )


def between_run_test(base_values: Sequence[float], cand_values: Sequence[float]) -> float | None:
    """Two-sided p-value that per-run values differ: Welch's t-test, or a one-sample t-test
    of the repeated side against a single run. None when neither side was repeated."""
    b, c = np.asarray(base_values, dtype=float), np.asarray(cand_values, dtype=float)
    if len(b) < 2 and len(c) < 2:
        return None
    if len(b) >= 2 and len(c) >= 2:
        if np.ptp(b) == 0 and np.ptp(c) == 0:
            return 1.0 if b[0] == c[0] else 0.0
        p = sps.ttest_ind(c, b, equal_var=False).pvalue
    else:
        many, one = (b, c[0]) if len(b) >= 2 else (c, b[0])
        p = 1.0 if np.ptp(many) == 0 and many[0] == one else sps.ttest_1samp(many, one).pvalue
    return float(p) if np.isfinite(p) else 1.0


def rank_test(base: Sequence[np.ndarray], cand: Sequence[np.ndarray]) -> tuple[float, float]:
    """Mann-Whitney U over the pooled samples: (two-sided p-value, P(cand sample > base sample)).

    The second figure is the common-language effect size U / (n_base n_cand):
    0.5 means neither side tends to be larger.
    """
    b, c = np.concatenate(list(base)), np.concatenate(list(cand))
    res = sps.mannwhitneyu(c, b, alternative="two-sided")
    return float(res.pvalue), float(res.statistic) / (len(b) * len(c))


def proportion_test(base_hits: int, base_n: int, cand_hits: int, cand_n: int) -> float:
    """Two-sided Fisher exact test p-value of two proportions (e.g. error rates)."""
    table = [[cand_hits, cand_n - cand_hits], [base_hits, base_n - base_hits]]
    return float(sps.fisher_exact(table).pvalue)


def _quantile_of(stat: str) -> float:
    try:
        return PERCENTILES[stat]
    except KeyError:
        raise ValueError(f"unknown statistic {stat!r}; use one of {', '.join(STATS)}") from None


def _check_groups(groups: Sequence[np.ndarray], side: str) -> None:
    if not groups:
        raise ValueError(f"the {side} has no runs")
    for i, g in enumerate(groups):
        if len(g) == 0:
            raise ValueError(f"run {i + 1} of the {side} has no samples")
