"""Load-generator health per node and per worker: who sent late, whose loop stalled, who was lost.

With workers spread over several machines (Ray actors), one overloaded node
delays only its own requests: the run-wide schedule lag can look tolerable while
a quarter of the requests left late. Judging each node (and each worker) with
the run's own limits names the one that fell behind, and the clock figures of
run.json (`ray.nodes`) say how far that node's run-relative times can be trusted.

Inputs are the run-directory contract only: request rows (`worker`, `node`,
`schedule_lag_s`, `sent_at`, `end_at`), run.json's `client_check.per_worker`
(loop lag, process CPU seconds),
`ray` and `lost_workers`. A local run is one node, `node` null, labelled `local`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from servescope.analyzers.metrics import MIN_SAMPLES, quantile

LOCAL = "local"
NODE_LABEL_CHARS = 8  # Ray node ids are 56 hex digits; the first 8 tell a cluster's nodes apart


@dataclass(frozen=True)
class LagLimits:
    """The run's limits (client_health derives them from the measured TTFT); a unit over one is behind."""

    schedule_p99_s: float
    loop_p99_s: float
    loop_max_s: float


def lag_reasons(schedule_p99: float | None, loop_p99: float | None, loop_max: float | None,
                limits: LagLimits) -> list[str]:
    """Why these lag figures distort the measurement (empty when they do not)."""
    reasons = []
    if schedule_p99 is not None and schedule_p99 > limits.schedule_p99_s:
        reasons.append(f"schedule lag p99 {schedule_p99 * 1e3:.1f} ms > {limits.schedule_p99_s * 1e3:.1f} ms")
    if loop_p99 is not None and loop_p99 > limits.loop_p99_s:
        reasons.append(f"event-loop lag p99 {loop_p99 * 1e3:.1f} ms > {limits.loop_p99_s * 1e3:.1f} ms")
    if loop_max is not None and loop_max > limits.loop_max_s:
        reasons.append(f"an event-loop stall of {loop_max * 1e3:.1f} ms > {limits.loop_max_s * 1e3:.1f} ms")
    return reasons


def node_label(node: Any) -> str:
    """`node 3f2a9c1b` for a Ray node id, `local` for workers on the driver's machine."""
    if node is None or (isinstance(node, float) and np.isnan(node)) or node == "":
        return LOCAL
    return f"node {str(node)[:NODE_LABEL_CHARS]}"


def lost_workers(run: dict[str, Any]) -> list[dict[str, Any]]:
    """run.json's lost workers (`lost_workers`, or the copy under `ray`), each with its node's label."""
    ray = run.get("ray") if isinstance(run.get("ray"), dict) else {}
    raw = run.get("lost_workers") or ray.get("lost_workers") or []
    out = []
    for item in raw:
        if isinstance(item, dict) and "worker" in item:
            out.append({"worker": item.get("worker"), "node": item.get("node"), "label": node_label(item.get("node")),
                        "at_s": item.get("at_s"), "reason": item.get("reason"),
                        "in_flight_lost": item.get("in_flight_lost")})
    return out


def generator_units(run: dict[str, Any], measured: pd.DataFrame, chunks: np.ndarray | None,
                    limits: LagLimits, per_worker: list[dict[str, Any]]) -> dict[str, Any]:
    """`{"nodes": [...], "workers": [...], "lost_workers": [...]}`: one health row per node and per worker.

    `chunks` counts each measured row's content chunks (its ITL gaps plus the
    first token); `per_worker` is run.json's `client_check.per_worker`.
    """
    frame = _unit_frame(measured, chunks)
    loop = {int(w["worker"]): w for w in per_worker if isinstance(w, dict) and w.get("worker") is not None}
    lost = lost_workers(run)
    node_of = _worker_nodes(run, frame, lost)
    workers = sorted(set(node_of) | set(loop))
    worker_rows = []
    for worker in workers:
        rows = frame[frame["worker"] == worker]
        check = loop.get(worker, {})
        worker_rows.append({
            "worker": worker, "node": node_of.get(worker), "label": node_label(node_of.get(worker)),
            **_sent_figures(rows),
            "loop_lag_p99_s": _number(check.get("loop_lag_p99_s")),
            "loop_lag_max_s": _number(check.get("loop_lag_max_s")),
            **_cpu_figures(_number(check.get("cpu_s")), float(rows["chunks"].sum())),
            "lost": next((item for item in lost if item["worker"] == worker), None),
        })
    for row in worker_rows:
        _judge(row, limits)
    clocks = _clocks(run)
    nodes = []
    for node in _ordered_nodes(node_of, clocks):
        members = [row for row in worker_rows if row["node"] == node]
        rows = frame[frame["node_key"] == (node or "")]
        entry = {
            "node": node, "label": node_label(node), "workers": [row["worker"] for row in members],
            **_sent_figures(rows),
            "loop_lag_p99_s": _max(row["loop_lag_p99_s"] for row in members),
            "loop_lag_max_s": _max(row["loop_lag_max_s"] for row in members),
            **_cpu_figures(_sum(row["cpu_s"] for row in members), float(rows["chunks"].sum())),
            **clocks.get(node, {"offset_s": None, "offset_uncertainty_s": None, "drift_s_per_s": None}),
            "lost_workers": [item for item in lost if item["node"] == node or item["worker"] in
                             {row["worker"] for row in members}],
        }
        _judge(entry, limits)
        nodes.append(entry)
    return {"nodes": nodes, "workers": worker_rows, "lost_workers": lost}


