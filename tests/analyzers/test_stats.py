"""The regression statistics on synthetic distributions with a known truth."""

from __future__ import annotations

import numpy as np
import pytest

from servescope.analyzers.metrics import percentile_rank
from servescope.analyzers.stats import compare_stat, point_stat, quantile_replicates, rank_test


def test_quantile_replicates_match_brute_force_bootstrap() -> None:
    """The O(1) Beta-law replicate has the same law as resampling and sorting."""
    rng = np.random.default_rng(7)
    x = np.sort(rng.lognormal(size=60))
    for q in (0.5, 0.9, 0.99):
        fast = quantile_replicates(x, q, 40_000, rng)
        idx = np.sort(rng.integers(0, len(x), size=(8_000, len(x))), axis=1)
        slow = x[idx[:, percentile_rank(len(x), q)]]
        assert fast.mean() == pytest.approx(slow.mean(), rel=0.03)
        assert fast.std() == pytest.approx(slow.std(), rel=0.08)


def test_point_stat_is_nearest_rank_like_summary() -> None:
    x = np.arange(1.0, 101.0)
    assert point_stat(x, "p50") == 50.0
    assert point_stat(x, "p99") == 99.0
    assert point_stat(x, "mean") == 50.5


def _false_positive_rate(stat: str, seeds: int, n: int, alpha: float) -> float:
    flagged = 0
    for seed in range(seeds):
        rng = np.random.default_rng(seed)
        base, cand = rng.lognormal(0, 0.5, n), rng.lognormal(0, 0.5, n)
        est = compare_stat([base], [cand], stat, alpha=alpha, n_boot=400, rng=rng)
        flagged += est.excludes_zero()
    return flagged / seeds


@pytest.mark.parametrize("stat", ["p50", "p90", "mean"])
def test_no_shift_is_flagged_at_about_alpha(stat: str) -> None:
    """200 seeds of same-distribution samples: the interval excludes zero about alpha of the time."""
    rate = _false_positive_rate(stat, seeds=200, n=150, alpha=0.05)
    assert rate <= 0.10, f"{stat}: false-positive rate {rate:.3f} far above alpha=0.05"


def test_rank_test_false_positive_rate_matches_alpha() -> None:
    hits = 0
    for seed in range(200):
        rng = np.random.default_rng(1000 + seed)
        p, _ = rank_test([rng.exponential(size=100)], [rng.exponential(size=100)])
        hits += p < 0.05
    assert 0.01 <= hits / 200 <= 0.10


def test_known_shift_is_detected_with_its_size() -> None:
    """A 25% slowdown: detected on nearly every seed, and the interval covers the truth."""
    detected, covered = 0, 0
    for seed in range(100):
        rng = np.random.default_rng(seed)
        base, cand = rng.lognormal(0, 0.5, 300), 1.25 * rng.lognormal(0, 0.5, 300)
        est = compare_stat([base], [cand], "p50", n_boot=400, rng=rng)
        detected += est.ci_low > 0
        covered += est.ci_low <= 0.25 <= est.ci_high
    assert detected >= 95
    assert covered >= 88  # nominal 95% coverage, with slack for 100 seeds


def test_repeated_runs_absorb_between_run_spread() -> None:
    """Runs that each drift by +-15% (same build): the per-run spread keeps the drift from being
    called a change; a 60% slowdown on top of the same drift is still found."""
    rng = np.random.default_rng(3)

    def runs(scale: float) -> list[np.ndarray]:
        return [scale * rng.uniform(0.85, 1.15) * rng.lognormal(0, 0.3, 2000) for _ in range(3)]

    base = runs(1.0)
    flagged = sum(compare_stat(base, runs(1.0), "p50", n_boot=500, rng=rng).significant(0.05) for _ in range(20))
    assert flagged <= 2
    # Pooling the requests of the same runs into one run each would (wrongly) be confident:
    pooled = sum(
        compare_stat([np.concatenate(base)], [np.concatenate(runs(1.0))], "p50", n_boot=500, rng=rng).significant(0.05)
        for _ in range(20)
    )
    assert pooled > flagged
    assert compare_stat(base, runs(1.6), "p50", n_boot=500, rng=rng).significant(0.05)


def test_relative_change_of_zero_baseline_is_undefined_not_infinite() -> None:
    est = compare_stat([np.zeros(50)], [np.ones(50)], "p50", n_boot=400)
    assert est.change != est.change  # NaN
    assert not est.excludes_zero()


def test_empty_run_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="run 1 of the candidate has no samples"):
        compare_stat([np.ones(5)], [np.empty(0)], "p50")
