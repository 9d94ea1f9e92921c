"""What the live page costs the measurement, and how far behind the data it is.

Against the scripted SSE server (tests/support/scripted_server.py, its own
process), the same closed-loop run through `servescope.execute_run` is made
with and without `--live`, alternating, several times each:

  overhead     content chunks per client CPU-second (this process, the driver,
               plus its worker processes) and the
               timing error p99 (a chunk's client timestamp minus the server's
               logged write time of it, same monotonic clock); with --live a
               poller process reads /api/state every 0.5 s as the page does,
               so the server, the JSON and the findings loop all run. The
               off runs' spread is the run-to-run noise the difference is
               judged against.
  page-delay   the same run with the page open in Chromium: how long the newest
               data waited before the page had drawn it (its age when served,
               plus the request and the drawing), as the page itself records it.

    python -m benchmarks.live_overhead              # 3 runs each way of 10 s, then the browser part
    python -m benchmarks.live_overhead --smoke      # a quick check of this script
    python -m benchmarks.live_overhead --save       # benchmarks/results/live_overhead_<cpu>.json

Percentiles are nearest-rank (servescope.analyzers.metrics).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

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

ScriptedServer = scripted_server_class()
SCRIPT = {"tokens": 50, "itl_s": 0.005, "first_token_delay_s": 0.01}  # 200 chunks/s per stream
POLL_S = 0.5  # as live.js polls


def pct(values: list[float], q: float) -> float:
    value = quantile(values, q / 100)
    return float("nan") if value is None else value


def _cpu_s(exclude: set[int]) -> float:
    """CPU seconds of this process and its children, living or gone, but the processes in `exclude`.

    The load generator's workers are children of multiprocessing's fork server, not of this
    process: their time reaches us as the fork server's own children's time (/proc stat's
    cutime + cstime once it has reaped them), read while it lives.
    """
    own, gone = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    total = own.ru_utime + own.ru_stime + gone.ru_utime + gone.ru_stime
    tick = os.sysconf("SC_CLK_TCK")
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        pid = int(stat.parent.name)
        if int(fields[1]) == os.getpid() and pid not in exclude:  # fields[1]: the parent's pid
            total += sum(int(v) for v in fields[11:15]) / tick  # utime, stime, cutime, cstime
    return total


# ---------------------------------------------------------------------------- the page's reader
def poll_page(url: str) -> None:
    """Read /api/state as the page does (every POLL_S, only the news), until the run has finished;
    print each delay of new data behind the driver (its age when served, plus the request)."""
    version, last_data, delays = 0, None, []
    print("ready", flush=True)  # imported and polling: the measured run may start
    while True:
        started = time.perf_counter()
        try:
            with urllib.request.urlopen(f"{url}api/state?since={version}", timeout=5) as response:
                state = json.loads(response.read())
        except OSError:
            time.sleep(POLL_S)
            continue
        if state["data_at"] is not None and state["data_at"] != last_data:
            if version:  # the first read finds data older than the reader: not a delay of the page
                delays.append(state["now"] - state["data_at"] + time.perf_counter() - started)
            last_data = state["data_at"]
        version = state["version"]
        if state["status"] == "finished":
            break
        time.sleep(POLL_S)
    print(json.dumps(delays))


# ---------------------------------------------------------------------------- one run
def one_run(srv: Any, live: bool, concurrency: int, duration_s: float) -> dict[str, Any]:
    from servescope import RunConfig, execute_run, load_run
    from servescope.harness.targets import free_port

    srv.reset()
    port = free_port()
    poller = None
    if live:
        poller = subprocess.Popen([sys.executable, "-m", "benchmarks.live_overhead", "--poll", f"http://127.0.0.1:{port}/"],
                                  stdout=subprocess.PIPE, text=True, cwd=str(Path(__file__).resolve().parents[1]))
        assert poller.stdout.readline().strip() == "ready"  # its imports must not compete with the measured run
    with tempfile.TemporaryDirectory() as tmp:
        config = RunConfig(target=srv.base_url, model="scripted", concurrency=concurrency, duration_s=duration_s,
                           prompt_tokens=16, max_tokens=SCRIPT["tokens"], workers=1, out=os.path.join(tmp, "run"),
                           report=False, show_progress=False, live=port if live else None)
        exclude = {srv.pid} | ({poller.pid} if poller is not None else set())  # the server and the "browser"
        cpu0, wall0 = _cpu_s(exclude), time.perf_counter()
        outcome = execute_run(config, quiet_console())
        cpu, wall = _cpu_s(exclude) - cpu0, time.perf_counter() - wall0
        run = load_run(outcome.run_dir)
    delays = json.loads(poller.communicate(timeout=60)[0].strip() or "[]") if poller is not None else []
    origin = run.run["clock_origin_perf_counter_s"]
    log = srv.write_log()
    errors, chunks = [], 0
    for rid, first, gaps in zip(run.requests["response_id"], run.requests["first_token_at"], run.requests["itl_s"]):
        if first != first:  # NaN: no content
            continue
        seen = [origin + first]
        for gap in gaps:
            seen.append(seen[-1] + gap)
        chunks += len(seen)
        errors += [s - w for s, w in zip(seen, log.get(rid or "", []))]
    return {"live": live, "chunks": chunks, "cpu_s": cpu, "wall_s": wall, "chunks_per_cpu_s": chunks / cpu,
            "timing_error_p50_ms": pct(errors, 50) * 1e3, "timing_error_p99_ms": pct(errors, 99) * 1e3,
            "errors": int((run.requests["status"] != "ok").sum()), "page_delays_s": delays,
            "findings_seconds": (run.run.get("live") or {}).get("findings_seconds", 0.0),
            "findings_evaluations": (run.run.get("live") or {}).get("findings_evaluations", 0)}


def spread(values: list[float]) -> float:
    """(max - min) / mean: the run-to-run noise of a figure."""
    mean = sum(values) / len(values)
    return (max(values) - min(values)) / mean if len(values) > 1 and mean else float("nan")


def mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else float("nan")


# ---------------------------------------------------------------------------- the page in Chromium
def browser_delays(srv: Any, concurrency: int, duration_s: float) -> tuple[list[float], list[float]] | str:
    """The page's own records in Chromium: each update's delay behind the data, and each poll's drawing time."""
    chromium = "/usr/bin/chromium"
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        return "skipped: playwright is not installed"
    if not os.path.exists(chromium):
        return f"skipped: no Chromium at {chromium}"
    from servescope.harness.targets import free_port

    port = free_port()
    with tempfile.TemporaryDirectory() as tmp:
        process = subprocess.Popen(
            [sys.executable, "-m", "servescope", "run", "--target", srv.base_url, "--model", "scripted",
             "--concurrency", str(concurrency), "--duration", f"{duration_s}s", "--max-tokens", str(SCRIPT["tokens"]),
             "--prompt-tokens", "16", "--workers", "1", "--no-report", "--live", str(port), "--out", f"{tmp}/run"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            with sync_playwright() as p:
                browser = p.chromium.launch(executable_path=chromium, args=["--no-sandbox", "--headless", "--disable-gpu"])
                page = browser.new_page()
                deadline = time.monotonic() + 60
                while True:
                    try:
                        page.goto(f"http://127.0.0.1:{port}/")
                        break
                    except Exception:  # noqa: BLE001 - the run is still starting: its page is not up yet
                        if time.monotonic() > deadline:
                            raise
                        time.sleep(0.3)
                page.wait_for_function("window.servescopeLive && window.servescopeLive.status === 'finished'",
                                       timeout=int((duration_s + 60) * 1000))
                delays = page.evaluate("window.servescopeLive.delays")
                draws = page.evaluate("window.servescopeLive.draws")
                browser.close()
        finally:
            process.wait(timeout=60)
    return delays, draws


# ---------------------------------------------------------------------------- main
def main() -> None:
    sys.stdout.reconfigure(line_buffering=True)
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--poll", metavar="URL", help=argparse.SUPPRESS)  # the page's reader, in its own process
    ap.add_argument("--parts", default="overhead,page-delay", help="comma-separated, of: overhead, page-delay")
    ap.add_argument("--repeats", type=int, default=3, help="runs each way (alternating off/on)")
    ap.add_argument("--duration", type=float, default=10.0, help="seconds per run")
    ap.add_argument("--concurrency", type=int, default=32, help="closed-loop streams")
    ap.add_argument("--page-duration", type=float, default=30.0, help="seconds of the run watched in Chromium")
    ap.add_argument("--smoke", action="store_true", help="a quick check: one short run each way, no browser")
    add_results_args(ap, default_save=False)
    args = ap.parse_args()
    if args.poll:
        poll_page(args.poll)
        return
    if args.smoke:
        args.repeats, args.duration, args.concurrency, args.parts = 1, 3.0, 8, "overhead"
    parts = [p for p in args.parts.split(",") if p]
    results = ResultsFile("live_overhead", cpu_name(), args.out, args.copy_to, save=args.save)
    run = run_info(concurrency=args.concurrency, duration_s=args.duration, script=SCRIPT,
                   note="a shared machine: other engineers' processes ran beside these figures")
    with ScriptedServer() as srv:
        if "overhead" in parts:
            one_run(srv, True, args.concurrency, 1.0)  # unmeasured: the first run pays every import
            runs = [one_run(srv, live, args.concurrency, args.duration)
                    for _ in range(args.repeats) for live in (False, True)]
            rows, figures = [], {}
            for live in (False, True):
                mine = [r for r in runs if r["live"] is live]
                per_cpu = [r["chunks_per_cpu_s"] for r in mine]
                p99 = [r["timing_error_p99_ms"] for r in mine]
                delays = [d for r in mine for d in r["page_delays_s"]]
                name = "with --live" if live else "without"
                figures[name] = {"runs": [{k: v for k, v in r.items() if k != "page_delays_s"} for r in mine],
                                 "chunks_per_cpu_s_mean": mean(per_cpu), "chunks_per_cpu_s_spread": spread(per_cpu),
                                 "timing_error_p99_ms_mean": mean(p99), "timing_error_p99_ms_spread": spread(p99),
                                 "page_delay_p50_s": pct(delays, 50) if delays else None,
                                 "page_delay_p99_s": pct(delays, 99) if delays else None,
                                 "page_delay_max_s": max(delays) if delays else None}
                rows.append([name, len(mine), sum(r["chunks"] for r in mine), mean(per_cpu),
                             100 * spread(per_cpu), mean(p99), f"{min(p99):.2f}-{max(p99):.2f}",
                             sum(r["errors"] for r in mine),
                             f"{sum(r['findings_seconds'] for r in mine):.2f} ({sum(r['findings_evaluations'] for r in mine)})"
                             if live else "-",
                             "-" if not delays else f"{pct(delays, 50) * 1e3:.0f} / {pct(delays, 99) * 1e3:.0f} / "
                                                    f"{max(delays) * 1e3:.0f}"])
            off, on = figures["without"], figures["with --live"]
            change = on["chunks_per_cpu_s_mean"] / off["chunks_per_cpu_s_mean"] - 1
            figures["change_chunks_per_cpu_s"] = change
            # Each with-run against the without-run just before it: what the machine did in between
            # moves both, so the pairs' ratios are a steadier view than the two means.
            pairs = [(runs[i], runs[i + 1]) for i in range(0, len(runs) - 1, 2)]
            ratios = [b["chunks_per_cpu_s"] / a["chunks_per_cpu_s"] - 1 for a, b in pairs]
            p99_changes = [b["timing_error_p99_ms"] - a["timing_error_p99_ms"] for a, b in pairs]
            figures["paired_change_chunks_per_cpu_s"] = ratios
            figures["paired_change_timing_error_p99_ms"] = p99_changes
            results.put("overhead", figures, run)
            print_table(["mode", "runs", "chunks", "chunks/CPU-s", "noise %", "timing err p99 ms", "p99 range",
                         "errors", "judging s (evals)", "poll delay p50/p99/max ms"], rows,
                        title=f"closed loop {args.concurrency} streams x {SCRIPT['tokens']} chunks, 5 ms apart, "
                              f"{args.duration:g} s per run, 1 worker; noise = (max - min) / mean over the runs")
            print_table(["pair", "chunks/CPU-s without", "with --live", "change %", "timing err p99 change ms"],
                        [[i + 1, a["chunks_per_cpu_s"], b["chunks_per_cpu_s"], 100 * r, d]
                         for i, ((a, b), r, d) in enumerate(zip(pairs, ratios, p99_changes))],
                        title="each with-run against the without-run just before it")
            print(f"with --live: chunks per client CPU-second {100 * change:+.1f}% (means; pairs: median "
                  f"{100 * pct(ratios, 50):+.1f}%, {100 * min(ratios):+.1f}% to {100 * max(ratios):+.1f}%) against a "
                  f"run-to-run noise of {100 * off['chunks_per_cpu_s_spread']:.1f}% (without) / "
                  f"{100 * on['chunks_per_cpu_s_spread']:.1f}% (with); on a machine shared with other engineers "
                  "(2 CPUs): read the noise before the difference")
        if "page-delay" in parts:
            found = browser_delays(srv, args.concurrency, args.page_duration)
            if isinstance(found, str):
                print("\npage-delay: " + found)
            else:
                delays, draws = found
                figures = {"updates": len(delays), "p50_s": pct(delays, 50), "p99_s": pct(delays, 99),
                           "max_s": max(delays) if delays else None, "draw_p50_s": pct(draws, 50),
                           "draw_p99_s": pct(draws, 99), "duration_s": args.page_duration}
                results.put("page-delay", figures, run)
                print_table(["updates", "p50 ms", "p99 ms", "max ms", "drawing p50 ms", "drawing p99 ms"],
                            [[len(delays), figures["p50_s"] * 1e3, figures["p99_s"] * 1e3,
                              (figures["max_s"] or float("nan")) * 1e3, figures["draw_p50_s"] * 1e3,
                              figures["draw_p99_s"] * 1e3]],
                            title=f"the page in Chromium through a {args.page_duration:g} s run: newest data's age "
                                  "when drawn (served age + request + draw)")
    print(f"\n{cpu_name()}" + (f"; results: {results.path}" if args.save else ""))


if __name__ == "__main__":
    main()
