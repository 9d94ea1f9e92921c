"""How does the reference engine do on requests of mixed lengths, against HF transformers' static
batches, and what do chunked prefill, prefix caching and piecewise CUDA graphs do to its latency?

    python -m benchmarks.engine_mixed [--parts ...] [--rate 20.7]    # on a GPU
    python -m benchmarks.engine_mixed --smoke                        # CPU check, tiny preset

Random bf16 weights. The parts:

  mixed            256 seeded requests, prompts lognormal (median 256, 16-2048 tokens), outputs
                   lognormal (median 128, 16-512), all at once: useful output tok/s;
  chunked-prefill  the first 256 of those requests arriving as a Poisson process (by default at half
                   of `mixed`'s request rate), with a step budget of 2048 tokens: TTFT and TPOT
                   p50/p99 with chunked prefill on/off x prefix caching on/off x piecewise CUDA
                   graphs on/off, on the requests as they are and on a shared-prefix variant (one of
                   4 system prompts of 1024 tokens before each); a warm-up at the same load first;
  hf-mixed         HF `generate` on the same requests in static batches of 32 (left padding, each
                   batch generating its longest output; only each request's own tokens count).

Each part's figures go to benchmarks/results/engine_mixed_<device>.json as soon as it ends; a part
not run keeps its earlier figures there. Percentiles are nearest-rank (servescope.analyzers.metrics).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

if __package__ in (None, ""):  # `python benchmarks/<script>.py`: import from the repository root, not benchmarks/
    sys.path[0] = str(Path(__file__).resolve().parents[1])

import torch  # noqa: E402

from benchmarks.common import print_table  # noqa: E402
from benchmarks.gpu_common import Bench, add_engine_args, lognormal_lengths, ms, random_prompts, run_requests  # noqa: E402
from benchmarks.hf_baseline import HFModel, hf_generate_s  # noqa: E402
from servescope.analyzers.metrics import quantile  # noqa: E402

BENCHMARK = "engine_mixed"
PARTS = ("mixed", "chunked-prefill", "hf-mixed")
HF_GOAL = 10.0


def triple(text: str) -> tuple[int, int, int]:
    median, low, high = (int(x) for x in text.split(","))
    return median, low, high


def workload(bench: Bench) -> tuple[list[list[int]], list[int]]:
    a = bench.args
    p, o = lognormal_lengths(a.requests, seed=3, prompt=a.prompt_lengths, output=a.output_lengths)
    return random_prompts(p, bench.mc.vocab_size, seed=4), o


def mixed(bench: Bench) -> dict:
    engine = bench.engine()
    a = bench.args
    engine.reset_scheduling(max_num_batched_tokens=a.max_num_batched_tokens, enable_prefix_caching=False)
    prompts, outs = workload(bench)
    runs = [run_requests(engine, prompts, outs) for _ in range(a.repeat)]
    engine.reset_scheduling(enable_prefix_caching=True)
    best = min(runs, key=lambda r: r["elapsed_s"])
    lens = [len(p) for p in prompts]
    out = {"requests": len(prompts), "prompt_tokens_total": sum(lens), "output_tokens_total": sum(outs),
           "prompt_p50_max": [quantile(lens, 0.5), max(lens)], "output_p50_max": [quantile(outs, 0.5), max(outs)],
           "max_num_batched_tokens": a.max_num_batched_tokens,
           "engine": {"elapsed_s": best["elapsed_s"], "output_tok_per_s": best["output_tok_per_s"],
                      "req_per_s": best["req_per_s"], "steps": best["steps"], "graph_steps": best["graph_steps"],
                      "all_runs_s": [r["elapsed_s"] for r in runs]}}
    e = out["engine"]
    print(f"\nmixed: {len(prompts)} requests ({sum(lens)} prompt / {sum(outs)} output tokens) in "
          f"{e['elapsed_s']:.2f} s: {e['output_tok_per_s']:.0f} useful output tok/s, {e['req_per_s']:.1f} req/s",
          flush=True)
    return out


def chunked_prefill(bench: Bench) -> dict:
    engine = bench.engine()
    a = bench.args
    mixed_rate = ((bench.part("mixed") or {}).get("engine") or {}).get("req_per_s")
    rate = a.rate or (a.load * mixed_rate if mixed_rate else 8.0)
    prompts, outs = workload(bench)
    prompts, outs = prompts[: a.chunked_requests], outs[: a.chunked_requests]
    # Shared-prefix variant: 4 system prompts of prefix_tokens tokens, each request's own prompt after one.
    shared = random_prompts([a.prefix_tokens] * 4, bench.mc.vocab_size, seed=5)
    limit = a.max_model_len - a.prefix_tokens - max(outs) - 1
    shared_prompts = [shared[i % 4] + p[:limit] for i, p in enumerate(prompts)]
    gen = torch.Generator().manual_seed(6)
    arrivals = torch.cumsum(torch.empty(len(prompts)).exponential_(generator=gen) / rate, 0).tolist()
    # Warm-up at the same load (new GEMM shapes, kernel variants), not measured.
    engine.reset_scheduling(max_num_batched_tokens=a.chunked_step_tokens)
    warm = min(48, len(prompts))
    run_requests(engine, shared_prompts[:warm], outs[:warm], arrivals[:warm])
    rows = []
    runner = engine.runner
    # Piecewise graphs off: mixed steps run eagerly; measured for the chunked configurations (the ones made
    # mostly of mixed steps), where the engine has piecewise graphs at all.
    modes = [True, False] if runner.piecewise else [False]
    for name, ps in (("mixed", prompts), ("shared prefix", shared_prompts)):
        for piecewise in modes:
            for chunked in (True, False):
                if not piecewise and not chunked and len(modes) > 1:
                    continue
                for prefix in (True, False):
                    engine.reset_scheduling(chunked_prefill=chunked, enable_prefix_caching=prefix,
                                            max_num_batched_tokens=a.chunked_step_tokens)
                    runner.piecewise_enabled = piecewise
                    r = run_requests(engine, ps, outs, arrivals)
                    bm = engine.block_manager
                    rows.append({"workload": name, "chunked_prefill": chunked, "prefix_caching": prefix,
                                 "piecewise_graphs": piecewise,
                                 "ttft_p50_s": quantile(r["ttft_s"], 0.5), "ttft_p99_s": quantile(r["ttft_s"], 0.99),
                                 "tpot_p50_s": quantile(r["tpot_s"], 0.5), "tpot_p99_s": quantile(r["tpot_s"], 0.99),
                                 "output_tok_per_s": r["output_tok_per_s"], "elapsed_s": r["elapsed_s"],
                                 "steps": r["steps"], "graph_steps": r["graph_steps"],
                                 "piecewise_steps": r["piecewise_steps"], "host_busy_s": r["host_busy_s"],
                                 "prefix_hit_rate": bm.prefix_hits / max(1, bm.prefix_queries),
                                 # The slowest first tokens: (prompt tokens, arrival s, TTFT s).
                                 "slowest_ttft": sorted(((len(ps[i]), arrivals[i], r["ttft_s"][i])
                                                         for i in range(len(ps))), key=lambda x: -x[2])[:5]})
                    print(f"  {name}, chunked {chunked}, prefix cache {prefix}, piecewise {piecewise}: "
                          f"TTFT p99 {rows[-1]['ttft_p99_s'] * 1e3:.1f} ms", flush=True)
    runner.piecewise_enabled = True
    engine.reset_scheduling(chunked_prefill=True, enable_prefix_caching=True,
                            max_num_batched_tokens=a.max_num_batched_tokens)
    return {"rate_req_per_s": rate, "requests": len(prompts), "shared_prefix_tokens": a.prefix_tokens,
            "max_num_batched_tokens": a.chunked_step_tokens, "rows": rows}


def hf_mixed(bench: Bench, hf: HFModel) -> dict:
    a = bench.args
    bench.drop_engine()  # the baseline needs the memory
    model = hf.get()
    prompts, outs = workload(bench)
    size = a.hf_batch_size
    batches = [list(range(i, min(i + size, len(prompts)))) for i in range(0, len(prompts), size)]
    total_batches, batches = len(batches), batches[: a.hf_batches]
    hf_generate_s(model, [prompts[i] for i in batches[0]], 4, bench.device)  # warm-up at the first batch's shapes
    total_s, useful, generated, per_batch = 0.0, 0, 0, []
    for idx in batches:
        longest = max(outs[i] for i in idx)
        secs = hf_generate_s(model, [prompts[i] for i in idx], longest, bench.device)
        total_s += secs
        useful += sum(outs[i] for i in idx)
        generated += longest * len(idx)
        per_batch.append({"requests": len(idx), "longest_output": longest, "seconds": secs,
                          "useful_tokens": sum(outs[i] for i in idx)})
    print(f"\nHF generate, {len(batches)} static batches of {size}: {useful} useful tokens in {total_s:.1f} s = "
          f"{useful / total_s:.0f} useful tok/s ({generated / total_s:.0f} with the padding rows)", flush=True)
    return {"batch_size": size, "batches_run": len(batches), "batches_total": total_batches, "elapsed_s": total_s,
            "useful_output_tok_per_s": useful / total_s, "padded_output_tok_per_s": generated / total_s,
            "per_batch": per_batch, **hf.info()}


def onoff(flag: bool) -> str:
    return "on" if flag else "off"


def summary(bench: Bench) -> None:
    """The figures the results file holds now."""
    mix, hfm, chunk = bench.part("mixed"), bench.part("hf-mixed"), bench.part("chunked-prefill")
    device = bench.results.data["device"]
    if mix:
        e = mix["engine"]
        rows = [["engine, continuous batching", e["output_tok_per_s"], e["elapsed_s"], "", ""]]
        if hfm:
            rows.append([f"HF generate, static batches of {hfm.get('batch_size', 32)} "
                         f"({hfm['batches_run']} of {hfm['batches_total']} run)", hfm["useful_output_tok_per_s"],
                         hfm["elapsed_s"], f"{e['output_tok_per_s'] / hfm['useful_output_tok_per_s']:.1f}x",
                         f"{HF_GOAL:.0f}x"])
        print_table(["mixed lengths", "useful tok/s", "seconds", "engine / HF", "goal"], rows,
                    title=f"{device}, {bench.args.preset}: {mix['requests']} mixed requests, "
                          f"{mix['prompt_tokens_total']:,} prompt / {mix['output_tokens_total']:,} output tokens")
    if chunk:
        rows = []
        for r in chunk["rows"]:
            eager = r["steps"] - r["graph_steps"] - r["piecewise_steps"]
            rows.append([r["workload"], onoff(r["chunked_prefill"]), onoff(r["prefix_caching"]),
                         onoff(r["piecewise_graphs"]), ms(r["ttft_p50_s"]), ms(r["ttft_p99_s"]), ms(r["tpot_p50_s"]),
                         ms(r["tpot_p99_s"]), f"{r['prefix_hit_rate']:.1%}", r["output_tok_per_s"],
                         f"{r['graph_steps']}/{r['piecewise_steps']}/{eager}",
                         ms(r["host_busy_s"] / max(1, r["steps"]))])
        print_table(["workload", "chunked", "prefix cache", "piecewise", "TTFT p50 ms", "TTFT p99 ms", "TPOT p50 ms",
                     "TPOT p99 ms", "hit rate", "out tok/s", "steps graph/piece/eager", "host ms/step"], rows,
                    title=f"chunked prefill: {chunk['requests']} requests, Poisson at "
                          f"{chunk['rate_req_per_s']:.1f} req/s, step budget {chunk['max_num_batched_tokens']} "
                          f"tokens, shared prefix 4 x {chunk['shared_prefix_tokens']} tokens")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_engine_args(p, PARTS, max_num_batched_tokens=8192)
    p.add_argument("--requests", type=int, default=256, help="requests of the mixed workload")
    p.add_argument("--prompt-lengths", type=triple, default=(256, 16, 2048), help="median,min,max prompt tokens")
    p.add_argument("--output-lengths", type=triple, default=(128, 16, 512), help="median,min,max output tokens")
    p.add_argument("--chunked-requests", type=int, default=256, help="chunked-prefill: the first N mixed requests")
    p.add_argument("--load", type=float, default=0.5,
                   help="chunked-prefill: arrival rate as a fraction of mixed's req/s")
    p.add_argument("--rate", type=float, default=None, help="chunked-prefill: arrival rate, req/s (overrides --load)")
    p.add_argument("--prefix-tokens", type=int, default=1024,
                   help="chunked-prefill: length of each shared system prompt")
    p.add_argument("--chunked-step-tokens", type=int, default=2048, help="chunked-prefill: the step token budget")
    p.add_argument("--hf-batch-size", type=int, default=32)
    p.add_argument("--hf-batches", type=int, default=2, help="HF static batches to time (HF is slow)")
    args = p.parse_args()
    if args.smoke:
        args.requests, args.chunked_requests, args.prefix_tokens = 16, 10, 32
        args.prompt_lengths, args.output_lengths = (32, 8, 96), (8, 4, 16)
        args.hf_batch_size, args.hf_batches, args.repeat = 8, 1, 1
    bench = Bench(BENCHMARK, args, PARTS)
    hf = HFModel(bench.mc, bench.device)
    bench.run_parts([("mixed", lambda: mixed(bench), 20),
                     ("chunked-prefill", lambda: chunked_prefill(bench), 60),
                     ("hf-mixed", lambda: hf_mixed(bench, hf), 120)])
    summary(bench)
    sys.exit(bench.finish())


if __name__ == "__main__":
    main()
