"""The reference engine on a GPU against the chip's measured limits and HF transformers' `generate`.

Run on the GPU machine, from the repository root (issue 9, item 4):

    python -m benchmarks.engine_gpu [--preset llama3-8b] [--parts limits,a,b,c,d,hf,e] [--out DIR]
    python -m benchmarks.engine_gpu --smoke        # CPU dry run of this script (tiny preset)

Random bf16 weights. First the two ceilings, measured in the same run: the
device-to-device copy bandwidth (bytes read + written) and the bf16 8192^3
matmul rate. Then:

(a) batch-1 decode tok/s against weight bytes / copy bandwidth, and against HF
    `generate` with `cache_implementation="static"` (and its default dynamic cache);
(b) offline throughput, 128 requests of 512 prompt / 128 output tokens, against
    prefill FLOPs at the matmul rate + per decode step weight and KV bytes at the
    copy bandwidth, and against HF `generate` at batch 128;
(c) 256 seeded mixed-length requests (prompts lognormal median 256 in 16-2048,
    outputs lognormal median 128 in 16-512) against HF `generate` in static
    batches of 32 (left padding, each batch generating its longest output,
    counting only each request's own tokens);
(d) chunked prefill and prefix caching on/off, TTFT/TPOT p50/p99, on (c) and on
    a shared-prefix variant, with Poisson arrivals at a fixed fraction of (c)'s
    offline request rate;
(e) the HTTP path: `servescope serve --device cuda` (as `python -m
    reference_engine`) driven by `servescope run` (as `python -m harness run`),
    closed loop at (b)'s shape and open loop at rising rates.

Each part prints its table and the JSON file (benchmarks/results/engine_gpu_<device>.json)
is rewritten after every part, so a run cut short keeps what it measured.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import platform
import re
import socket
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from harness.config import parse_duration  # noqa: E402
from reference_engine.config import EngineConfig, ModelConfig, preset  # noqa: E402
from reference_engine.engine import LLMEngine  # noqa: E402
from reference_engine.sequence import SamplingParams  # noqa: E402

GiB = 1 << 30


# -- measuring ---------------------------------------------------------------------------------
def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def median_s(fn, device: str, reps: int = 20) -> float:
    if device.startswith("cuda"):
        from triton.testing import do_bench

        return do_bench(fn, warmup=25, rep=100, return_mode="median") / 1e3
    times = []
    for _ in range(max(2, reps // 10)):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return sorted(times)[len(times) // 2]


def busy(fn, device: str, seconds: float) -> None:
    """Run fn back to back for a while: an idle GPU needs time to raise its clocks."""
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        for _ in range(10):
            fn()
        sync(device)


def measure_limits(device: str) -> dict:
    n = GiB if device.startswith("cuda") else 1 << 22  # bytes per buffer
    src = torch.randn(n // 2, dtype=torch.bfloat16, device=device)
    dst = torch.empty_like(src)
    busy(lambda: dst.copy_(src), device, 0.5)
    copy_s = median_s(lambda: dst.copy_(src), device)
    del src, dst
    size = 8192 if device.startswith("cuda") else 256
    a = torch.randn(size, size, dtype=torch.bfloat16, device=device)
    b = torch.randn(size, size, dtype=torch.bfloat16, device=device)
    busy(lambda: a @ b, device, 1.0)
    mm_s = median_s(lambda: a @ b, device)
    # Also as a mean over back-to-back products (no cache flush between them, as KINDS.md measured);
    # the roofline takes the faster of the two, so it is never lenient.
    if device.startswith("cuda"):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(20):
            a @ b
        end.record()
        sync(device)
        mm_b2b_s = start.elapsed_time(end) / 20 / 1e3
    else:
        mm_b2b_s = mm_s
    del a, b
    flops = 2 * size**3
    return {"copy_GBps": 2 * n / copy_s / 1e9, "matmul_bf16_TFLOPs": flops / min(mm_s, mm_b2b_s) / 1e12,
            "matmul_bf16_TFLOPs_do_bench_median": flops / mm_s / 1e12,
            "matmul_bf16_TFLOPs_back_to_back_mean": flops / mm_b2b_s / 1e12,
            "copy_bytes_read_plus_written": 2 * n, "matmul_size": size}


# -- model arithmetic --------------------------------------------------------------------------
def weight_bytes(mc: ModelConfig, dtype_bytes: int = 2) -> int:
    """All parameter bytes (the issue's batch-1 roofline counts the whole checkpoint)."""
    return mc.num_params * dtype_bytes


def prefill_flops(mc: ModelConfig, prompt_lens: list[int]) -> float:
    """Matmul FLOPs of the prefill of these prompts: every layer for every token, the LM head for the
    last token of each (the engine and HF both compute logits only where they sample), plus causal attention."""
    head = mc.vocab_size * mc.hidden_size
    body = mc.num_params - mc.vocab_size * mc.hidden_size - (0 if mc.tie_word_embeddings else head)
    tokens = sum(prompt_lens)
    attn = sum(4 * mc.num_layers * mc.num_heads * mc.head_dim * n * (n + 1) / 2 for n in prompt_lens)
    return 2 * body * tokens + 2 * head * len(prompt_lens) + attn


def offline_roofline_s(mc: ModelConfig, prompt: int, output: int, batch: int, limits: dict) -> dict:
    """(b)'s limit: prefill FLOPs at the matmul rate + each decode step's weight and KV bytes at the copy bandwidth."""
    flops = prefill_flops(mc, [prompt] * batch)
    prefill_s = flops / (limits["matmul_bf16_TFLOPs"] * 1e12)
    kv_tok = mc.kv_bytes_per_token(2)
    steps = output - 1  # the first token comes out of the prefill
    decode_bytes = sum(weight_bytes(mc) + batch * (prompt + i + 1) * kv_tok for i in range(steps))
    decode_s = decode_bytes / (limits["copy_GBps"] * 1e9)
    return {"prefill_flops": flops, "prefill_s": prefill_s, "decode_bytes": decode_bytes, "decode_s": decode_s,
            "total_s": prefill_s + decode_s, "output_tok_per_s": batch * output / (prefill_s + decode_s)}


# -- workloads -----------------------------------------------------------------------------------
def random_prompts(lengths: list[int], vocab: int, seed: int) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(10, vocab, (n,), generator=gen).tolist() for n in lengths]


def mixed_lengths(count: int, seed: int) -> tuple[list[int], list[int]]:
    """(c): prompts lognormal median 256 clipped to 16-2048, outputs lognormal median 128 clipped to 16-512."""
    gen = torch.Generator().manual_seed(seed)
    sigma = 0.8
    p = torch.exp(math.log(256) + sigma * torch.randn(count, generator=gen)).round().clamp(16, 2048)
    o = torch.exp(math.log(128) + sigma * torch.randn(count, generator=gen)).round().clamp(16, 512)
    return [int(x) for x in p], [int(x) for x in o]


# -- driving the engine in-process ---------------------------------------------------------------
def greedy(n: int) -> SamplingParams:
    return SamplingParams(max_tokens=n, temperature=0, ignore_eos=True)


class TokenTimes:
    """Per request, from the engine's step outputs: when its first and last tokens came, and how many."""

    def __init__(self, n: int) -> None:
        self.first = [math.nan] * n
        self.last = [math.nan] * n
        self.count = [0] * n
        self.timeline: list[tuple[float, int]] = []  # (t, tokens so far), one point per step

    def record(self, i: int, t: float, tokens: int) -> None:
        if self.count[i] == 0:
            self.first[i] = t
        self.last[i] = t
        self.count[i] += tokens
        total = (self.timeline[-1][1] if self.timeline else 0) + tokens
        if self.timeline and self.timeline[-1][0] == t:
            self.timeline[-1] = (t, total)
        else:
            self.timeline.append((t, total))

    def rate_between(self, t0: float, t1: float) -> float:
        """Output tokens per second between the first and last steps inside [t0, t1]."""
        inside = [(t, n) for t, n in self.timeline if t0 <= t <= t1]
        if len(inside) < 2 or inside[-1][0] <= inside[0][0]:
            return math.nan
        return (inside[-1][1] - inside[0][1]) / (inside[-1][0] - inside[0][0])

    def check(self, outputs: list[int]) -> None:
        assert self.count == outputs, "every request must produce exactly its output length"

    def ttft(self, starts: list[float]) -> list[float]:
        return [f - s for f, s in zip(self.first, starts)]

    def tpot(self) -> list[float]:
        return [(l - f) / (c - 1) for f, l, c in zip(self.first, self.last, self.count) if c > 1]


