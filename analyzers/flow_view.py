"""The report's Flows section: call latency by user class, task and step, and its charts.

Task-level figures (flow durations, calls and tokens per flow, errors) come
from summary.json's `flows` block (`analyzers.flows`), so the HTML and the
JSON agree. This module adds what only the report shows: each task's calls
sliced by step (does the third call of an agent loop get slower as its
context grows, does it hit the prefix cache) and four charts.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd

from servescope.analyzers import charts
from servescope.analyzers.flow_parts import step_label
from servescope.analyzers.metrics import MIN_SAMPLES, describe

LATENCIES = ("ttft_s", "tpot_s", "e2e_s")
# One legend row per trace or two: room below the step axis for a few tasks' entries.
# One colour per task in the step charts; its second series (p99, cached tokens) is dotted.
TASK_COLORS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22", "#17becf")
STEP_CHART_LAYOUT = {"height": 400, "legend": {"orientation": "h", "y": -0.3}, "margin": {"l": 60, "r": 20, "t": 40, "b": 60}}


def _call_row(calls: pd.DataFrame, step: str) -> dict[str, Any]:
    """One row of the step table: counts, latency distributions of the ok calls, prompt and cache figures."""
    ok = calls[calls["status"] == "ok"]
    prompt = calls["prompt_tokens"].to_numpy(dtype=np.float64)
    cached = calls["cached_tokens"].to_numpy(dtype=np.float64)
    known = np.isfinite(cached) & np.isfinite(prompt)
    row: dict[str, Any] = {
        "step": step,
        "n": int(len(calls)),
        "errors": int(((calls["status"] != "ok") & (calls["status"] != "cancelled")).sum()),
        **{col: describe(ok[col].to_numpy(dtype=np.float64), with_ci=False) for col in LATENCIES},
        "prompt_tokens_p50": float(np.median(prompt[np.isfinite(prompt)])) if np.isfinite(prompt).any() else None,
        "cached_tokens_p50": float(np.median(cached[known])) if known.any() else None,
        "cached_share": float(cached[known].sum() / prompt[known].sum()) if known.any() and prompt[known].sum() > 0 else None,
        "cache_hit_share": float((cached[known] > 0).mean()) if known.any() else None,
        "low_n": len(ok) < MIN_SAMPLES,
    }
    return row


def step_tables(frame: pd.DataFrame) -> list[dict[str, Any]]:
    """Per (user class, task): its calls by step, and all its calls together."""
    calls = frame[frame["flow_id"].notna()]
    if calls.empty:
        return []
    keys = calls[["user_class", "task"]].astype(object).where(calls[["user_class", "task"]].notna(), "?")
    tables = []
    for (user_class, task), group in calls.groupby([keys["user_class"], keys["task"]], sort=True):
        steps = group["step"].to_numpy(dtype=np.float64)
        rows = [_call_row(group[steps == s], step_label(s)) for s in np.unique(steps[np.isfinite(steps)])]
        if not np.isfinite(steps).all():
            rows.append(_call_row(group[~np.isfinite(steps)], "no step"))
        tables.append({"user_class": str(user_class), "task": str(task), "rows": rows, "all": _call_row(group, "all")})
    return tables


def _task_name(entry: dict[str, Any]) -> str:
    return f"{entry['user_class']}.{entry['task']}"


def duration_chart(tasks: list[dict[str, Any]]) -> dict[str, Any] | None:
    """Flow duration p50 and p99 per task (ok flows)."""
    shown = [t for t in tasks if t["duration_s"]["n"]]
    if not shown:
        return None
    names = [f"{_task_name(t)} (n={t['duration_s']['n']})" for t in shown]
    return charts.figure(
        [charts.bar(names, [1e3 * t["duration_s"]["p50"] for t in shown], "p50"),
         charts.bar(names, [1e3 * t["duration_s"]["p99"] for t in shown], "p99")],
        "Flow duration by task (successful flows)", "user class.task", "ms", barmode="group",
    )


def _line(task_index: int, dash: str) -> dict[str, str]:
    return {"color": TASK_COLORS[task_index % len(TASK_COLORS)], "dash": dash}


def _step_numbers(table: dict[str, Any]) -> tuple[list[float], list[dict[str, Any]]]:
    rows = [r for r in table["rows"] if r["step"].startswith("step ") and r["step"][5:].isdigit()]
    return [float(r["step"][5:]) for r in rows], rows


def step_latency_chart(tables: list[dict[str, Any]], key: str, label: str) -> dict[str, Any] | None:
    """p50 and p99 of one latency (`key`) of each task's calls by step: does a later call of a flow get slower?"""
    traces = []
    for i, table in enumerate(tables):
        x, rows = _step_numbers(table)
        if len(x) < 2:
            continue
        for stat, dash in (("p50", "solid"), ("p99", "dot")):
            y = [r[key][stat] if r[key]["n"] else np.nan for r in rows]
            traces.append(charts.scatter(np.asarray(x), np.asarray(y, dtype=np.float64), f"{_task_name(table)} {stat}",
                                          scale=1e3, mode="lines+markers", line=_line(i, dash)))
    if not traces:
        return None
    return charts.figure(traces, f"{label} by step", "step (call order within the flow)", "ms", **STEP_CHART_LAYOUT)


def step_cache_chart(tables: list[dict[str, Any]]) -> dict[str, Any] | None:
    """Prompt and cached tokens (p50) of each task's calls by step: does the growing context hit the prefix cache?"""
    traces = []
    for i, table in enumerate(tables):
        x, rows = _step_numbers(table)
        if len(x) < 2 or all(r["cached_tokens_p50"] is None for r in rows):
            continue
        for key, label, dash in (("prompt_tokens_p50", "prompt tokens", "solid"), ("cached_tokens_p50", "cached tokens", "dot")):
            y = [np.nan if r[key] is None else r[key] for r in rows]
            traces.append(charts.scatter(np.asarray(x), np.asarray(y, dtype=np.float64), f"{_task_name(table)} {label}",
                                          mode="lines+markers", line=_line(i, dash)))
    if not traces:
        return None
    return charts.figure(traces, "Prompt and cached tokens by step (p50)", "step (call order within the flow)", "tokens",
                         **STEP_CHART_LAYOUT)


def flow_view(summary: dict[str, Any], frame: pd.DataFrame) -> dict[str, Any] | None:
    """What the Flows section shows; None for a run without flows (the section is left out)."""
    flows = summary.get("flows")
    if not flows:
        return None
    tables = step_tables(frame)
    chart_list = [("duration", duration_chart(flows["overall"]["tasks"])),
                  ("step-ttft", step_latency_chart(tables, "ttft_s", "TTFT")),
                  ("step-e2e", step_latency_chart(tables, "e2e_s", "E2E")), ("step-cache", step_cache_chart(tables))]
    return {"overall": flows["overall"], "phases": flows["phases"], "steps": tables,
            "charts": [(name, fig) for name, fig in chart_list if fig is not None]}
