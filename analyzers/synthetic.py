"""Synthetic run directories with realistic shapes, for the report benchmark, tests and demos.

Generated with numpy straight into Arrow columns (the `itl_s` lists are built
from one flat array and offsets), so a 100k-request run with millions of
token gaps takes about a second to produce. Distributions: Poisson arrivals,
log-normal prompt and output lengths per bucket, TTFT growing with prompt
length, per-token gaps around a TPOT with occasional stalls, a few errors,
prefix groups with cache hits, speculative acceptance. Server metrics are
scraped every second like the real scraper.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa

from servescope.rundir.schema import conform_requests
from servescope.rundir.writer import write_run_dir

BUCKETS = (("short", 128, 0.6), ("medium", 1024, 0.3), ("long", 4096, 0.1))
OUTPUT_BUCKETS = (("short", 64, 0.5), ("long", 256, 0.5))


@dataclass
class SyntheticSpec:
    requests: int = 1000
    rate: float = 50.0  # req/s (Poisson)
    seed: int = 0
    error_rate: float = 0.003
    warmup: int = 0  # leading requests labelled phase=warmup

    def __post_init__(self) -> None:
        if self.requests < 1 or self.rate <= 0 or not 0 <= self.error_rate < 1 or self.warmup < 0:
            raise ValueError(f"invalid synthetic spec {self}")


def synthetic_table(spec: SyntheticSpec) -> pa.Table:
    rng = np.random.default_rng(spec.seed)
    n = spec.requests
    scheduled = np.cumsum(rng.exponential(1 / spec.rate, n))
    lag = rng.exponential(0.0003, n)
    sent = scheduled + lag
    b = rng.choice(len(BUCKETS), n, p=[w for _, _, w in BUCKETS])
    prompt = np.maximum(8, rng.lognormal(np.log([BUCKETS[i][1] for i in b]), 0.3)).astype(np.int64)
    ob = rng.choice(len(OUTPUT_BUCKETS), n, p=[w for _, _, w in OUTPUT_BUCKETS])
    max_tokens = np.array([OUTPUT_BUCKETS[i][1] for i in ob], dtype=np.int64)
    out_tokens = np.maximum(1, (max_tokens * rng.uniform(0.3, 1.0, n)).astype(np.int64))
    groups = rng.integers(0, 20, n)
    has_group = rng.random(n) < 0.5
    cached = np.where(has_group & (rng.random(n) < 0.8), np.minimum(prompt, 256) // 16 * 16, 0)
    ttft = 0.02 + (prompt - cached) * 2e-5 + rng.lognormal(np.log(0.01), 0.5, n)
    tpot = rng.lognormal(np.log(0.012), 0.2, n)
    gaps_n = out_tokens - 1
    total = int(gaps_n.sum())
    gaps = rng.lognormal(0, 0.25, total) * np.repeat(tpot, gaps_n)
    stalls = rng.random(total) < 0.002
    gaps[stalls] += rng.exponential(0.1, int(stalls.sum()))
    offsets = np.concatenate(([0], np.cumsum(gaps_n)))
    decode = np.add.reduceat(gaps, offsets[:-1]) if total else np.zeros(n)
    decode = np.where(gaps_n > 0, decode, 0.0)
    first = sent + ttft
    end = first + decode
    status = np.where(rng.random(n) < spec.error_rate, "error", "ok").astype(object)
    failed = status != "ok"
    draft = np.where(rng.random(n) < 0.5, out_tokens * 4 // 3, 0)
    accepted = (draft * rng.beta(4, 3, n)).astype(np.int64)
    phase = np.array(["rate=%g" % spec.rate] * n, dtype=object)
    phase[: spec.warmup] = "warmup"

    def opt(values, mask):
        return pa.array(np.where(mask, None, values).tolist())

    columns = {
        "request_id": pa.array([f"req-{i:06d}" for i in range(n)]),
        "response_id": pa.array([f"cmpl-{i:06d}" for i in range(n)]),
        "worker": pa.array(np.arange(n) % 4),
        "phase": pa.array(phase.tolist()),
        "session_id": pa.nulls(n, pa.string()),
        "turn": pa.nulls(n, pa.int64()),
        "tenant": pa.array(np.array(["team-a", "team-b", "team-c"], dtype=object)[rng.integers(0, 3, n)].tolist()),
        "prefix_group": opt(np.char.add("sys-", groups.astype(str)).astype(object), ~has_group),
        "prompt_bucket": pa.array([BUCKETS[i][0] for i in b]),
        "output_bucket": pa.array([OUTPUT_BUCKETS[i][0] for i in ob]),
        "api": pa.array(["completions"] * n),
        "prompt_tokens": pa.array(prompt),
        "max_tokens": pa.array(max_tokens),
        "scheduled_at": pa.array(scheduled),
        "sent_at": pa.array(sent),
        "first_token_at": opt(first, failed),
        "end_at": pa.array(np.where(failed, sent + 0.01, end)),
        "ttft_s": opt(ttft, failed),
        "e2e_s": opt(end - sent, failed),
        "tpot_s": opt(np.where(out_tokens > 1, decode / np.maximum(gaps_n, 1), np.nan), failed | (out_tokens <= 1)),
        "itl_s": pa.ListArray.from_arrays(pa.array(offsets.astype(np.int32)), pa.array(gaps)),
        "chunk_tokens": pa.ListArray.from_arrays(pa.array(np.concatenate(([0], np.cumsum(gaps_n))).astype(np.int32)), pa.array(np.ones(total, dtype=np.int64))),
        "output_tokens": opt(out_tokens, failed),
        "output_tokens_source": pa.array(["usage"] * n),
        "usage_prompt_tokens": pa.array(prompt),
        "cached_tokens": pa.array(cached),
        "spec_accepted_tokens": pa.array(accepted),
        "spec_draft_tokens": pa.array(draft),
        "status": pa.array(status.tolist()),
        "error_kind": opt(np.array(["http_5xx"] * n, dtype=object), ~failed),
        "http_status": opt(np.full(n, 503), ~failed),
        "error_message": opt(np.array(["<script>alert('overloaded')</script> server busy"] * n, dtype=object), ~failed),
        "schedule_lag_s": pa.array(lag),
        "connect_s": pa.nulls(n, pa.float64()),
    }
    return conform_requests(pa.table(columns))


def synthetic_server_metrics(table: pa.Table) -> pa.Table:
    """Once-a-second scrape of running/waiting/KV usage/counters implied by the requests."""
    sent = table.column("sent_at").to_numpy()
    end = table.column("end_at").to_numpy()
    horizon = float(np.nanmax(end))
    ts = np.arange(0.0, horizon + 1.0, 1.0)
    running = np.searchsorted(np.sort(sent), ts) - np.searchsorted(np.sort(end), ts)
    done_tokens = np.searchsorted(np.sort(end), ts)
    labels = json.dumps({"model_name": "synthetic", "engine": "0"})
    rows_t, rows_name, rows_value = [], [], []
    for name, values in (
        ("vllm:num_requests_running", running),
        ("vllm:num_requests_waiting", np.zeros_like(ts)),
        ("vllm:kv_cache_usage_perc", np.clip(running / 200, 0, 1)),
        ("vllm:num_preemptions_total", np.zeros_like(ts)),
        ("vllm:generation_tokens_total", done_tokens * 100.0),
    ):
        rows_t.append(ts)
        rows_name += [name] * len(ts)
        rows_value.append(np.asarray(values, dtype=np.float64))
    t = np.concatenate(rows_t)
    return pa.table({"t": t, "name": rows_name, "labels": [labels] * len(t), "value": np.concatenate(rows_value)})


def write_synthetic_run(out_dir: str | Path, spec: SyntheticSpec) -> Path:
    """A complete run directory (run.json, requests.parquet, server_metrics.parquet)."""
    table = synthetic_table(spec)
    run = {
        "status": "complete",
        "command": f"synthetic --requests {spec.requests} --rate {spec.rate} --seed {spec.seed}",
        "target": "synthetic://",
        "model": "synthetic",
        "seed": spec.seed,
        "load": {"kind": "rate", "rate": spec.rate, "arrival": "poisson"},
        "tokenizer": {"name": "bundled", "exact_for_target": True},
        "client": {"loop_lag_max_s": 0.002},
    }
    return write_run_dir(out_dir, run, table, synthetic_server_metrics(table))
