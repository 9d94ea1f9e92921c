import json

import pandas as pd
import pytest

from servescope.analyzers.server_metrics import ServerMetrics


def _frame(rows):
    return pd.DataFrame([{"t": t, "name": n, "labels": json.dumps(l, sort_keys=True), "value": v} for t, n, l, v in rows])


def test_counter_increase_survives_a_restart_and_sums_engines():
    rows = [(t, "vllm:num_preemptions_total", {"engine": "0"}, v) for t, v in ((0, 5), (1, 7), (2, 1), (3, 4))]
    rows += [(t, "vllm:num_preemptions_total", {"engine": "1"}, v) for t, v in ((0, 0), (1, 1), (2, 2), (3, 3))]
    m = ServerMetrics.from_frame(_frame(rows))
    # engine 0: +2, reset to 1 (+1), +3 = 6; engine 1: +3.
    assert m.counter_increase("preemptions") == 9
    assert m.counter_rate("preemptions").tolist() == [3.0, 2.0, 4.0]


def test_sglang_names_map_to_the_same_keys():
    rows = [(0, "sglang:num_queue_reqs", {}, 4.0), (0, "sglang:token_usage", {}, 0.5),
            (0, "sglang:num_running_reqs", {}, 2.0), (0, "some_other_metric", {}, 1.0)]
    m = ServerMetrics.from_frame(_frame(rows))
    assert m.gauge("waiting").tolist() == [4.0]
    assert m.gauge("kv_usage").tolist() == [0.5]
    assert m.gauge("running").tolist() == [2.0]
    assert len(m.samples) == 3


def test_histogram_quantile_from_bucket_deltas():
    name = "vllm:time_to_first_token_seconds_bucket"
    rows = []
    # At t=0: 10 observations all <= 0.1. By t=10: 100 more, 50 in (0.1, 0.5], 50 in (0.5, 1.0].
    for le, v0, v1 in (("0.1", 10, 10), ("0.5", 10, 60), ("1.0", 10, 110), ("+Inf", 10, 110)):
        rows += [(0, name, {"le": le}, v0), (10, name, {"le": le}, v1)]
    m = ServerMetrics.from_frame(_frame(rows))
    assert m.histogram_quantile("ttft_hist", 0.5, 0, 10) == pytest.approx(0.5)
    assert m.histogram_quantile("ttft_hist", 0.25, 0, 10) == pytest.approx(0.3)
    # No t0: all 110 observations; the 55th lies 45/50 of the way into (0.1, 0.5].
    assert m.histogram_quantile("ttft_hist", 0.5) == pytest.approx(0.46)
    assert m.histogram_quantile("queue_hist", 0.5) is None


def test_a_wide_first_bucket_is_capped_by_the_windows_mean():
    """vLLM's queue-time histogram starts at 0.3 s: microsecond queues must not read as 150 ms."""
    base = "vllm:request_queue_time_seconds"
    rows = []
    for t, n, total in ((0, 0, 0.0), (10, 200, 200 * 6e-6)):
        rows += [(t, base + "_bucket", {"le": le}, n) for le in ("0.3", "0.5", "+Inf")]
        rows += [(t, base + "_count", {}, n), (t, base + "_sum", {}, total)]
    m = ServerMetrics.from_frame(_frame(rows))
    assert m.histogram_mean("queue_hist", 0, 10) == pytest.approx(6e-6)
    assert m.histogram_quantile("queue_hist", 0.5, 0, 10) == pytest.approx(12e-6)  # Markov: mean / (1 - q)
    assert m.histogram_quantile("queue_hist", 0.99, 0, 10) == pytest.approx(6e-4)
    # Where the buckets are informative the cap stays out of the way.
    rows = []
    for t, n in ((0, 0), (10, 100)):
        rows += [(t, base + "_bucket", {"le": "0.1"}, n // 2), (t, base + "_bucket", {"le": "1.0"}, n),
                 (t, base + "_bucket", {"le": "+Inf"}, n), (t, base + "_count", {}, n), (t, base + "_sum", {}, n * 0.3)]
    m = ServerMetrics.from_frame(_frame(rows))
    assert m.histogram_quantile("queue_hist", 0.5, 0, 10) == pytest.approx(0.1)


def test_no_metrics_means_empty_answers():
    m = ServerMetrics.from_frame(pd.DataFrame(columns=["t", "name", "labels", "value"]))
    assert m.gauge("waiting").empty and m.counter_increase("preemptions") == 0.0 and not m.has("kv_usage")
