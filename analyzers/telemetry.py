"""GPU and host telemetry of a run: utilisation, memory, power, energy per output token, CPU and network.

The samples come from whatever endpoints the run scraped (NVIDIA's DCGM
exporter, node-exporter, the reference engine's own `servescope:gpu_*`
gauges), already renamed and put in one unit per key by `ServerMetrics`.
Every figure here is None when no endpoint reported it: a run without
telemetry says nothing rather than zeros.

Energy: the GPUs' own energy counter (DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION)
over the window when it was scraped, else the power gauge integrated over the
window (trapezoids between scrapes, so a one-second scrape interval misses
only what changes within a second).
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import pandas as pd

from servescope.analyzers import charts
from servescope.analyzers.server_metrics import ServerMetrics

GIB = 2.0**30
LOOPBACK_DEVICES = ("lo",)  # node-exporter reports the loopback device too; it is not the network


def _in(series: pd.Series, t0: float | None, t1: float | None) -> pd.Series:
    if t0 is None or t1 is None:
        return series
    return series[(series.index >= t0) & (series.index <= t1)]


def host_cpu_busy(metrics: ServerMetrics) -> pd.Series:
    """Host CPU busy (%), from node-exporter's per-CPU idle seconds: 100 x (1 - idle seconds per second per CPU).

    Averaged over the hosts (sources) that report it.
    """
    sub = metrics.samples[metrics.samples["key"] == "host_cpu_seconds"]
    per_host = []
    for source, part in sub.groupby("source", sort=False):
        cpus = {json.loads(text).get("cpu") for text in part["labels"].unique()}
        idle = ServerMetrics(part).counter_total("host_cpu_seconds", where={"mode": "idle"})
        if len(idle) < 2 or not cpus:
            continue
        dt = np.diff(idle.index.to_numpy(dtype=np.float64))
        rate = np.diff(idle.to_numpy()) / np.where(dt > 0, dt, np.nan)
        per_host.append(pd.Series(np.clip(100.0 * (1.0 - rate / len(cpus)), 0.0, 100.0), index=idle.index[1:],
                                  name=str(source)))
    if not per_host:
        return pd.Series(dtype=float)
    return pd.concat(per_host, axis=1).sort_index().ffill().mean(axis=1)


def network_rate(metrics: ServerMetrics, key: str) -> pd.Series:
    """Bytes per second of `net_rx_bytes` or `net_tx_bytes`, every device but loopback."""
    sub = metrics.samples[metrics.samples["key"] == key]
    keep = np.array([json.loads(text).get("device") not in LOOPBACK_DEVICES for text in sub["labels"]], dtype=bool)
    return ServerMetrics(sub[keep]).counter_rate(key)


def energy_joules(metrics: ServerMetrics, t0: float | None, t1: float | None) -> tuple[float | None, str | None]:
    """GPU energy over [t0, t1] in joules and how it was found (`energy counter` / `power integrated`)."""
    if metrics.has("gpu_energy"):
        total = metrics.counter_total("gpu_energy")
        window = _in(total, t0, t1)
        if len(window) > 1:
            return float(window.iloc[-1] - window.iloc[0]), "energy counter"
    power = _in(metrics.gauge("gpu_power"), t0, t1).dropna()
    if len(power) > 1:
        return float(np.trapezoid(power.to_numpy(), power.index.to_numpy(dtype=np.float64))), "power integrated"
    return None, None


def telemetry_summary(metrics: ServerMetrics, t0: float | None, t1: float | None,
                      output_tokens: float | None) -> dict[str, Any] | None:
    """summary.json's `telemetry`: GPU and host figures over the measured window; None without telemetry.

    `output_tokens` are the tokens generated inside [t0, t1] (the summary's own
    throughput times its window), so energy per token divides like by like.
    """
    out: dict[str, Any] = {}

    def gauge_stats(key: str, name: str, scale: float = 1.0) -> None:
        series = _in(metrics.gauge(key), t0, t1).dropna()
        if len(series):
            out[f"{name}_mean"] = float(series.mean()) * scale
            out[f"{name}_max"] = float(series.max()) * scale

    gauge_stats("gpu_util", "gpu_util_pct")
    gauge_stats("gpu_mem_used", "gpu_mem_used_gib", 1 / GIB)
    gauge_stats("gpu_power", "gpu_power_w")
    gauge_stats("gpu_sm_clock", "gpu_sm_clock_mhz")
    gauge_stats("gpu_mem_bw_util", "gpu_mem_bw_util_pct")
    cpu = _in(host_cpu_busy(metrics), t0, t1).dropna()
    if len(cpu):
        out["host_cpu_busy_pct_mean"] = float(cpu.mean())
    for key, name in (("net_rx_bytes", "net_rx_bytes_per_s_mean"), ("net_tx_bytes", "net_tx_bytes_per_s_mean")):
        rate = _in(network_rate(metrics, key), t0, t1).dropna()
        if len(rate):
            out[name] = float(rate.mean())
    energy, how = energy_joules(metrics, t0, t1)
    if energy is not None:
        out["gpu_energy_j"] = energy
        out["gpu_energy_from"] = how
        out["energy_per_output_token_j"] = energy / output_tokens if output_tokens else None
    if out:
        out["sources"] = sorted({s for key in ("gpu_util", "gpu_mem_used", "gpu_power", "gpu_energy", "host_cpu_seconds",
                                                "net_rx_bytes") for s in metrics.sources(key)})
    return out or None


def gpu_over_time(frame: pd.DataFrame, metrics: ServerMetrics) -> dict[str, Any] | None:
    """GPU utilisation, memory and power under the latency they served, on one time axis."""
    rows = [(key, name, unit, scale) for key, name, unit, scale in (
        ("gpu_util", "GPU utilisation", "%", 1.0),
        ("gpu_mem_used", "GPU memory used", "GiB", 1 / GIB),
        ("gpu_power", "GPU power", "W", 1.0),
    ) if metrics.has(key)]
    if not rows:
        return None
    panels = len(rows) + 1
    gap = 0.06
    height = (1.0 - gap * (panels - 1)) / panels
    domain = lambda i: [round(1.0 - (i + 1) * height - i * gap, 4), round(1.0 - i * height - i * gap, 4)]  # noqa: E731
    traces: list[dict[str, Any]] = []
    ok = frame[frame["status"] == "ok"]
    if len(ok):
        end = ok["end_at"].to_numpy(dtype=np.float64)
        bins = charts.bin_count(int(np.isfinite(end).sum()), float(np.nanmax(end) - np.nanmin(end)), per_bin=20)
        centres, (ttft99,) = charts.binned_quantiles(end, ok["ttft_s"].to_numpy(dtype=np.float64), bins, (0.99,))
        _, (e2e99,) = charts.binned_quantiles(end, ok["e2e_s"].to_numpy(dtype=np.float64), bins, (0.99,))
        traces += [charts.line(centres, ttft99, "TTFT p99 (ms)", scale=1e3),
                   charts.line(centres, e2e99, "E2E p99 (ms)", scale=1e3)]
    layout: dict[str, Any] = {"height": 170 * panels, "yaxis": {"title": {"text": "latency (ms)"}, "rangemode": "tozero",
                                                                 "domain": domain(0)}}
    for i, (key, name, unit, scale) in enumerate(rows, start=1):
        axis = f"y{i + 1}"
        for source in metrics.sources(key):
            series = metrics.gauge(key, source)
            label = name if len(metrics.sources(key)) == 1 else f"{name} ({source})"
            traces.append(charts.line(series.index.to_numpy(), series.to_numpy(), f"{label} ({unit})", scale=scale,
                                      yaxis=axis))
        layout[f"yaxis{i + 1}"] = {"title": {"text": unit}, "rangemode": "tozero", "domain": domain(i), "anchor": "x"}
    layout["xaxis"] = {"title": {"text": "time in run (s)"}, "anchor": f"y{panels}"}
    return charts.figure(traces, "GPU utilisation, memory and power beside latency (by completion time)",
                         "time in run (s)", "latency (ms)", **layout)


def host_over_time(metrics: ServerMetrics) -> dict[str, Any] | None:
    """Host CPU busy and network throughput (node-exporter)."""
    traces = []
    cpu = host_cpu_busy(metrics)
    if len(cpu):
        traces.append(charts.line(cpu.index.to_numpy(), cpu.to_numpy(), "host CPU busy (%)"))
    for key, name in (("net_rx_bytes", "network received (MB/s)"), ("net_tx_bytes", "network sent (MB/s)")):
        rate = network_rate(metrics, key)
        if len(rate):
            traces.append(charts.line(rate.index.to_numpy(), rate.to_numpy(), name, scale=1e-6, yaxis="y2"))
    if not traces:
        return None
    return charts.figure(traces, "Host CPU and network (node-exporter)", "time in run (s)", "CPU busy (%)",
                         yaxis2={"title": {"text": "MB/s"}, "overlaying": "y", "side": "right"})


def run_telemetry(server_metrics: pd.DataFrame, overall: dict[str, Any]) -> dict[str, Any] | None:
    """summary.json's `telemetry` over the overall measured window (`overall` is the summary's overall group)."""
    if server_metrics.empty:
        return None
    window = overall["window"]
    tokens = (overall.get("output_tok_per_s") or 0.0) * (overall.get("duration_s") or 0.0)
    return telemetry_summary(ServerMetrics.from_frame(server_metrics), window["start_s"], window["end_s"], tokens)
