"""What does the HTTP path cost: how close does the reference engine behind its OpenAI-compatible
server, driven by `servescope run`, come to the same engine driven in-process?

    python -m benchmarks.engine_served [--parts ...] [--runs-dir DIR]   # on a GPU
    python -m benchmarks.engine_served --smoke                          # CPU check, tiny preset

Random bf16 weights, 512-token prompts, exactly 128 output tokens per request. The parts:

  offline      128 requests at once, in-process: the reference rate the other two are set against;
  in-process   the served loads in-process: a closed loop of 128 in flight over 384 requests (a new
               request as soon as one finishes; once more with each replacement reaching the engine
               one step late, as one sent over HTTP does), the same closed loop sampled as served
               requests are (T=1, min_tokens, the /metrics observer attached: together, then each
               alone), and Poisson arrivals at the top served rate;
  served       `servescope serve` (the step loop in its own engine process) driven by `servescope
               run --force-output-length`: the closed loop (2 s of warm-up), then an open-loop sweep
               (8, 16, 32, 64 req/s, 10 s each). Per phase: the client's figures (summary.json),
               the engine's own TTFT and queue means from its scraped /metrics, the client's tok/s
               and the engine's running batch over the second half of the window (the whole window
               includes the ramp), and, per harness run, the engine's step counts and the CPU of the
               HTTP and engine processes. --engine-modes process,thread also measures the step loop
               in a thread of the HTTP process (results part `served-thread`).

Run directories go to --runs-dir when given (`servescope report DIR/process/closed` renders one),
else to a temporary folder removed at the end. Each part's figures go to
benchmarks/results/engine_served_<device>.json as soon as it ends; a part not run keeps its
earlier figures there. In-process percentiles are nearest-rank (servescope.analyzers.metrics).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

if __package__ in (None, ""):  # `python benchmarks/<script>.py`: import from the repository root, not benchmarks/
    sys.path[0] = str(Path(__file__).resolve().parents[1])

import httpx  # noqa: E402
import torch  # noqa: E402

from benchmarks.common import print_table  # noqa: E402
from benchmarks.gpu_common import (  # noqa: E402
    Bench,
    add_engine_args,
    greedy,
    measure_offline,
    ms,
    on_cuda,
    random_prompts,
    run_closed_loop,
    run_requests,
    served_params,
)
from servescope import load_run  # noqa: E402
from servescope.analyzers.metrics import quantile  # noqa: E402
from servescope.analyzers.server_metrics import server_view  # noqa: E402
from servescope.harness.config import parse_duration  # noqa: E402
from servescope.harness.targets.engine import EngineProcess  # noqa: E402
from servescope.reference_engine.sequence import SamplingParams  # noqa: E402

BENCHMARK = "engine_served"
PARTS = ("offline", "in-process", "served")


def served_key(mode: str, defaults: bool = False) -> str:
    key = "served" if mode == "process" else f"served-{mode}"
    return f"{key}-defaults" if defaults else key


def offline_reference(bench: Bench) -> dict | None:
    """The offline part's rate (this run's, or the results file's), to set the others against."""
    off = bench.part("offline")
    if not off:
        return None
    return {"output_tok_per_s": off["engine"]["output_tok_per_s"], "measured": off["run"]["date"]}


def of_offline(rate: float | None, reference: dict | None) -> str:
    return f"{rate / reference['output_tok_per_s']:.1%}" if rate and reference else "-"