def run_requests(engine: LLMEngine, prompts: list[list[int]], outputs: list[int],
                 arrivals: list[float] | None = None) -> dict:
    """All at t=0 (offline) or at the given arrival offsets; per-request token times from the step outputs."""
    n = len(prompts)
    arrivals = arrivals or [0.0] * n
    order = sorted(range(n), key=lambda i: arrivals[i])
    seq_index: dict[int, int] = {}
    times = TokenTimes(n)
    runner = engine.runner
    steps0, busy0, graph0, piece0 = engine.num_steps, engine.busy_s, runner.num_graph_steps, runner.num_piecewise_steps
    seqs0, seqs = engine.scheduled_seqs_total, []
    t0 = time.perf_counter()
    k = 0
    while k < n or engine.has_unfinished():
        now = time.perf_counter() - t0
        while k < n and arrivals[order[k]] <= now:
            i = order[k]
            seq = engine.add_request(prompts[i], greedy(outputs[i]), arrival_time=t0 + arrivals[i])
            seq_index[seq.seq_id] = i
            seqs.append(seq)
            k += 1
        if not engine.has_unfinished():
            time.sleep(min(0.002, max(0.0, arrivals[order[k]] - now)))
            continue
        outs = engine.step()
        t = time.perf_counter() - t0
        for out in outs:
            times.record(seq_index[out.seq.seq_id], t, len(out.token_ids))
    elapsed = time.perf_counter() - t0
    times.check(outputs)
    total = sum(times.count)
    return {"elapsed_s": elapsed, "output_tokens": total, "output_tok_per_s": total / elapsed,
            "req_per_s": n / elapsed, "ttft_s": times.ttft(arrivals), "tpot_s": times.tpot(),
            "first_s": times.first, "last_s": times.last, "queue_s": queue_times(seqs),
            "steady_tok_per_s": times.rate_between((arrivals[order[0]] + arrivals[order[-1]]) / 2, arrivals[order[-1]]),
            "steps": engine.num_steps - steps0, "graph_steps": runner.num_graph_steps - graph0,
            "piecewise_steps": runner.num_piecewise_steps - piece0, "host_busy_s": engine.busy_s - busy0,
            "mean_batch": (engine.scheduled_seqs_total - seqs0) / max(1, engine.num_steps - steps0)}


def queue_times(seqs: list) -> list[float]:
    """Each request's wait from arrival to its first scheduling (the engine's queue-time metric)."""
    return [s.first_scheduled_time - s.arrival_time for s in seqs if s.first_scheduled_time is not None]


def served_params(n: int) -> SamplingParams:
    """What (e)'s requests ask the server for: the API's default temperature (1.0) and exactly n
    tokens (`--force-output-length` sends min_tokens and ignore_eos)."""
    return SamplingParams(max_tokens=n, min_tokens=n, temperature=1.0, ignore_eos=True)


def run_closed_loop(engine: LLMEngine, prompts: list[list[int]], outputs: list[int], concurrency: int,
                    late_steps: int = 0, params=greedy) -> dict:
    """In-process closed loop: `concurrency` requests in flight, a new one added as soon as one
    finishes (what `servescope run --concurrency N` does over HTTP, without the HTTP path).

    `late_steps`: each replacement reaches the engine only after that many more steps, as one sent
    over HTTP does (a round trip, and overlapped scheduling has planned the next step already).
    With 0 the loop paces itself: a finished group's replacements join the very next step. TTFT
    counts from the finish that freed the slot (when a client would send)."""
    n = len(prompts)
    times, start = TokenTimes(n), [0.0] * n
    seq_index: dict[int, int] = {}
    steps0, seqs0, seqs = engine.num_steps, engine.scheduled_seqs_total, []
    t0 = time.perf_counter()
    next_i, step_no = 0, 0
    due: list[tuple[int, float]] = []  # (step after which to add, the finish time that freed the slot)

    def add(sent: float) -> None:
        nonlocal next_i
        start[next_i] = sent
        seq = engine.add_request(prompts[next_i], params(outputs[next_i]))
        seq_index[seq.seq_id] = next_i
        seqs.append(seq)
        next_i += 1

    while next_i < min(concurrency, n):
        add(time.perf_counter() - t0)
    while engine.has_unfinished() or due:
        while due and (due[0][0] <= step_no or not engine.has_unfinished()):
            add(due.pop(0)[1])
        outs = engine.step()
        step_no += 1
        t = time.perf_counter() - t0
        for out in outs:
            times.record(seq_index[out.seq.seq_id], t, len(out.token_ids))
            if out.finished and next_i + len(due) < n:
                due.append((step_no + late_steps, t))
    elapsed = time.perf_counter() - t0
    times.check(outputs)
    return {"elapsed_s": elapsed, "req_per_s": n / elapsed, "output_tok_per_s": sum(times.count) / elapsed,
            "ttft_s": times.ttft(start), "tpot_s": times.tpot(), "queue_s": queue_times(seqs),
            "steady_tok_per_s": times.rate_between(start[-1] / 2, start[-1]),
            "mean_batch": (engine.scheduled_seqs_total - seqs0) / max(1, engine.num_steps - steps0),
            "mean_step_ms": elapsed * 1e3 / max(1, engine.num_steps - steps0)}


def pct(values: list[float], q: float) -> float:
    vals = sorted(v for v in values if not math.isnan(v))
    if not vals:
        return math.nan
    pos = (len(vals) - 1) * q
    lo, hi = int(math.floor(pos)), int(math.ceil(pos))
    return vals[lo] + (vals[hi] - vals[lo]) * (pos - lo)


# -- HF transformers baselines -------------------------------------------------------------------
def hf_model(mc: ModelConfig, device: str):
    from transformers import LlamaConfig, LlamaForCausalLM

    rope = None
    if mc.rope_scaling is not None:
        s = mc.rope_scaling
        rope = {"rope_type": "llama3", "factor": s.factor, "low_freq_factor": s.low_freq_factor,
                "high_freq_factor": s.high_freq_factor,
                "original_max_position_embeddings": s.original_max_position_embeddings,
                "rope_theta": mc.rope_theta}
    cfg = LlamaConfig(vocab_size=mc.vocab_size, hidden_size=mc.hidden_size, intermediate_size=mc.intermediate_size,
                      num_hidden_layers=mc.num_layers, num_attention_heads=mc.num_heads,
                      num_key_value_heads=mc.num_kv_heads, head_dim=mc.head_dim,
                      max_position_embeddings=mc.max_position_embeddings, rms_norm_eps=mc.rms_norm_eps,
                      tie_word_embeddings=mc.tie_word_embeddings, rope_scaling=rope, rope_theta=mc.rope_theta,
                      bos_token_id=None, eos_token_id=None, pad_token_id=0)
    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    with torch.device(device):
        try:
            model = LlamaForCausalLM._from_config(cfg, dtype=dtype)
        except TypeError:  # transformers 4.x
            model = LlamaForCausalLM._from_config(cfg, torch_dtype=dtype)
    model.eval()
    gc_ = model.generation_config
    gc_.eos_token_id = None
    gc_.pad_token_id = 0
    gc_.do_sample = False
    gc_.temperature = None
    gc_.top_p = None
    gc_.top_k = None
    return model


def hf_generate_s(model, prompts: list[list[int]], new_tokens: int, device: str, **kwargs) -> float:
    """Seconds for one left-padded batch `generate` producing exactly new_tokens per row."""
    width = max(len(p) for p in prompts)
    ids = torch.zeros(len(prompts), width, dtype=torch.int64)
    mask = torch.zeros(len(prompts), width, dtype=torch.int64)
    for r, p in enumerate(prompts):
        ids[r, width - len(p):] = torch.tensor(p)
        mask[r, width - len(p):] = 1
    ids, mask = ids.to(device), mask.to(device)
    sync(device)
    t = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new_tokens,
                             min_new_tokens=new_tokens, do_sample=False, **kwargs)
    sync(device)
    elapsed = time.perf_counter() - t
    assert out.shape[1] == width + new_tokens, (out.shape, width, new_tokens)
    return elapsed


