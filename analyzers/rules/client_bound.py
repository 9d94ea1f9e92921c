"""Rule `client_bound`: the load generator itself was too slow to measure the server faithfully.

When it fires, every other finding is marked less certain (see `analyzers.rules.diagnose`).
"""

from __future__ import annotations

import numpy as np

from servescope.analyzers import charts
from servescope.analyzers.context import DiagnosisContext
from servescope.analyzers.findings import Finding
from servescope.analyzers.rules.common import effect_ratio, ms, ratio


def client_bound(ctx: DiagnosisContext) -> Finding | None:
    health = ctx.client
    if not health.get("client_bound"):
        return None
    frame = ctx.frame
    lag = frame["schedule_lag_s"].to_numpy(dtype=np.float64)
    chart = None
    if np.isfinite(lag).any():
        chart = charts.figure(
            [charts.scatter(frame["scheduled_at"].to_numpy(dtype=np.float64), lag, "schedule lag", scale=1e3)],
            "Load generator schedule lag", "scheduled time in run (s)", "lag (ms)",
        )
    return Finding(
        rule="client_bound",
        severity="high",
        title="The load generator could not keep up: latencies include its own delay",
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
            "effect": effect_ratio(ratio(health.get("schedule_lag_p99_s"), health.get("lag_limit_s")),
                                   ratio(health.get("loop_lag_p99_s"), health.get("loop_lag_p99_limit_s")),
                                   ratio(health.get("loop_lag_max_s"), health.get("loop_lag_max_limit_s"))),
        },
        suggestion=(
            f"Run with more worker processes (--workers), fewer concurrent streams per worker, or on a less "
            f"loaded machine; the lag should stay under {ms(health.get('lag_limit_s'))}."
        ),
        chart=chart,
    )
