"""What the engine benchmarks share: the chip's measured limits, the roofline arithmetic, the
reference engine driven in-process, and the bookkeeping of parts, time budget and results.

Limits, measured in the same run as the figures set against them: the device-to-device copy
bandwidth (bytes read + written, 1 GiB buffers) and the bf16 8192^3 matmul rate (the faster of the
do_bench median and the mean of 20 back-to-back products, so a roofline is never lenient).
"""

from __future__ import annotations

import argparse
import gc
import math
import tempfile
import time
import traceback
from typing import Callable, Sequence

import torch

from benchmarks.common import ResultsFile, add_results_args, cpu_name, print_table, run_info
from servescope.reference_engine.config import EngineConfig, ModelConfig, preset
from servescope.reference_engine.engine import LLMEngine
from servescope.reference_engine.sequence import SamplingParams

GiB = 1 << 30


# -- the chip's limits ---------------------------------------------------------------------------
def on_cuda(device: str) -> bool:
    return device.startswith("cuda")


def sync(device: str) -> None:
    if on_cuda(device):
        torch.cuda.synchronize()


def device_name(device: str) -> str:
    """The GPU's name, or the CPU's model and CPU count (the results file is named after it)."""
    return torch.cuda.get_device_name() if on_cuda(device) else cpu_name()


def median_s(fn: Callable[[], object], device: str) -> float:
    """Median seconds of fn: triton's do_bench on a GPU, a few host-timed calls on the CPU."""
    if on_cuda(device):
        from triton.testing import do_bench

        return do_bench(fn, warmup=25, rep=100, return_mode="median") / 1e3
    times = []
    for _ in range(3):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return sorted(times)[1]


def busy(fn: Callable[[], object], device: str, seconds: float) -> None:
    """Run fn back to back for a while: an idle GPU needs time to raise its clocks."""
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        for _ in range(10):
            fn()
        sync(device)


def copy_seconds(device: str, nbytes: int) -> float:
    """Median seconds of one device-to-device copy of a buffer of `nbytes` bytes."""
    src = torch.randn(nbytes // 2, dtype=torch.bfloat16, device=device)
    dst = torch.empty_like(src)
    busy(lambda: dst.copy_(src), device, 0.5 if on_cuda(device) else 0.05)
    return median_s(lambda: dst.copy_(src), device)


def matmul_seconds(device: str, size: int) -> tuple[float, float]:
    """(do_bench median, mean of 20 back-to-back products) seconds of one bf16 size^3 matmul."""
    a = torch.randn(size, size, dtype=torch.bfloat16, device=device)
    b = torch.randn(size, size, dtype=torch.bfloat16, device=device)
    busy(lambda: a @ b, device, 1.0 if on_cuda(device) else 0.05)
    median = median_s(lambda: a @ b, device)
    if not on_cuda(device):
        return median, median
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(20):  # back to back, no cache flush between the products
        a @ b
    end.record()
    sync(device)
    return median, start.elapsed_time(end) / 20 / 1e3


def measure_limits(device: str) -> dict:
    """Copy bandwidth (GB/s, read + written) and bf16 matmul rate (TFLOP/s) of this device."""
    n = GiB if on_cuda(device) else 1 << 22  # bytes per buffer
    copy_s = copy_seconds(device, n)
    size = 8192 if on_cuda(device) else 256
    mm_s, mm_b2b_s = matmul_seconds(device, size)
    flops = 2 * size**3
    return {"copy_GBps": 2 * n / copy_s / 1e9, "matmul_bf16_TFLOPs": flops / min(mm_s, mm_b2b_s) / 1e12,
            "matmul_bf16_TFLOPs_do_bench_median": flops / mm_s / 1e12,
            "matmul_bf16_TFLOPs_back_to_back_mean": flops / mm_b2b_s / 1e12,
            "copy_bytes_read_plus_written": 2 * n, "matmul_size": size}


# -- roofline arithmetic -------------------------------------------------------------------------
def weight_bytes(mc: ModelConfig, dtype_bytes: int = 2) -> int:
    """All parameter bytes: the batch-1 roofline counts the whole checkpoint."""
    return mc.num_params * dtype_bytes


def prefill_flops(mc: ModelConfig, prompt_lens: Sequence[int]) -> float:
    """Matmul FLOPs of prefilling these prompts: every layer for every token, the LM head for the last
    token of each (the engine and HF compute logits only where they sample), and causal attention."""
    head = mc.vocab_size * mc.hidden_size
    body = mc.num_params - mc.vocab_size * mc.hidden_size - (0 if mc.tie_word_embeddings else head)
    attn = sum(4 * mc.num_layers * mc.num_heads * mc.head_dim * n * (n + 1) / 2 for n in prompt_lens)
    return 2 * body * sum(prompt_lens) + 2 * head * len(prompt_lens) + attn


def offline_roofline(mc: ModelConfig, prompt: int, output: int, batch: int, limits: dict) -> dict:
    """The offline limit: prefill FLOPs at the matmul rate + each decode step's weight and KV bytes at
    the copy bandwidth."""
    flops = prefill_flops(mc, [prompt] * batch)
    prefill_s = flops / (limits["matmul_bf16_TFLOPs"] * 1e12)
    kv_tok = mc.kv_bytes_per_token(2)
    steps = output - 1  # the first token comes out of the prefill
    decode_bytes = sum(weight_bytes(mc) + batch * (prompt + i + 1) * kv_tok for i in range(steps))
    decode_s = decode_bytes / (limits["copy_GBps"] * 1e9)
    return {"prefill_flops": flops, "prefill_s": prefill_s, "decode_bytes": decode_bytes, "decode_s": decode_s,
            "total_s": prefill_s + decode_s, "output_tok_per_s": batch * output / (prefill_s + decode_s)}


# -- workloads -----------------------------------------------------------------------------------
def random_prompts(lengths: Sequence[int], vocab: int, seed: int) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(10, vocab, (n,), generator=gen).tolist() for n in lengths]