# -- in-process ----------------------------------------------------------------------------------
def in_process(bench: Bench) -> dict:
    """The served loads in-process, same requests, concurrency, top rate and step budget: what is left
    between these and the served figures is the HTTP path."""
    from servescope.reference_engine.metrics import EngineMetrics

    engine = bench.engine()
    a = bench.args
    engine.reset_scheduling(max_num_batched_tokens=a.max_num_batched_tokens, enable_prefix_caching=False)
    vocab = engine.model_config.vocab_size
    prompts = random_prompts([a.prompt_tokens] * a.requests, vocab, seed=7)
    outs = [a.output_tokens] * a.requests
    run_closed_loop(engine, prompts[:64], outs[:64], a.concurrency)  # warm-up, as the served run has 2 s of it
    rate = float(max(a.rates))
    n_open = max(1, round(rate * parse_duration(a.duration)))  # as many arrivals as the served phase sends
    open_prompts = random_prompts([a.prompt_tokens] * n_open, vocab, seed=9)
    gen = torch.Generator().manual_seed(8)
    arrivals = torch.cumsum(torch.empty(n_open).exponential_(generator=gen) / rate, 0).tolist()
    closed = f"closed concurrency={a.concurrency}"
    runs = {closed: run_closed_loop(engine, prompts, outs, a.concurrency),
            f"{closed}, replacements 1 step late": run_closed_loop(engine, prompts, outs, a.concurrency, late_steps=1)}

    def min_tokens_only(n: int) -> SamplingParams:
        return SamplingParams(max_tokens=n, min_tokens=n, temperature=0, ignore_eos=True)

    def temperature_only(n: int) -> SamplingParams:
        return SamplingParams(max_tokens=n, temperature=1.0, ignore_eos=True)

    # The engine process's own per-step work without the socket: sampled as served requests are, with
    # the /metrics observer attached; then each of the three alone.
    for label, params, observed in (("as served (T=1, min_tokens, /metrics)", served_params, True),
                                    ("T=1 alone", temperature_only, False),
                                    ("min_tokens alone", min_tokens_only, False),
                                    ("/metrics alone", greedy, True)):
        engine.observer = EngineMetrics(a.preset) if observed else None
        try:
            runs[f"{closed}, {label}"] = run_closed_loop(engine, prompts, outs, a.concurrency, params=params)
        finally:
            engine.observer = None
    runs[f"open rate={rate:g}"] = run_requests(engine, open_prompts, [a.output_tokens] * n_open, arrivals)
    engine.reset_scheduling(enable_prefix_caching=True)
    rows = []
    for phase, r in runs.items():
        rows.append({"phase": phase, "requests": len(r["ttft_s"]), "elapsed_s": r["elapsed_s"],
                     "req_per_s": r["req_per_s"], "output_tok_per_s": r["output_tok_per_s"],
                     "ttft_p50_s": quantile(r["ttft_s"], 0.5), "ttft_p99_s": quantile(r["ttft_s"], 0.99),
                     "ttft_mean_s": sum(r["ttft_s"]) / len(r["ttft_s"]),
                     "queue_mean_s": sum(r["queue_s"]) / max(1, len(r["queue_s"])), "mean_batch": r["mean_batch"],
                     "steady_tok_per_s": r["steady_tok_per_s"], "mean_step_ms": r.get("mean_step_ms"),
                     "tpot_p50_s": quantile(r["tpot_s"], 0.5), "tpot_p99_s": quantile(r["tpot_s"], 0.99)})
        print(f"  {phase}: {r['output_tok_per_s']:.0f} out tok/s, mean batch {r['mean_batch']:.1f}", flush=True)
    return {"requests": a.requests, "concurrency": a.concurrency, "rate": rate, "prompt_tokens": a.prompt_tokens,
            "output_tokens": a.output_tokens, "max_num_batched_tokens": a.max_num_batched_tokens,
            "offline_reference": offline_reference(bench), "rows": rows}


# -- served --------------------------------------------------------------------------------------
def process_cpu_s(pid: int) -> float:
    """User + system CPU seconds of one process so far (/proc; 0 where it is gone)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def child_pids(pid: int) -> list[int]:
    """Direct children of a process (the engine process under `serve --engine-process`)."""
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            if int(stat.read_text().rsplit(")", 1)[1].split()[1]) == pid:
                out.append(int(stat.parent.name))
        except (OSError, ValueError, IndexError):
            continue
    return out


def server_cpu(server_pid: int) -> dict:
    """CPU seconds so far of the server's HTTP process and of its engine child."""
    return {"http_cpu_s": process_cpu_s(server_pid), "engine_cpu_s": sum(map(process_cpu_s, child_pids(server_pid))),
            "t": time.perf_counter()}


def cpu_fractions(before: dict, after: dict) -> dict:
    """Each server process's CPU use between two readings, as a fraction of one core."""
    wall = after["t"] - before["t"]
    return {"http_process_cpu_frac": (after["http_cpu_s"] - before["http_cpu_s"]) / wall,
            "engine_process_cpu_frac": (after["engine_cpu_s"] - before["engine_cpu_s"]) / wall}


