"""Flows of scripted users: the numbers of summary.json's `flows` block and of flow SLOs.

A flow is one task invocation of a scripted user (`flows.parquet`, one row
each): what the user waited for, end to end, however many calls it made.
Duration percentiles use the flows that ended `ok`, as request latencies use
the successful requests: a flow cut short by a failed call or a raising script
is fast for the wrong reason. The flow error rate is the share of flows that
did not end `ok` (a failed call or a script error), over every flow but the
`cancelled` ones (the run stopped those, the server did not fail them).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd

from servescope.analyzers.metrics import describe
from servescope.rundir.schema import FLOW_STATUSES

WARMUP_PHASE = "warmup"
SCRIPT_ERROR_ROWS = 10  # distinct (type, location) of script errors listed per group
FLOW_DURATION_METRIC = "flow_duration_s"  # the SLO metric names (servescope.slo) these figures answer
FLOW_ERROR_METRIC = "flow_error_rate"


def measured_flows(flows: pd.DataFrame) -> pd.DataFrame:
    """Flows outside the warm-up phase."""
    return flows[flows["phase"].fillna("") != WARMUP_PHASE]


def flow_error_rate(flows: pd.DataFrame) -> tuple[float | None, int]:
    """(share of judged flows that did not end ok, judged flows); None when none was judged."""
    status = flows["status"].fillna("error")
    judged = int((status != "cancelled").sum())
    failed = int(((status != "ok") & (status != "cancelled")).sum())
    return (failed / judged if judged else None), judged


def _mean(values: pd.Series) -> float | None:
    arr = values.to_numpy(dtype=np.float64)
    arr = arr[np.isfinite(arr)]
    return float(arr.mean()) if arr.size else None


def script_errors(flows: pd.DataFrame) -> list[dict[str, Any]]:
    """The script errors by exception type and script location, most frequent first, with one message each."""
    raised = flows[flows["status"] == "script_error"]
    if raised.empty:
        return []
    keys = raised[["error_type", "error_location"]].astype(object).where(raised[["error_type", "error_location"]].notna(), "unknown")
    grouped = raised.assign(_type=keys["error_type"], _where=keys["error_location"]).groupby(["_type", "_where"], sort=False)
    rows = [{"error_type": str(t), "error_location": str(w), "count": int(len(g)),
             "message": next((str(m) for m in g["error_message"] if isinstance(m, str) and m), None)}
            for (t, w), g in grouped]
    rows.sort(key=lambda r: (-r["count"], r["error_type"], r["error_location"]))
    return rows[:SCRIPT_ERROR_ROWS]


def flow_group(flows: pd.DataFrame, *, with_ci: bool = True) -> dict[str, Any]:
    """One group of flows: counts by status, error rate, duration distribution, calls and tokens per flow."""
    status = flows["status"].fillna("error")
    counts = {s: int((status == s).sum()) for s in FLOW_STATUSES}
    rate, judged = flow_error_rate(flows)
    ok = flows[status == "ok"]
    return {
        "flows": int(len(flows)),
        "status": counts,
        "error_rate": rate,
        "judged": judged,
        "duration_s": describe(ok["duration_s"].to_numpy(dtype=np.float64), with_ci=with_ci),
        "calls_per_flow": _mean(flows["calls"]),
        "failed_calls": int(np.nansum(flows["failed_calls"].to_numpy(dtype=np.float64))),
        "prompt_tokens_per_flow": _mean(ok["prompt_tokens"]),
        "output_tokens_per_flow": _mean(ok["output_tokens"]),
        "script_errors": script_errors(flows),
    }


def task_groups(flows: pd.DataFrame) -> list[dict[str, Any]]:
    """`flow_group` per (user class, task), in name order."""
    keys = flows[["user_class", "task"]].astype(object).where(flows[["user_class", "task"]].notna(), "?")
    out = []
    for (user_class, task), group in flows.groupby([keys["user_class"], keys["task"]], sort=True):
        out.append({"user_class": str(user_class), "task": str(task), **flow_group(group, with_ci=False)})
    return out


def flow_phase(flows: pd.DataFrame, name: str) -> dict[str, Any]:
    """A phase's (or the overall set's) flows block entry: the group and its tasks."""
    return {"phase": name, **flow_group(flows), "tasks": task_groups(flows)}


def flows_summary(flows: pd.DataFrame, phases: list[str]) -> dict[str, Any] | None:
    """summary.json's `flows`: per phase (in `phases`' order) and overall (every phase but warm-up); None without flows."""
    if flows.empty:
        return None
    key = flows["phase"].fillna("")
    ordered = [p for p in phases if (key == p).any()] + sorted(set(key) - set(phases))
    return {
        "phases": [flow_phase(flows[key == p], p or "all") for p in ordered],
        "overall": flow_phase(measured_flows(flows), "overall"),
    }


def flow_slo_metrics(flows: pd.DataFrame) -> dict[str, dict[str, Any]]:
    """What the flow SLOs are judged on, keyed like `servescope.slo` metrics (empty flows: no samples)."""
    rate, judged = flow_error_rate(flows)
    ok = flows[flows["status"].fillna("error") == "ok"]
    return {
        FLOW_DURATION_METRIC: describe(ok["duration_s"].to_numpy(dtype=np.float64), with_ci=False),
        FLOW_ERROR_METRIC: {"rate": rate, "n": judged},
    }
