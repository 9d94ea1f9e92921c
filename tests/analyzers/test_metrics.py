import numpy as np
import pytest

from servescope.analyzers.metrics import MIN_SAMPLES, bootstrap_rank_interval, describe, percentile_rank


def test_percentiles_are_observed_values_with_counts():
    values = np.arange(1, 101, dtype=float)  # 1..100
    d = describe(values)
    assert d["n"] == 100
    assert d["p50"] == 50 and d["p90"] == 90 and d["p99"] == 99 and d["p99.9"] == 100
    assert d["mean"] == pytest.approx(50.5)
    assert not d["low_n"]


def test_closed_form_interval_matches_resampling_bootstrap():
    """The CI is the B -> infinity limit of the percentile bootstrap: check against 20k real resamples."""
    rng = np.random.default_rng(1)
    x = rng.lognormal(0, 1, 150)
    d = describe(x)
    resamples = np.sort(x[rng.integers(0, x.size, (20_000, x.size))], axis=1)
    for name, q in (("p50", 0.5), ("p90", 0.9), ("p99", 0.99)):
        boot = resamples[:, percentile_rank(x.size, q)]
        lo, hi = np.quantile(boot, [0.025, 0.975])
        sorted_x = np.sort(x)
        # Same order statistics, allowing one rank of Monte Carlo slack.
        assert abs(np.searchsorted(sorted_x, d["ci95"][name][0]) - np.searchsorted(sorted_x, lo)) <= 1
        assert abs(np.searchsorted(sorted_x, d["ci95"][name][1]) - np.searchsorted(sorted_x, hi)) <= 1


def test_interval_narrows_with_more_samples_and_contains_estimate():
    rng = np.random.default_rng(2)
    small, big = describe(rng.exponential(1, 200)), describe(rng.exponential(1, 200_000))
    for d in (small, big):
        lo, hi = d["ci95"]["p99"]
        assert lo <= d["p99"] <= hi
    assert (big["ci95"]["p99"][1] - big["ci95"]["p99"][0]) < (small["ci95"]["p99"][1] - small["ci95"]["p99"][0]) / 5


def test_small_and_empty_samples_are_flagged_not_invented():
    few = describe([0.1, 0.2, 0.3])
    assert few["n"] == 3 and few["low_n"] and few["p99"] == 0.3
    empty = describe([np.nan, np.inf])
    assert empty["n"] == 0 and empty["p50"] is None and empty["low_n"]
    assert describe(np.ones(MIN_SAMPLES))["low_n"] is False


def test_rank_interval_bounds_are_valid_ranks():
    for n in (1, 2, 5, 50, 1000):
        for q in (0.5, 0.99, 0.999):
            lo, hi = bootstrap_rank_interval(n, q)
            assert 0 <= lo <= percentile_rank(n, q) <= hi <= n - 1