def harness_run(url: str, out_dir: Path, args: list[str], timeout_s: float) -> dict:
    """One `servescope run` against the server; its summary.json."""
    cmd = [sys.executable, "-m", "servescope", "run", "--target", url, "--no-report", "--force-output-length",
           "--out", str(out_dir), *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s)
    if proc.returncode not in (0, 1):
        raise RuntimeError(f"servescope run failed ({proc.returncode}): {proc.stderr[-2000:]}")
    return json.loads((out_dir / "summary.json").read_text())


def phase_row(phase: dict) -> dict:
    """The client's figures of one phase, from summary.json."""
    m = phase.get("metrics", {})

    def q(name: str, p: str) -> float | None:
        return (m.get(name) or {}).get(p)

    return {"phase": phase["phase"], "requests": phase.get("requests"), "ok": phase.get("ok"),
            "req_per_s": phase.get("req_per_s"), "output_tok_per_s": phase.get("output_tok_per_s"),
            "ttft_p50_s": q("ttft_s", "p50"), "ttft_p99_s": q("ttft_s", "p99"), "ttft_mean_s": q("ttft_s", "mean"),
            "tpot_p50_s": q("tpot_s", "p50"), "tpot_p99_s": q("tpot_s", "p99")}


def phase_server_side(run_dir: Path, summary: dict) -> dict[str, dict]:
    """Per phase, from the run directory: the engine's own TTFT and queue-time means (its arrival to first
    token, to first scheduling) over the throughput window, from the scraped /metrics; and over the
    window's second half, the output tokens per second the client received (each chunk's tokens at its
    arrival) and the engine's mean running batch. The second half is the steady state the ramp leads
    to, the figure to set beside an in-process run's."""
    import numpy as np

    run = load_run(run_dir)
    records = run.requests
    out = {}
    for phase in summary["phases"]:
        window = phase.get("window") or {}
        t0, t1 = window.get("start_s"), window.get("end_s")
        if t0 is None or t1 is None or t1 <= t0:
            continue
        mid, tokens = (t0 + t1) / 2, 0.0
        rows = records.loc[records["phase"] == phase["phase"], ["first_token_at", "itl_s", "chunk_tokens"]]
        for first, gaps, counts in rows.itertuples(index=False):
            if counts is None or first is None or not np.isfinite(first):
                continue
            at = first + np.concatenate([[0.0], np.cumsum(gaps)]) if gaps is not None else np.array([first])
            counts = np.asarray(counts, dtype=float)[: len(at)]
            tokens += float(counts[(at[: len(counts)] >= mid) & (at[: len(counts)] <= t1)].sum())
        hists = (server_view(run.server_metrics, t0, t1) or {}).get("histograms", {})
        second_half = server_view(run.server_metrics, mid, t1) or {}
        out[phase["phase"]] = {
            "engine_ttft_mean_s": (hists.get("ttft") or {}).get("mean"),
            "engine_queue_mean_s": (hists.get("queue") or {}).get("mean"),
            "steady_tok_per_s": tokens / (t1 - mid),
            "engine_running_mean": second_half.get("gauges", {}).get("running", {}).get("mean")}
    return out


def server_args(bench: Bench, mode: str) -> list[str]:
    a = bench.args
    if a.served_defaults:  # what a user who passes no engine flags gets
        return ["--device", bench.device, "--engine-process" if mode == "process" else "--no-engine-process"]
    args = ["--device", bench.device, "--max-model-len", str(a.max_model_len), "--max-num-seqs", str(a.max_num_seqs),
            "--max-num-batched-tokens", str(a.max_num_batched_tokens),
            "--engine-process" if mode == "process" else "--no-engine-process"]
    args += ["--kv-cache-memory", f"{a.kv_gib}GB"] if on_cuda(bench.device) else ["--num-kv-blocks", "2048"]
    return args + a.serve_args.split()


