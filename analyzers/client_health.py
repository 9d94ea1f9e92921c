"""Is the load generator itself distorting the numbers?

A load generator that sends late (schedule lag) or whose event loop stalls
(loop lag) adds its own delay to every latency it measures and lowers the
offered rate. run.json carries the workers' self-check; the requests carry
each one's schedule lag. Thresholds are relative to the latencies measured, so
a 5 ms lag is harmless against 2 s TTFTs and fatal against 20 ms ones.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd

from servescope.analyzers.loadgen_nodes import LagLimits, behind, generator_units, lag_reasons
from servescope.analyzers.metrics import quantile

# Schedule lag shifts when load arrives (the offered rate), event-loop lag delays
# the timestamps themselves. This is the one place the verdict is made: `servescope
# run` copies it into run.json's client_check. Above a floor, a lag only distorts the numbers when it
# is a visible share of the latencies measured (a fraction of the median TTFT).
# A single loop stall delays one timestamp, so the loop's p99 is judged, and its
# maximum only when one stall outlasts a typical TTFT.
SCHEDULE_LAG_FLOOR_S = 0.010
LOOP_LAG_P99_FLOOR_S = 0.010
LOOP_LAG_MAX_FLOOR_S = 0.200
LAG_SHARE_OF_TTFT = 0.10

_RUN_JSON_SECTIONS = ("client", "client_check", "self_check", "client_self_check")


def client_self_check(run: dict[str, Any]) -> dict[str, Any]:
    """The self-check section of run.json, whichever name the writer gave it ({} if none)."""
    for key in _RUN_JSON_SECTIONS:
        section = run.get(key)
        if isinstance(section, dict):
            return section
    return {}


def _first_number(section: dict[str, Any], *keys: str) -> float | None:
    for key in keys:
        value = section.get(key)
        if isinstance(value, (int, float)) and np.isfinite(value):
            return float(value)
    return None


def client_health(run: dict[str, Any], measured: pd.DataFrame, chunks: np.ndarray | None = None) -> dict[str, Any]:
    """`{"schedule_lag_p99_s", "loop_lag_max_s", "client_bound", "nodes", "workers", "behind", ...}`.

    For summary.json and the client_bound rule. `chunks`: each measured row's ITL
    gap count (counted from `itl_s` when not given). The run is client-bound when
    its own figures are over the limits or when one node (or, on one machine, one
    worker) is: `behind` names those, each with its reasons.
    """
    check = client_self_check(run)
    lag = measured["schedule_lag_s"].to_numpy(dtype=np.float64) if len(measured) else np.empty(0)
    lag_p99 = quantile(lag, 0.99)
    if lag_p99 is None:
        lag_p99 = _first_number(check, "schedule_lag_p99_s", "schedule_lag_p99")
    loop_max = _first_number(check, "loop_lag_max_s", "max_loop_lag_s", "event_loop_lag_max_s", "loop_lag_max")
    loop_p99 = _first_number(check, "loop_lag_p99_s", "loop_lag_p99")
    ttft = measured.loc[measured["status"] == "ok", "ttft_s"].to_numpy(dtype=np.float64) if len(measured) else np.empty(0)
    ttft_p50 = quantile(ttft, 0.5) or 0.0
    limits = LagLimits(schedule_p99_s=max(SCHEDULE_LAG_FLOOR_S, LAG_SHARE_OF_TTFT * ttft_p50),
                       loop_p99_s=max(LOOP_LAG_P99_FLOOR_S, LAG_SHARE_OF_TTFT * ttft_p50),
                       loop_max_s=max(LOOP_LAG_MAX_FLOOR_S, ttft_p50))
    reasons = lag_reasons(lag_p99, loop_p99, loop_max, limits)
    per_worker = check.get("per_worker") if isinstance(check.get("per_worker"), list) else []
    units = generator_units(run, measured, chunks, limits, per_worker)
    lagging = behind(units, run_wide=bool(reasons))
    reasons += [f"{unit['label']}: {'; '.join(unit['reasons'])}" for unit in lagging]
    return {
        "schedule_lag_p50_s": quantile(lag, 0.5),
        "schedule_lag_p99_s": lag_p99,
        "schedule_lag_n": int(np.isfinite(lag).sum()),
        "loop_lag_p99_s": loop_p99,
        "loop_lag_max_s": loop_max,
        "lag_limit_s": limits.schedule_p99_s,
        "loop_lag_p99_limit_s": limits.loop_p99_s,
        "loop_lag_max_limit_s": limits.loop_max_s,
        "client_bound": bool(reasons),
        "reasons": reasons,
        "behind": lagging,
        **units,
        "self_check": check,
    }
