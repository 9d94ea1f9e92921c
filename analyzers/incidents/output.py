"""A simulation written as a run directory (with server metrics) or as a production-style request log."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa

from servescope.analyzers.incidents.simulator import Simulation
from servescope.rundir.schema import conform_requests
from servescope.rundir.writer import write_run_dir

LOG_COLUMNS = ("timestamp", "user_id", "model", "prompt_tokens", "completion_tokens", "cached_tokens",
               "ttft_ms", "latency_ms", "status_code")
LOG_EPOCH = np.datetime64("2024-05-01T12:00:00", "ms")


def _opt(values: np.ndarray, missing: np.ndarray) -> pa.Array:
    return pa.array(values, mask=missing)


def requests_table(sim: Simulation) -> pa.Table:
    """The requests.parquet rows of a simulation (the contract schema)."""
    c, s, n = sim.columns, sim.settings, len(sim)
    ok = c["http_status"] == 200
    tenants = np.array([t.name for t in s.tenants], dtype=object)[c["tenant"]]
    models = np.array([m.name for m in s.models], dtype=object)[c["model"]]
    group = np.where(c["prefix_group"] >= 0, np.char.add("sys-", c["prefix_group"].astype(str)), None)
    ttft = c["first_token_at"] - c["sent_at"]
    e2e = c["end_at"] - c["sent_at"]
    out = c["output_tokens"]
    tpot = np.where(out > 1, (e2e - ttft) / np.maximum(out - 1, 1), np.nan)
    columns = {
        "request_id": pa.array([f"sim-{i:07d}" for i in range(n)]),
        "worker": pa.array(np.arange(n) % 4),
        "phase": pa.array(np.char.add("model=", models.astype(str)).astype(object)),  # as the log importer labels models
        "tenant": pa.array(tenants),
        "prefix_group": pa.array(group.astype(object)),
        "prompt_bucket": pa.array(_bucket(c["prompt_tokens"], (256, 1024, 4096), ("<256", "256-1k", "1k-4k", ">=4k"))),
        "output_bucket": pa.array(_bucket(out, (64, 256, 1024), ("<64", "64-256", "256-1k", ">=1k"))),
        "api": pa.array(np.full(n, "completions", dtype=object)),
        "prompt_tokens": pa.array(c["prompt_tokens"]),
        "max_tokens": pa.array(c["max_tokens"]),
        "scheduled_at": pa.array(c["scheduled_at"]),
        "sent_at": pa.array(c["sent_at"]),
        "first_token_at": _opt(c["first_token_at"], ~ok),
        "end_at": pa.array(c["end_at"]),
        "ttft_s": _opt(ttft, ~ok),
        "e2e_s": _opt(e2e, ~ok),
        "tpot_s": _opt(tpot, ~ok | (out <= 1)),
        "output_tokens": _opt(out, ~ok),
        "output_tokens_source": pa.array(np.full(n, "usage", dtype=object)),
        "usage_prompt_tokens": pa.array(c["prompt_tokens"]),
        "cached_tokens": _opt(c["cached_tokens"], ~ok),
        "status": pa.array(np.where(ok, "ok", "error").astype(object)),
        "error_kind": pa.array(np.where(ok, None, "http_429").astype(object)),
        "http_status": _opt(c["http_status"], ok),
        "error_message": pa.array(np.where(ok, None, "429 Too Many Requests: tenant quota exceeded; retry-after 1s").astype(object)),
        "schedule_lag_s": pa.array(c["schedule_lag_s"]),
        "kv_transfer_s": _opt(np.nan_to_num(c["kv_transfer_s"]), ~np.isfinite(c["kv_transfer_s"])),
    }
    if sim.itl_offsets is not None:
        offsets = pa.array(sim.itl_offsets.astype(np.int32))
        columns["itl_s"] = pa.ListArray.from_arrays(offsets, pa.array(sim.itl_values))
        columns["chunk_tokens"] = pa.ListArray.from_arrays(offsets, pa.array(np.ones(len(sim.itl_values), np.int64)))
    return conform_requests(pa.table(columns))


def _bucket(values: np.ndarray, edges: tuple[int, ...], names: tuple[str, ...]) -> np.ndarray:
    return np.array(names, dtype=object)[np.searchsorted(np.array(edges), values, side="right")]


def server_metrics_table(sim: Simulation) -> pa.Table:
    labels = json.dumps({"engine": "0", "model_name": sim.settings.models[0].name}, sort_keys=True)
    names = list(sim.gauges)
    t = np.tile(sim.scrape_t, len(names))
    return pa.table({"t": t, "name": np.repeat(np.array(names, dtype=object), len(sim.scrape_t)),
                     "labels": np.full(len(t), labels, dtype=object),
                     "value": np.concatenate([sim.gauges[k] for k in names])})


def write_run(sim: Simulation, out_dir: str | Path, incident: str = "simulated") -> Path:
    """A complete run directory: run.json, requests.parquet, server_metrics.parquet."""
    s = sim.settings
    meta = {
        "status": "complete", "command": f"simulated incident {incident} (seed {s.seed})", "target": "simulated://",
        "model": s.models[0].name, "seed": s.seed, "incident": incident,
        "load": {"kind": "rate", "rate": sum(t.rate for t in s.tenants), "arrival": "poisson"},
        "tokenizer": {"name": "simulated", "exact_for_target": True},
        "client": {"loop_lag_max_s": 0.002},
    }
    return write_run_dir(out_dir, meta, requests_table(sim), server_metrics_table(sim))


def write_log(sim: Simulation, path: str | Path) -> Path:
    """A production-style CSV request log (LOG_COLUMNS), one row per request in send order."""
    import pandas as pd

    c, s = sim.columns, sim.settings
    ok = c["http_status"] == 200
    stamp = LOG_EPOCH + (c["sent_at"] * 1000).astype("timedelta64[ms]")
    frame = pd.DataFrame({
        "timestamp": np.datetime_as_string(stamp, unit="ms"),
        "user_id": np.array([t.name for t in s.tenants], dtype=object)[c["tenant"]],
        "model": np.array([m.name for m in s.models], dtype=object)[c["model"]],
        "prompt_tokens": c["prompt_tokens"],
        "completion_tokens": c["output_tokens"],
        "cached_tokens": c["cached_tokens"],
        "ttft_ms": np.where(ok, np.round((c["first_token_at"] - c["sent_at"]) * 1000, 1), np.nan),
        "latency_ms": np.round((c["end_at"] - c["sent_at"]) * 1000, 1),
        "status_code": c["http_status"],
    }, columns=list(LOG_COLUMNS))
    path = Path(path)
    frame.to_csv(path, index=False)
    return path
