"""Rule `client_bound`: the load generator itself was too slow to measure the server faithfully.

When it fires, every other finding is marked less certain (see `analyzers.rules.diagnose`).
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from servescope.analyzers import charts
from servescope.analyzers.context import DiagnosisContext
from servescope.analyzers.findings import Finding
from servescope.analyzers.loadgen_nodes import node_label
from servescope.analyzers.rules.common import effect_ratio, ms, ratio


def client_bound(ctx: DiagnosisContext) -> Finding | None:
    health = ctx.client
    if not health.get("client_bound"):
        return None
    frame = ctx.frame
    lagging = health.get("behind") or []
    names = ", ".join(unit["label"] for unit in lagging)
    return Finding(
        rule="client_bound",
        severity="high",
        title=(f"The load generator could not keep up on {names}: its requests include its own delay" if lagging
               else "The load generator could not keep up: latencies include its own delay"),
        summary=(
            "The client sent requests late or its event loop stalled: "
            + "; ".join(health.get("reasons", []))
            + ". Measured latencies include this delay and the offered load was lower than asked, "
            "so every other finding here is less certain."
        ),
        evidence={
            "schedule_lag_p50_s": health.get("schedule_lag_p50_s"),
            "schedule_lag_p99_s": health.get("schedule_lag_p99_s"),
            "loop_lag_max_s": health.get("loop_lag_max_s"),
            "lag_limit_s": health.get("lag_limit_s"),
            "n": int(len(frame)),
            "behind": lagging,
            "effect": effect_ratio(ratio(health.get("schedule_lag_p99_s"), health.get("lag_limit_s")),
                                   ratio(health.get("loop_lag_p99_s"), health.get("loop_lag_p99_limit_s")),
                                   ratio(health.get("loop_lag_max_s"), health.get("loop_lag_max_limit_s")),
                                   *(ratio(unit.get("schedule_lag_p99_s"), health.get("lag_limit_s")) for unit in lagging)),
        },
        suggestion=(
            (f"Give {names} fewer workers or a lighter share of the load, or add nodes (--workers, the Ray cluster's CPUs); "
             if lagging and lagging[0].get("node") is not None else
             "Run with more worker processes (--workers), fewer concurrent streams per worker, or on a less loaded machine; ")
            + f"the lag should stay under {ms(health.get('lag_limit_s'))}."
        ),
        chart=_lag_chart(frame, len(health.get("nodes") or []) > 1),
    )


def _lag_chart(frame: pd.DataFrame, per_node: bool) -> dict | None:
    """Schedule lag over the run; one trace per node when the run spans several."""
    lag = frame["schedule_lag_s"].to_numpy(dtype=np.float64)
    if not np.isfinite(lag).any():
        return None
    scheduled = frame["scheduled_at"].to_numpy(dtype=np.float64)
    if per_node:
        keys = frame["node"].fillna("").astype(str).to_numpy()
        traces = [charts.scatter(scheduled[keys == key], lag[keys == key], node_label(key or None), scale=1e3)
                  for key in dict.fromkeys(keys)]
    else:
        traces = [charts.scatter(scheduled, lag, "schedule lag", scale=1e3)]
    return charts.figure(traces, "Load generator schedule lag", "scheduled time in run (s)", "lag (ms)")
