"""How well `servescope run` keeps its schedule, end to end, by load and worker count.

Drives the scripted SSE server (tests/support/scripted_server.py, its own
process) through `harness.api.execute_run` — dispatcher, worker processes,
client, run directory — and reads back each run's requests:

  achieved send rate, schedule lag (sent_at - scheduled_at) p50 / p99 / max,
  and the workers' worst event-loop lag, for open-loop rates and closed-loop
  concurrencies with 1 and 2 workers.

This is the evidence behind the worker-count rule in harness/loadgen/models.py
(RATE_PER_WORKER, STREAMS_PER_WORKER) and the client-bound thresholds in
harness/api.py.

    python benchmarks/run_schedule.py                       # ~1-2 min
    python benchmarks/run_schedule.py --duration 10 --rates 100,400 --workers 1,2,4
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from pathlib import Path

import pyarrow.parquet as pq
from rich.console import Console

from servescope.harness.orchestration.repeat import execute_run
from servescope.harness.config import RunConfig
from servescope.harness.console import RunConsole


def _scripted_server_class():
    """tests/support/scripted_server.py, loaded by path: putting tests/ on sys.path would let
    tests/workloads/ (a namespace folder) shadow the real `workloads` package."""
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "tests" / "support" / "scripted_server.py"
    spec = importlib.util.spec_from_file_location("scripted_server", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.ScriptedServer


def one_run(base_url: str, out: Path, workers: int, duration: float, rate: float | None = None,
            concurrency: int | None = None) -> dict:
    config = RunConfig(target=base_url, rate=rate, concurrency=concurrency, arrival="constant",
                       duration_s=duration, prompt_tokens=32, max_tokens=8, workers=workers,
                       out=str(out), report=False, seed=1)
    outcome = execute_run(config, RunConsole(show_progress=False, console=Console(file=open(os.devnull, "w"))))
    frame = pq.read_table(outcome.run_dir / "requests.parquet").to_pandas()
    meta = json.loads((outcome.run_dir / "run.json").read_text())
    lag = frame["schedule_lag_s"].dropna()
    sent = frame["sent_at"].dropna()
    span = float(sent.max() - sent.min()) if len(sent) > 1 else float("nan")
    return {
        "load": f"rate={rate:g}" if rate else f"concurrency={concurrency}",
        "workers": workers,
        "requests": len(frame),
        "ok": int((frame["status"] == "ok").sum()),
        "send_rate": (len(sent) - 1) / span if span and span > 0 else float("nan"),
        "lag_p50_ms": 1e3 * float(lag.quantile(0.5)),
        "lag_p99_ms": 1e3 * float(lag.quantile(0.99)),
        "lag_max_ms": 1e3 * float(lag.max()),
        "loop_lag_max_ms": 1e3 * (meta["client_check"]["loop_lag_max_s"] or 0.0),
        "client_bound": meta["client_check"]["client_bound"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--duration", type=float, default=5.0)
    parser.add_argument("--rates", default="50,100,200,400")
    parser.add_argument("--concurrencies", default="64,256")
    parser.add_argument("--workers", default="1,2")
    args = parser.parse_args()
    rows = []
    with _scripted_server_class()() as server, tempfile.TemporaryDirectory() as tmp:
        n = 0
        for workers in (int(w) for w in args.workers.split(",")):
            for rate in (float(r) for r in args.rates.split(",") if r):
                n += 1
                rows.append(one_run(server.base_url, Path(tmp) / f"r{n}", workers, args.duration, rate=rate))
            for conc in (int(c) for c in args.concurrencies.split(",") if c):
                n += 1
                rows.append(one_run(server.base_url, Path(tmp) / f"r{n}", workers, args.duration, concurrency=conc))
    print(f"# servescope run schedule keeping, {os.cpu_count()} CPUs, {args.duration:g}s per run, "
          "scripted server, 32-token prompts, 8 output tokens")
    header = ["load", "workers", "requests", "ok", "send req/s", "lag p50 ms", "lag p99 ms", "lag max ms",
              "loop lag max ms", "client-bound"]
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for r in rows:
        print(f"| {r['load']} | {r['workers']} | {r['requests']} | {r['ok']} | {r['send_rate']:.1f} | "
              f"{r['lag_p50_ms']:.2f} | {r['lag_p99_ms']:.2f} | {r['lag_max_ms']:.2f} | {r['loop_lag_max_ms']:.2f} | "
              f"{'yes' if r['client_bound'] else 'no'} |")


if __name__ == "__main__":
    main()
