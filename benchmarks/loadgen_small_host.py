"""servescope beside a bare client on a small host: timing error and schedule lateness, same server, same cores.

The setting: a single-threaded asyncio SSE server (tests/support/scripted_server.py, its own
process) that logs when it wrote each content chunk and when it had read each request, sharing
the CPUs this script may use with the client under test. Run the script under `taskset -c 0,1`
to put server and client on two cores; every process it starts inherits that.

  bare        one process, one asyncio.Protocol per connection, `perf_counter()` as the first
              statement of `data_received`, httptools for the framing and nothing else: no
              records, no dispatcher, no run directory. The floor on these cores.
  servescope  `servescope.execute_run`: the driver, its worker processes (the default worker
              count for the CPUs this process may use), records, the run directory.

Parts:

  closed   closed loop at each `--streams` level (64: 10 ms ITL, 640 requests; 512: 50 ms ITL,
           1,536 requests; 64 chunks a request, 50 ms TTFT): timing error = client timestamp
           minus the server's logged write time of the same chunk, p50/p99, first chunks (TTFT)
           and later chunks (ITL) apart; `--runs` runs of each client, alternating, and the
           ratio servescope / bare of each p99.
  open     open loop, Poisson at `--rate` req/s for `--rate-duration` s (one seeded schedule for
           both clients), 32-token prompts, 16-token outputs (50 ms TTFT, 10 ms ITL): lateness
           measured at the server, its receive time minus the scheduled send time, p50/p99/max,
           and servescope's own `schedule_lag_s` p99.

Beside each run: CPU milliseconds per 1,000 chunks of the driver (the bare client's process),
the workers and the server, over the load itself (read from /proc: robust to other load on
the host, unlike the timing figures).

    taskset -c 0,1 python -m benchmarks.loadgen_small_host          # ~2 min
    python -m benchmarks.loadgen_small_host --parts open --rate 1000 --runs 1
    python -m benchmarks.loadgen_small_host --smoke                 # a quick check of this script

Percentiles are nearest-rank (servescope.analyzers.metrics). With --save the figures go to
benchmarks/results/loadgen_small_host_<cpu>.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from time import perf_counter
from typing import Any

if __package__ in (None, ""):  # `python benchmarks/<script>.py`: import from the repository root, not benchmarks/
    sys.path[0] = str(Path(__file__).resolve().parents[1])

import httptools  # noqa: E402
import numpy as np  # noqa: E402

from benchmarks.common import (  # noqa: E402
    ResultsFile,
    add_results_args,
    cpu_name,
    cpu_ticks,
    descendants,
    print_table,
    quiet_console,
    run_info,
    scripted_server_class,
    timing_errors,
)
from servescope import RunConfig, execute_run, load_run  # noqa: E402
from servescope.analyzers.metrics import quantile  # noqa: E402
from servescope.harness.client.sse import split_events  # noqa: E402
from servescope.harness.config import Arrival  # noqa: E402
from servescope.harness.loadgen.arrivals import send_offsets  # noqa: E402

ScriptedServer = scripted_server_class()
CHUNKS = 64  # closed loop: content chunks per request
TTFT_S = 0.05
CLOSED_ITL_S = {64: 0.01, 512: 0.05}  # the two settings; other stream counts get 50 ms
CLOSED_REQUESTS = {64: 640, 512: 1536}  # other stream counts: three waves
OPEN_PROMPT_TOKENS, OPEN_OUTPUT_TOKENS, OPEN_ITL_S = 32, 16, 0.01
SEED = 1
CLK_TCK = os.sysconf("SC_CLK_TCK")


def ms(values: list[float], q: float) -> float:
    value = quantile(values, q)
    return float("nan") if value is None else 1e3 * value


# ---------------------------------------------------------------------------- CPU accounting
class CpuSampler:
    """Samples (time, driver CPU, workers' CPU, server CPU) every `period_s` on a thread, so that the
    CPU spent over the load alone (not start-up, not the end-of-run summary) can be read off."""

    def __init__(self, server_pid: int, period_s: float = 0.2) -> None:
        self.server_pid, self.period_s = server_pid, period_s
        self.samples: list[tuple[float, float, float, float]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="cpu-sampler", daemon=True)

    def sample(self) -> None:
        me = os.getpid()
        workers = sum(cpu_ticks(p) for p in descendants(me) if p != self.server_pid) / CLK_TCK
        self.samples.append((perf_counter(), time.process_time(), workers, cpu_ticks(self.server_pid) / CLK_TCK))

    def _loop(self) -> None:
        while not self._stop.wait(self.period_s):
            self.sample()

    def __enter__(self) -> "CpuSampler":
        self.sample()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.sample()

    def between(self, t0: float, t1: float) -> tuple[float, float, float]:
        """CPU seconds (driver, workers, server) between perf_counter times t0 and t1, interpolated."""
        times = np.array([s[0] for s in self.samples])
        return tuple(float(np.interp(t1, times, col) - np.interp(t0, times, col))  # type: ignore[return-value]
                     for col in (np.array([s[k] for s in self.samples]) for k in (1, 2, 3)))


def cpu_columns(cpu: tuple[float, float, float], chunks: int) -> dict[str, float]:
    per_k = 1e3 * 1e3 / chunks if chunks else float("nan")  # CPU ms per 1,000 chunks
    return {"driver_cpu_ms_per_kchunk": cpu[0] * per_k, "workers_cpu_ms_per_kchunk": cpu[1] * per_k,
            "server_cpu_ms_per_kchunk": cpu[2] * per_k}


# ---------------------------------------------------------------------------- the bare client
class BareConnection(asyncio.Protocol):
    """One keep-alive connection: the time of every read, its body bytes, and nothing else."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.parser: httptools.HttpResponseParser | None = None
        self.t = 0.0
        self.pieces: list[bytes] = []
        self.times: list[float] = []
        self.done: asyncio.Future[None] | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.t = perf_counter()
        self.parser.feed_data(data)  # type: ignore[union-attr]

    def on_body(self, body: bytes) -> None:
        self.pieces.append(body)
        self.times.append(self.t)

    def on_message_complete(self) -> None:
        self.done.set_result(None)  # type: ignore[union-attr]

    def connection_lost(self, exc: Exception | None) -> None:
        if self.done is not None and not self.done.done():
            self.done.set_exception(ConnectionError(f"connection lost: {exc}"))

    async def request(self, payload: bytes) -> tuple[list[bytes], list[float]]:
        self.pieces, self.times = [], []
        self.parser = httptools.HttpResponseParser(self)
        self.done = asyncio.get_running_loop().create_future()
        self.transport.write(payload)  # type: ignore[union-attr]
        await self.done
        return self.pieces, self.times


def request_bytes(port: int, prompt_words: int, max_tokens: int) -> bytes:
    body = json.dumps({"model": "scripted", "prompt": " ".join(["hello"] * prompt_words), "max_tokens": max_tokens,
                       "stream": True}).encode()
    return (f"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n").encode() + body


def content_times(pieces: list[bytes], times: list[float]) -> tuple[str | None, list[float]]:
    """(response id, arrival time of each content chunk) of one response; parsed after the run."""
    events = split_events(pieces, times)
    rid, out = None, []
    for t, data in zip(events.times, events.data):
        if data == b"[DONE]":
            continue
        obj = json.loads(data)
        rid = rid or obj.get("id")
        if any(c.get("text") for c in obj.get("choices") or []):
            out.append(t)
    return rid, out


async def _open(port: int, n: int) -> list[BareConnection]:
    loop = asyncio.get_running_loop()
    conns = []
    for _ in range(n):
        _, conn = await loop.create_connection(BareConnection, "127.0.0.1", port)
        conns.append(conn)
    return conns


async def bare_closed(port: int, streams: int, requests: int, max_tokens: int) -> tuple[list, float, float]:
    """Closed loop: `streams` slots share `requests`; returns (responses, load start, load end)."""
    conns = await _open(port, streams)
    payload = request_bytes(port, OPEN_PROMPT_TOKENS, max_tokens)
    left = [requests]
    responses: list[tuple[list[bytes], list[float]]] = []

    async def slot(conn: BareConnection) -> None:
        while left[0] > 0:
            left[0] -= 1
            responses.append(await conn.request(payload))

    t0 = perf_counter()
    await asyncio.gather(*(slot(c) for c in conns))
    t1 = perf_counter()
    for conn in conns:
        conn.transport.close()  # type: ignore[union-attr]
    return responses, t0, t1


async def bare_open(port: int, offsets: list[float], prewarm: int) -> tuple[list, float, float]:
    """Open loop: request i goes out at start + offsets[i] on an idle connection (a new one if none is idle).

    Returns ([(scheduled perf_counter time, pieces, times)], load start, load end)."""
    idle = await _open(port, prewarm)
    payload = request_bytes(port, OPEN_PROMPT_TOKENS, OPEN_OUTPUT_TOKENS)
    loop = asyncio.get_running_loop()
    out: list[tuple[float, list[bytes], list[float]]] = []

    async def one(due: float) -> None:
        delay = due - perf_counter()
        while delay > 0:
            await asyncio.sleep(delay)
            delay = due - perf_counter()
        conn = idle.pop() if idle else (await loop.create_connection(BareConnection, "127.0.0.1", port))[1]
        pieces, times = await conn.request(payload)
        idle.append(conn)
        out.append((due, pieces, times))

    start = perf_counter() + 0.1
    await asyncio.gather(*(one(start + offset) for offset in offsets))
    end = perf_counter()
    for conn in idle:
        conn.transport.close()  # type: ignore[union-attr]
    return out, start, end


def run_bare(coro: Any) -> Any:
    """The bare client's loop: uvloop where installed, as servescope's workers use."""
    try:
        import uvloop

        return uvloop.run(coro)
    except ImportError:
        return asyncio.run(coro)


# ---------------------------------------------------------------------------- one run of each kind
@dataclass
class Case:
    streams: int
    requests: int
    itl_s: float

    @property
    def script(self) -> dict[str, float]:
        return {"first_token_delay_s": TTFT_S, "itl_s": self.itl_s}


def closed_bare(srv: Any, case: Case) -> dict[str, Any]:
    srv.reset()
    cpu0, server0 = time.process_time(), cpu_ticks(srv.pid)
    responses, t0, t1 = run_bare(bare_closed(srv.port, case.streams, case.requests, CHUNKS))
    cpu, server = time.process_time() - cpu0, (cpu_ticks(srv.pid) - server0) / CLK_TCK
    log = srv.write_log()
    ttft, itl, chunks = [], [], 0
    for pieces, times in responses:
        rid, seen = content_times(pieces, times)
        written = log.get(rid or "", [])
        errors = [a - b for a, b in zip(seen, written)]
        if errors:
            ttft.append(errors[0])
            itl.extend(errors[1:])
        chunks += len(seen)
    return {"requests": len(responses), "chunks": chunks, "ttft": ttft, "itl": itl, "wall_s": t1 - t0,
            **cpu_columns((cpu, 0.0, server), chunks), "workers": 0}


def _servescope_run(srv: Any, work: Path, **options: Any) -> tuple[Path, Any, CpuSampler]:
    out = work / f"run-{len(list(work.iterdir()))}"
    config = RunConfig(target=srv.base_url, model="scripted", out=str(out), report=False, show_progress=False,
                       seed=SEED, **options)
    srv.reset()
    with CpuSampler(srv.pid) as sampler:
        execute_run(config, console=quiet_console())
    return out, load_run(out), sampler


def _load_cpu(run: Any, sampler: CpuSampler) -> tuple[float, float, float]:
    origin = run.run["clock_origin_perf_counter_s"]
    measured = [p for p in run.run["phases"] if p["phase"] != "warmup"]
    return sampler.between(origin + measured[0]["start_s"], origin + measured[-1]["end_s"])


def closed_servescope(srv: Any, case: Case, work: Path) -> dict[str, Any]:
    out, run, sampler = _servescope_run(srv, work, concurrency=case.streams, requests=case.requests,
                                        prompt_tokens=OPEN_PROMPT_TOKENS, max_tokens=CHUNKS)
    ttft, itl, chunks = timing_errors(out, srv.write_log())
    phase = run.run["phases"][-1]
    return {"requests": len(run.requests), "chunks": chunks, "ttft": ttft, "itl": itl,
            "wall_s": phase["end_s"] - phase["start_s"], **cpu_columns(_load_cpu(run, sampler), chunks),
            "workers": run.run["workers"], "status": run.run["status"]}


def open_offsets(rate: float, duration_s: float) -> list[float]:
    """The seeded schedule servescope's dispatcher draws for a run's first phase (same seed, same times)."""
    return list(send_offsets(Arrival.parse("poisson"), rate, np.random.default_rng([SEED, 0]), duration_s=duration_s))


def open_bare(srv: Any, rate: float, duration_s: float) -> dict[str, Any]:
    srv.reset()
    offsets = open_offsets(rate, duration_s)
    cpu0, server0 = time.process_time(), cpu_ticks(srv.pid)
    responses, t0, t1 = run_bare(bare_open(srv.port, offsets, prewarm=max(64, int(rate))))
    cpu, server = time.process_time() - cpu0, (cpu_ticks(srv.pid) - server0) / CLK_TCK
    received = srv.receive_log()
    late, chunks = [], 0
    for due, pieces, times in responses:
        rid, seen = content_times(pieces, times)
        chunks += len(seen)
        if rid in received:
            late.append(received[rid] - due)
    return {"requests": len(responses), "chunks": chunks, "late": late, "own_lag": [], "wall_s": t1 - t0,
            **cpu_columns((cpu, 0.0, server), chunks), "workers": 0}


def open_servescope(srv: Any, rate: float, duration_s: float, work: Path) -> dict[str, Any]:
    out, run, sampler = _servescope_run(srv, work, rate=rate, arrival="poisson", duration_s=duration_s,
                                        prompt_tokens=OPEN_PROMPT_TOKENS, max_tokens=OPEN_OUTPUT_TOKENS)
    received = srv.receive_log()
    origin = run.run["clock_origin_perf_counter_s"]
    frame = run.requests
    late = [received[rid] - (origin + at) for rid, at in zip(frame["response_id"], frame["scheduled_at"])
            if rid in received]
    chunks = int(frame["chunk_tokens"].map(len).sum())
    phase = run.run["phases"][-1]
    return {"requests": len(frame), "chunks": chunks, "late": late,
            "own_lag": frame["schedule_lag_s"].dropna().tolist(), "wall_s": phase["end_s"] - phase["start_s"],
            **cpu_columns(_load_cpu(run, sampler), chunks), "workers": run.run["workers"],
            "status": run.run["status"]}


# ---------------------------------------------------------------------------- main
PARTS = ("closed", "open")
CPU_HEADER = ["driver CPU ms/1k chunks", "workers", "server"]


def _cpu_cells(row: dict[str, Any]) -> list[float]:
    return [row["driver_cpu_ms_per_kchunk"], row["workers_cpu_ms_per_kchunk"], row["server_cpu_ms_per_kchunk"]]


def _closed_part(args: argparse.Namespace, work: Path, results: ResultsFile) -> None:
    rows, ratios = [], []
    for streams in (int(s) for s in args.streams.split(",")):
        found = []
        case = Case(streams, args.requests or CLOSED_REQUESTS.get(streams, 3 * streams),
                    CLOSED_ITL_S.get(streams, 0.05))
        with ScriptedServer(default_script=case.script) as srv:
            for run in range(1, args.runs + 1):
                pair = {}
                for client in ("bare", "servescope"):
                    r = closed_bare(srv, case) if client == "bare" else closed_servescope(srv, case, work)
                    fig = {"streams": streams, "itl_s": case.itl_s, "client": client, "run": run,
                           "requests": r["requests"], "chunks": r["chunks"], "workers": r["workers"],
                           "wall_s": r["wall_s"],
                           "ttft_err_p50_ms": ms(r["ttft"], 0.5), "ttft_err_p99_ms": ms(r["ttft"], 0.99),
                           "itl_err_p50_ms": ms(r["itl"], 0.5), "itl_err_p99_ms": ms(r["itl"], 0.99),
                           **{k: v for k, v in r.items() if k.endswith("_per_kchunk")}}
                    pair[client] = fig
                    found.append(fig)
                    rows.append([f"{streams} ({1e3 * case.itl_s:g} ms ITL)", client, run, fig["workers"],
                                 fig["requests"], fig["chunks"], fig["ttft_err_p50_ms"], fig["ttft_err_p99_ms"],
                                 fig["itl_err_p50_ms"], fig["itl_err_p99_ms"], *_cpu_cells(fig)])
                ratios.append([streams, run, pair["servescope"]["ttft_err_p99_ms"], pair["bare"]["ttft_err_p99_ms"],
                               pair["servescope"]["ttft_err_p99_ms"] / pair["bare"]["ttft_err_p99_ms"],
                               pair["servescope"]["itl_err_p99_ms"], pair["bare"]["itl_err_p99_ms"],
                               pair["servescope"]["itl_err_p99_ms"] / pair["bare"]["itl_err_p99_ms"]])
        results.put(f"closed-{streams}", {"rows": found}, run_info(cpus=sorted(os.sched_getaffinity(0))))
    print_table(["streams", "client", "run", "workers", "requests", "chunks", "TTFT err p50 ms", "TTFT err p99 ms",
                 "ITL err p50 ms", "ITL err p99 ms", *CPU_HEADER], rows,
                title=f"closed loop, {CHUNKS} chunks a request, {1e3 * TTFT_S:g} ms TTFT: client timestamp - server "
                      f"write time ({cpu_name()}, CPUs {_cpus()})")
    print_table(["streams", "run", "TTFT p99 servescope", "bare", "ratio", "ITL p99 servescope", "bare", "ratio"],
                ratios, title="servescope / bare client, p99 timing error (ms); the goal is a ratio under 1.5")


def _open_part(args: argparse.Namespace, work: Path, results: ResultsFile) -> None:
    rows, found = [], []
    script = {"first_token_delay_s": TTFT_S, "itl_s": OPEN_ITL_S}
    with ScriptedServer(default_script=script) as srv:
        for run in range(1, args.runs + 1):
            for client in ("bare", "servescope"):
                r = (open_bare(srv, args.rate, args.rate_duration) if client == "bare"
                     else open_servescope(srv, args.rate, args.rate_duration, work))
                fig = {"rate": args.rate, "client": client, "run": run, "requests": r["requests"],
                       "chunks": r["chunks"], "workers": r["workers"], "achieved_rps": r["requests"] / args.rate_duration,
                       "late_p50_ms": ms(r["late"], 0.5), "late_p99_ms": ms(r["late"], 0.99),
                       "late_max_ms": 1e3 * max(r["late"]) if r["late"] else float("nan"),
                       "own_lag_p99_ms": ms(r["own_lag"], 0.99),
                       **{k: v for k, v in r.items() if k.endswith("_per_kchunk")}}
                found.append(fig)
                rows.append([client, run, fig["workers"], fig["requests"], fig["late_p50_ms"], fig["late_p99_ms"],
                             fig["late_max_ms"], fig["own_lag_p99_ms"], *_cpu_cells(fig)])
    results.put("open", {"rows": found}, run_info(cpus=sorted(os.sched_getaffinity(0))))
    print_table(["client", "run", "workers", "requests", "late p50 ms", "late p99 ms", "late max ms",
                 "own lag p99 ms", *CPU_HEADER], rows,
                title=f"open loop, Poisson {args.rate:g} req/s for {args.rate_duration:g} s, {OPEN_PROMPT_TOKENS}/"
                      f"{OPEN_OUTPUT_TOKENS}-token requests: lateness at the server = receive time - scheduled time; "
                      f"the goal is p99 under 3 ms (CPUs {_cpus()})")


def _cpus() -> str:
    return ",".join(str(c) for c in sorted(os.sched_getaffinity(0)))


def main() -> None:
    sys.stdout.reconfigure(line_buffering=True)
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated, of: {', '.join(PARTS)}")
    parser.add_argument("--streams", default="64,512", help="closed-loop stream counts")
    parser.add_argument("--requests", type=int, default=None,
                        help="closed loop: requests per run (default: 640 at 64 streams, 1,536 at 512, else 3 waves)")
    parser.add_argument("--rate", type=float, default=1000.0, help="open loop: Poisson arrivals per second")
    parser.add_argument("--rate-duration", type=float, default=5.0, help="open loop: seconds of arrivals")
    parser.add_argument("--runs", type=int, default=2, help="runs of each client, alternating")
    parser.add_argument("--smoke", action="store_true", help="a quick check: 32 streams, 96 requests, 100 req/s, one run")
    add_results_args(parser, default_save=False)
    args = parser.parse_args()
    if args.smoke:
        args.streams, args.requests, args.rate, args.rate_duration, args.runs = "32", 96, 100.0, 1.0, 1
    parts = [p for p in args.parts.split(",") if p]
    if set(parts) - set(PARTS):
        parser.error(f"unknown part(s) {', '.join(sorted(set(parts) - set(PARTS)))}; the parts are: {', '.join(PARTS)}")
    results = ResultsFile("loadgen_small_host", cpu_name(), args.out, args.copy_to, save=args.save)
    started = perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        if "closed" in parts:
            _closed_part(args, Path(tmp), results)
        if "open" in parts:
            _open_part(args, Path(tmp), results)
    print(f"\ntotal {perf_counter() - started:.0f} s; {cpu_name()}, CPUs {_cpus()}"
          + (f"; results: {results.path}" if args.save else ""))


if __name__ == "__main__":
    main()