def served(bench: Bench, mode: str) -> dict:
    """The server in engine mode `mode`, driven by `servescope run`: a closed loop, then an open-loop sweep."""
    bench.drop_engine()  # the server builds its own
    a = bench.args
    t = time.perf_counter()
    server = EngineProcess(preset=a.preset, extra_args=tuple(server_args(bench, mode)),
                           health_timeout_s=a.start_timeout)
    out: dict = {"engine_mode": mode, "server_cmd": server.argv[1:], "prompt_tokens": a.prompt_tokens,
                 "output_tokens": a.output_tokens}
    scratch = None if a.runs_dir else tempfile.TemporaryDirectory(prefix="engine_served_")
    runs_dir = Path(a.runs_dir or scratch.name) / mode
    try:
        server.start()
        out["server_start_s"] = time.perf_counter() - t
        print(f"\nserver ({mode}) up in {out['server_start_s']:.0f} s: {' '.join(server.argv[1:])}", flush=True)
        # Each harness run its own seed: with one seed the open run would resend the closed run's prompts,
        # and the server's prefix cache would hold part of them.
        plans = [("closed", ["--concurrency", str(a.concurrency), "--requests", str(a.requests), "--warmup", "2s",
                             "--seed", "1"])]
        if a.rates:
            plans.append(("open", ["--sweep", "rate:" + ",".join(f"{r:g}" for r in a.rates), "--duration", a.duration,
                                   "--seed", "2"]))
        rows = []
        for kind, extra in plans:
            before = httpx.get(server.base_url + "/internal/engine", timeout=10).json()
            cpu_before = server_cpu(server.process.pid)
            lengths = ["--prompt-tokens", str(a.prompt_tokens), "--max-tokens", str(a.output_tokens)]
            summary = harness_run(server.base_url, runs_dir / kind, [*lengths, *extra], timeout_s=a.run_timeout)
            after = httpx.get(server.base_url + "/internal/engine", timeout=10).json()
            steps = after["steps"] - before["steps"]
            scheduled = after["scheduled_seqs_total"] - before["scheduled_seqs_total"]
            engine_side = {"steps": steps, "busy_s": after["busy_s"] - before["busy_s"],
                           "mean_batch": scheduled / max(1, steps),
                           "graph_steps": after["graph_steps"] - before["graph_steps"],
                           "piecewise_steps": after.get("piecewise_steps", 0) - before.get("piecewise_steps", 0),
                           **cpu_fractions(cpu_before, server_cpu(server.process.pid))}
            per_phase = phase_server_side(runs_dir / kind, summary)
            for phase in summary["phases"]:
                if phase["phase"] == "warmup":
                    continue
                rows.append({**phase_row(phase), **per_phase.get(phase["phase"], {}), "kind": kind})
            rows[-1]["engine_side_of_run"] = engine_side
            s = engine_side
            print(f"  {kind} run: {s['steps']} steps, mean batch {s['mean_batch']:.1f}, {s['graph_steps']} graphed, "
                  f"{s['piecewise_steps']} piecewise, host busy in step() {s['busy_s']:.1f} s; CPU: HTTP process "
                  f"{s['http_process_cpu_frac']:.0%}, engine process {s['engine_process_cpu_frac']:.0%} of a core",
                  flush=True)
        out["rows"] = rows
        out["offline_reference"] = offline_reference(bench)
        if a.runs_dir:
            out["runs_dir"] = str(runs_dir)
    finally:
        out["server_log_tail"] = server.stderr_tail()[-3000:]
        server.close()
        if scratch is not None:
            scratch.cleanup()
    return out