def lognormal_lengths(count: int, seed: int, prompt: tuple[int, int, int],
                      output: tuple[int, int, int]) -> tuple[list[int], list[int]]:
    """Prompt and output lengths, lognormal (sigma 0.8); each of `prompt`/`output` is (median, min, max)."""
    gen = torch.Generator().manual_seed(seed)

    def draw(median: int, low: int, high: int) -> list[int]:
        x = torch.exp(math.log(median) + 0.8 * torch.randn(count, generator=gen)).round().clamp(low, high)
        return [int(v) for v in x]

    return draw(*prompt), draw(*output)


# -- the engine driven in-process ----------------------------------------------------------------
def greedy(n: int) -> SamplingParams:
    return SamplingParams(max_tokens=n, temperature=0, ignore_eos=True)


def served_params(n: int) -> SamplingParams:
    """What the served benchmark's requests ask for: the API's default temperature (1.0) and exactly
    n tokens (`--force-output-length` sends min_tokens and ignore_eos)."""
    return SamplingParams(max_tokens=n, min_tokens=n, temperature=1.0, ignore_eos=True)


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

    def check(self, outputs: Sequence[int]) -> None:
        assert self.count == list(outputs), "every request must produce exactly its output length"

    def ttft(self, starts: Sequence[float]) -> list[float]:
        return [f - s for f, s in zip(self.first, starts)]

    def tpot(self) -> list[float]:
        return [(last - first) / (c - 1) for first, last, c in zip(self.first, self.last, self.count) if c > 1]


def queue_times(seqs: list) -> list[float]:
    """Each request's wait from arrival to its first scheduling (the engine's queue-time metric)."""
    return [s.first_scheduled_time - s.arrival_time for s in seqs if s.first_scheduled_time is not None]


def run_requests(engine: LLMEngine, prompts: list[list[int]], outputs: Sequence[int],
                 arrivals: Sequence[float] | None = None) -> dict:
    """All at t=0 (offline) or at the given arrival offsets; per-request token times from the step outputs."""
    n = len(prompts)
    arrivals = list(arrivals) if arrivals else [0.0] * n
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
    steps = engine.num_steps - steps0
    return {"elapsed_s": elapsed, "output_tokens": total, "output_tok_per_s": total / elapsed,
            "req_per_s": n / elapsed, "ttft_s": times.ttft(arrivals), "tpot_s": times.tpot(),
            "first_s": times.first, "last_s": times.last, "queue_s": queue_times(seqs),
            "steady_tok_per_s": times.rate_between((arrivals[order[0]] + arrivals[order[-1]]) / 2, arrivals[order[-1]]),
            "steps": steps, "graph_steps": runner.num_graph_steps - graph0,
            "piecewise_steps": runner.num_piecewise_steps - piece0, "host_busy_s": engine.busy_s - busy0,
            "mean_batch": (engine.scheduled_seqs_total - seqs0) / max(1, steps)}


def run_closed_loop(engine: LLMEngine, prompts: list[list[int]], outputs: Sequence[int], concurrency: int,
                    late_steps: int = 0, params: Callable[[int], SamplingParams] = greedy) -> dict:
    """`concurrency` requests in flight, a new one added as soon as one finishes: what
    `servescope run --concurrency N` does over HTTP, without the HTTP path.

    `late_steps`: each replacement reaches the engine only after that many more steps, as one sent
    over HTTP does (a round trip, and overlapped scheduling has planned the next step already).
    With 0 a finished group's replacements join the very next step. TTFT counts from the finish
    that freed the slot (when a client would send)."""
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
    steps = engine.num_steps - steps0
    return {"elapsed_s": elapsed, "req_per_s": n / elapsed, "output_tok_per_s": sum(times.count) / elapsed,
            "ttft_s": times.ttft(start), "tpot_s": times.tpot(), "queue_s": queue_times(seqs),
            "steady_tok_per_s": times.rate_between(start[-1] / 2, start[-1]),
            "mean_batch": (engine.scheduled_seqs_total - seqs0) / max(1, steps),
            "mean_step_ms": elapsed * 1e3 / max(1, steps)}