# -- HTTP path -------------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http_get_json(url: str) -> dict:
    import urllib.request

    with urllib.request.urlopen(url, timeout=10) as resp:
        return json.loads(resp.read())


def process_cpu_s(pid: int) -> float:
    """User + system CPU seconds of one process so far (/proc; 0 where it is gone). Read by hand:
    psutil is not on the GPU machines this runs on, and two fields of one file are all it needs."""
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
    """CPU seconds so far of the server's HTTP process and of its engine child, to difference
    around one run."""
    return {"http_cpu_s": process_cpu_s(server_pid), "engine_cpu_s": sum(map(process_cpu_s, child_pids(server_pid))),
            "t": time.perf_counter()}


def server_cpu_delta(before: dict, after: dict) -> dict:
    """Each server process's CPU use over one run, as a fraction of one core."""
    wall = after["t"] - before["t"]
    return {"http_process_cpu_frac": (after["http_cpu_s"] - before["http_cpu_s"]) / wall,
            "engine_process_cpu_frac": (after["engine_cpu_s"] - before["engine_cpu_s"]) / wall}


def phase_server_side(run_dir: Path) -> dict[str, dict]:
    """Per phase, from the run directory (the scraped /metrics read by the analyzers' server_view):
    the engine's own TTFT and queue-time means (its arrival to first token, to first scheduling)
    over the throughput window; and over the window's second half, output tokens per second as the
    client received them (each chunk's tokens at its arrival) and the engine's mean running batch.
    The whole window includes the ramp to a saturated batch; its second half is the steady state it
    ramps to, the figure to set beside an in-process run's."""
    import numpy as np
    import pandas as pd

    from analyzers.server_metrics import server_view

    records = pd.read_parquet(run_dir / "requests.parquet", columns=["phase", "first_token_at", "itl_s", "chunk_tokens"])
    frame = pd.read_parquet(run_dir / "server_metrics.parquet")
    out = {}
    for phase in json.loads((run_dir / "summary.json").read_text())["phases"]:
        window = phase.get("window") or {}
        t0, t1 = window.get("start_s"), window.get("end_s")
        if t0 is None or t1 is None or t1 <= t0:
            continue
        mid, tokens = (t0 + t1) / 2, 0.0
        for first, gaps, counts in records.loc[records["phase"] == phase["phase"],
                                               ["first_token_at", "itl_s", "chunk_tokens"]].itertuples(index=False):
            if counts is None or not np.isfinite(first):
                continue
            at = first + np.concatenate([[0.0], np.cumsum(gaps)]) if gaps is not None else np.array([first])
            counts = np.asarray(counts, dtype=float)[: len(at)]
            tokens += float(counts[(at[: len(counts)] >= mid) & (at[: len(counts)] <= t1)].sum())
        hists = (server_view(frame, t0, t1) or {}).get("histograms", {})
        second_half = server_view(frame, mid, t1) or {}
        out[phase["phase"]] = {
            "engine_ttft_mean_s": (hists.get("ttft") or {}).get("mean") or math.nan,
            "engine_queue_mean_s": (hists.get("queue") or {}).get("mean") or math.nan,
            "steady_tok_per_s": tokens / (t1 - mid),
            "engine_running_mean": second_half.get("gauges", {}).get("running", {}).get("mean", math.nan)}
    return out


def wait_health(url: str, proc: subprocess.Popen, timeout_s: float) -> None:
    import urllib.request

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(url + "/health", timeout=2) as resp:
                if resp.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    raise RuntimeError("the server did not answer /health in time")


def harness_run(url: str, out_dir: Path, args: list[str], timeout_s: float) -> dict:
    cmd = [sys.executable, "-m", "harness", "run", "--target", url, "--no-report", "--force-output-length",
           "--out", str(out_dir), *args]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout_s)
    if proc.returncode not in (0, 1):
        raise RuntimeError(f"servescope run failed ({proc.returncode}): {proc.stderr[-2000:]}")
    return json.loads((out_dir / "summary.json").read_text())


def phase_row(phase: dict) -> dict:
    m = phase.get("metrics", {})

    def q(name: str, p: str) -> float:
        return (m.get(name) or {}).get(p, math.nan)

    return {"phase": phase["phase"], "requests": phase.get("requests"), "ok": phase.get("ok"),
            "req_per_s": phase.get("req_per_s"), "output_tok_per_s": phase.get("output_tok_per_s"),
            "ttft_p50_s": q("ttft_s", "p50"), "ttft_p99_s": q("ttft_s", "p99"), "ttft_mean_s": q("ttft_s", "mean"),
            "tpot_p50_s": q("tpot_s", "p50"), "tpot_p99_s": q("tpot_s", "p99")}


