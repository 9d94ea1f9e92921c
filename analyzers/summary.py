"""`summarize(run, slos) -> dict`: the numbers of summary.json (shape in docs/internals.md).

Measurement window (throughput and goodput), per phase:
  start = the first send of the phase; end = the last send of the phase.
  Only completions and tokens inside [start, end] count. Before the last send
  the offered load is still fully applied; after it the server drains and
  in-flight drops, so that cool-down tail would understate throughput. Warm-up
  is its own phase (`warmup`) and never counted in `overall`.
  Fallback: when that window is degenerate (everything sent in a burst, or it
  holds fewer than 3 completions or under 10% of them) the window runs to the
  last completion instead, and says so in `window.rule`.
Output tokens count in proportion to how much of each request's generation
interval [first_token_at, end_at] lies inside the window; input tokens count
when the prefill finished (first token) inside it.
Latency percentiles use every successful request of the group (ITL pools every
gap of every request); error rate excludes `cancelled` (the harness stopped
those, the server did not fail them).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd

from servescope.analyzers.client_health import client_health
from servescope.analyzers.flows import flow_slo_metrics, flows_summary, measured_flows
from servescope.analyzers.from_scheduled import from_scheduled, from_scheduled_columns, open_loop_mask
from servescope.analyzers.metrics import describe
from servescope.analyzers.server_metrics import server_view
from servescope.analyzers.telemetry import run_telemetry
from servescope.rundir.reader import RunData
from servescope.slo import SCHEDULED_METRICS, SLO, evaluate, requests_meeting, slos_from_run

WARMUP_PHASE = "warmup"
LATENCY_COLUMNS = ("ttft_s", "tpot_s", "e2e_s")
MIN_WINDOW_COMPLETIONS = 3
MIN_WINDOW_FRACTION = 0.10


def servescope_version() -> str:
    from servescope.version import __version__

    return __version__


def phase_names(frame: pd.DataFrame) -> list[str]:
    """Phases in the order they ran (by first send)."""
    if frame.empty:
        return []
    first = frame.groupby(frame["phase"].fillna(""), sort=False)["sent_at"].min().sort_values(na_position="last")
    return [str(p) for p in first.index]


def measured_mask(frame: pd.DataFrame) -> np.ndarray:
    """Rows outside the warm-up phase."""
    return (frame["phase"].fillna("") != WARMUP_PHASE).to_numpy()


def measurement_window(frame: pd.DataFrame) -> dict[str, Any]:
    """`{"start_s", "end_s", "rule"}` of a group of requests (see the module docstring)."""
    sent = frame["sent_at"].to_numpy(dtype=np.float64)
    end = frame["end_at"].to_numpy(dtype=np.float64)
    if not np.isfinite(sent).any():
        return {"start_s": None, "end_s": None, "rule": "no request was sent"}
    start, last_sent = float(np.nanmin(sent)), float(np.nanmax(sent))
    ok = (frame["status"] == "ok").to_numpy()
    inside = int(np.sum(ok & (end >= start) & (end <= last_sent)))
    if last_sent > start and inside >= max(MIN_WINDOW_COMPLETIONS, MIN_WINDOW_FRACTION * ok.sum()):
        return {"start_s": start, "end_s": last_sent, "rule": "first send to last send (cool-down tail excluded)"}
    last_end = float(np.nanmax(end)) if np.isfinite(end).any() else last_sent
    return {"start_s": start, "end_s": max(last_end, start), "rule": "first send to last completion (too few completions before the last send)"}


def _throughput(frame: pd.DataFrame, window: dict[str, Any], meets: np.ndarray) -> dict[str, Any]:
    start, stop = window["start_s"], window["end_s"]
    duration = (stop - start) if start is not None else 0.0
    if not duration or duration <= 0:
        return {"duration_s": 0.0, "req_per_s": None, "output_tok_per_s": None, "input_tok_per_s": None, "goodput_req_per_s": None}
    end = frame["end_at"].to_numpy(dtype=np.float64)
    first = frame["first_token_at"].to_numpy(dtype=np.float64)
    ok = (frame["status"] == "ok").to_numpy()
    done_inside = (end >= start) & (end <= stop)
    # Share of each request's generation interval inside the window.
    gen_start = np.where(np.isfinite(first), first, end)
    span = end - gen_start
    overlap = np.clip(np.minimum(end, stop) - np.maximum(gen_start, start), 0, None)
    share = np.where(span > 0, overlap / np.where(span > 0, span, 1), ((end >= start) & (end <= stop)).astype(float))
    out_tokens = np.nan_to_num(frame["output_tokens"].to_numpy(dtype=np.float64))
    prompt = np.nan_to_num(frame["prompt_tokens"].to_numpy(dtype=np.float64))
    prefilled = np.isfinite(first) & (first >= start) & (first <= stop)
    return {
        "duration_s": float(duration),
        "req_per_s": float(np.sum(ok & done_inside) / duration),
        "output_tok_per_s": float(np.sum(np.nan_to_num(share) * out_tokens) / duration),
        "input_tok_per_s": float(np.sum(prompt[prefilled]) / duration),
        "goodput_req_per_s": float(np.sum(meets & done_inside) / duration),
    }


def summarize_group(run: RunData, mask: np.ndarray, name: str, slos: list[SLO], meets: np.ndarray,
                    flows: pd.DataFrame | None = None, open_loop: np.ndarray | None = None) -> dict[str, Any]:
    """One phase (or the overall measured set): counts, rates, latency distributions, SLO verdict.

    `flows` are the group's scripted-user flows (the flow SLOs are judged on them); `open_loop`
    marks the rows of open-loop phases (their latencies from the scheduled time are added).
    """
    frame = run.requests.loc[mask]
    status = frame["status"].fillna("error")
    ok_rows = (status == "ok").to_numpy()
    failed = frame.loc[~ok_rows]
    kinds = failed["error_kind"].where(failed["error_kind"].notna(), failed["status"]).fillna("error")
    errors = {str(k): int(v) for k, v in kinds.value_counts().sort_index().items()}
    judged = int((status != "cancelled").sum())
    failures = int(((status != "ok") & (status != "cancelled")).sum())
    error_rate = failures / judged if judged else 0.0
    ok_frame = frame.loc[ok_rows]
    metrics = {col: describe(ok_frame[col].to_numpy(dtype=np.float64)) for col in LATENCY_COLUMNS}
    metrics["itl_s"] = describe(run.pooled_itl(mask & (run.requests["status"] == "ok").to_numpy()))
    metrics = {key: metrics[key] for key in ("ttft_s", "tpot_s", "itl_s", "e2e_s")}
    window = measurement_window(frame)
    group: dict[str, Any] = {
        "phase": name,
        "requests": int(len(frame)),
        "ok": int(ok_rows.sum()),
        "errors": errors,
        "error_rate": error_rate,
        **_throughput(frame, window, meets[mask]),
        "window": window,
        "metrics": metrics,
    }
    if open_loop is not None and (scheduled := from_scheduled(ok_frame, open_loop[mask][ok_rows])) is not None:
        group["from_scheduled"] = scheduled
    if slos:
        judged = metrics | flow_slo_metrics(run.flows.iloc[:0] if flows is None else flows)
        if any(slo.metric in SCHEDULED_METRICS for slo in slos):  # every loop kind: from the intended send
            judged |= {column: describe(values) for column, values in from_scheduled_columns(ok_frame).items()}
        group["slo"] = evaluate(slos, judged, error_rate)
    return group


def summarize(run: RunData, slos: list[SLO] | None = None) -> dict[str, Any]:
    """summary.json: per phase and overall (every phase but `warmup`). SLOs default to run.json's."""
    if slos is None:
        slos = slos_from_run(run.run)
    frame = run.requests
    meets = requests_meeting(slos, frame, run.itl_max) if len(frame) else np.zeros(0, bool)
    phases_key = frame["phase"].fillna("").to_numpy() if len(frame) else np.empty(0, dtype=object)
    flow_phase = run.flows["phase"].fillna("")
    open_loop = open_loop_mask(run.run, frame) if len(frame) else np.zeros(0, bool)
    phases = [
        summarize_group(run, phases_key == name, name or "all", slos, meets, run.flows[flow_phase == name], open_loop)
        for name in phase_names(frame)
    ]
    measured = measured_mask(frame) if len(frame) else np.zeros(0, bool)
    overall = summarize_group(run, measured, "overall", slos, meets, measured_flows(run.flows), open_loop)
    summary: dict[str, Any] = {
        "servescope_version": servescope_version(),
        "status": run.run.get("status", "unknown"),
        "phases": phases,
        "overall": overall,
        "slo": overall.get("slo") if slos else {"ok": True, "objectives": []},
        "client": {k: v for k, v in client_health(run.run, frame.loc[measured], run.itl_lengths[measured]).items() if k != "self_check"},
        "server": server_view(run.server_metrics, overall["window"]["start_s"], overall["window"]["end_s"]),
        "telemetry": run_telemetry(run.server_metrics, overall),
        "flows": flows_summary(run.flows, phase_names(frame)),
    }
    return summary