def measure_offline(bench: "Bench", batch: int, prompt: int, tokens: int, step_tokens: int) -> dict:
    """`batch` requests of `prompt` random tokens, `tokens` greedy output tokens each, all at t=0,
    best of --repeat runs, against the offline roofline. No prefix caching: the repeats reuse the prompts."""
    engine = bench.engine()
    engine.reset_scheduling(max_num_batched_tokens=step_tokens, enable_prefix_caching=False)
    prompts = random_prompts([prompt] * batch, engine.model_config.vocab_size, seed=2)
    warm = min(16, batch)
    run_requests(engine, prompts[:warm], [8] * warm)
    runs = [run_requests(engine, prompts, [tokens] * batch) for _ in range(bench.args.repeat)]
    engine.reset_scheduling(max_num_batched_tokens=bench.args.max_num_batched_tokens, enable_prefix_caching=True)
    best = min(runs, key=lambda r: r["elapsed_s"])
    roof = offline_roofline(bench.mc, prompt, tokens, batch, bench.limits)
    return {"batch": batch, "prompt_tokens": prompt, "output_tokens": tokens, "max_num_batched_tokens": step_tokens,
            "roofline": roof,
            "engine": {"elapsed_s": best["elapsed_s"], "output_tok_per_s": best["output_tok_per_s"],
                       "frac_roofline": roof["total_s"] / best["elapsed_s"], "steps": best["steps"],
                       "graph_steps": best["graph_steps"], "host_busy_s": best["host_busy_s"],
                       "all_runs_s": [r["elapsed_s"] for r in runs]}}


# -- parts, budget, results ----------------------------------------------------------------------
def add_engine_args(parser: argparse.ArgumentParser, parts: Sequence[str], max_num_batched_tokens: int,
                    budget_s: float = 540.0) -> None:
    parser.add_argument("--parts", default=",".join(parts), help=f"comma-separated, of: {', '.join(parts)}")
    parser.add_argument("--preset", default="llama3-8b")
    parser.add_argument("--budget-s", type=float, default=budget_s,
                        help="skip a part that would not fit in what is left of this many seconds")
    parser.add_argument("--repeat", type=int, default=2, help="runs per timed figure; the best is kept")
    parser.add_argument("--max-model-len", type=int, default=4096)
    parser.add_argument("--max-num-seqs", type=int, default=256)
    parser.add_argument("--max-num-batched-tokens", type=int, default=max_num_batched_tokens,
                        help="the engine's step token budget")
    parser.add_argument("--kv-gib", type=int, default=64, help="KV cache size on a GPU")
    parser.add_argument("--cpu-kv-blocks", type=int, default=2048, help="KV cache size on the CPU, in blocks")
    parser.add_argument("--smoke", action="store_true",
                        help="CPU check of this script: tiny preset, small shapes, results in a temporary folder")
    add_results_args(parser, default_save=True)


