"""Time-series charts of a run: latency, GPU, throughput, queue, KV usage, cache hits, preemptions, acceptance, host.

Client-side series come from the requests (always available); server-side ones
from the scraped metrics when the target exposes them. Each function returns a
plotly figure dict, or None when it has nothing to draw.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd

from servescope.analyzers import charts
from servescope.analyzers.server_metrics import ServerMetrics


def _bins(t: np.ndarray, per_bin: int, min_width_s: float = 0.5) -> int:
    t = t[np.isfinite(t)]
    span = float(t.max() - t.min()) if t.size else 0.0
    return charts.bin_count(t.size, span, per_bin=per_bin, min_width_s=min_width_s)


def _ratio(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    return np.where(den > 0, num / np.where(den > 0, den, 1), np.nan)


def latency_over_time(frame: pd.DataFrame) -> dict[str, Any] | None:
    ok = frame[frame["status"] == "ok"]
    if ok.empty:
        return None
    sent = ok["sent_at"].to_numpy(dtype=np.float64)
    ttft = ok["ttft_s"].to_numpy(dtype=np.float64)
    bins = _bins(sent, per_bin=20)
    centres, (p50, p99) = charts.binned_quantiles(sent, ttft, bins, (0.5, 0.99))
    _, (e2e99,) = charts.binned_quantiles(sent, ok["e2e_s"].to_numpy(dtype=np.float64), bins, (0.99,))
    return charts.figure(
        [
            charts.scatter(sent, ttft, "TTFT per request (sampled)", scale=1e3),
            charts.line(centres, p50, "TTFT p50", scale=1e3),
            charts.line(centres, p99, "TTFT p99", scale=1e3),
            charts.line(centres, e2e99, "E2E p99", scale=1e3, visible="legendonly"),
        ],
        "Latency over time (by send time)", "time in run (s)", "ms",
    )


def throughput_over_time(frame: pd.DataFrame) -> dict[str, Any] | None:
    ok = frame[frame["status"] == "ok"]
    if ok.empty:
        return None
    end = ok["end_at"].to_numpy(dtype=np.float64)
    bins = _bins(end, per_bin=10, min_width_s=1.0)
    x, req_rate = charts.rate_per_bin(end, None, bins)
    _, tok_rate = charts.rate_per_bin(end, ok["output_tokens"].to_numpy(dtype=np.float64), bins)
    return charts.figure(
        [charts.line(x, req_rate, "completed req/s"), charts.line(x, tok_rate, "output tok/s", yaxis="y2")],
        "Throughput over time (by completion time)", "time in run (s)", "req/s",
        yaxis2={"title": {"text": "tok/s"}, "overlaying": "y", "side": "right"},
    )


def queue_over_time(frame: pd.DataFrame, metrics: ServerMetrics) -> dict[str, Any] | None:
    sent = np.sort(frame["sent_at"].dropna().to_numpy(dtype=np.float64))
    end = np.sort(frame["end_at"].dropna().to_numpy(dtype=np.float64))
    if sent.size == 0:
        return None
    grid = np.linspace(sent[0], end[-1] if end.size else sent[-1], 300)
    traces = [charts.line(grid, np.searchsorted(sent, grid, "right") - np.searchsorted(end, grid, "right"), "in flight (client)")]
    for key, name in (("running", "running (server)"), ("waiting", "waiting (server)")):
        series = metrics.gauge(key)
        if len(series):
            traces.append(charts.line(series.index.to_numpy(), series.to_numpy(), name))
    return charts.figure(traces, "Requests in flight and server queue", "time in run (s)", "requests")


def server_gauges(metrics: ServerMetrics) -> dict[str, Any] | None:
    """KV cache usage and preemption rate, the two faces of memory pressure."""
    traces = []
    kv = metrics.gauge("kv_usage")
    if len(kv):
        traces.append(charts.line(kv.index.to_numpy(), kv.to_numpy() * 100, "KV cache usage (%)"))
    preempt = metrics.counter_rate("preemptions")
    if len(preempt):
        traces.append(charts.line(preempt.index.to_numpy(), preempt.to_numpy(), "preemptions/s", yaxis="y2"))
    if not traces:
        return None
    return charts.figure(traces, "KV cache usage and preemptions (server)", "time in run (s)", "KV usage (%)",
                         yaxis2={"title": {"text": "preemptions/s"}, "overlaying": "y", "side": "right"})


def cache_and_acceptance(frame: pd.DataFrame, metrics: ServerMetrics) -> dict[str, Any] | None:
    """Prefix-cache hit rate and speculative acceptance per time bin, from the requests (server as fallback)."""
    traces = []
    ok = frame[frame["status"] == "ok"]
    sent = ok["sent_at"].to_numpy(dtype=np.float64)
    bins = _bins(sent, per_bin=20)
    cached = ok["cached_tokens"].to_numpy(dtype=np.float64)
    known = np.isfinite(cached)
    if known.any() and (cached[known] > 0).any():  # a cache that never hit is said by the prefix_cache rule, not a flat line
        x, hits = charts.rate_per_bin(sent[known], (cached[known] > 0).astype(float), bins)
        _, total = charts.rate_per_bin(sent[known], None, bins)
        traces.append(charts.line(x, _ratio(hits, total) * 100, "prefix-cache hit rate (%)"))
    elif metrics.counter_increase("prefix_hits") > 0:
        q, h = metrics.counter_rate("prefix_queries"), metrics.counter_rate("prefix_hits")
        traces.append(charts.line(q.index.to_numpy(), (h.reindex(q.index) / q.replace(0, np.nan)).to_numpy() * 100, "prefix-cache hit rate (%, server)"))
    draft = ok["spec_draft_tokens"].to_numpy(dtype=np.float64)
    if np.nansum(draft) > 0:
        x, acc = charts.rate_per_bin(sent, ok["spec_accepted_tokens"].to_numpy(dtype=np.float64), bins)
        _, dr = charts.rate_per_bin(sent, draft, bins)
        traces.append(charts.line(x, _ratio(acc, dr) * 100, "spec acceptance (%)"))
    if not traces:
        return None
    return charts.figure(traces, "Prefix-cache hit rate and speculative acceptance", "time in run (s)", "%")


def all_time_series(frame: pd.DataFrame, metrics: ServerMetrics) -> list[tuple[str, dict[str, Any]]]:
    from servescope.analyzers.telemetry import gpu_over_time, host_over_time

    figures = [
        ("latency", latency_over_time(frame)),
        ("gpu", gpu_over_time(frame, metrics)),
        ("throughput", throughput_over_time(frame)),
        ("queue", queue_over_time(frame, metrics)),
        ("kv", server_gauges(metrics)),
        ("cache", cache_and_acceptance(frame, metrics)),
        ("host", host_over_time(metrics)),
    ]
    return [(name, fig) for name, fig in figures if fig is not None]
