"""What scripted users cost the load generator, next to the plain workload path.

Both paths run through the whole load generator (`servescope.execute_run`: one
worker process, its dispatcher, the run directory) against the scripted SSE
server in its own process, paced like the transport benchmark (first chunk
after 50 ms, then one chunk every 2 ms, 64 chunks a request), at 64 streams:

  plain        the bucketed-workload path: 64 closed-loop slots, prompts built by the driver;
  plain-32     the same with 32-chunk requests (the reference for users-flow's calls);
  users-1call  64 scripted users, each task one `completions` call (the prompt built by
               `self.prompt` in the worker, token-exact), no think time;
  users-flow   64 scripted users, each task two 32-chunk calls in sequence (the second carries
               the first answer), the shape of an agent step.

"vs plain" compares each case with the plain path of the same request length.

For each: content chunks per client CPU-second at steady state (the driver
process plus the worker process, which reports its own CPU seconds in
run.json; each case runs twice, for a fifth
of the duration and for all of it, and the figure is the difference of chunks
over the difference of CPU, so start-up costs such as importing and loading the
tokenizer cancel out; an untimed run of each case comes first, for the driver's
one-time imports), and the timing error of every chunk of the long run
(the client's timestamp minus the server's logged write time of the same chunk,
same monotonic clock) at p50 / p99, first chunks (TTFT) and later chunks (ITL) apart.

    python -m benchmarks.loadgen_users            # 2 rounds x 3 cases x (2 + 10 s), ~2 min
    python -m benchmarks.loadgen_users --smoke    # a quick check of this script
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import tempfile
import textwrap
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # `python benchmarks/<script>.py`: import from the repository root, not benchmarks/
    sys.path[0] = str(Path(__file__).resolve().parents[1])

import numpy as np  # noqa: E402

from benchmarks.common import (  # noqa: E402
    ResultsFile,
    add_results_args,
    cpu_name,
    print_table,
    quiet_console,
    run_info,
    scripted_server_class,
    timing_errors,
)
from servescope.harness.config import RunConfig  # noqa: E402
from servescope.harness.orchestration.repeat import execute_run  # noqa: E402
from servescope.rundir.reader import load_run  # noqa: E402

ScriptedServer = scripted_server_class()
PACING = {"first_token_delay_s": 0.05, "itl_s": 0.002}
CHUNKS = 64

SCRIPTS = {
    "users-1call": f"""
        from servescope import User, task

        class OneCall(User):
            @task
            async def call(self):
                await self.client.completions(prompt=self.prompt(tokens=16), max_tokens={CHUNKS})
    """,
    "users-flow": f"""
        from servescope import User, task

        class TwoSteps(User):
            @task
            async def step(self):
                first = await self.client.completions(prompt=self.prompt(tokens=16), max_tokens={CHUNKS // 2})
                await self.client.completions(prompt=first.text + self.prompt(tokens=8), max_tokens={CHUNKS // 2})
    """,
}


def one_case(case: str, srv: Any, streams: int, duration_s: float, work: Path) -> dict[str, Any]:
    """The case run for a fifth of `duration_s` and then for all of it; steady-state figures from the difference."""
    short = one_run(case, srv, streams, duration_s / 5, work)
    full = one_run(case, srv, streams, duration_s, work)
    d_chunks, d_cpu = full["chunks"] - short["chunks"], full["client_cpu_s"] - short["client_cpu_s"]
    return {**full, "chunks_per_cpu_s": d_chunks / d_cpu if d_cpu > 0 else float("nan"),
            "marginal_chunks": d_chunks, "marginal_cpu_s": d_cpu}


def one_run(case: str, srv: Any, streams: int, duration_s: float, work: Path) -> dict[str, Any]:
    out = work / f"{case}-{len(list(work.iterdir()))}"
    duration = f"{duration_s:g}s"
    options: dict[str, Any] = {"target": srv.base_url, "model": "bench", "concurrency": streams, "duration_s": duration,
                               "warmup_s": "1s", "workers": 1, "report": False, "out": str(out), "show_progress": False}
    if case.startswith("plain"):
        options.update(prompt_tokens=16, max_tokens=CHUNKS if case == "plain" else CHUNKS // 2)
    else:
        script = work / f"{case}.py"
        script.write_text(textwrap.dedent(SCRIPTS[case]))
        options["users"] = str(script)
    srv.reset()
    before = resource.getrusage(resource.RUSAGE_SELF)
    outcome = execute_run(RunConfig(**options), console=quiet_console())
    after = resource.getrusage(resource.RUSAGE_SELF)
    driver = (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)
    workers = sum(w.get("cpu_s") or 0.0 for w in load_run(out).run["client_check"]["per_worker"])
    cpu = driver + workers
    ttft, itl, chunks = timing_errors(out, srv.write_log())
    q = lambda v, p: float(np.percentile(v, p)) * 1e3 if v else float("nan")  # noqa: E731
    return {"case": case, "status": outcome.status, "chunks": chunks, "client_cpu_s": cpu,
            "ttft_err_p50_ms": q(ttft, 50), "ttft_err_p99_ms": q(ttft, 99),
            "itl_err_p50_ms": q(itl, 50), "itl_err_p99_ms": q(itl, 99), "requests": len(ttft)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--streams", type=int, default=64)
    parser.add_argument("--duration", type=float, default=10.0, help="measured seconds of a case's long run")
    parser.add_argument("--rounds", type=int, default=2, help="rounds of all cases, interleaved")
    parser.add_argument("--smoke", action="store_true", help="one short round at 8 streams")
    add_results_args(parser, default_save=False)
    args = parser.parse_args()
    if args.smoke:
        args.streams, args.duration, args.rounds = 8, 2.0, 1
    cases = ["plain", "users-1call", "plain-32", "users-flow"]
    reference = {"plain": "plain", "users-1call": "plain", "plain-32": "plain-32", "users-flow": "plain-32"}
    rows: list[dict[str, Any]] = []
    with ScriptedServer(default_script=PACING) as srv, tempfile.TemporaryDirectory() as tmp:
        for case in cases:  # untimed: the driver's first run of each kind pays its imports and caches
            one_run(case, srv, args.streams, 1.0, Path(tmp))
        for round_ in range(args.rounds):
            for case in cases:
                row = one_case(case, srv, args.streams, args.duration, Path(tmp))
                row["round"] = round_ + 1
                rows.append(row)
    header = ["case", "round", "requests", "chunks", "client CPU s", "steady chunks/CPU-s", "vs plain",
              "TTFT err p50 ms", "TTFT err p99 ms", "ITL err p50 ms", "ITL err p99 ms"]
    table = []
    for row in rows:
        plain = next(r for r in rows if r["case"] == reference[row["case"]] and r["round"] == row["round"])
        table.append([row["case"], row["round"], row["requests"], row["chunks"], row["client_cpu_s"],
                      row["chunks_per_cpu_s"], row["chunks_per_cpu_s"] / plain["chunks_per_cpu_s"],
                      row["ttft_err_p50_ms"], row["ttft_err_p99_ms"], row["itl_err_p50_ms"], row["itl_err_p99_ms"]])
    print_table(header, table, title=f"scripted users vs the plain path: {args.streams} streams, one worker, "
                                     f"{CHUNKS} chunks of 2 ms per request ({cpu_name()}, {os.cpu_count()} CPUs)")
    if args.save and not args.smoke:
        results = ResultsFile("loadgen_users", cpu_name(), args.out)
        results.put("users-vs-plain", {"rows": rows}, run_info(streams=args.streams, duration=args.duration))
        results.save()
        print(json.dumps({"saved": str(results.path)}))


if __name__ == "__main__":
    main()
