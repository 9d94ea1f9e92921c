"""Ray-actor workers against local workers, and how many records the driver can take in.

Against the scripted SSE server in its own process (first chunk after 50 ms,
then one chunk every 2 ms, 64 chunks a request), at the same stream count,
through the whole load generator (`servescope.execute_run`, two workers):

  local   worker processes on this host (harness.loadgen.pool);
  ray     the same workers hosted by Ray actors (harness.loadgen.ray_pool), on a
          Ray cluster of two nodes started on this host (or --address).

For each: content chunks per worker CPU-second at steady state (each worker
reports its own process CPU; a short and a long run are differenced, so start-up
cancels out), the Ray relays' CPU beside it (sampled from /proc), and the timing
error of every chunk against the server's write log, p50/p99, TTFT and ITL apart.

driver-intake: the driver's cost per record, two ways: measured in the Ray run
(the driver process's CPU over the records it took in), and the record path
alone (Records batches of 64 real rows through the dispatcher's handler into
the run directory), as records per CPU-second of one core. Divided by the
records per second of a run, it says how much of a core the driver needs.

    python -m benchmarks.loadgen_ray             # ~3 min on 2 CPUs
    python -m benchmarks.loadgen_ray --smoke     # a quick check of this script
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
import tempfile
import threading
import time
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


class RelayCPU:
    """CPU seconds of the Ray actor processes (`ray::WorkerActor`) and their children, sampled every 0.2 s."""

    def __init__(self) -> None:
        self.ticks: dict[int, int] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _loop(self) -> None:
        while not self._stop.wait(0.2):
            for pid in (int(p) for p in os.listdir("/proc") if p.isdigit()):
                try:
                    if b"ray::WorkerActor" not in Path(f"/proc/{pid}/cmdline").read_bytes():
                        continue
                    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
                except OSError:
                    continue
                self.ticks[pid] = max(self.ticks.get(pid, 0), int(fields[11]) + int(fields[12]))

    def __enter__(self) -> "RelayCPU":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    @property
    def seconds(self) -> float:
        return sum(self.ticks.values()) / os.sysconf("SC_CLK_TCK")


def one_run(kind: str, srv: Any, address: str | None, streams: int, duration_s: float, out: Path) -> dict[str, Any]:
    options: dict[str, Any] = {"target": srv.base_url, "model": "bench", "concurrency": streams, "workers": 2,
                               "duration_s": f"{duration_s:g}s", "warmup_s": "1s", "prompt_tokens": 16,
                               "max_tokens": CHUNKS, "report": False, "out": str(out), "show_progress": False}
    if kind == "ray":
        options["ray"] = address
    srv.reset()
    own = resource.getrusage(resource.RUSAGE_SELF)
    with RelayCPU() as relays:
        outcome = execute_run(RunConfig(**options), console=quiet_console())
    after = resource.getrusage(resource.RUSAGE_SELF)
    run = load_run(out)
    ttft, itl, chunks = timing_errors(out, srv.write_log())
    workers = sum(w.get("cpu_s") or 0.0 for w in run.run["client_check"]["per_worker"])
    return {"kind": kind, "status": outcome.status, "chunks": chunks, "records": len(run.requests),
            "worker_cpu_s": workers, "relay_cpu_s": relays.seconds if kind == "ray" else 0.0,
            "driver_cpu_s": (after.ru_utime + after.ru_stime) - (own.ru_utime + own.ru_stime),
            "ttft": ttft, "itl": itl, "nodes": int(run.requests["node"].nunique())}


def one_case(kind: str, srv: Any, address: str | None, streams: int, duration_s: float, work: Path) -> dict[str, Any]:
    short = one_run(kind, srv, address, streams, duration_s / 5, work / f"{kind}-short-{time.monotonic_ns()}")
    full = one_run(kind, srv, address, streams, duration_s, work / f"{kind}-full-{time.monotonic_ns()}")
    d_chunks = full["chunks"] - short["chunks"]
    d_worker = full["worker_cpu_s"] - short["worker_cpu_s"]
    d_relay = full["relay_cpu_s"] - short["relay_cpu_s"]
    q = lambda v, p: float(np.percentile(v, p)) * 1e3 if v else float("nan")  # noqa: E731
    return {"kind": kind, "status": full["status"], "nodes": full["nodes"], "records": full["records"],
            "chunks": full["chunks"], "chunks_per_worker_cpu_s": d_chunks / d_worker if d_worker > 0 else float("nan"),
            "chunks_per_client_cpu_s": d_chunks / (d_worker + d_relay) if d_worker + d_relay > 0 else float("nan"),
            "relay_cpu_share": d_relay / (d_worker + d_relay) if d_worker + d_relay > 0 else 0.0,
            "driver_cpu_per_record_ms": full["driver_cpu_s"] / max(1, full["records"]) * 1e3,
            "ttft_err_p50_ms": q(full["ttft"], 50), "ttft_err_p99_ms": q(full["ttft"], 99),
            "itl_err_p50_ms": q(full["itl"], 50), "itl_err_p99_ms": q(full["itl"], 99)}


def record_path_rate(rows: list[dict[str, Any]], work: Path, batches: int) -> float:
    """Records per CPU-second through the driver's record path: dispatcher handler -> hooks -> run directory."""
    from servescope.harness.api import _Hooks
    from servescope.harness.loadgen.dispatcher import Dispatcher
    from servescope.harness.loadgen.messages import Records
    from servescope.rundir.writer import RunDirWriter

    writer = RunDirWriter(work / f"intake-{time.monotonic_ns()}")
    writer.start({})
    hooks = _Hooks(writer, quiet_console(), time.perf_counter, None)

    class _NoWorkers(list):  # the handler under test never talks to workers
        pass

    dispatcher = Dispatcher(_NoWorkers([None]), [], iter(()), time.perf_counter, hooks)
    batch = (rows * (64 // max(1, len(rows)) + 1))[:64]
    t0 = time.process_time()
    for _ in range(batches):
        dispatcher._handle(Records(0, [dict(row) for row in batch]))
        writer.tick()
    writer.finish("complete")
    return batches * len(batch) / (time.process_time() - t0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--address", help="an existing Ray cluster (default: start two nodes on this host)")
    parser.add_argument("--streams", type=int, default=64)
    parser.add_argument("--duration", type=float, default=10.0, help="seconds of each case's long run")
    parser.add_argument("--smoke", action="store_true", help="8 streams, 2 s runs")
    add_results_args(parser, default_save=False)
    args = parser.parse_args()
    if args.smoke:
        args.streams, args.duration = 8, 2.0
    cluster = None
    if args.address is None:
        from ray.cluster_utils import Cluster

        cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 2, "include_dashboard": False})
        cluster.add_node(num_cpus=2)
        cluster.wait_for_nodes()
        args.address = cluster.address
    rows: list[dict[str, Any]] = []
    try:
        with ScriptedServer(default_script=PACING) as srv, tempfile.TemporaryDirectory() as tmp:
            for kind in ("local", "ray"):  # untimed: the driver's first run of each kind pays one-time costs
                one_run(kind, srv, args.address, args.streams, 1.0, Path(tmp) / f"{kind}-first")
            for kind in ("local", "ray"):
                rows.append(one_case(kind, srv, args.address, args.streams, args.duration, Path(tmp)))
            sample = load_run(next(Path(tmp).glob("local-full-*"))).requests.to_dict("records")[:64]
            intake = record_path_rate(sample, Path(tmp), 200 if args.smoke else 2000)
    finally:
        if cluster is not None:
            import ray

            ray.shutdown()
            cluster.shutdown()
    local = rows[0]
    print_table(["workers", "nodes", "records", "chunks/worker CPU-s", "chunks/client CPU-s", "vs local",
                 "relay share", "TTFT err p50 ms", "TTFT err p99 ms", "ITL err p50 ms", "ITL err p99 ms"],
                [[r["kind"], r["nodes"], r["records"], r["chunks_per_worker_cpu_s"], r["chunks_per_client_cpu_s"],
                  r["chunks_per_client_cpu_s"] / local["chunks_per_client_cpu_s"], r["relay_cpu_share"],
                  r["ttft_err_p50_ms"], r["ttft_err_p99_ms"], r["itl_err_p50_ms"], r["itl_err_p99_ms"]] for r in rows],
                title=f"Ray-actor workers vs local workers: 2 workers, {args.streams} streams, {CHUNKS} chunks of 2 ms "
                      f"({cpu_name()}, {os.cpu_count()} CPUs)")
    ray_row = rows[1]
    print_table(["driver record intake", "records per CPU-second", "CPU per record ms"],
                [["record path alone (64-row batches)", intake, 1e3 / intake],
                 ["measured in the Ray run (driver process)", 1e3 / ray_row["driver_cpu_per_record_ms"],
                  ray_row["driver_cpu_per_record_ms"]]],
                title="what one driver core can take in")
    if args.save and not args.smoke:
        results = ResultsFile("loadgen_ray", cpu_name(), args.out)
        results.put("ray-vs-local", {"rows": rows, "record_path_per_cpu_s": intake},
                    run_info(streams=args.streams, duration=args.duration))
        results.save()


if __name__ == "__main__":
    main()
