"""How close does the reference engine come to the memory-bandwidth roofline, at batch 1 and
offline, and how far ahead of HF transformers' `generate` is it?

    python -m benchmarks.engine_decode_roofline [--parts ...] [--preset llama3-8b]   # on a GPU
    python -m benchmarks.engine_decode_roofline --smoke                           # CPU check, tiny preset

Random bf16 weights; the chip's copy bandwidth and matmul rate are measured first, in the same run.
The parts:

  decode-batch1   one request, 128-token prompt, 256 greedy tokens: decode tok/s (first to last
                  token) against copy bandwidth / weight bytes, per engine mode (CUDA graphs with
                  overlapped scheduling, graphs with a synchronous loop, eager), and once more with
                  every decode projection on cuBLAS (the skinny-matrix kernel's policy off);
  decode-profile  where a batch-1 decode step's time goes: graph replays alone per batch bucket
                  against the bytes they must read, the kernels of one batch-1 forward
                  (torch.profiler), cuBLAS on the decode projections, the first steps' host times;
  offline         128 requests of 512 prompt / 128 output tokens at once, against prefill FLOPs at
                  the matmul rate + each decode step's weight and KV bytes at the copy bandwidth;
  hf-offline      HF `generate` on the same 128 requests in one batch;
  hf-batch1       HF `generate` on decode-batch1's request, dynamic cache and static cache
                  (the latter compiled by `generate` on CUDA; its first call is not timed).

Each part's figures go to benchmarks/results/engine_decode_roofline_<device>.json as soon as it
ends; a part not run keeps its earlier figures there.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # `python benchmarks/<script>.py`: import from the repository root, not benchmarks/
    sys.path[0] = str(Path(__file__).resolve().parents[1])

import torch  # noqa: E402

from benchmarks.common import print_table  # noqa: E402
from benchmarks.gpu_common import (  # noqa: E402
    Bench,
    add_engine_args,
    greedy,
    measure_offline,
    on_cuda,
    random_prompts,
    run_requests,
    sync,
    weight_bytes,
)
from benchmarks.hf_baseline import HFModel, hf_generate_s  # noqa: E402
from servescope.reference_engine.engine import LLMEngine  # noqa: E402

BENCHMARK = "engine_decode_roofline"
PARTS = ("decode-batch1", "decode-profile", "offline", "hf-offline", "hf-batch1")
DECODE_GOAL, OFFLINE_GOAL = 0.85, 0.80


def best_decode(bench: Bench, engine: LLMEngine, prompt: list[list[int]]) -> dict:
    """Best of --repeat runs of one request: decode tok/s from its first to its last token."""
    a = bench.args
    run_requests(engine, prompt, [8])  # warm
    best = None
    for _ in range(a.repeat):
        r = run_requests(engine, prompt, [a.batch1_tokens])
        decode = (a.batch1_tokens - 1) / (r["last_s"][0] - r["first_s"][0])
        if best is None or decode > best["decode_tok_per_s"]:
            best = {"decode_tok_per_s": decode, "e2e_tok_per_s": a.batch1_tokens / r["elapsed_s"],
                    "ttft_s": r["ttft_s"][0]}
    best["frac_roofline"] = best["decode_tok_per_s"] / roofline_tok_per_s(bench)
    return best


def roofline_tok_per_s(bench: Bench) -> float:
    return bench.limits["copy_GBps"] * 1e9 / weight_bytes(bench.mc)


def cublas_projections(bench: Bench, engine: LLMEngine, prompt: list[list[int]], rows: dict) -> dict | None:
    """Batch-1 decode again with every projection on cuBLAS (kernels/gemv.py's policy off), same process
    and machine: the batch-1 graph is recaptured without the skinny kernel, then every graph as it was."""
    ops = engine.ops
    if not hasattr(ops, "gemv_policy"):
        return None
    from servescope.kernels.gemv import GemvPolicy

    keep = ops.gemv_policy
    info = {"mode": getattr(keep, "mode", None),
            "table": os.environ.get("KERNELS_GEMV_TABLE", "kernels/gemv_tuned.json"),
            "device_entries": getattr(keep, "entries", None)}
    runner = engine.runner
    max_len = runner.graph_max_blocks * engine.config.block_size
    try:
        ops.gemv_policy = GemvPolicy(None, mode="off")
        runner.capture_graphs(1, max_len, capture=runner.on_gpu)
        rows["graphs+async, cuBLAS projections"] = best_decode(bench, engine, prompt)
    finally:
        ops.gemv_policy = keep
        if runner.on_gpu:  # back to the engine's own graphs, piecewise ones included
            engine.capture_graphs()
        else:
            runner.capture_graphs(engine.config.max_num_seqs, max_len, capture=False)
    return info


def decode_batch1(bench: Bench) -> dict:
    engine = bench.engine()
    a = bench.args
    prompt = random_prompts([a.batch1_prompt], engine.model_config.vocab_size, seed=1)
    modes = {"graphs+async": (True, True), "graphs, sync": (True, False), "eager, sync": (False, False)}
    engine.reset_scheduling(enable_prefix_caching=False)  # repeats of one prompt must not hit the cache
    saved, overlap_before = engine.runner.graphs, engine.async_scheduling
    rows = {}
    for mode, (graphs, overlap) in modes.items():
        if graphs and not saved:
            continue
        engine.runner.graphs = saved if graphs else {}
        engine.async_scheduling = overlap
        rows[mode] = best_decode(bench, engine, prompt)
    engine.runner.graphs = saved
    engine.async_scheduling = overlap_before
    gemv = cublas_projections(bench, engine, prompt, rows) if saved and a.cublas_compare else None
    engine.reset_scheduling(enable_prefix_caching=True)
    roof = roofline_tok_per_s(bench)
    print_table(["engine mode", "decode tok/s", "of roofline", "e2e tok/s", "TTFT ms"],
                [[mode, r["decode_tok_per_s"], f"{r['frac_roofline']:.1%}", r["e2e_tok_per_s"], r["ttft_s"] * 1e3]
                 for mode, r in rows.items()],
                title=f"batch-1 decode, {a.batch1_prompt}-token prompt, {a.batch1_tokens} tokens; roofline "
                      f"{roof:.0f} tok/s = copy BW / {weight_bytes(bench.mc) / 1e9:.2f} GB of weights")
    out = {"prompt_tokens": a.batch1_prompt, "output_tokens": a.batch1_tokens, "roofline_tok_per_s": roof,
           "engine": rows}
    if gemv is not None:
        out["gemv"] = gemv
    return out


def graph_replays(bench: Bench, engine: LLMEngine, ctx: int) -> list[dict]:
    """Each decode graph bucket replayed alone (no host work) at context `ctx`, against the bytes it reads."""
    runner, device = engine.runner, bench.device
    bs, kv_tok = engine.config.block_size, bench.mc.kv_bytes_per_token(2)
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
            tables = torch.arange(bucket * nblk, device=device, dtype=torch.int32) % engine.num_blocks
            runner._g_tables[:bucket, :nblk].copy_(tables.view(bucket, nblk))
        graph = runner.graphs[bucket][0]
        for _ in range(5):
            graph.replay()
        sync(device)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(20):
            graph.replay()
        end.record()
        sync(device)
        replay_ms = start.elapsed_time(end) / 20
        nbytes = weight_bytes(bench.mc) + bucket * ctx * kv_tok
        rows.append({"bucket": bucket, "context": ctx, "replay_ms": replay_ms,
                     "GBps_vs_weights_plus_kv": nbytes / replay_ms / 1e6,
                     "frac_copy_bw": nbytes / replay_ms / 1e6 / bench.limits["copy_GBps"]})
    return rows


def forward_kernels(bench: Bench, fn, reps: int = 5) -> dict:
    """The CUDA kernels of fn (one forward), per call: [name, launches, us], the longest first."""
    from torch.profiler import ProfilerActivity, profile

    with torch.inference_mode():
        fn()
        sync(bench.device)
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(reps):
                fn()
            sync(bench.device)
    found = []
    for evt in prof.key_averages():
        t = getattr(evt, "device_time_total", None) or getattr(evt, "cuda_time_total", 0.0)
        if t > 0:
            found.append((evt.key[:70], evt.count // reps, t / reps))
    found.sort(key=lambda k: -k[2])
    return {"total_us": sum(k[2] for k in found), "count": sum(k[1] for k in found),
            "top": [list(k) for k in found[:16]]}


def projections_on_cublas(bench: Bench) -> list[dict]:
    """cuBLAS on the decode projections at 1 and 128 rows: F.linear (weight [N, K]) against a [K, N] copy."""
    from triton.testing import do_bench

    mc, device, copy_bw = bench.mc, bench.device, bench.limits["copy_GBps"]
    shapes = {"qkv": ((mc.num_heads + 2 * mc.num_kv_heads) * mc.head_dim, mc.hidden_size),
              "o": (mc.hidden_size, mc.num_heads * mc.head_dim),
              "gate_up": (2 * mc.intermediate_size, mc.hidden_size),
              "down": (mc.hidden_size, mc.intermediate_size)}
    rows = []
    for name, (n, k) in shapes.items():
        w = torch.randn(n, k, dtype=torch.bfloat16, device=device)
        wt = w.t().contiguous()
        for m in (1, 128):
            x = torch.randn(m, k, dtype=torch.bfloat16, device=device)
            lin = do_bench(lambda x=x, w=w: torch.nn.functional.linear(x, w), return_mode="median") * 1e3
            kn = do_bench(lambda x=x, wt=wt: x @ wt, return_mode="median") * 1e3
            gb = n * k * 2 / 1e3
            rows.append({"proj": name, "m": m, "linear_us": lin, "kn_us": kn,
                         "linear_frac_copy_bw": gb / lin / copy_bw, "kn_frac_copy_bw": gb / kn / copy_bw})
    return rows


def decode_profile(bench: Bench) -> dict:
    engine = bench.engine()
    runner = engine.runner
    prof: dict = {}
    ctx = bench.args.batch1_prompt + bench.args.batch1_tokens // 2
    if runner.graphs and on_cuda(bench.device):
        prof["graph_replay"] = graph_replays(bench, engine, ctx)
        print_table(["bucket", "replay ms", "of copy BW"],
                    [[r["bucket"], r["replay_ms"], f"{r['frac_copy_bw']:.1%}"] for r in prof["graph_replay"]],
                    title=f"decode graph replay alone, context {ctx}; bytes = all weights + KV")
        for name, fn in (("replay", lambda: runner.graphs[1][0].replay()), ("eager", lambda: runner._graph_forward(1))):
            prof[f"kernels_bucket1_{name}"] = ks = forward_kernels(bench, fn)
            print_table(["kernel", "launches", "us per forward"], ks["top"][:12],
                        title=f"batch-1 forward ({name}): {ks['count']} kernels, "
                              f"{ks['total_us']:.0f} us of kernel time")
        prof["projections"] = projections_on_cublas(bench)
        print_table(["proj", "rows", "F.linear us", "of copy BW", "[K,N] us", "of copy BW"],
                    [[g["proj"], g["m"], g["linear_us"], f"{g['linear_frac_copy_bw']:.0%}", g["kn_us"],
                      f"{g['kn_frac_copy_bw']:.0%}"] for g in prof["projections"]],
                    title="cuBLAS on the decode projections")
    # The first steps of one batch-1 request, as the engine runs them.
    engine.reset_scheduling(enable_prefix_caching=False)
    prompt = random_prompts([bench.args.batch1_prompt], bench.mc.vocab_size, seed=11)[0]
    engine.add_request(prompt, greedy(6))
    steps = []
    while engine.has_unfinished():
        t = time.perf_counter()
        outs = engine.step()
        steps.append((round((time.perf_counter() - t) * 1e3, 2), len(outs)))
    engine.reset_scheduling(enable_prefix_caching=True)
    prof["batch1_step_ms_and_outputs"] = steps
    print(f"batch-1 steps (host ms, outputs): {steps}")
    return prof


def offline(bench: Bench) -> dict:
    a = bench.args
    out = measure_offline(bench, a.offline_batch, a.offline_prompt, a.offline_tokens, a.max_num_batched_tokens)
    roof, e = out["roofline"], out["engine"]
    print_table(["", "seconds", "output tok/s", "of roofline", "steps", "graphed steps"],
                [["roofline", roof["total_s"], roof["output_tok_per_s"], "", "", ""],
                 ["engine", e["elapsed_s"], e["output_tok_per_s"], f"{e['frac_roofline']:.1%}", e["steps"],
                  e["graph_steps"]]],
                title=f"offline {a.offline_batch} x ({a.offline_prompt} prompt / {a.offline_tokens} output): "
                      f"roofline = prefill {roof['prefill_s']:.3f} s at the matmul rate + decode "
                      f"{roof['decode_s']:.3f} s at copy BW")
    return out


def hf_offline(bench: Bench, hf: HFModel) -> dict:
    a = bench.args
    bench.drop_engine()  # the baseline needs the memory
    model = hf.get()
    prompts = random_prompts([a.offline_prompt] * a.offline_batch, bench.mc.vocab_size, seed=2)
    hf_generate_s(model, prompts[:4], 4, bench.device)  # warm
    secs = hf_generate_s(model, prompts, a.offline_tokens, bench.device)
    out = {"batch": a.offline_batch, "elapsed_s": secs, "output_tok_per_s": a.offline_batch * a.offline_tokens / secs,
           **hf.info()}
    print(f"\nHF generate, batch {a.offline_batch}: {secs:.2f} s, {out['output_tok_per_s']:.0f} output tok/s",
          flush=True)
    return out


def hf_batch1(bench: Bench, hf: HFModel) -> dict:
    a = bench.args
    bench.drop_engine()
    model = hf.get()
    prompt = random_prompts([a.batch1_prompt], bench.mc.vocab_size, seed=1)
    hf_generate_s(model, prompt, 4, bench.device)
    dyn = hf_generate_s(model, prompt, a.batch1_tokens, bench.device)
    t = time.perf_counter()
    first = hf_generate_s(model, prompt, a.batch1_tokens, bench.device, cache_implementation="static")
    runs = [hf_generate_s(model, prompt, a.batch1_tokens, bench.device, cache_implementation="static")
            for _ in range(2)]
    best = min(runs)
    out = {"prompt_tokens": a.batch1_prompt, "output_tokens": a.batch1_tokens,
           "dynamic": {"elapsed_s": dyn, "tok_per_s": a.batch1_tokens / dyn},
           "static": {"first_call_s": first, "elapsed_s": best, "tok_per_s": a.batch1_tokens / best,
                      "all_runs_s": runs, "warm_total_s": time.perf_counter() - t}, **hf.info()}
    print(f"\nHF generate, batch 1: dynamic cache {out['dynamic']['tok_per_s']:.1f} tok/s, static cache "
          f"{out['static']['tok_per_s']:.1f} tok/s (first call {first:.1f} s, compile included)", flush=True)
    return out


def summary(bench: Bench) -> None:
    """The figures the results file holds now, against their limits and baselines."""
    rows = []
    dec, hf1 = bench.part("decode-batch1"), bench.part("hf-batch1")
    if dec:
        best = dec["engine"].get("graphs+async") or next(iter(dec["engine"].values()))
        rows.append(["batch-1 decode tok/s", best["decode_tok_per_s"], "roofline", dec["roofline_tok_per_s"],
                     f"{best['frac_roofline']:.1%}", f"{DECODE_GOAL:.0%}"])
        if hf1:
            for cache in ("static", "dynamic"):
                rows.append([f"batch-1 end to end tok/s vs HF, {cache} cache", best["e2e_tok_per_s"], "HF generate",
                             hf1[cache]["tok_per_s"], f"{best['e2e_tok_per_s'] / hf1[cache]['tok_per_s']:.2f}x", ""])
    off, hfo = bench.part("offline"), bench.part("hf-offline")
    if off:
        e = off["engine"]
        rows.append(["offline output tok/s", e["output_tok_per_s"], "roofline", off["roofline"]["output_tok_per_s"],
                     f"{e['frac_roofline']:.1%}", f"{OFFLINE_GOAL:.0%}"])
        if hfo:
            rows.append([f"offline vs HF generate, batch {hfo['batch']}", e["output_tok_per_s"], "HF generate",
                         hfo["output_tok_per_s"], f"{e['output_tok_per_s'] / hfo['output_tok_per_s']:.2f}x", ""])
    print_table(["figure", "engine", "against", "value", "engine / value", "goal"], rows,
                title=f"{bench.results.data['device']}, {bench.args.preset}: the figures in the results file")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_engine_args(p, PARTS, max_num_batched_tokens=8192)
    p.add_argument("--batch1-prompt", type=int, default=128)
    p.add_argument("--batch1-tokens", type=int, default=256)
    p.add_argument("--no-cublas-compare", dest="cublas_compare", action="store_false",
                   help="skip decode-batch1's extra run with every projection on cuBLAS")
    p.add_argument("--offline-batch", type=int, default=128)
    p.add_argument("--offline-prompt", type=int, default=512)
    p.add_argument("--offline-tokens", type=int, default=128)
    args = p.parse_args()
    if args.smoke:
        args.batch1_prompt, args.batch1_tokens = 16, 12
        args.offline_batch, args.offline_prompt, args.offline_tokens = 8, 32, 8
        args.repeat = 1
    bench = Bench(BENCHMARK, args, PARTS)
    hf = HFModel(bench.mc, bench.device)
    bench.run_parts([("decode-batch1", lambda: decode_batch1(bench), 40),
                     ("decode-profile", lambda: decode_profile(bench), 20),
                     ("offline", lambda: offline(bench), 20),
                     ("hf-offline", lambda: hf_offline(bench, hf), 60),
                     ("hf-batch1", lambda: hf_batch1(bench, hf), 120)])
    summary(bench)
    sys.exit(bench.finish())


if __name__ == "__main__":
    main()
