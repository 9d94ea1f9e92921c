"""Run directories written from synthetic latency distributions (real files, real schema).

Used by the compare tests before (and besides) real engine runs: the statistics
must find a planted shift and stay quiet without one, which needs a known truth.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from servescope.rundir.schema import RequestRecord
from servescope.rundir.writer import write_run_dir

WORKLOAD = {"name": "synthetic", "classes": [{"prompt_tokens": 256, "max_tokens": 32}]}


def write_run(
    out: Path,
    *,
    n: int = 600,  # p99 is compared from 500 requests a side (analyzers.compare.MIN_TAIL_SAMPLES)
    seed: int = 0,
    arrival_seed: int = 0,
    slowdown: float = 1.0,
    error_rate: float = 0.0,
    rate: float = 20.0,
    workload: dict | None = None,
    tenants: tuple[str, ...] = ("a", "b"),
) -> Path:
    """Write run.json + requests.parquet of `n` requests at `rate` req/s; latencies scaled by `slowdown`.

    Latencies are lognormal (long prompts have a slower TTFT), so percentiles
    and the rank test see realistic skew; `error_rate` turns requests into 5xx.
    """
    rng = np.random.default_rng(seed)
    rows = []
    # Arrivals have their own seed: a real run with the same --seed replays the same schedule.
    sent = np.cumsum(np.random.default_rng(arrival_seed).exponential(1.0 / rate, size=n))
    for i in range(n):
        long_prompt = i % 3 == 0
        ttft = rng.lognormal(np.log(0.05 if not long_prompt else 0.12), 0.35) * slowdown
        out_tokens = 32
        itl = rng.lognormal(np.log(0.01), 0.25, size=out_tokens - 1) * slowdown
        e2e = ttft + float(itl.sum())
        failed = rng.random() < error_rate
        rec = RequestRecord(
            request_id=f"r{i}", phase="rate=20.0", tenant=tenants[i % len(tenants)],
            prompt_bucket="long" if long_prompt else "short", output_bucket="32",
            prompt_tokens=1024 if long_prompt else 128, max_tokens=32,
            scheduled_at=float(sent[i]), sent_at=float(sent[i]),
            status="error" if failed else "ok", error_kind="http_5xx" if failed else None,
        )
        if not failed:
            rec.first_token_at = rec.sent_at + ttft
            rec.end_at = rec.sent_at + e2e
            rec.ttft_s, rec.e2e_s = ttft, e2e
            rec.tpot_s = (e2e - ttft) / (out_tokens - 1)
            rec.itl_s = [float(x) for x in itl]
            rec.output_tokens = out_tokens
        else:
            rec.end_at = rec.sent_at + 0.01
        rows.append(rec.to_dict())
    run = {"status": "complete", "workload": workload or WORKLOAD, "load_model": {"kind": "rate", "rate": rate}, "seed": seed}
    return write_run_dir(out, run, rows)