def behind(units: dict[str, Any], run_wide: bool) -> list[dict[str, Any]]:
    """The nodes that fell behind when the run spans several; else the workers that did.

    When every one did and the run-wide figures already say so (`run_wide`), naming them all adds
    nothing: the whole generator was short of capacity, and the list is empty.
    """
    nodes = units.get("nodes", [])
    pick = nodes if len(nodes) > 1 else units.get("workers", []) if len(units.get("workers", [])) > 1 else []
    if run_wide and pick and all(u["behind"] for u in pick):
        return []
    return [{"label": (u["label"] if "worker" not in u else f"worker {u['worker']}"
                       + ("" if u["label"] == LOCAL else f" ({u['label']})")),
             **{k: u.get(k) for k in ("node", "worker", "workers", "schedule_lag_p99_s", "schedule_lag_n",
                                      "loop_lag_p99_s", "loop_lag_max_s", "requests") if k in u},
             "reasons": u["reasons"]}
            for u in pick if u["behind"]]


def _unit_frame(measured: pd.DataFrame, chunks: np.ndarray | None) -> pd.DataFrame:
    if chunks is None:
        chunks = measured["itl_s"].map(lambda gaps: 0 if gaps is None else len(gaps)).to_numpy(dtype=np.float64)
    first = measured["first_token_at"].to_numpy(dtype=np.float64)
    node = measured["node"] if "node" in measured else pd.Series(None, index=measured.index, dtype=object)
    return pd.DataFrame({
        "worker": measured["worker"].to_numpy(dtype=np.float64),
        "node_key": node.fillna("").astype(str).to_numpy(),
        "lag": measured["schedule_lag_s"].to_numpy(dtype=np.float64),
        "sent": measured["sent_at"].to_numpy(dtype=np.float64),
        "end": measured["end_at"].to_numpy(dtype=np.float64),
        # A request's content chunks: its gaps plus the first one (none when no token came).
        "chunks": np.where(np.isfinite(first), np.asarray(chunks, dtype=np.float64) + 1, 0.0),
    })


def _worker_nodes(run: dict[str, Any], frame: pd.DataFrame, lost: list[dict[str, Any]]) -> dict[int, str | None]:
    """Each worker's node: run.json's `ray.nodes[].workers` first, then its request rows, then its loss record."""
    node_of: dict[int, str | None] = {}
    ray = run.get("ray") if isinstance(run.get("ray"), dict) else {}
    for entry in ray.get("nodes") or []:
        for worker in entry.get("workers") or []:
            node_of[int(worker)] = entry.get("node")
    seen = frame[np.isfinite(frame["worker"].to_numpy())].drop_duplicates("worker")
    for worker, key in zip(seen["worker"].astype(int), seen["node_key"]):
        node_of.setdefault(int(worker), key or None)
    for item in lost:
        if item["worker"] is not None:
            node_of.setdefault(int(item["worker"]), item["node"])
    return node_of


def _clocks(run: dict[str, Any]) -> dict[str | None, dict[str, Any]]:
    """Per Ray node: its clock offset to the driver, the offset's uncertainty and drift (run.json `ray.nodes`)."""
    ray = run.get("ray") if isinstance(run.get("ray"), dict) else {}
    return {entry.get("node"): {"offset_s": _number(entry.get("offset_s")),
                                "offset_uncertainty_s": _number(entry.get("uncertainty_s")),
                                "drift_s_per_s": _number(entry.get("drift_s_per_s")),
                                "clock_measurements": entry.get("measurements")}
            for entry in ray.get("nodes") or [] if isinstance(entry, dict)}


def _ordered_nodes(node_of: dict[int, str | None], clocks: dict[str | None, Any]) -> list[str | None]:
    order: list[str | None] = []
    for node in [*clocks, *(node_of[w] for w in sorted(node_of))]:
        if node not in order:
            order.append(node)
    return order or [None]


def _sent_figures(rows: pd.DataFrame) -> dict[str, Any]:
    """Requests, schedule lag p50/p99 with its n, and content chunks per second over the unit's active span."""
    lag = rows["lag"].to_numpy()
    lag = lag[np.isfinite(lag)]
    sent, end = rows["sent"].to_numpy(), rows["end"].to_numpy()
    span = (float(np.nanmax(end)) - float(np.nanmin(sent))) if np.isfinite(sent).any() and np.isfinite(end).any() else 0.0
    chunks = float(rows["chunks"].sum())
    return {"requests": int(len(rows)), "schedule_lag_n": int(lag.size),
            "schedule_lag_p50_s": quantile(lag, 0.5), "schedule_lag_p99_s": quantile(lag, 0.99),
            "chunks": int(chunks), "chunk_rate_per_s": chunks / span if span > 0 else None}


def _judge(unit: dict[str, Any], limits: LagLimits) -> None:
    """Mark a unit behind with its reasons. A schedule-lag p99 over fewer than MIN_SAMPLES sends is its
    slowest send, not a tail: it names no one (the run-wide verdict still counts those sends)."""
    schedule = unit["schedule_lag_p99_s"] if unit["schedule_lag_n"] >= MIN_SAMPLES else None
    unit["reasons"] = lag_reasons(schedule, unit["loop_lag_p99_s"], unit["loop_lag_max_s"], limits)
    unit["behind"] = bool(unit["reasons"])


def _cpu_figures(cpu_s: float | None, chunks: float) -> dict[str, Any]:
    """The workers' process CPU seconds and content chunks per CPU-second: how much the client spent per chunk."""
    return {"cpu_s": cpu_s, "chunks_per_cpu_s": chunks / cpu_s if cpu_s else None}


def _number(value: Any) -> float | None:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) and np.isfinite(value) else None


def _sum(values: Any) -> float | None:
    known = [v for v in values if v is not None]
    return float(sum(known)) if known else None


def _max(values: Any) -> float | None:
    known = [v for v in values if v is not None]
    return max(known) if known else None
