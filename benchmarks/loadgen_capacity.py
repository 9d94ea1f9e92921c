"""How much load can one client process drive, and how exactly does it time what it sees?

Against the scripted SSE server (tests/support/scripted_server.py) running in
its own process, this measures for each transport of `servescope.harness.client`:

  throughput     content chunks per CPU-second of this (the client) process and
                 sustained chunks/s, paced (64 streams, one chunk every 2 ms each: one read
                 per chunk, so the figure is the true per-chunk cost) and flooded (no delay);
  timing-error   client timestamp minus the server's logged write time of
                 the same chunk (joined on response id + chunk index, same monotonic
                 clock), p50/p99/max over all chunks and over first chunks (TTFT), at 64,
                 256 and 1024 concurrent streams, plus the first wave's start spread (last
                 minus first send time of the requests launched together after pre-warm);
  open-loop      the highest open-loop request rate whose p99 schedule lag (sent_at minus
                 scheduled_at) stays under 5 ms, for short requests from one process;
  execute-run    the same open-loop steps through the whole load generator
                 (`servescope.execute_run`: worker processes, run directory), 1 and 2 workers.

    python -m benchmarks.loadgen_capacity                     # all transports, ~2-3 min
    python -m benchmarks.loadgen_capacity --transports fast --save
    python -m benchmarks.loadgen_capacity --smoke             # a quick check of this script

Percentiles are nearest-rank (servescope.analyzers.metrics). With --save the figures go to
benchmarks/results/loadgen_capacity_<cpu>.json.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Awaitable, Callable

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
from servescope.analyzers.metrics import quantile  # noqa: E402
from servescope.harness.client import ClientConfig, StreamingClient  # noqa: E402
from servescope.rundir.schema import RequestRecord  # noqa: E402
from servescope.workloads.types import RequestSpec  # noqa: E402

ScriptedServer = scripted_server_class()


def pct(values: list[float], q: float) -> float:
    """The q-th percentile (q in 0-100), nearest-rank; NaN without values."""
    value = quantile(values, q / 100)
    return float("nan") if value is None else value


def spec(i: int, script: dict[str, Any], max_tokens: int) -> RequestSpec:
    return RequestSpec(request_id=f"r{i}", api="completions", prompt="benchmark", max_tokens=max_tokens,
                       extra_body={"script": script})


def new_loop(kind: str) -> asyncio.AbstractEventLoop:
    if kind == "uvloop":
        import uvloop

        return uvloop.new_event_loop()
    return asyncio.new_event_loop()


def run_in_loop(kind: str, coro_fn: Callable[[], Awaitable[Any]]) -> Any:
    loop = new_loop(kind)
    try:
        return loop.run_until_complete(coro_fn())
    finally:
        loop.close()


def client_for(srv: ScriptedServer, transport: str, pool: int) -> StreamingClient:
    # clock_origin 0: record times are absolute perf_counter() values, like the server's log.
    return StreamingClient(ClientConfig(srv.base_url, "bench", 0.0, transport=transport, pool_size=pool, timeout_s=30))


# ---------------------------------------------------------------------------- throughput
@dataclass
class Throughput:
    transport: str
    mode: str
    chunks: int
    wall_s: float
    cpu_s: float
    errors: int

    @property
    def chunks_per_s(self) -> float:
        return self.chunks / self.wall_s

    @property
    def chunks_per_cpu_s(self) -> float:
        return self.chunks / self.cpu_s if self.cpu_s else float("nan")


async def closed_loop(client: StreamingClient, streams: int, duration_s: float, make: Callable[[int], RequestSpec]) -> list[RequestRecord]:
    """`streams` slots, each sending its next request as soon as the last ended, until the deadline."""
    records: list[RequestRecord] = []
    deadline = time.perf_counter() + duration_s
    counter = iter(range(10**9))

    async def slot() -> None:
        while time.perf_counter() < deadline:
            i = next(counter)
            rec = RequestRecord(f"r{i}")
            await client.execute(make(i), rec)
            records.append(rec)

    await asyncio.gather(*(slot() for _ in range(streams)))
    return records


def bench_throughput(srv: ScriptedServer, transport: str, mode: str, loop: str, duration_s: float) -> Throughput:
    itl = 0.002 if mode == "paced" else 0.0
    script = {"tokens": 100, "itl_s": itl}

    async def go() -> Throughput:
        client = client_for(srv, transport, 64)
        await client.prewarm(64)
        cpu0, t0 = time.process_time(), time.perf_counter()
        records = await closed_loop(client, 64, duration_s, lambda i: spec(i, script, 100))
        wall, cpu = time.perf_counter() - t0, time.process_time() - cpu0
        await client.aclose()
        chunks = sum(len(r.chunk_tokens) for r in records)
        return Throughput(transport, mode, chunks, wall, cpu, sum(r.status != "ok" for r in records))

    return run_in_loop(loop, go)


# ---------------------------------------------------------------------------- timing error
@dataclass
class TimingError:
    transport: str
    streams: int
    n_chunks: int
    p50_ms: float
    p99_ms: float
    max_ms: float
    ttft_p99_ms: float
    wave_spread_ms: float
    wave_new_connections: int
    errors: int


def content_times(rec: RequestRecord) -> list[float]:
    if rec.first_token_at is None:
        return []
    out = [rec.first_token_at]
    for gap in rec.itl_s:
        out.append(out[-1] + gap)
    return out


def bench_timing(srv: ScriptedServer, transport: str, streams: int, loop: str) -> TimingError:
    # A realistic decode pace: first token after 50 ms, then one token every 50 ms (20 tok/s per stream).
    script = {"tokens": 16, "first_token_delay_s": 0.05, "itl_s": 0.05}

    async def go() -> list[RequestRecord]:
        client = client_for(srv, transport, streams)
        await client.prewarm(streams)
        records = [RequestRecord(f"r{i}") for i in range(streams)]
        await asyncio.gather(*(client.execute(spec(i, script, 16), records[i]) for i in range(streams)))
        await client.aclose()
        return records

    srv.reset()
    records = run_in_loop(loop, go)
    log = srv.write_log()
    errors, firsts = [], []
    for rec in records:
        writes = log.get(rec.response_id or "", [])
        for k, (seen, wrote) in enumerate(zip(content_times(rec), writes)):
            errors.append(seen - wrote)
            if k == 0:
                firsts.append(seen - wrote)
    sent = [r.sent_at for r in records if r.sent_at is not None]
    return TimingError(
        transport, streams, len(errors), pct(errors, 50) * 1e3, pct(errors, 99) * 1e3,
        max(errors) * 1e3 if errors else float("nan"), pct(firsts, 99) * 1e3,
        (max(sent) - min(sent)) * 1e3 if sent else float("nan"),
        sum(r.connect_s is not None for r in records), sum(r.status != "ok" for r in records),
    )


# ---------------------------------------------------------------------------- open-loop rate
@dataclass
class RateStep:
    transport: str
    rate: float
    sent: int
    achieved_rps: float
    lag_p50_ms: float
    lag_p99_ms: float
    errors: int

    @property
    def ok(self) -> bool:
        return self.lag_p99_ms < 5.0 and self.errors == 0 and self.achieved_rps >= 0.95 * self.rate


async def open_loop(client: StreamingClient, rate: float, duration_s: float) -> list[RequestRecord]:
    """Constant-rate arrivals: request i is due at t0 + i/rate, sent by its own task."""
    script = {"tokens": 2}
    n = int(rate * duration_s)
    records: list[RequestRecord] = []
    tasks: set[asyncio.Task[None]] = set()
    t0 = time.perf_counter() + 0.05

    async def one(i: int, due: float) -> None:
        rec = RequestRecord(f"r{i}", scheduled_at=due)
        await client.execute(spec(i, script, 2), rec)
        records.append(rec)

    for i in range(n):
        due = t0 + i / rate
        delay = due - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        task = asyncio.get_running_loop().create_task(one(i, due))
        tasks.add(task)
        task.add_done_callback(tasks.discard)
    if tasks:
        await asyncio.gather(*tasks)
    return records


def bench_rate(srv: ScriptedServer, transport: str, loop: str, rates: list[float], duration_s: float) -> list[RateStep]:
    steps: list[RateStep] = []
    for rate in rates:
        async def go() -> list[RequestRecord]:
            client = client_for(srv, transport, 64)
            await client.prewarm(64)
            recs = await open_loop(client, rate, duration_s)
            await client.aclose()
            return recs

        records = run_in_loop(loop, go)
        lags = [r.schedule_lag_s for r in records if r.schedule_lag_s is not None]
        span = max(r.end_at for r in records if r.end_at) - min(r.scheduled_at for r in records)
        step = RateStep(transport, rate, len(records), len(records) / span, pct(lags, 50) * 1e3,
                        pct(lags, 99) * 1e3, sum(r.status != "ok" for r in records))
        steps.append(step)
        if not step.ok:
            break
    return steps


# ---------------------------------------------------------------------------- the whole load generator
def bench_execute_run(srv, workers: int, rates: list[float], duration_s: float) -> list[dict[str, Any]]:
    """The same open-loop test through servescope.execute_run (worker processes, run directory)."""
    import tempfile

    from servescope import RunConfig, execute_run, load_run

    rows = []
    for rate in rates:
        with tempfile.TemporaryDirectory() as tmp:
            config = RunConfig(target=srv.base_url, model="scripted", prompt_tokens=16, max_tokens=2, rate=rate,
                               arrival="constant", duration_s=duration_s, workers=workers, out=os.path.join(tmp, "run"),
                               report=False, show_progress=False)
            outcome = execute_run(config, quiet_console())
            df = load_run(outcome.run_dir).requests
        lags = df["schedule_lag_s"].dropna().tolist()
        span = df["end_at"].max() - df["scheduled_at"].min()
        row = {"workers": workers, "rate": rate, "sent": len(df), "achieved_rps": float(len(df) / span),
               "lag_p50_ms": pct(lags, 50) * 1e3, "lag_p99_ms": pct(lags, 99) * 1e3,
               "errors": int((df["status"] != "ok").sum())}
        row["ok"] = bool(row["lag_p99_ms"] < 5.0 and row["errors"] == 0 and row["achieved_rps"] >= 0.95 * rate)
        rows.append(row)
        if not row["ok"]:
            break
    return rows


# ---------------------------------------------------------------------------- main
PARTS = ("throughput", "timing-error", "open-loop", "execute-run")


def main() -> None:
    sys.stdout.reconfigure(line_buffering=True)  # tables appear as each part finishes
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated, of: {', '.join(PARTS)}")
    ap.add_argument("--transports", default="fast,httpx,aiohttp")
    ap.add_argument("--loop", choices=["uvloop", "asyncio"], default="uvloop", help="client event loop")
    ap.add_argument("--streams", default="64,256,1024", help="concurrency levels of the timing-error runs")
    ap.add_argument("--duration", type=float, default=3.0, help="seconds per throughput run")
    ap.add_argument("--rates", default="500,1000,1500,2000,2500,3000,4000,5000")
    ap.add_argument("--rate-duration", type=float, default=2.0)
    ap.add_argument("--workers", default="1,2", help="execute-run: worker process counts")
    ap.add_argument("--smoke", action="store_true", help="a quick check: fast transport, short runs, low rates")
    add_results_args(ap, default_save=False)
    args = ap.parse_args()
    if args.smoke:
        args.transports, args.streams, args.duration = "fast", "64", 0.5
        args.rates, args.rate_duration, args.workers = "200,400", 0.5, "1"
    parts = [p for p in args.parts.split(",") if p]
    if set(parts) - set(PARTS):
        unknown = ", ".join(sorted(set(parts) - set(PARTS)))
        raise SystemExit(f"unknown part(s) {unknown}; the parts are: {', '.join(PARTS)}")
    transports = [t for t in args.transports.split(",") if t]
    rates = [float(x) for x in args.rates.split(",")]
    results = ResultsFile("loadgen_capacity", cpu_name(), args.out, args.copy_to, save=args.save)
    run = run_info(client_loop=args.loop)
    started = time.perf_counter()
    with ScriptedServer() as srv:
        if "throughput" in parts:
            rows, found = [], []
            for t in transports:
                for mode in ("paced", "flood"):
                    r = bench_throughput(srv, t, mode, args.loop, args.duration)
                    found.append({**asdict(r), "chunks_per_s": r.chunks_per_s, "chunks_per_cpu_s": r.chunks_per_cpu_s})
                    rows.append([t, mode, r.chunks, r.chunks_per_s, r.chunks_per_cpu_s, 100 * r.cpu_s / r.wall_s,
                                 r.errors])
            results.put("throughput", {"rows": found}, run)
            print_table(["transport", "mode", "chunks", "chunks/s", "chunks/CPU-s", "client CPU %", "errors"], rows,
                        title="throughput, 64 streams x 100 tokens (paced: 2 ms/chunk/stream; flood: no delay)")
        if "timing-error" in parts:
            rows, found = [], []
            for t in transports:
                for n in (int(x) for x in args.streams.split(",")):
                    if t == "httpx" and n > 256:
                        # httpx already needed ~26 s to start 256 streams (wave spread); 1024 takes minutes.
                        rows.append([t, n, "skipped: httpx starts 256 streams over tens of seconds"] + [""] * 7)
                        continue
                    r = bench_timing(srv, t, n, args.loop)
                    found.append(asdict(r))
                    rows.append([t, n, r.n_chunks, r.p50_ms, r.p99_ms, r.max_ms, r.ttft_p99_ms, r.wave_spread_ms,
                                 r.wave_new_connections, r.errors])
            results.put("timing-error", {"rows": found}, run)
            print_table(["transport", "streams", "chunks", "p50", "p99", "max", "TTFT p99", "wave spread",
                         "new conns", "errors"], rows,
                        title="timing error = client timestamp - server write time, ms (16 tokens, 50 ms apart)")
        if "open-loop" in parts:
            rows, found = [], []
            for t in transports:
                steps = bench_rate(srv, t, args.loop, rates, args.rate_duration)
                found.extend(asdict(s) | {"ok": s.ok} for s in steps)
                best = max((s.rate for s in steps if s.ok), default=0.0)
                for s in steps:
                    rows.append([t, s.rate, s.achieved_rps, s.lag_p50_ms, s.lag_p99_ms, s.errors,
                                 "ok" if s.ok else "FAIL", "<- best" if s.rate == best else ""])
            results.put("open-loop", {"rows": found}, run)
            print_table(["transport", "rate", "achieved/s", "lag p50 ms", "lag p99 ms", "errors", "verdict", ""], rows,
                        title="open-loop short requests (2 tokens), one client process: pass = p99 schedule lag < 5 ms")
        if "execute-run" in parts:
            rows, found = [], []
            for w in (int(x) for x in args.workers.split(",")):
                try:
                    steps = bench_execute_run(srv, w, rates, args.rate_duration)
                except Exception as exc:  # the load generator is another part: report, do not hide the rest
                    rows.append([w, f"failed: {type(exc).__name__}: {exc}"[:120]] + [""] * 5)
                    continue
                found.extend(steps)
                rows += [[s["workers"], s["rate"], s["achieved_rps"], s["lag_p50_ms"], s["lag_p99_ms"], s["errors"],
                          "ok" if s["ok"] else "FAIL"] for s in steps]
            results.put("execute-run", {"rows": found}, run)
            print_table(["workers", "rate", "achieved/s", "lag p50 ms", "lag p99 ms", "errors", "verdict"], rows,
                        title="the same through servescope.execute_run (servescope run --rate R --arrival constant)")
    print(f"\ntotal {time.perf_counter() - started:.0f} s; client loop {args.loop}; "
          f"python {platform.python_version()}; "
          f"{cpu_name()}" + (f"; results: {results.path}" if args.save else ""))


if __name__ == "__main__":
    main()
