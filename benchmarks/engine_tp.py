"""Tensor parallelism in the reference engine: how close each split comes to its roofline, and what the
all-reduce costs, at N = 1, 2, 4, 8 GPUs where they exist.

    python -m benchmarks.engine_tp [--presets llama3-8b,llama3-70b] [--sizes 1,2,4,8]   # on GPUs
    python -m benchmarks.engine_tp --smoke                            # CPU check: tiny preset, gloo, N = 1, 2

Random bf16 weights. The chip's copy bandwidth and matmul rate are measured first, in the same run
(gpu_common.measure_limits). For every (preset, N):

  allreduce  in a group of N processes on the same GPUs, before the engine starts: NCCL's bus bandwidth
             (a 256 MiB all-reduce; bus bandwidth = bytes x 2(N-1)/N / time, as nccl-tests define it),
             and the all-reduce of one decode token's hidden state (hidden x 2 bytes), which the
             engine does twice per layer (after o and after down): its measured time per layer
             against the time the bus bandwidth alone implies (at this size latency dominates);
  decode     one request, 128-token prompt, 256 greedy tokens: decode tok/s (first to last token)
             against the sharded roofline, copy bandwidth / (weight bytes / N): every GPU streams its
             shard once per token; and the share of a decode step the all-reduces take;
  offline    128 requests of 512 prompt / 128 output tokens at once, against the offline roofline with
             N GPUs' bandwidth and matmul rate.

A row that cannot run says why (fewer GPUs than N; a shard that does not fit one GPU's free memory
beside its KV cache) instead of failing. Results: benchmarks/results/engine_tp_<device>.json, one part
per (preset, N), written as each row ends.
"""

from __future__ import annotations

import argparse
import gc
import os
import socket
import sys
import tempfile
import time
import traceback
from pathlib import Path

if __package__ in (None, ""):  # `python benchmarks/<script>.py`: import from the repository root, not benchmarks/
    sys.path[0] = str(Path(__file__).resolve().parents[1])

import torch  # noqa: E402
import torch.multiprocessing as mp  # noqa: E402

from benchmarks.common import ResultsFile, add_results_args, print_table, run_info  # noqa: E402
from benchmarks.gpu_common import (  # noqa: E402
    GiB,
    device_name,
    measure_limits,
    offline_roofline,
    random_prompts,
    run_requests,
    weight_bytes,
)
from servescope.reference_engine.config import EngineConfig, ModelConfig, preset  # noqa: E402
from servescope.reference_engine.engine import LLMEngine  # noqa: E402

BENCHMARK = "engine_tp"
BUS_BYTES = 256 << 20  # the large all-reduce that measures bus bandwidth
# Beside the shard and its KV cache a GPU needs room for activations, CUDA graphs and the random
# weights' float32 draw of the largest tensor (the embedding).
HEADROOM_BYTES = 8 * GiB


