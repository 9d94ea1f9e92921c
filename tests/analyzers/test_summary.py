import pytest

from servescope.analyzers.summary import summarize


def test_counts_errors_and_warmup_exclusion(sim):
    for i in range(10):
        sim.add(i * 0.1, 0.01, phase="warmup")
    for i in range(100):
        sim.add(1 + i * 0.1, 0.02, status="error" if i % 10 == 0 else "ok")
    sim.add(11.0, 0.02, status="cancelled", error_kind="cancelled")
    s = summarize(sim.run())
    assert [p["phase"] for p in s["phases"]] == ["warmup", "rate=10"]
    o = s["overall"]
    assert o["requests"] == 101 and o["ok"] == 90
    assert o["errors"] == {"cancelled": 1, "http_5xx": 10}
    assert o["error_rate"] == pytest.approx(10 / 100)  # cancelled is not the server's failure
    assert o["metrics"]["ttft_s"]["n"] == 90
    assert set(o["metrics"]) == {"ttft_s", "tpot_s", "itl_s", "e2e_s"}
    assert {"p50", "p90", "p95", "p99", "p99.9", "mean", "n", "ci95"} <= set(o["metrics"]["e2e_s"])


def test_throughput_window_excludes_the_cool_down_tail(sim):
    # 1 req/s for 100 s, each takes 0.2 s + 19 x 0.01 s; tokens are 20 per request.
    for i in range(101):
        sim.add(float(i), 0.2, out=20, tpot=0.01)
    o = summarize(sim.run())["overall"]
    assert o["window"]["start_s"] == 0.0 and o["window"]["end_s"] == 100.0
    assert o["req_per_s"] == pytest.approx(1.0, rel=0.02)
    assert o["output_tok_per_s"] == pytest.approx(20.0, rel=0.02)
    assert o["input_tok_per_s"] == pytest.approx(100.0, rel=0.02)
    assert "cool-down" in o["window"]["rule"]


def test_burst_falls_back_to_last_completion(sim):
    for i in range(10):
        sim.add(0.0, 0.1 * (i + 1), out=2, tpot=0.0)  # all sent at once
    o = summarize(sim.run())["overall"]
    assert o["window"]["end_s"] == pytest.approx(1.0)
    assert o["req_per_s"] == pytest.approx(10.0)
    assert "last completion" in o["window"]["rule"]


def test_itl_is_pooled_over_every_gap(sim):
    sim.add(0.0, 0.01, out=11, gaps=[0.01] * 10)
    sim.add(1.0, 0.01, out=3, gaps=[1.0, 1.0])
    o = summarize(sim.run())["overall"]
    assert o["metrics"]["itl_s"]["n"] == 12
    assert o["metrics"]["itl_s"]["p50"] == 0.01  # pooled, not a median of per-request means
    assert o["metrics"]["tpot_s"]["n"] == 2


def test_client_section_reads_the_self_check(sim):
    sim.steady(n=50)
    s = summarize(sim.run(client_check={"loop_lag_max_s": 0.004}))
    assert s["client"]["loop_lag_max_s"] == 0.004
    assert s["client"]["client_bound"] is False
    assert s["client"]["schedule_lag_p99_s"] == pytest.approx(0.0005)


def test_empty_run_summarizes_without_numbers(sim):
    s = summarize(sim.run())
    assert s["phases"] == [] and s["overall"]["requests"] == 0 and s["overall"]["req_per_s"] is None


def test_sweep_phases_are_summarized_in_order(sim):
    t = 0.0
    for phase, rate in (("rate=2", 2.0), ("rate=8", 8.0)):
        for _ in range(40):
            t += 1 / rate
            sim.add(t, 0.02, phase=phase)
    s = summarize(sim.run())
    assert [p["phase"] for p in s["phases"]] == ["rate=2", "rate=8"]
    assert s["phases"][0]["req_per_s"] == pytest.approx(2.0, rel=0.05)
    assert s["phases"][1]["req_per_s"] == pytest.approx(8.0, rel=0.05)
    assert s["overall"]["requests"] == 80


def test_no_slo_goodput_equals_throughput(sim):
    sim.steady(n=100)
    o = summarize(sim.run())["overall"]
    assert o["goodput_req_per_s"] == o["req_per_s"]


def test_server_view_from_counters_and_histograms(sim):
    for i in range(100):
        sim.add(i * 0.1, 0.02)
    for second in range(11):
        sim.metric(second, "vllm:generation_tokens_total", 200.0 * second)
        sim.metric(second, "vllm:num_requests_waiting", 3.0)
        sim.metric(second, "vllm:prefix_cache_queries_total", 100.0 * second)
        sim.metric(second, "vllm:prefix_cache_hits_total", 25.0 * second)
    server = summarize(sim.run())["server"]
    assert server["rates"]["generation_tokens_per_s"] == pytest.approx(200.0, rel=1e-9)
    assert server["gauges"]["waiting"] == {"mean": 3.0, "max": 3.0}
    assert server["prefix_cache_hit_rate"] == pytest.approx(0.25)
    assert summarize(type(sim)().steady(n=10).run())["server"] is None


def test_server_rates_are_exact_when_the_window_falls_between_scrapes() -> None:
    """A window that starts and ends mid-interval: the rate is the increase between the scrapes
    inside it over their own span, not over the whole window (which read 4/4.7 of the truth)."""
    import pandas as pd

    from servescope.analyzers.server_metrics import server_view

    rows = [{"t": float(s), "name": "vllm:generation_tokens_total", "labels": "{}", "value": 100.0 * s}
            for s in range(10)]
    view = server_view(pd.DataFrame(rows), 0.5, 5.2)
    assert view["rates"]["generation_tokens_per_s"] == pytest.approx(100.0, rel=1e-9)
    assert "generation_tokens_per_s" not in server_view(pd.DataFrame(rows), 0.5, 1.2)["rates"]
