"""The live page's numbers, computed from what a run has collected so far.

The driver hands over request rows and scraped samples as they arrive (the
analyzers never import the harness); this module turns them into

- per-window figures of the requests that completed in each `WINDOW_S` window
  (TTFT / ITL / E2E p50 and p99, requests and tokens per second, errors by
  kind, the load generator's schedule lag): a window is keyed by completion
  time, so once the clock has passed it only a straggling batch can change it;
- one point per scrape of each metrics endpoint: the server's queue, running
  requests, KV usage, prefix-cache hit rate and preemptions per second since
  its previous scrape, GPU utilisation, memory and power, host CPU busy;
- the findings of the rules that can be judged on a run still going
  (`LIVE_RULES`), run by the report's own rule functions on the rows so far,
  so a finding reads here as it will in findings.json.
"""

from __future__ import annotations

import json
import math
from typing import Any

import numpy as np
import pandas as pd

from servescope.analyzers.metrics import quantile
from servescope.analyzers.server_metrics import canonical_name, is_averaged

WINDOW_S = 1.0
# The rules whose evidence is a window of time rather than the whole run's distribution.
LIVE_RULES = ("client_bound", "errors", "queueing", "preemption")
POINT_GAUGES = ("running", "waiting", "kv_usage", "prefix_hit_rate", "gpu_util", "gpu_mem_used", "gpu_power")
POINT_COUNTERS = ("preemptions", "prefix_queries", "prefix_hits", "gpu_energy")


def window_index(t: float) -> int:
    return int(math.floor(t / WINDOW_S))


def _q(values: list[float], q: float) -> float | None:
    return quantile(np.asarray(values, dtype=np.float64), q) if values else None


def window_stats(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """The figures of the requests that completed in one window (latencies in seconds)."""
    ok = [r for r in rows if r.get("status") == "ok"]
    errors: dict[str, int] = {}
    for r in rows:
        if r.get("status") not in ("ok", "cancelled"):
            kind = str(r.get("error_kind") or r.get("status") or "error")
            errors[kind] = errors.get(kind, 0) + 1
    latencies = {col: [r[col] for r in ok if r.get(col) is not None] for col in ("ttft_s", "e2e_s")}
    gaps = [g for r in ok for g in (r.get("itl_s") or ())]
    lags = [r["schedule_lag_s"] for r in rows if r.get("schedule_lag_s") is not None]
    tokens = sum(r.get("output_tokens") or 0 for r in ok)
    return {
        "completed": len(ok), "errors": errors, "req_per_s": len(ok) / WINDOW_S, "tok_per_s": tokens / WINDOW_S,
        "ttft_p50": _q(latencies["ttft_s"], 0.5), "ttft_p99": _q(latencies["ttft_s"], 0.99),
        "itl_p50": _q(gaps, 0.5), "itl_p99": _q(gaps, 0.99),
        "e2e_p50": _q(latencies["e2e_s"], 0.5), "e2e_p99": _q(latencies["e2e_s"], 0.99),
        "lag_p99": _q(lags, 0.99),
    }


def scrape_totals(rows: list[dict[str, Any]]) -> dict[str, float]:
    """One scrape of one endpoint as canonical gauges and counter totals (summed, or averaged for fractions).

    Host CPU is kept as idle seconds summed over CPUs (`cpu_idle_s`) and the CPU count (`cpus`).
    """
    sums: dict[str, float] = {}
    counts: dict[str, int] = {}
    cpus: set[str] = set()
    for row in rows:
        mapped = canonical_name(row["name"])
        if mapped is None or mapped[1]:
            continue
        key, _, scale = mapped
        value = float(row["value"]) * scale
        if key == "host_cpu_seconds":
            labels = json.loads(row["labels"]) if isinstance(row["labels"], str) else row["labels"]
            if labels.get("mode") == "idle":
                cpus.add(str(labels.get("cpu")))
                sums["cpu_idle_s"] = sums.get("cpu_idle_s", 0.0) + value
            continue
        if key in POINT_GAUGES or key in POINT_COUNTERS:
            sums[key] = sums.get(key, 0.0) + value
            counts[key] = counts.get(key, 0) + 1
    totals = {key: (value / counts[key] if is_averaged(key) and counts.get(key) else value) for key, value in sums.items()}
    if cpus:
        totals["cpus"] = float(len(cpus))
    return totals


def scrape_point(t: float, totals: dict[str, float], previous: tuple[float, dict[str, float]] | None) -> dict[str, Any]:
    """A live point: the gauges as scraped, counters as rates since the endpoint's previous scrape."""
    point: dict[str, Any] = {"t": t, **{k: totals[k] for k in POINT_GAUGES if k in totals}}
    if previous is None:
        return point
    t0, before = previous
    dt = t - t0
    if dt <= 0:
        return point

    def delta(key: str) -> float | None:
        if key not in totals or key not in before:
            return None
        change = totals[key] - before[key]
        return totals[key] if change < 0 else change  # a counter reset: the new value is the increase

    preempted = delta("preemptions")
    if preempted is not None:
        point["preemptions_per_s"] = preempted / dt
    queries, hits = delta("prefix_queries"), delta("prefix_hits")
    if queries and hits is not None:
        point["prefix_hit_rate"] = hits / queries
    idle = delta("cpu_idle_s")
    if idle is not None and totals.get("cpus"):
        point["host_cpu_busy"] = max(0.0, min(100.0, 100.0 * (1.0 - idle / dt / totals["cpus"])))
    energy = delta("gpu_energy")
    if energy is not None and "gpu_power" not in point:
        point["gpu_power"] = energy / dt
    return point


def live_findings(rows: list[dict[str, Any]], samples: list[dict[str, Any]], run: dict[str, Any]) -> list[Any]:
    """The LIVE_RULES' findings on the rows and samples so far (the report's Finding objects, ranked)."""
    from servescope.analyzers.context import build_context
    from servescope.analyzers.rules import run_rules
    from servescope.rundir.reader import RunData, requests_from_records
    from servescope.rundir.schema import SERVER_METRIC_COLUMNS

    if not rows:
        return []
    frame = pd.DataFrame.from_records(samples, columns=list(SERVER_METRIC_COLUMNS))
    return run_rules(build_context(RunData(run, requests_from_records(rows), frame)), LIVE_RULES)


def one_liner(finding: dict[str, Any]) -> str:
    """How the console prints a finding as it fires: `finding [high] queueing: <title>`."""
    return f"finding [{finding['severity']}] {finding['rule']}: {finding['title']}"