# -- the tables ----------------------------------------------------------------------------------
def summary(bench: Bench) -> None:
    """The figures the results file holds now."""
    device = bench.results.data["device"]
    off = bench.part("offline")
    if off:
        e = off["engine"]
        print_table(["offline (in-process)", "output tok/s", "of roofline", "seconds"],
                    [[f"{off['batch']} x ({off['prompt_tokens']} / {off['output_tokens']})", e["output_tok_per_s"],
                      f"{e['frac_roofline']:.1%}", e["elapsed_s"]]], title=f"{device}, {bench.args.preset}")
    inp = bench.part("in-process")
    if inp:
        ref = inp.get("offline_reference")
        rows = [[r["phase"], r["req_per_s"], r["output_tok_per_s"], of_offline(r["output_tok_per_s"], ref),
                 r["steady_tok_per_s"], r["mean_batch"], r["mean_step_ms"], ms(r["ttft_p50_s"]), ms(r["ttft_p99_s"]),
                 ms(r["queue_mean_s"]), ms(r["tpot_p50_s"]), ms(r["tpot_p99_s"])] for r in inp["rows"]]
        print_table(["in-process", "req/s", "out tok/s", "of offline", "2nd half tok/s", "mean batch", "ms/step",
                     "TTFT p50 ms", "TTFT p99 ms", "queued ms", "TPOT p50 ms", "TPOT p99 ms"], rows,
                    title=f"in-process: {inp['requests']} x ({inp['prompt_tokens']} / {inp['output_tokens']}), "
                          f"step budget {inp['max_num_batched_tokens']}")
    for key in sorted(k for k in bench.results.parts if k.startswith("served")):
        part = bench.results.parts[key]
        ref = part.get("offline_reference")
        rows = [[f"{r['kind']} {r['phase']}", r["req_per_s"], r["output_tok_per_s"],
                 of_offline(r["output_tok_per_s"], ref), ms(r["ttft_p50_s"]), ms(r["ttft_p99_s"]), ms(r["tpot_p50_s"]),
                 ms(r["tpot_p99_s"]), ms(r.get("engine_ttft_mean_s")), ms(r.get("engine_queue_mean_s")),
                 r.get("steady_tok_per_s"), r.get("engine_running_mean")] for r in part.get("rows", [])]
        print_table(["phase", "req/s", "out tok/s", "of offline", "TTFT p50 ms", "TTFT p99 ms", "TPOT p50 ms",
                     "TPOT p99 ms", "engine TTFT ms", "engine queue ms", "2nd half tok/s", "running"], rows,
                    title=f"served, engine mode {part['engine_mode']} (engine columns: its own means, from /metrics)")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_engine_args(p, PARTS, max_num_batched_tokens=8192)
    p.add_argument("--prompt-tokens", type=int, default=512)
    p.add_argument("--output-tokens", type=int, default=128)
    p.add_argument("--concurrency", type=int, default=128, help="the closed loop (and the offline batch)")
    p.add_argument("--requests", type=int, default=384, help="requests of the closed loop")
    p.add_argument("--rates", default="8,16,32,64", help="open-loop rates, req/s")
    p.add_argument("--duration", default="10s", help="each open-loop rate's phase")
    p.add_argument("--engine-modes", default="process", help="process, thread, or both (process,thread)")
    p.add_argument("--serve-args", default="", help="more `servescope serve` options, e.g. --no-async-scheduling")
    p.add_argument("--served-defaults", action="store_true",
                   help="serve with no engine flags but --device (the defaults a user gets; results part "
                        "served-defaults), instead of this script's step budget, batch bound and KV size")
    p.add_argument("--runs-dir", default=None,
                   help="keep the run directories here (DIR/<mode>/closed, DIR/<mode>/open)")
    p.add_argument("--start-timeout", type=float, default=240.0, help="seconds the server may take to come up")
    p.add_argument("--run-timeout", type=float, default=240.0, help="seconds one `servescope run` may take")
    args = p.parse_args()
    if args.smoke:
        args.prompt_tokens, args.output_tokens, args.concurrency, args.requests = 32, 8, 8, 16
        args.rates, args.duration, args.repeat = "4,8", "2s", 1
    args.rates = [float(x) for x in args.rates.split(",") if x]
    modes = [m for m in args.engine_modes.split(",") if m]
    if set(modes) - {"process", "thread"}:
        raise SystemExit(f"--engine-modes: process and/or thread, got {args.engine_modes}")
    bench = Bench(BENCHMARK, args, PARTS)
    if "served" in bench.parts:  # one results part per engine mode
        bench.parts += [served_key(m, args.served_defaults) for m in modes
                        if m != "process" or args.served_defaults]
    plan = [("offline", lambda: measure_offline(bench, args.concurrency, args.prompt_tokens, args.output_tokens,
                                                args.max_num_batched_tokens), 20),
            ("in-process", lambda: in_process(bench), 60)]
    plan += [(served_key(m, args.served_defaults), lambda m=m: served(bench, m), 90) for m in modes]
    bench.run_parts(plan)
    summary(bench)
    sys.exit(bench.finish())


if __name__ == "__main__":
    main()