# -- the benchmark ---------------------------------------------------------------------------------
class Bench:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.device = args.device
        self.started = time.perf_counter()
        self.mc = preset(args.preset, vocab_size=8192)
        name = torch.cuda.get_device_name() if self.device.startswith("cuda") else "cpu"
        self.results: dict = {
            "device": name, "preset": args.preset, "torch": torch.__version__,
            "python": platform.python_version(), "argv": sys.argv[1:], "smoke": args.smoke,
            "model": {"num_params": self.mc.num_params, "weight_bytes": weight_bytes(self.mc),
                      "kv_bytes_per_token": self.mc.kv_bytes_per_token(2)},
        }
        try:
            import triton

            self.results["triton"] = triton.__version__
        except ImportError:
            pass
        slug = re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_")
        suffix = "_smoke" if args.smoke else ("_" + args.tag if args.tag else "")
        self.path = Path(args.out) / f"engine_gpu_{slug}{suffix}.json"
        if self.path.exists() and not args.smoke:  # keep parts measured by an earlier call
            previous = json.loads(self.path.read_text())
            for key, value in previous.items():
                self.results.setdefault(key, value)
        self.engine: LLMEngine | None = None

    # bookkeeping
    def left_s(self) -> float:
        return self.args.budget_s - (time.perf_counter() - self.started)

    def save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.write_text(json.dumps(self.results, indent=1, default=float))
        extra = os.environ.get("OUT")
        if extra and not self.args.smoke:
            Path(extra, self.path.name).write_text(self.path.read_text())

    def part(self, key: str, fn, need_s: float) -> None:
        if key not in self.args.parts:
            return
        if self.left_s() < need_s:
            print(f"\n[{key}] skipped: {self.left_s():.0f} s of the budget left, needs ~{need_s:.0f} s")
            self.results.setdefault("skipped", {})[key] = f"budget ({self.left_s():.0f} s left)"
            self.save()
            return
        t = time.perf_counter()
        try:
            fn()
        except Exception as exc:  # keep the other parts
            traceback.print_exc()
            self.results.setdefault("errors", {})[key] = f"{type(exc).__name__}: {exc}"
            if self.engine is not None:  # abort what the failed part left behind
                for seq in list(self.engine.scheduler.running) + list(self.engine.scheduler.waiting):
                    self.engine.abort(seq)
                self.engine._inflight = None
        self.results.setdefault("part_seconds", {})[key] = time.perf_counter() - t
        self.save()
        print(f"[{key}] {time.perf_counter() - t:.1f} s (total {time.perf_counter() - self.started:.0f} s)", flush=True)

    @property
    def limits(self) -> dict:
        return self.results["limits"]

    def engine_config(self, **overrides) -> EngineConfig:
        a = self.args
        fields = dict(device=self.device, max_model_len=a.max_model_len, max_num_seqs=a.max_num_seqs,
                      max_num_batched_tokens=a.max_num_batched_tokens, seed=0)
        if self.device.startswith("cuda"):
            fields["kv_cache_memory"] = a.kv_gib * GiB
        else:
            fields["num_kv_blocks"] = 2048
        fields.update(overrides)
        return EngineConfig(**fields)

    def get_engine(self) -> LLMEngine:
        if self.engine is None:
            t = time.perf_counter()
            self.engine = LLMEngine.build(self.engine_config(), preset_name=self.args.preset)
            self.results["engine_build"] = {
                "seconds": time.perf_counter() - t, "graph_capture_s": self.engine.graph_capture_s,
                "graph_buckets": sorted(self.engine.runner.graphs), "num_kv_blocks": self.engine.num_blocks,
                "piecewise_token_buckets": sorted(self.engine.runner.piecewise),
                "ops": self.engine.ops.name, "async_scheduling": self.engine.async_scheduling}
            print(f"engine: {self.args.preset} built in {self.results['engine_build']['seconds']:.1f} s "
                  f"(graphs {self.engine.graph_capture_s:.1f} s, buckets {sorted(self.engine.runner.graphs)})", flush=True)
        return self.engine

    def drop_engine(self) -> None:
        self.engine = None
        gc.collect()
        if self.device.startswith("cuda"):
            torch.cuda.empty_cache()

    # parts
    def do_limits(self) -> None:
        self.results["limits"] = measure_limits(self.device)
        lim = self.limits
        print(f"\nlimits ({self.results['device']}): copy {lim['copy_GBps']:.0f} GB/s (read + write), "
              f"bf16 matmul {lim['matmul_bf16_TFLOPs']:.0f} TFLOP/s ({lim['matmul_size']}^3; do_bench median "
              f"{lim['matmul_bf16_TFLOPs_do_bench_median']:.0f}, back-to-back mean "
              f"{lim['matmul_bf16_TFLOPs_back_to_back_mean']:.0f})")

    def do_a(self) -> None:
        engine = self.get_engine()
        a = self.args
        prompt = random_prompts([a.a_prompt], engine.model_config.vocab_size, seed=1)
        roof = self.limits["copy_GBps"] * 1e9 / weight_bytes(self.mc)
        modes = {"graphs+async": (True, True), "graphs, sync": (True, False), "eager, sync": (False, False)}
        engine.reset_scheduling(enable_prefix_caching=False)  # repeats of one prompt must not hit the cache
        saved = engine.runner.graphs
        overlap_before = engine.async_scheduling
        rows = {}
        for mode, (graphs, overlap) in modes.items():
            if graphs and not saved:
                continue
            engine.runner.graphs = saved if graphs else {}
            engine.async_scheduling = overlap
            rows[mode] = self.best_decode(engine, prompt)
        engine.runner.graphs = saved
        engine.async_scheduling = overlap_before
        gemv_info = self.compare_gemv(engine, prompt, rows) if saved and a.a_compare_gemv else None
        engine.reset_scheduling(enable_prefix_caching=True)
        self.results["a"] = {"prompt_tokens": a.a_prompt, "output_tokens": a.a_tokens,
                             "roofline_tok_per_s": roof, "engine": rows}
        if gemv_info is not None:
            self.results["a"]["gemv"] = gemv_info
        print(f"\n(a) batch-1 decode, {a.a_prompt}-token prompt, {a.a_tokens} tokens; roofline "
              f"{roof:.0f} tok/s = copy BW / {weight_bytes(self.mc) / 1e9:.2f} GB of weights")
        print(f"{'engine mode':<34} {'decode tok/s':>12} {'of roofline':>11} {'e2e tok/s':>10} {'TTFT ms':>8}")
        for mode, r in rows.items():
            print(f"{mode:<34} {r['decode_tok_per_s']:>12.1f} {r['frac_roofline']:>10.1%} "
                  f"{r['e2e_tok_per_s']:>10.1f} {r['ttft_s'] * 1e3:>8.1f}")

    def best_decode(self, engine: LLMEngine, prompt: list[list[int]]) -> dict:
        a = self.args
        run_requests(engine, prompt, [8])  # warm
        best = None
        for _ in range(a.repeat):
            r = run_requests(engine, prompt, [a.a_tokens])
            decode = (a.a_tokens - 1) / (r["last_s"][0] - r["first_s"][0])
            if best is None or decode > best["decode_tok_per_s"]:
                best = {"decode_tok_per_s": decode, "e2e_tok_per_s": a.a_tokens / r["elapsed_s"], "ttft_s": r["ttft_s"][0]}
        best["frac_roofline"] = best["decode_tok_per_s"] / (self.limits["copy_GBps"] * 1e9 / weight_bytes(self.mc))
        return best

    def compare_gemv(self, engine: LLMEngine, prompt: list[list[int]], rows: dict) -> dict | None:
        """(a) again with every projection on cuBLAS (kernels/gemv.py's policy off), same process and
        machine: the batch-1 graph is recaptured without the skinny kernel, then all graphs are
        recaptured as they were."""
        ops = engine.ops
        if not hasattr(ops, "gemv_policy"):
            return None
        from kernels.gemv import GemvPolicy

        keep = ops.gemv_policy
        info = {"mode": getattr(keep, "mode", None), "table": os.environ.get("KERNELS_GEMV_TABLE", "kernels/gemv_tuned.json"),
                "device_entries": getattr(keep, "entries", None)}
        runner = engine.runner
        max_len = runner.graph_max_blocks * engine.config.block_size
        try:
            ops.gemv_policy = GemvPolicy(None, mode="off")
            runner.capture_graphs(1, max_len, capture=runner.on_gpu)
            rows["graphs+async, cuBLAS projections"] = self.best_decode(engine, prompt)
        finally:
            ops.gemv_policy = keep
            if runner.on_gpu:  # back to the engine's own graphs, piecewise ones included
                engine.capture_graphs()
            else:
                runner.capture_graphs(engine.config.max_num_seqs, max_len, capture=False)
        return info

    def do_b(self) -> None:
        engine = self.get_engine()
        a = self.args
        # No prefix caching: the repeats (and the warm-up) reuse these prompts.
        engine.reset_scheduling(max_num_batched_tokens=a.offline_batched_tokens, enable_prefix_caching=False)
        prompts = random_prompts([a.b_prompt] * a.b_batch, engine.model_config.vocab_size, seed=2)
        outs = [a.b_tokens] * a.b_batch
        run_requests(engine, prompts[: min(16, a.b_batch)], [8] * min(16, a.b_batch))  # warm
        runs = [run_requests(engine, prompts, outs) for _ in range(a.repeat)]
        engine.reset_scheduling(max_num_batched_tokens=a.max_num_batched_tokens, enable_prefix_caching=True)
        best = min(runs, key=lambda r: r["elapsed_s"])
        roof = offline_roofline_s(self.mc, a.b_prompt, a.b_tokens, a.b_batch, self.limits)
        self.results["b"] = {
            "batch": a.b_batch, "prompt_tokens": a.b_prompt, "output_tokens": a.b_tokens,
            "max_num_batched_tokens": a.offline_batched_tokens, "roofline": roof,
            "engine": {"elapsed_s": best["elapsed_s"], "output_tok_per_s": best["output_tok_per_s"],
                       "frac_roofline": roof["total_s"] / best["elapsed_s"], "steps": best["steps"],
                       "graph_steps": best["graph_steps"], "host_busy_s": best["host_busy_s"],
                       "all_runs_s": [r["elapsed_s"] for r in runs]}}
        e = self.results["b"]["engine"]
        print(f"\n(b) offline {a.b_batch} x ({a.b_prompt} prompt / {a.b_tokens} output); roofline "
              f"{roof['total_s']:.2f} s (prefill {roof['prefill_s']:.2f} s at the matmul rate + decode "
              f"{roof['decode_s']:.2f} s at copy BW) = {roof['output_tok_per_s']:.0f} output tok/s")
        print(f"engine: {e['elapsed_s']:.2f} s, {e['output_tok_per_s']:.0f} output tok/s, "
              f"{e['frac_roofline']:.1%} of the roofline ({e['steps']} steps, {e['graph_steps']} graphed)")

    def c_workload(self) -> tuple[list[list[int]], list[int]]:
        p, o = mixed_lengths(self.args.c_requests, seed=3)
        return random_prompts(p, self.mc.vocab_size, seed=4), o

    def do_c(self) -> None:
        engine = self.get_engine()
        a = self.args
        engine.reset_scheduling(max_num_batched_tokens=a.offline_batched_tokens, enable_prefix_caching=False)
        prompts, outs = self.c_workload()
        runs = [run_requests(engine, prompts, outs) for _ in range(a.repeat)]
        engine.reset_scheduling(max_num_batched_tokens=a.max_num_batched_tokens, enable_prefix_caching=True)
        best = min(runs, key=lambda r: r["elapsed_s"])
        self.results["c"] = {
            "requests": len(prompts), "prompt_tokens_total": sum(map(len, prompts)), "output_tokens_total": sum(outs),
            "prompt_p50_max": [pct([len(p) for p in prompts], 0.5), max(map(len, prompts))],
            "output_p50_max": [pct(outs, 0.5), max(outs)],
            "engine": {"elapsed_s": best["elapsed_s"], "output_tok_per_s": best["output_tok_per_s"],
                       "req_per_s": best["req_per_s"], "steps": best["steps"], "graph_steps": best["graph_steps"],
                       "all_runs_s": [r["elapsed_s"] for r in runs]}}
        e = self.results["c"]["engine"]
        print(f"\n(c) {len(prompts)} mixed requests ({sum(map(len, prompts))} prompt / {sum(outs)} output tokens): "
              f"engine {e['elapsed_s']:.2f} s, {e['output_tok_per_s']:.0f} useful output tok/s, {e['req_per_s']:.1f} req/s")

    def do_d(self) -> None:
        engine = self.get_engine()
        a = self.args
        c_rate = (self.results.get("c") or {}).get("engine", {}).get("req_per_s")
        rate = a.d_rate or (a.d_load * c_rate if c_rate else 8.0)
        prompts, outs = self.c_workload()
        prompts, outs = prompts[: a.d_requests], outs[: a.d_requests]
        # Shared-prefix variant: 4 system prompts of d_prefix tokens, each request's own prompt after it.
        shared = random_prompts([a.d_prefix] * 4, self.mc.vocab_size, seed=5)
        limit = a.max_model_len - a.d_prefix - max(outs) - 1
        shared_prompts = [shared[i % 4] + p[:limit] for i, p in enumerate(prompts)]
        gen = torch.Generator().manual_seed(6)
        gaps = torch.empty(len(prompts)).exponential_(generator=gen) / rate
        arrivals = torch.cumsum(gaps, 0).tolist()
        # Warm-up at the same load (new GEMM shapes, kernel variants), not measured.
        engine.reset_scheduling(max_num_batched_tokens=a.max_num_batched_tokens)
        warm = min(48, len(prompts))
        run_requests(engine, shared_prompts[:warm], outs[:warm], arrivals[:warm])
        rows = []
        runner = engine.runner
        # Piecewise graphs off: the eager mixed step of the earlier runs, for the chunked configurations
        # (the ones made mostly of mixed steps), when the engine has piecewise graphs at all.
        modes = [True, False] if runner.piecewise else [False]
        for workload, ps in (("mixed (c)", prompts), ("shared prefix", shared_prompts)):
            for piecewise in modes:
                for chunked in (True, False):
                    if not piecewise and chunked is False and len(modes) > 1:
                        continue
                    for prefix in (True, False):
                        engine.reset_scheduling(chunked_prefill=chunked, enable_prefix_caching=prefix,
                                                max_num_batched_tokens=a.max_num_batched_tokens)
                        runner.piecewise_enabled = piecewise
                        r = run_requests(engine, ps, outs, arrivals)
                        bm = engine.block_manager
                        rows.append({"workload": workload, "chunked_prefill": chunked, "prefix_caching": prefix,
                                     "piecewise_graphs": piecewise,
                                     "ttft_p50_s": pct(r["ttft_s"], 0.5), "ttft_p99_s": pct(r["ttft_s"], 0.99),
                                     "tpot_p50_s": pct(r["tpot_s"], 0.5), "tpot_p99_s": pct(r["tpot_s"], 0.99),
                                     "output_tok_per_s": r["output_tok_per_s"], "elapsed_s": r["elapsed_s"],
                                     "steps": r["steps"], "graph_steps": r["graph_steps"],
                                     "piecewise_steps": r["piecewise_steps"], "host_busy_s": r["host_busy_s"],
                                     "prefix_hit_rate": bm.prefix_hits / max(1, bm.prefix_queries),
                                     # The slowest first tokens: (prompt tokens, arrival s, TTFT s).
                                     "slowest_ttft": sorted(((len(ps[i]), arrivals[i], r["ttft_s"][i])
                                                             for i in range(len(ps))), key=lambda x: -x[2])[:5]})
        runner.piecewise_enabled = True
        engine.reset_scheduling(chunked_prefill=True, enable_prefix_caching=True)
        self.results["d"] = {"rate_req_per_s": rate, "requests": len(prompts), "shared_prefix_tokens": a.d_prefix,
                             "max_num_batched_tokens": a.max_num_batched_tokens, "rows": rows}
        print(f"\n(d) {len(prompts)} requests, Poisson arrivals at {rate:.1f} req/s, "
              f"token budget {a.max_num_batched_tokens}/step; shared prefix = 4 x {a.d_prefix} tokens")
        print(f"{'workload':<14} {'chunked':>7} {'prefix$':>7} {'pieces':>6} {'TTFT p50':>9} {'TTFT p99':>9} "
              f"{'TPOT p50':>9} {'TPOT p99':>9} {'hit rate':>8} {'tok/s':>7} {'steps g/p/e':>15} {'host ms/step':>12}")
        for r in rows:
            eager = r["steps"] - r["graph_steps"] - r["piecewise_steps"]
            print(f"{r['workload']:<14} {'on' if r['chunked_prefill'] else 'off':>7} "
                  f"{'on' if r['prefix_caching'] else 'off':>7} {'on' if r['piecewise_graphs'] else 'off':>6} "
                  f"{r['ttft_p50_s'] * 1e3:>9.1f} "
                  f"{r['ttft_p99_s'] * 1e3:>9.1f} {r['tpot_p50_s'] * 1e3:>9.2f} {r['tpot_p99_s'] * 1e3:>9.2f} "
                  f"{r['prefix_hit_rate']:>8.1%} {r['output_tok_per_s']:>7.0f} "
                  f"{r['graph_steps']:>5}/{r['piecewise_steps']}/{eager:<5} "
                  f"{r['host_busy_s'] / max(1, r['steps']) * 1e3:>12.2f}")

    def do_profile(self) -> None:
        """Where a decode step's time goes: graph replays alone (no host work) per bucket against the
        bytes they must read, and the kernels of one batch-1 forward (torch.profiler)."""
        engine = self.get_engine()
        runner = engine.runner
        prof: dict = {}
        self.results["profile"] = prof
        ctx = self.args.a_prompt + self.args.a_tokens // 2
        bs = engine.config.block_size
        kv_tok = self.mc.kv_bytes_per_token(2)
        if runner.graphs and self.device.startswith("cuda"):
            rows = []
            for bucket in (1, 8, 64, 128, 256):
                if bucket not in runner.graphs:
                    continue
                nblk = -(-ctx // bs)
                with torch.inference_mode():
                    runner._g_lens[:bucket].fill_(ctx)
                    runner._g_slots[:bucket].fill_(-1)
                    runner._g_pos[:bucket].fill_(ctx - 1)
                    runner._g_ids[:bucket].fill_(5)
                    tables = torch.arange(bucket * nblk, device=self.device, dtype=torch.int32) % engine.num_blocks
                    runner._g_tables[:bucket, :nblk].copy_(tables.view(bucket, nblk))
                graph = runner.graphs[bucket][0]
                for _ in range(5):
                    graph.replay()
                sync(self.device)
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                for _ in range(20):
                    graph.replay()
                end.record()
                sync(self.device)
                ms = start.elapsed_time(end) / 20
                nbytes = weight_bytes(self.mc) + bucket * ctx * kv_tok
                rows.append({"bucket": bucket, "context": ctx, "replay_ms": ms,
                             "GBps_vs_weights_plus_kv": nbytes / ms / 1e6,
                             "frac_copy_bw": nbytes / ms / 1e6 / self.limits["copy_GBps"]})
            prof["graph_replay"] = rows
            print(f"\nprofile: graph replay alone (context {ctx}), bytes = all weights + KV")
            for r in rows:
                print(f"  bucket {r['bucket']:>3}: {r['replay_ms']:.3f} ms, {r['frac_copy_bw']:.1%} of copy BW")
            from torch.profiler import ProfilerActivity, profile

            def kernels(fn, reps: int = 5) -> list[tuple[str, int, float]]:
                fn()
                sync(self.device)
                with profile(activities=[ProfilerActivity.CUDA]) as p:
                    for _ in range(reps):
                        fn()
                    sync(self.device)
                out = []
                for evt in p.key_averages():
                    t = getattr(evt, "device_time_total", None) or getattr(evt, "cuda_time_total", 0.0)
                    if t > 0:
                        out.append((evt.key[:70], evt.count // reps, t / reps))
                return sorted(out, key=lambda x: -x[2])

            for name, fn in (("replay", lambda: runner.graphs[1][0].replay()),
                             ("eager", lambda: runner._graph_forward(1))):
                with torch.inference_mode():
                    ks = kernels(fn)
                total = sum(k[2] for k in ks)
                prof[f"kernels_bucket1_{name}"] = {"total_us": total, "count": sum(k[1] for k in ks),
                                                   "top": [list(k) for k in ks[:16]]}
                print(f"  bucket-1 {name}: {sum(k[1] for k in ks)} kernels, {total:.0f} us of kernel time per forward")
                for key, count, us in ks[:12]:
                    print(f"    {us:8.1f} us  {count:4d}x  {key}")
        if self.device.startswith("cuda"):
            # cuBLAS on the batch-1 projections: F.linear (weight [N, K]) against a [K, N] copy.
            from triton.testing import do_bench

            mc = self.mc
            shapes = {"qkv": ((mc.num_heads + 2 * mc.num_kv_heads) * mc.head_dim, mc.hidden_size),
                      "o": (mc.hidden_size, mc.num_heads * mc.head_dim),
                      "gate_up": (2 * mc.intermediate_size, mc.hidden_size),
                      "down": (mc.hidden_size, mc.intermediate_size)}
            gemv = []
            for name, (n, k) in shapes.items():
                w = torch.randn(n, k, dtype=torch.bfloat16, device=self.device)
                wt = w.t().contiguous()
                for m in (1, 128):
                    x = torch.randn(m, k, dtype=torch.bfloat16, device=self.device)
                    lin = do_bench(lambda: torch.nn.functional.linear(x, w), return_mode="median") * 1e3
                    kn = do_bench(lambda: x @ wt, return_mode="median") * 1e3
                    gb = n * k * 2 / 1e3
                    gemv.append({"proj": name, "m": m, "linear_us": lin, "kn_us": kn,
                                 "linear_frac_copy_bw": gb / lin / self.limits["copy_GBps"],
                                 "kn_frac_copy_bw": gb / kn / self.limits["copy_GBps"]})
                del w, wt
            prof["projections"] = gemv
            print("  projections (us; fraction of copy BW): " + "; ".join(
                f"{g['proj']} m={g['m']}: linear {g['linear_us']:.1f} ({g['linear_frac_copy_bw']:.0%}), "
                f"[K,N] {g['kn_us']:.1f} ({g['kn_frac_copy_bw']:.0%})" for g in gemv))
        # The first steps of one batch-1 request, as the engine runs them.
        engine.reset_scheduling(enable_prefix_caching=False)
        prompt = random_prompts([self.args.a_prompt], self.mc.vocab_size, seed=11)[0]
        engine.add_request(prompt, greedy(6))
        times = []
        while engine.has_unfinished():
            t = time.perf_counter()
            outs = engine.step()
            times.append((round((time.perf_counter() - t) * 1e3, 2), len(outs)))
        engine.reset_scheduling(enable_prefix_caching=True)
        prof["batch1_step_ms_and_outputs"] = times
        print(f"  batch-1 steps (ms, outputs): {times}")

    def do_hf(self) -> None:
        self.drop_engine()
        a = self.args
        t = time.perf_counter()
        model = hf_model(self.mc, self.device)
        hf: dict = {"build_s": time.perf_counter() - t}
        self.results["hf"] = hf
        try:
            import transformers

            hf["transformers"] = transformers.__version__
        except ImportError:
            pass
        vocab = self.mc.vocab_size
        # (b): one batch of b_batch.
        if "b" in a.hf_parts:
            prompts = random_prompts([a.b_prompt] * a.b_batch, vocab, seed=2)
            hf_generate_s(model, prompts[:4], 4, self.device)  # warm
            secs = hf_generate_s(model, prompts, a.b_tokens, self.device)
            hf["b"] = {"elapsed_s": secs, "output_tok_per_s": a.b_batch * a.b_tokens / secs}
            self.save()
            print(f"\nHF (b) batch {a.b_batch}: {secs:.2f} s, {hf['b']['output_tok_per_s']:.0f} output tok/s", flush=True)
        # (c): static batches of 32, each generating its longest output; useful tokens only.
        if "c" in a.hf_parts:
            prompts, outs = self.c_workload()
            batches = [list(range(i, min(i + 32, len(prompts)))) for i in range(0, len(prompts), 32)]
            batches = batches[: a.hf_c_batches]
            total_s, useful, generated = 0.0, 0, 0
            per_batch = []
            # Warm-up at the first batch's shapes (the committed H200 run had none: its first batch
            # took 61 s, its second 40 s for about the same work).
            hf_generate_s(model, [prompts[i] for i in batches[0]], 4, self.device)
            for idx in batches:
                longest = max(outs[i] for i in idx)
                secs = hf_generate_s(model, [prompts[i] for i in idx], longest, self.device)
                total_s += secs
                useful += sum(outs[i] for i in idx)
                generated += longest * len(idx)
                per_batch.append({"requests": len(idx), "longest_output": longest, "seconds": secs,
                                  "useful_tokens": sum(outs[i] for i in idx)})
            hf["c"] = {"batches_run": len(batches), "batches_total": -(-len(prompts) // 32), "elapsed_s": total_s,
                       "useful_output_tok_per_s": useful / total_s, "padded_output_tok_per_s": generated / total_s,
                       "per_batch": per_batch}
            self.save()
            print(f"HF (c) {len(batches)} static batches of 32: {useful} useful tokens in {total_s:.1f} s = "
                  f"{useful / total_s:.0f} useful tok/s ({generated / total_s:.0f} incl. padding rows)", flush=True)
        # (a): batch 1, dynamic cache then static cache (auto-compiled by generate on CUDA).
        if "a" in a.hf_parts:
            prompt = random_prompts([a.a_prompt], vocab, seed=1)
            hf_generate_s(model, prompt, 4, self.device)
            dyn = hf_generate_s(model, prompt, a.a_tokens, self.device)
            hf["a_dynamic"] = {"elapsed_s": dyn, "tok_per_s": a.a_tokens / dyn}
            self.save()
            print(f"HF (a) dynamic cache: {a.a_tokens / dyn:.1f} tok/s", flush=True)
            t = time.perf_counter()
            first = hf_generate_s(model, prompt, a.a_tokens, self.device, cache_implementation="static")
            runs = [hf_generate_s(model, prompt, a.a_tokens, self.device, cache_implementation="static")
                    for _ in range(2)]
            best = min(runs)
            hf["a_static"] = {"first_call_s": first, "elapsed_s": best, "tok_per_s": a.a_tokens / best,
                              "all_runs_s": runs, "warm_total_s": time.perf_counter() - t}
            print(f"HF (a) static cache: {a.a_tokens / best:.1f} tok/s (first call {first:.1f} s incl. compile)", flush=True)
        del model
        gc.collect()
        if self.device.startswith("cuda"):
            torch.cuda.empty_cache()

    def do_e0(self) -> None:
        """(e)'s loads in-process (same requests, concurrency, top rate and step budget): the baseline
        that leaves only the HTTP path between it and (e). The closed loop here stays in lockstep
        (every request of a wave starts and ends together); the open loop at (e)'s top rate has
        (e)'s Poisson arrivals, the control for what arrival jitter alone costs."""
        engine = self.get_engine()
        a = self.args
        engine.reset_scheduling(max_num_batched_tokens=a.offline_batched_tokens, enable_prefix_caching=False)
        prompts = random_prompts([a.b_prompt] * a.e_requests, engine.model_config.vocab_size, seed=7)
        outs = [a.b_tokens] * a.e_requests
        run_closed_loop(engine, prompts[:64], outs[:64], a.b_batch)  # warm-up, as (e) has 2 s of it
        rate = float(max(a.e_rates))
        # As many arrivals as (e)'s open phase at this rate sends (rate x phase duration).
        n_open = max(1, round(rate * parse_duration(a.e_duration)))
        open_prompts = random_prompts([a.b_prompt] * n_open, engine.model_config.vocab_size, seed=9)
        gen = torch.Generator().manual_seed(8)
        arrivals = torch.cumsum(torch.empty(n_open).exponential_(generator=gen) / rate, 0).tolist()
        runs = {f"closed concurrency={a.b_batch}": run_closed_loop(engine, prompts, outs, a.b_batch),
                f"closed concurrency={a.b_batch}, replacements 1 step late":
                    run_closed_loop(engine, prompts, outs, a.b_batch, late_steps=1)}
        # The engine process's own per-step work, minus the socket: sampled at T=1 with min_tokens
        # (as (e)'s requests are) and the /metrics observer attached; then each of the three alone.
        from reference_engine.metrics import EngineMetrics

        def min_tokens_only(n: int) -> SamplingParams:
            return SamplingParams(max_tokens=n, min_tokens=n, temperature=0, ignore_eos=True)

        def temperature_only(n: int) -> SamplingParams:
            return SamplingParams(max_tokens=n, temperature=1.0, ignore_eos=True)

        for label, params, observed in (("as served (T=1, min_tokens, /metrics)", served_params, True),
                                        ("T=1 alone", temperature_only, False),
                                        ("min_tokens alone", min_tokens_only, False),
                                        ("/metrics alone", greedy, True)):
            engine.observer = EngineMetrics(a.preset) if observed else None
            try:
                runs[f"closed concurrency={a.b_batch}, {label}"] = run_closed_loop(
                    engine, prompts, outs, a.b_batch, params=params)
            finally:
                engine.observer = None
        runs[f"open rate={rate}"] = run_requests(engine, open_prompts, [a.b_tokens] * n_open, arrivals)
        engine.reset_scheduling(max_num_batched_tokens=a.max_num_batched_tokens, enable_prefix_caching=True)
        b = (self.results.get("b") or {}).get("engine", {}).get("output_tok_per_s")
        rows = []
        print(f"\n(e0) in-process, {a.e_requests} x ({a.b_prompt} / {a.b_tokens}), step budget {a.offline_batched_tokens}")
        for phase, r in runs.items():
            row = {"phase": phase, "requests": len(r["ttft_s"]), "elapsed_s": r["elapsed_s"],
                   "req_per_s": r["req_per_s"], "output_tok_per_s": r["output_tok_per_s"],
                   "ttft_p50_s": pct(r["ttft_s"], 0.5), "ttft_p99_s": pct(r["ttft_s"], 0.99),
                   "ttft_mean_s": sum(r["ttft_s"]) / len(r["ttft_s"]),
                   "queue_mean_s": sum(r["queue_s"]) / max(1, len(r["queue_s"])), "mean_batch": r["mean_batch"],
                   "steady_tok_per_s": r["steady_tok_per_s"], "mean_step_ms": r.get("mean_step_ms"),
                   "tpot_p50_s": pct(r["tpot_s"], 0.5), "tpot_p99_s": pct(r["tpot_s"], 0.99)}
            rows.append(row)
            vs = f" ({row['output_tok_per_s'] / b:.0%} of (b))" if b else ""
            step = f" ({row['mean_step_ms']:.1f} ms a step)" if row["mean_step_ms"] is not None else ""
            print(f"  {phase}: {row['req_per_s']:.1f} req/s, {row['output_tok_per_s']:.0f} out tok/s{vs} "
                  f"({row['steady_tok_per_s']:.0f} in the 2nd half of the sends), mean batch "
                  f"{row['mean_batch']:.1f}{step}, TTFT p50/p99/mean {row['ttft_p50_s'] * 1e3:.0f}/"
                  f"{row['ttft_p99_s'] * 1e3:.0f}/{row['ttft_mean_s'] * 1e3:.0f} ms (queued "
                  f"{row['queue_mean_s'] * 1e3:.0f}), TPOT p50/p99 {row['tpot_p50_s'] * 1e3:.2f}/"
                  f"{row['tpot_p99_s'] * 1e3:.2f} ms")
        self.results["e0"] = {"rows": rows, "concurrency": a.b_batch, "rate": rate}

    def do_e(self) -> None:
        """The HTTP path, once per engine mode in --e-modes: `process` (the step loop in its own
        process, results under "e") and `thread` (the loop in a thread of the HTTP process, "e_thread")."""
        self.drop_engine()
        for mode in self.args.e_modes.split(","):
            self.serve_and_drive(mode)

    def serve_and_drive(self, mode: str) -> None:
        a = self.args
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        cmd = [sys.executable, "-m", "reference_engine", "--preset", a.preset, "--device", self.device,
               "--port", str(port), "--max-model-len", str(a.max_model_len), "--max-num-seqs", str(a.max_num_seqs),
               "--max-num-batched-tokens", str(a.offline_batched_tokens),
               "--engine-process" if mode == "process" else "--no-engine-process"]
        cmd += ["--kv-cache-memory", f"{a.kv_gib}GB"] if self.device.startswith("cuda") else ["--num-kv-blocks", "2048"]
        cmd += a.e_serve_args.split()
        log = tempfile.NamedTemporaryFile("w+", suffix=".log", delete=False)
        t = time.perf_counter()
        server = subprocess.Popen(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
        e: dict = {"server_cmd": cmd, "engine_mode": mode}
        self.results["e" if mode == "process" else "e_" + mode] = e
        try:
            wait_health(url, server, a.e_start_timeout)
            e["server_start_s"] = time.perf_counter() - t
            print(f"\n(e, engine {mode}) server up in {e['server_start_s']:.0f} s: {' '.join(cmd[1:])}", flush=True)
            rows = []
            runs_dir = (Path(a.e_runs_dir) / mode) if a.e_runs_dir else Path(tempfile.mkdtemp(prefix="engine_gpu_e_"))
            # Each run its own seed: with one seed the open run resent the closed run's prompts, and the
            # server's prefix cache held a quarter of their tokens at 64 req/s (s13f).
            plans = [("closed", ["--concurrency", str(a.b_batch), "--requests", str(a.e_requests),
                                 "--warmup", "2s", "--seed", "1"])]
            plans += [("open", ["--sweep", "rate:" + ",".join(str(r) for r in a.e_rates), "--duration", a.e_duration,
                                "--seed", "2"])]
            for kind, extra in plans:
                before = http_get_json(url + "/internal/engine")
                cpu_before = server_cpu(server.pid)
                summary = harness_run(url, runs_dir / kind, ["--prompt-tokens", str(a.b_prompt), "--max-tokens",
                                                             str(a.b_tokens), *extra], timeout_s=a.e_run_timeout)
                after = http_get_json(url + "/internal/engine")
                cpu_after = server_cpu(server.pid)
                steps = after["steps"] - before["steps"]
                engine_side = {"steps": steps, "busy_s": after["busy_s"] - before["busy_s"],
                               "mean_batch": (after["scheduled_seqs_total"] - before["scheduled_seqs_total"]) / max(1, steps),
                               "graph_steps": after["graph_steps"] - before["graph_steps"],
                               "piecewise_steps": after.get("piecewise_steps", 0) - before.get("piecewise_steps", 0),
                               **server_cpu_delta(cpu_before, cpu_after)}
                per_phase = phase_server_side(runs_dir / kind)
                for phase in summary["phases"]:
                    if phase["phase"] == "warmup":
                        continue
                    row = phase_row(phase)
                    row.update(per_phase.get(phase["phase"], {}))
                    row["kind"] = kind
                    rows.append(row)
                rows[-1]["engine_side_of_run"] = engine_side
                self.save()
            e["rows"] = rows
            b = (self.results.get("b") or {}).get("engine", {}).get("output_tok_per_s")
            e["in_process_b_tok_per_s"] = b
            print(f"{'phase':<18} {'req/s':>6} {'out tok/s':>9} {'vs (b)':>7} {'TTFT p50':>9} {'TTFT p99':>9} "
                  f"{'TPOT p50':>9} {'TPOT p99':>9} {'engine TTFT':>11} {'queued':>7} {'2nd half tok/s':>14} "
                  f"{'running':>7}   (ms; engine: its own means)")
            for r in rows:
                vs = f"{r['output_tok_per_s'] / b:>6.0%}" if b else "     -"
                print(f"{r['kind'] + ' ' + r['phase']:<18} {r['req_per_s']:>6.1f} {r['output_tok_per_s']:>9.0f} "
                      f"{vs:>7} {r['ttft_p50_s'] * 1e3:>9.1f} {r['ttft_p99_s'] * 1e3:>9.1f} "
                      f"{r['tpot_p50_s'] * 1e3:>9.2f} {r['tpot_p99_s'] * 1e3:>9.2f} "
                      f"{r.get('engine_ttft_mean_s', math.nan) * 1e3:>11.1f} {r.get('engine_queue_mean_s', math.nan) * 1e3:>7.1f} "
                      f"{r.get('steady_tok_per_s', math.nan):>14.0f} {r.get('engine_running_mean', math.nan):>7.1f}")
            for r in rows:
                if "engine_side_of_run" in r:
                    s = r["engine_side_of_run"]
                    print(f"engine side of the {r['kind']} run: {s['steps']} steps, mean batch {s['mean_batch']:.1f}, "
                          f"{s['graph_steps']} graphed, {s['piecewise_steps']} piecewise, "
                          f"host busy in step() {s['busy_s']:.1f} s; CPU: HTTP process "
                          f"{s['http_process_cpu_frac']:.0%}, engine process {s['engine_process_cpu_frac']:.0%} of a core")
        finally:
            server.terminate()
            try:
                server.wait(20)
            except subprocess.TimeoutExpired:
                server.kill()
            log.seek(0)
            e["server_log_tail"] = log.read()[-3000:]

    def summary(self) -> None:
        r = self.results
        lines = [f"\n== summary: {r['preset']} on {r['device']} =="]
        if "limits" in r:
            lines.append(f"limits: copy {r['limits']['copy_GBps']:.0f} GB/s, matmul {r['limits']['matmul_bf16_TFLOPs']:.0f} TFLOP/s")
        hf = r.get("hf", {})
        if "a" in r:
            best = r["a"]["engine"].get("graphs+async") or next(iter(r["a"]["engine"].values()))
            line = (f"(a) batch-1: {best['decode_tok_per_s']:.0f} tok/s decode = {best['frac_roofline']:.1%} of "
                    f"{r['a']['roofline_tok_per_s']:.0f} (target 85%); e2e {best['e2e_tok_per_s']:.0f} tok/s")
            if "a_static" in hf:
                line += f"; HF static {hf['a_static']['tok_per_s']:.0f} -> {best['e2e_tok_per_s'] / hf['a_static']['tok_per_s']:.2f}x"
            if "a_dynamic" in hf:
                line += f", HF dynamic {hf['a_dynamic']['tok_per_s']:.0f}"
            lines.append(line)
        if "b" in r:
            e = r["b"]["engine"]
            line = (f"(b) offline: {e['output_tok_per_s']:.0f} output tok/s = {e['frac_roofline']:.1%} of the "
                    f"roofline {r['b']['roofline']['output_tok_per_s']:.0f} (target 80%)")
            if "b" in hf:
                line += f"; HF batch {r['b']['batch']} {hf['b']['output_tok_per_s']:.0f} -> {e['output_tok_per_s'] / hf['b']['output_tok_per_s']:.2f}x"
            lines.append(line)
        if "c" in r:
            e = r["c"]["engine"]
            line = f"(c) mixed: {e['output_tok_per_s']:.0f} useful tok/s"
            if "c" in hf:
                ratio = e["output_tok_per_s"] / hf["c"]["useful_output_tok_per_s"]
                line += (f"; HF static batches of 32 {hf['c']['useful_output_tok_per_s']:.0f} -> {ratio:.1f}x "
                         f"(target 10x; HF ran {hf['c']['batches_run']}/{hf['c']['batches_total']} batches)")
            lines.append(line)
        for key in ("skipped", "errors"):
            if r.get(key):
                lines.append(f"{key}: {r[key]}")
        lines.append(f"results: {self.path}")
        print("\n".join(lines))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="llama3-8b")
    p.add_argument("--parts", default="limits,a,b,c,d,e0,e,hf", help="also: profile")
    p.add_argument("--hf-parts", default="b,c,a", help="which HF baselines to run (a: static-cache compile is slow)")
    p.add_argument("--out", default=str(REPO / "benchmarks" / "results"))
    p.add_argument("--tag", default="", help="suffix of the results file name")
    p.add_argument("--budget-s", type=float, default=540.0, help="skip parts that would not fit in this many seconds")
    p.add_argument("--repeat", type=int, default=2)
    p.add_argument("--max-model-len", type=int, default=4096)
    p.add_argument("--max-num-seqs", type=int, default=256)
    p.add_argument("--max-num-batched-tokens", type=int, default=2048, help="step token budget for (d)")
    p.add_argument("--offline-batched-tokens", type=int, default=8192, help="step token budget for (b), (c), (e)")
    p.add_argument("--kv-gib", type=int, default=64)
    p.add_argument("--a-prompt", type=int, default=128)
    p.add_argument("--a-tokens", type=int, default=256)
    p.add_argument("--no-a-compare-gemv", dest="a_compare_gemv", action="store_false",
                   help="skip (a)'s extra run with every projection on cuBLAS")
    p.add_argument("--b-batch", type=int, default=128)
    p.add_argument("--b-prompt", type=int, default=512)
    p.add_argument("--b-tokens", type=int, default=128)
    p.add_argument("--c-requests", type=int, default=256)
    p.add_argument("--hf-c-batches", type=int, default=2, help="HF static batches of 32 to time (of 8)")
    p.add_argument("--d-requests", type=int, default=128)
    p.add_argument("--d-load", type=float, default=0.5, help="(d) arrival rate as a fraction of (c)'s offline req/s")
    p.add_argument("--d-rate", type=float, default=None, help="(d) arrival rate, req/s (overrides --d-load)")
    p.add_argument("--d-prefix", type=int, default=1024)
    p.add_argument("--e-requests", type=int, default=384)
    p.add_argument("--e-rates", default="8,16,32,64")
    p.add_argument("--e-modes", default="process", help="engine modes of (e): process, thread, or both (process,thread)")
    p.add_argument("--e-duration", default="10s")
    p.add_argument("--e-serve-args", default="", help="more `serve` options for (e), e.g. --no-async-scheduling")
    p.add_argument("--e-runs-dir", default=None, help="keep (e)'s run directories here (report them with `servescope report`)")
    p.add_argument("--e-start-timeout", type=float, default=240.0)
    p.add_argument("--e-run-timeout", type=float, default=240.0)
    p.add_argument("--smoke", action="store_true", help="CPU dry run: tiny preset, small sizes")
    args = p.parse_args()
    args.device = "cuda" if torch.cuda.is_available() and not args.smoke else "cpu"
    if args.smoke:
        args.preset = "tiny"
        args.a_prompt, args.a_tokens = 16, 12
        args.b_batch, args.b_prompt, args.b_tokens = 8, 32, 8
        args.c_requests, args.d_requests, args.d_prefix, args.hf_c_batches = 40, 12, 64, 1
        args.e_requests, args.e_rates, args.e_duration = 16, "4,8", "2s"
        args.repeat = 1
        args.out = tempfile.mkdtemp(prefix="engine_gpu_smoke_")
        torch.set_num_threads(1)
    args.parts = set(args.parts.split(","))
    args.hf_parts = set(args.hf_parts.split(","))
    args.e_rates = [float(x) if "." in x else int(x) for x in str(args.e_rates).split(",")]
    bench = Bench(args)
    print(f"engine_gpu: {args.preset} on {bench.results['device']}, parts {sorted(args.parts)}, "
          f"budget {args.budget_s:.0f} s", flush=True)
    bench.part("limits", bench.do_limits, 5)
    if "limits" not in bench.results:
        bench.do_limits()
    bench.part("profile", bench.do_profile, 20)
    bench.part("a", bench.do_a, 40)
    bench.part("b", bench.do_b, 20)
    bench.part("c", bench.do_c, 20)
    bench.part("d", bench.do_d, 60)
    bench.part("e0", bench.do_e0, 60)
    bench.part("e", bench.do_e, 90)
    bench.part("hf", bench.do_hf, 200)
    bench.summary()


if __name__ == "__main__":
    main()
