"""How well does `servescope run` keep its schedule, end to end, by load and worker count?

Drives the scripted SSE server (tests/support/scripted_server.py, its own
process) through `servescope.execute_run` — dispatcher, worker processes,
client, run directory — and reads back each run's requests:

  achieved send rate, schedule lag (sent_at - scheduled_at) p50 / p99 / max,
  and the workers' worst event-loop lag, for open-loop rates and closed-loop
  concurrencies with 1 and 2 workers.

This is the evidence behind the worker-count rule in harness/loadgen/models.py
(RATE_PER_WORKER, STREAMS_PER_WORKER) and the client-bound thresholds in
harness/api.py.

    python -m benchmarks.run_schedule                       # ~1-2 min
    python -m benchmarks.run_schedule --duration 10 --rates 100,400 --workers 1,2,4
    python -m benchmarks.run_schedule --smoke               # a quick check of this script

Percentiles are nearest-rank (servescope.analyzers.metrics). With --save the rows go to
benchmarks/results/run_schedule_<cpu>.json.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

if __package__ in (None, ""):  # `python benchmarks/<script>.py`: import from the repository root, not benchmarks/
    sys.path[0] = str(Path(__file__).resolve().parents[1])

from benchmarks.common import (  # noqa: E402
    ResultsFile,
    add_results_args,
    cpu_name,
    print_table,
    quiet_console,
    run_info,
    scripted_server_class,
)
from servescope import RunConfig, execute_run, load_run  # noqa: E402
from servescope.analyzers.metrics import quantile  # noqa: E402


def one_run(base_url: str, out: Path, workers: int, duration: float, rate: float | None = None,
            concurrency: int | None = None) -> dict:
    config = RunConfig(target=base_url, rate=rate, concurrency=concurrency, arrival="constant",
                       duration_s=duration, prompt_tokens=32, max_tokens=8, workers=workers,
                       out=str(out), report=False, seed=1)
    outcome = execute_run(config, quiet_console())
    run = load_run(outcome.run_dir)
    frame = run.requests
    check = run.run["client_check"]
    lag = frame["schedule_lag_s"].dropna().to_numpy()
    sent = frame["sent_at"].dropna()
    span = float(sent.max() - sent.min()) if len(sent) > 1 else float("nan")

    def lag_ms(q: float) -> float:
        value = quantile(lag, q)
        return float("nan") if value is None else 1e3 * value

    return {
        "load": f"rate={rate:g}" if rate else f"concurrency={concurrency}",
        "workers": workers,
        "requests": len(frame),
        "ok": int((frame["status"] == "ok").sum()),
        "send_rate": (len(sent) - 1) / span if span and span > 0 else float("nan"),
        "lag_p50_ms": lag_ms(0.5),
        "lag_p99_ms": lag_ms(0.99),
        "lag_max_ms": 1e3 * float(lag.max()) if len(lag) else float("nan"),
        "loop_lag_max_ms": 1e3 * (check["loop_lag_max_s"] or 0.0),
        "client_bound": check["client_bound"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--duration", type=float, default=5.0)
    parser.add_argument("--rates", default="50,100,200,400")
    parser.add_argument("--concurrencies", default="64,256")
    parser.add_argument("--workers", default="1,2")
    parser.add_argument("--smoke", action="store_true",
                        help="a quick check: 1 s runs, one rate, one concurrency, 1 worker")
    add_results_args(parser, default_save=False)
    args = parser.parse_args()
    if args.smoke:
        args.duration, args.rates, args.concurrencies, args.workers = 1.0, "50", "8", "1"
    rows = []
    with scripted_server_class()() as server, tempfile.TemporaryDirectory() as tmp:
        n = 0
        for workers in (int(w) for w in args.workers.split(",")):
            for rate in (float(r) for r in args.rates.split(",") if r):
                n += 1
                rows.append(one_run(server.base_url, Path(tmp) / f"r{n}", workers, args.duration, rate=rate))
            for conc in (int(c) for c in args.concurrencies.split(",") if c):
                n += 1
                rows.append(one_run(server.base_url, Path(tmp) / f"r{n}", workers, args.duration, concurrency=conc))
    print_table(["load", "workers", "requests", "ok", "send req/s", "lag p50 ms", "lag p99 ms", "lag max ms",
                 "loop lag max ms", "client-bound"],
                [[r["load"], r["workers"], r["requests"], r["ok"], r["send_rate"], r["lag_p50_ms"], r["lag_p99_ms"],
                  r["lag_max_ms"], r["loop_lag_max_ms"], bool(r["client_bound"])] for r in rows],
                title=f"servescope run schedule keeping, {cpu_name()}, {args.duration:g} s per run, scripted server, "
                      "32-token prompts, 8 output tokens")
    if args.save:
        results = ResultsFile("run_schedule", cpu_name(), args.out, args.copy_to)
        results.put("schedule", {"duration_s": args.duration, "rows": rows}, run_info())
        print(f"results: {results.path}")


if __name__ == "__main__":
    main()
