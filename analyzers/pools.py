"""Pools of a disaggregated server: what the prefill pool and the decode pool each did in a run.

A disaggregated engine labels its series with `pool` (prefill | decode) and
`replica`; requests that continued on the decode pool carry `kv_transfer_s`.
`pool_labels` gives each request the pool that finished it (the `pool` slice):
"decode" when it was handed off, "prefill" when it ended on its first token.
`pool_view` sets the pools side by side from both ends: running and waiting
requests and step time from the server's metrics, and from the requests the
latency each pool owns (TTFT is the prefill pool's, TPOT the decode pool's)
and the transfer between them. Runs of an engine without pools give None.
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import pandas as pd

from servescope.analyzers.metrics import describe
from servescope.analyzers.server_metrics import ServerMetrics

POOLS = ("prefill", "decode")


def pool_labels(frame: pd.DataFrame) -> pd.Series:
    """Per request: "decode" (handed off), "prefill" (finished on the prefill pool), None (no pools in this run)."""
    transfer = frame["kv_transfer_s"].to_numpy(dtype=np.float64)
    if not np.isfinite(transfer).any():
        return pd.Series([None] * len(frame), index=frame.index, dtype=object)
    ok = (frame["status"] == "ok").to_numpy()
    labels = np.where(np.isfinite(transfer), "decode", np.where(ok, "prefill", None))
    return pd.Series(labels.astype(object), index=frame.index, dtype=object)


def _pool_of(labels_json: str) -> str | None:
    return json.loads(labels_json).get("pool")


def pool_metrics(metrics: ServerMetrics) -> dict[str, ServerMetrics]:
    """The server's samples split by their `pool` label ({} when no series carries one)."""
    samples = metrics.samples
    if samples.empty:
        return {}
    pools = samples["labels"].map(_pool_of)
    return {pool: ServerMetrics(samples[(pools == pool).to_numpy()].reset_index(drop=True))
            for pool in POOLS if (pools == pool).any()}


def _gauge_stats(metrics: ServerMetrics, key: str) -> dict[str, float | None]:
    series = metrics.gauge(key)
    if series.empty:
        return {"mean": None, "max": None}
    return {"mean": float(series.mean()), "max": float(series.max())}


def _replicas(metrics: ServerMetrics) -> int:
    return int(metrics.samples["labels"].map(lambda text: json.loads(text).get("replica")).nunique())


def _span_s(metrics: ServerMetrics, key: str) -> float:
    t = metrics.samples.loc[metrics.samples["key"] == key, "t"]
    return float(t.max() - t.min()) if len(t) > 1 else 0.0


def pool_view(frame: pd.DataFrame, metrics: ServerMetrics) -> list[dict[str, Any]] | None:
    """One row per pool: server figures (running, waiting, step time; transfer on the decode side) and the
    requests' latency that pool owns. None when the run has no pools."""
    by_pool = pool_metrics(metrics)
    labels = pool_labels(frame)
    if not by_pool and labels.isna().all():
        return None
    ok = frame["status"].to_numpy() == "ok"
    transfer = frame["kv_transfer_s"].to_numpy(dtype=np.float64)
    handed = ok & np.isfinite(transfer)
    rows = []
    for pool in POOLS:
        m = by_pool.get(pool)
        row: dict[str, Any] = {"pool": pool, "replicas": _replicas(m) if m is not None else None}
        if m is not None:
            row["running"] = _gauge_stats(m, "running")
            row["waiting"] = _gauge_stats(m, "waiting")
            row["step_s"] = {"p50": m.histogram_quantile("step_hist", 0.5), "p99": m.histogram_quantile("step_hist", 0.99)}
        if pool == "prefill":
            row["requests"] = int(ok.sum())
            row["ttft_s"] = describe(frame["ttft_s"].to_numpy(dtype=np.float64)[ok], with_ci=False)
        else:
            row["requests"] = int(handed.sum())
            row["tpot_s"] = describe(frame["tpot_s"].to_numpy(dtype=np.float64)[handed], with_ci=False)
            row["kv_transfer_s"] = describe(transfer[handed], with_ci=False)
            if m is not None:
                wait = m.counter_increase("kv_transfer_wait")
                span = _span_s(m, "kv_transfer_wait")
                replicas = max(row["replicas"] or 1, 1)
                row["transfer_wait_s"] = wait
                row["transfer_wait_share"] = wait / (span * replicas) if span > 0 else None
                row["transfer_queue"] = _gauge_stats(m, "kv_transfer_queue")
                row["transfer_bytes_mean"] = m.histogram_mean("kv_transfer_bytes_hist")
        rows.append(row)
    return rows