class Bench:
    """One run of an engine benchmark: its device and limits (measured first), the engine (built on
    first use), the results file, and the parts run in order within the time budget."""

    def __init__(self, benchmark: str, args: argparse.Namespace, all_parts: Sequence[str]) -> None:
        self.args = args
        self.parts = [p for p in args.parts.split(",") if p]
        unknown = sorted(set(self.parts) - set(all_parts))
        if unknown:
            raise SystemExit(f"unknown part(s) {', '.join(unknown)}; the parts are: {', '.join(all_parts)}")
        self.device = "cuda" if torch.cuda.is_available() and not args.smoke else "cpu"
        if args.smoke:
            args.preset = "tiny"
            args.out = tempfile.mkdtemp(prefix=f"{benchmark}_smoke_")
            torch.set_num_threads(1)
        self.mc = preset(args.preset, vocab_size=8192)  # 8192: the bundled tokenizer's vocabulary (tiny only)
        self.results = ResultsFile(benchmark, device_name(self.device), args.out, args.copy_to, save=args.save)
        self.started = time.perf_counter()
        self._engine: LLMEngine | None = None
        self.status: dict[str, tuple[str, float]] = {}
        print(f"{benchmark}: {args.preset} on {device_name(self.device)}, parts {', '.join(self.parts)}, "
              f"budget {args.budget_s:.0f} s", flush=True)
        self.limits = measure_limits(self.device)
        lim = self.limits
        print(f"limits: copy {lim['copy_GBps']:.0f} GB/s (read + write), bf16 matmul {lim['matmul_bf16_TFLOPs']:.0f} "
              f"TFLOP/s ({lim['matmul_size']}^3; do_bench median {lim['matmul_bf16_TFLOPs_do_bench_median']:.0f}, "
              f"back-to-back mean {lim['matmul_bf16_TFLOPs_back_to_back_mean']:.0f})", flush=True)
        triton_version = None
        try:
            import triton

            triton_version = triton.__version__
        except ImportError:
            pass
        self.run = run_info(device=device_name(self.device), preset=args.preset, torch=torch.__version__,
                            triton=triton_version, limits=self.limits, smoke=args.smoke)

    def left_s(self) -> float:
        return self.args.budget_s - (time.perf_counter() - self.started)

    def run_parts(self, plan: Sequence[tuple[str, Callable[[], dict | None], float]]) -> None:
        """Run each selected (part, fn, seconds it needs) in order; fn returns the part's figures."""
        for name, fn, need_s in plan:
            if name not in self.parts:
                continue
            if self.left_s() < need_s:
                self.status[name] = (f"skipped: {self.left_s():.0f} s of the budget left, needs ~{need_s:.0f}", 0.0)
                print(f"\n[{name}] {self.status[name][0]}", flush=True)
                continue
            t = time.perf_counter()
            try:
                figures = fn()
            except Exception as exc:  # keep the other parts; the file keeps this part's earlier figures
                traceback.print_exc()
                self.status[name] = (f"failed: {type(exc).__name__}: {exc}"[:160], time.perf_counter() - t)
                self._abort_leftovers()
                continue
            seconds = time.perf_counter() - t
            if figures is not None:
                self.results.put(name, figures, {**self.run, "part_seconds": seconds})
            self.status[name] = ("measured" if figures is not None else "nothing to measure here", seconds)
            print(f"[{name}] {seconds:.1f} s (total {time.perf_counter() - self.started:.0f} s)", flush=True)

    def _abort_leftovers(self) -> None:
        if self._engine is None:
            return
        for seq in list(self._engine.scheduler.running) + list(self._engine.scheduler.waiting):
            self._engine.abort(seq)
        self._engine._inflight = None

    def engine_config(self, **overrides) -> EngineConfig:
        a = self.args
        fields = dict(device=self.device, max_model_len=a.max_model_len, max_num_seqs=a.max_num_seqs,
                      max_num_batched_tokens=a.max_num_batched_tokens, seed=0)
        if on_cuda(self.device):
            fields["kv_cache_memory"] = a.kv_gib * GiB
        else:
            fields["num_kv_blocks"] = a.cpu_kv_blocks
        fields.update(overrides)
        return EngineConfig(**fields)

    def engine(self) -> LLMEngine:
        """The engine, built on first use (random weights); what it was built with goes into the run info."""
        if self._engine is None:
            t = time.perf_counter()
            engine = LLMEngine.build(self.engine_config(), preset_name=self.args.preset)
            self.run["engine_build"] = {
                "seconds": time.perf_counter() - t, "graph_capture_s": engine.graph_capture_s,
                "graph_buckets": sorted(engine.runner.graphs), "num_kv_blocks": engine.num_blocks,
                "piecewise_token_buckets": sorted(engine.runner.piecewise),
                "ops": engine.ops.name, "async_scheduling": engine.async_scheduling}
            print(f"engine: {self.args.preset} built in {self.run['engine_build']['seconds']:.1f} s (graphs "
                  f"{engine.graph_capture_s:.1f} s, buckets {sorted(engine.runner.graphs)})", flush=True)
            self._engine = engine
        return self._engine

    def drop_engine(self) -> None:
        self._engine = None
        self.run.pop("engine_build", None)
        gc.collect()
        if on_cuda(self.device):
            torch.cuda.empty_cache()

    def part(self, name: str) -> dict | None:
        """A part's figures as the results file holds them now (this run's or an earlier one's)."""
        return self.results.parts.get(name)

    def finish(self) -> int:
        """Print which parts ran, and return the exit status (1 when a part failed)."""
        rows = [[name, status, seconds] for name, (status, seconds) in self.status.items()]
        where = self.results.path if self.results.enabled else "not saved (--no-save)"
        print_table(["part", "status", "seconds"], rows, title=f"parts of this run; results: {where}")
        return 1 if any(s.startswith("failed") for s, _ in self.status.values()) else 0


def ms(seconds: float | None) -> float | None:
    """Seconds to milliseconds, for table cells (None stays None)."""
    return None if seconds is None or (isinstance(seconds, float) and math.isnan(seconds)) else seconds * 1e3