# -- collectives, measured in a group of their own -----------------------------------------------------
def _collective_rank(rank: int, size: int, port: int, cuda: bool, hidden: int, bus_bytes: int,
                     iters: int, out: "mp.Queue") -> None:
    import torch.distributed as dist

    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    os.environ.setdefault("NCCL_SOCKET_IFNAME", "lo")
    device = torch.device("cuda", rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if cuda else "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=size)
    dtype = torch.bfloat16 if cuda else torch.float32

    def timed(x: torch.Tensor, n: int) -> float:
        """Seconds per all-reduce of x, n back to back (as nccl-tests time them)."""
        for _ in range(5):
            dist.all_reduce(x)
        if cuda:
            torch.cuda.synchronize()
        dist.barrier()
        t = time.perf_counter()
        for _ in range(n):
            dist.all_reduce(x)
        if cuda:
            torch.cuda.synchronize()
        return (time.perf_counter() - t) / n

    small = torch.randn(1, hidden, dtype=dtype, device=device)
    big = torch.randn(bus_bytes // small.element_size(), dtype=dtype, device=device)
    token_s = min(timed(small, iters) for _ in range(3))
    big_s = min(timed(big, max(5, iters // 20)) for _ in range(2))
    if rank == 0:
        out.put({"token_allreduce_s": token_s, "token_bytes": small.numel() * small.element_size(),
                 "bus_allreduce_s": big_s, "bus_bytes": big.numel() * big.element_size()})
    dist.destroy_process_group()


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def measure_collectives(size: int, cuda: bool, hidden: int, smoke: bool) -> dict:
    """All-reduce figures of a group of `size` ranks (spawned processes, one per GPU)."""
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    bus_bytes = (4 << 20) if smoke else BUS_BYTES
    iters = 20 if smoke else 200
    mp.start_processes(_collective_rank, args=(size, free_port(), cuda, hidden, bus_bytes, iters, queue),
                       nprocs=size, join=True, start_method="spawn")
    r = queue.get(timeout=10)
    factor = 2 * (size - 1) / size  # bytes each rank sends and receives per byte reduced (ring)
    r["bus_GBps"] = r["bus_bytes"] * factor / r["bus_allreduce_s"] / 1e9
    r["per_layer_s"] = 2 * r["token_allreduce_s"]  # after o_proj and after down_proj
    r["per_layer_bandwidth_bound_s"] = 2 * r["token_bytes"] * factor / (r["bus_GBps"] * 1e9)
    return r


# -- the engine ------------------------------------------------------------------------------------
def build_engine(a: argparse.Namespace, name: str, size: int, device: str) -> LLMEngine:
    fields = dict(device=device, tensor_parallel_size=size, max_model_len=a.max_model_len,
                  max_num_seqs=a.max_num_seqs, max_num_batched_tokens=a.max_num_batched_tokens, seed=0)
    if device == "cuda":
        fields["kv_cache_memory"] = a.kv_gib * GiB
    else:
        fields["num_kv_blocks"] = 1024
    return LLMEngine.build(EngineConfig(**fields), preset_name=name)


def decode_batch1(engine: LLMEngine, a: argparse.Namespace) -> dict:
    """Best of --repeat runs of one request: decode tok/s from its first to its last token."""
    prompt = random_prompts([a.batch1_prompt], engine.model_config.vocab_size, seed=1)
    engine.reset_scheduling(enable_prefix_caching=False)  # the repeats must not hit the cache
    run_requests(engine, prompt, [8])  # warm
    best = 0.0
    for _ in range(a.repeat):
        r = run_requests(engine, prompt, [a.batch1_tokens])
        best = max(best, (a.batch1_tokens - 1) / (r["last_s"][0] - r["first_s"][0]))
    engine.reset_scheduling(enable_prefix_caching=True)
    return {"prompt_tokens": a.batch1_prompt, "output_tokens": a.batch1_tokens, "decode_tok_per_s": best}


def offline(engine: LLMEngine, mc: ModelConfig, a: argparse.Namespace, limits: dict, size: int) -> dict:
    """--offline-batch requests at once, best of --repeat, against N GPUs' offline roofline."""
    engine.reset_scheduling(max_num_batched_tokens=a.offline_step_tokens, enable_prefix_caching=False)
    prompts = random_prompts([a.offline_prompt] * a.offline_batch, mc.vocab_size, seed=2)
    warm = min(16, a.offline_batch)
    run_requests(engine, prompts[:warm], [8] * warm)
    runs = [run_requests(engine, prompts, [a.offline_tokens] * a.offline_batch) for _ in range(a.repeat)]
    engine.reset_scheduling(max_num_batched_tokens=a.max_num_batched_tokens, enable_prefix_caching=True)
    best = min(runs, key=lambda r: r["elapsed_s"])
    scaled = {**limits, "copy_GBps": limits["copy_GBps"] * size,
              "matmul_bf16_TFLOPs": limits["matmul_bf16_TFLOPs"] * size}
    roof = offline_roofline(mc, a.offline_prompt, a.offline_tokens, a.offline_batch, scaled)
    return {"batch": a.offline_batch, "prompt_tokens": a.offline_prompt, "output_tokens": a.offline_tokens,
            "roofline_tok_per_s": roof["output_tok_per_s"], "output_tok_per_s": best["output_tok_per_s"],
            "frac_roofline": roof["total_s"] / best["elapsed_s"], "elapsed_s": best["elapsed_s"],
            "all_runs_s": [r["elapsed_s"] for r in runs]}


def why_not(mc: ModelConfig, size: int, device: str, a: argparse.Namespace, dtype_bytes: int) -> str | None:
    """Why (preset, N) cannot run here, or None."""
    if device != "cuda":
        return None if size <= 2 else "the CPU check runs N = 1, 2"
    have = torch.cuda.device_count()
    if size > have:
        return f"needs {size} GPUs, this machine has {have}"
    free, _ = torch.cuda.mem_get_info(0)
    shard = weight_bytes(mc, dtype_bytes) / size
    need = shard + a.kv_gib * GiB + HEADROOM_BYTES
    if need > free:
        return (f"does not fit: {shard / GiB:.1f} GiB of weights per GPU + {a.kv_gib} GiB KV + "
                f"{HEADROOM_BYTES / GiB:.0f} GiB headroom > {free / GiB:.1f} GiB free")
    return None


def measure_row(a: argparse.Namespace, name: str, size: int, device: str, limits: dict) -> dict:
    mc = preset(name, vocab_size=8192)  # 8192: the bundled tokenizer's vocabulary (tiny only)
    dtype_bytes = 2 if device == "cuda" else 4
    row: dict = {"preset": name, "tensor_parallel_size": size,
                 "weight_bytes_per_rank": weight_bytes(mc, dtype_bytes) / size}
    reason = why_not(mc, size, device, a, dtype_bytes)
    if reason is not None:
        row["not_run"] = reason
        return row
    if size > 1:
        row["allreduce"] = measure_collectives(size, device == "cuda", mc.hidden_size, a.smoke)
    t = time.perf_counter()
    engine = build_engine(a, name, size, device)
    row["engine_build_s"] = time.perf_counter() - t
    row["graph_capture_s"] = engine.graph_capture_s
    try:
        decode = decode_batch1(engine, a)
        decode["roofline_tok_per_s"] = limits["copy_GBps"] * 1e9 / row["weight_bytes_per_rank"]
        decode["frac_roofline"] = decode["decode_tok_per_s"] / decode["roofline_tok_per_s"]
        if size > 1:
            decode["allreduce_share_of_step"] = (mc.num_layers * row["allreduce"]["per_layer_s"]
                                                 * decode["decode_tok_per_s"])
        row["decode"] = decode
        row["offline"] = offline(engine, mc, a, limits, size)
        row["rank_step_s_mean"] = {rank: st.total_s / max(1, st.count)
                                   for rank, st in engine.rank_step_stats().items()}
    finally:
        engine.shutdown()
        del engine
        gc.collect()
        if device == "cuda":
            torch.cuda.empty_cache()
    return row


def print_rows(rows: list[dict]) -> None:
    def us(x: float | None) -> float | None:
        return None if x is None else x * 1e6

    table = []
    for r in rows:
        ar, dec, off = r.get("allreduce", {}), r.get("decode", {}), r.get("offline", {})
        weights = r["weight_bytes_per_rank"]
        table.append([r["preset"], r["tensor_parallel_size"], None if weights is None else weights / GiB,
                      dec.get("decode_tok_per_s"), dec.get("roofline_tok_per_s"),
                      f"{dec['frac_roofline']:.1%}" if dec else None,
                      ar.get("bus_GBps"), us(ar.get("per_layer_s")), us(ar.get("per_layer_bandwidth_bound_s")),
                      f"{dec['allreduce_share_of_step']:.1%}" if "allreduce_share_of_step" in dec else None,
                      off.get("output_tok_per_s"), off.get("roofline_tok_per_s"),
                      f"{off['frac_roofline']:.1%}" if off else None, r.get("not_run") or r.get("failed")])
    print_table(["preset", "N", "weights/GPU GiB", "b1 decode tok/s", "sharded roofline", "of roofline",
                 "NCCL bus GB/s", "all-reduce/layer us", "bus-bound us", "of decode step",
                 "offline tok/s", "offline roofline", "of roofline", "note"], table,
                title="tensor parallelism: batch-1 decode against copy BW / (weight bytes / N); the all-reduce "
                      "of one token's hidden state (x2 per layer) against NCCL's bus bandwidth; offline")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--presets", default="llama3-8b,llama3-70b", help="comma-separated model presets")
    parser.add_argument("--sizes", default="1,2,4,8", help="tensor-parallel sizes; those needing more GPUs "
                                                          "than this machine has are listed as not run")
    parser.add_argument("--budget-s", type=float, default=540.0, help="rows starting after this many seconds "
                                                                       "are skipped")
    parser.add_argument("--repeat", type=int, default=2, help="runs per timed figure; the best is kept")
    parser.add_argument("--max-model-len", type=int, default=4096)
    parser.add_argument("--max-num-seqs", type=int, default=256)
    parser.add_argument("--max-num-batched-tokens", type=int, default=2048)
    parser.add_argument("--kv-gib", type=int, default=16, help="KV cache per GPU")
    parser.add_argument("--batch1-prompt", type=int, default=128)
    parser.add_argument("--batch1-tokens", type=int, default=256)
    parser.add_argument("--offline-batch", type=int, default=128)
    parser.add_argument("--offline-prompt", type=int, default=512)
    parser.add_argument("--offline-tokens", type=int, default=128)
    parser.add_argument("--offline-step-tokens", type=int, default=8192)
    parser.add_argument("--smoke", action="store_true",
                        help="CPU check of this script: tiny preset, gloo, N = 1, 2, small shapes, results in a "
                             "temporary folder")
    add_results_args(parser, default_save=True)
    a = parser.parse_args(argv)
    try:
        sizes = [int(x) for x in a.sizes.split(",") if x]
    except ValueError:
        parser.error(f"--sizes {a.sizes!r}: write comma-separated integers, e.g. 1,2,4,8")
    if not sizes or min(sizes) < 1:
        parser.error(f"--sizes {a.sizes!r}: every size must be >= 1")
    presets = [p for p in a.presets.split(",") if p]
    device = "cuda" if torch.cuda.is_available() and not a.smoke else "cpu"
    if a.smoke:
        presets, sizes = ["tiny"], [1, 2]
        a.batch1_tokens, a.offline_batch, a.offline_prompt, a.offline_tokens = 24, 8, 32, 8
        a.offline_step_tokens, a.repeat = 256, 1
        a.out = tempfile.mkdtemp(prefix=f"{BENCHMARK}_smoke_")
        torch.set_num_threads(1)
    results = ResultsFile(BENCHMARK, device_name(device), a.out, a.copy_to, save=a.save)
    started = time.perf_counter()
    print(f"{BENCHMARK}: {', '.join(presets)} at N = {', '.join(map(str, sizes))} on {device_name(device)}"
          f"{f' x {torch.cuda.device_count()}' if device == 'cuda' else ''}", flush=True)
    limits = measure_limits(device)
    print(f"limits: copy {limits['copy_GBps']:.0f} GB/s (read + write), bf16 matmul "
          f"{limits['matmul_bf16_TFLOPs']:.0f} TFLOP/s", flush=True)
    info = run_info(device=device_name(device), gpus=torch.cuda.device_count() if device == "cuda" else 0,
                    torch=torch.__version__, limits=limits, smoke=a.smoke)
    rows, failed = [], False
    for name in presets:
        for size in sizes:
            elapsed = time.perf_counter() - started
            if elapsed > a.budget_s:
                rows.append({"preset": name, "tensor_parallel_size": size, "weight_bytes_per_rank": None,
                             "not_run": f"skipped: {elapsed:.0f} s of the {a.budget_s:.0f} s budget spent"})
                continue
            t = time.perf_counter()
            try:
                row = measure_row(a, name, size, device, limits)
            except Exception as exc:  # keep the other rows; this one says what went wrong
                traceback.print_exc()
                failed = True
                row = {"preset": name, "tensor_parallel_size": size, "weight_bytes_per_rank": None,
                       "failed": f"failed: {type(exc).__name__}: {exc}"[:160]}
            row["seconds"] = time.perf_counter() - t
            rows.append(row)
            results.put(f"{name} tp={size}", row, info)
            print(f"[{name} tp={size}] {row.get('not_run') or row.get('failed') or 'measured'} "
                  f"({row['seconds']:.1f} s, total {time.perf_counter() - started:.0f} s)", flush=True)
    print_rows(rows)
    print(f"results: {results.path if results.enabled else 'not saved (--no-save)'}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
