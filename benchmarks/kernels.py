"""How fast are the Triton kernels on a CUDA GPU, against the chip's measured limits and torch?

    python -m benchmarks.kernels [--sweep | --long-sweep]     # on a GPU: kernels_<device>.json
    python -m benchmarks.kernels --gemv [--gemv-table FILE]   # decode projections: kernels_gemv_<device>.json
    python -m benchmarks.kernels --smoke [--gemv]             # CPU check on Triton's interpreter, times nothing

It first measures the two ceilings in the same run (device-to-device copy
bandwidth, counting bytes read + written, and the bf16 8192^3 matmul rate),
checks every kernel against its plain-torch reference at the benchmark shapes,
then times each kernel (triton.testing.do_bench, median) beside torch. Each
kernel (and torch beside it) is also timed per call inside a CUDA graph, as the
engine's decode graphs run it: a ~100 us kernel launched eagerly from Python can
be bound by the host's launch time rather than the GPU, which made the short
cases swing by up to 60% between machines; the graph figure is the GPU's. With
--sweep it also tries launch configurations of the two attention kernels and
reports the best; --long-sweep tries every decode tile configuration on the
2 x 32k shape. The parts (elementwise, decode, decode-splits, decode-long,
prefill) go to benchmarks/results/kernels_<device>.json.

--gemv instead times the skinny-matrix kernel (kernels/gemv.py) on the
llama3-8b decode projections at 1-16 rows against cuBLAS (F.linear, torch.mv,
and a [K, N] copy of the weight), over a sweep of launch configurations, and its
fused RMSNorm / SiLU-mul prologues against the separate Triton kernel plus the
faster plain product. Each time is per call inside a CUDA graph that runs the
product over enough distinct weight copies to stream far more than L2 holds
(as the engine's graph does, one layer after another). It writes
benchmarks/results/kernels_gemv_<device>.json and this device's entry of the
tuned table that GemvPolicy reads (--gemv-table, default kernels/gemv_tuned.json;
other devices' entries are kept): an entry wherever the kernel was at least 2%
faster. With --smoke the table goes to a temporary folder.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

if __package__ in (None, ""):  # `python benchmarks/<script>.py`: import from the repository root, not benchmarks/
    sys.path[0] = str(Path(__file__).resolve().parents[1])
if "--smoke" in sys.argv:  # CPU dry run of this script's own logic, on Triton's interpreter
    os.environ.setdefault("TRITON_INTERPRET", "1")

import torch  # noqa: E402
import triton  # noqa: E402
from torch.nn.attention import SDPBackend, sdpa_kernel  # noqa: E402
from triton.testing import do_bench  # noqa: E402

from benchmarks.common import ResultsFile, add_results_args, print_table, run_info  # noqa: E402
from benchmarks.gpu_common import measure_limits as chip_limits  # noqa: E402
from servescope.kernels.activation import silu_and_mul, silu_and_mul_ref  # noqa: E402
from servescope.kernels.gemv import TUNED_PATH, GemvConfig, gemv  # noqa: E402
from servescope.kernels.kv_write import write_kv, write_kv_ref  # noqa: E402
from servescope.kernels.paged_decode_attention import DEFAULT_CONFIG as DECODE_DEFAULT  # noqa: E402
from servescope.kernels.paged_decode_attention import DecodeConfig, decode_attention, decode_attention_ref  # noqa: E402
from servescope.kernels.paged_prefill_attention import PrefillConfig, prefill_attention, prefill_attention_ref  # noqa: E402
from servescope.kernels.rmsnorm import rms_norm, rms_norm_ref  # noqa: E402
from servescope.kernels.rope import rope, rope_ref  # noqa: E402

DTYPE = torch.bfloat16
PAGE = 16
# The decode target shape: batch 64 x 4k context, 32 query / 8 KV heads, d=128.
DECODE = dict(batch=64, context=4096, q_heads=32, kv_heads=8, head_dim=128)
# A latency case where split-K matters: few long sequences.
DECODE_LONG = dict(batch=2, context=32768, q_heads=32, kv_heads=8, head_dim=128)
# Prefill: 4k causal, 32/8 heads, d=128, 4 sequences.
PREFILL = dict(batch=4, seqlen=4096, q_heads=32, kv_heads=8, head_dim=128)


DEVICE = "cuda"
# Calls per CUDA graph when timing in a graph: the attention shapes read 0.27-1.07 GB a call, far more
# than L2 holds, so back-to-back calls on the same tensors still stream from HBM.
GRAPH_CALLS = 16
# The elementwise kernels' inputs (8-235 MB) come in this many copies, cycled inside the graph, so no
# call finds its input in L2 (50-60 MB on an H100/H200).
ELEMENTWISE_COPIES = 4


def median_us(fn: Callable[[], object]) -> float:
    if DEVICE != "cuda":  # --smoke: one host-timed call, only to exercise the code path
        start = time.perf_counter()
        fn()
        return (time.perf_counter() - start) * 1e6
    return do_bench(fn, warmup=25, rep=100, return_mode="median") * 1e3


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    if torch.isnan(out).any():
        return float("nan")
    return ((out.double() - ref.double()).norm() / ref.double().norm()).item()


def measure_limits() -> dict:
    """The chip's copy bandwidth and bf16 matmul rate (benchmarks/gpu_common.py), measured here."""
    return chip_limits(DEVICE)


def paged_cache(lens: list[int], kv_heads: int, head_dim: int, gen: torch.Generator):
    pages = [-(-n // PAGE) for n in lens]
    num_blocks = sum(pages)
    k_cache = torch.randn(num_blocks, PAGE, kv_heads, head_dim, dtype=DTYPE, device=DEVICE, generator=gen)
    v_cache = torch.randn_like(k_cache)
    order = torch.randperm(num_blocks, device=DEVICE, generator=gen).int()
    tables = torch.zeros(len(lens), max(pages), dtype=torch.int32, device=DEVICE)
    used = 0
    for row, n in enumerate(pages):
        tables[row, :n] = order[used : used + n]
        used += n
    return k_cache, v_cache, tables, torch.tensor(lens, dtype=torch.int32, device=DEVICE)


def contiguous_kv(k_cache, v_cache, tables, lens):
    """The same K/V as [B, Hkv, S, D] contiguous tensors (all lengths equal), for SDPA."""
    batch, ctx = len(lens), int(lens[0])
    k = k_cache[tables.long()].reshape(batch, -1, *k_cache.shape[2:])[:, :ctx].transpose(1, 2).contiguous()
    v = v_cache[tables.long()].reshape(batch, -1, *v_cache.shape[2:])[:, :ctx].transpose(1, 2).contiguous()
    return k, v


def sdpa_times(q, k, v, causal: bool) -> tuple[dict[str, float | str], dict[str, float | str]]:
    """Each SDPA backend's median time per call, eagerly and inside a CUDA graph."""
    times: dict[str, float | str] = {}
    graph_times: dict[str, float | str] = {}
    for name, backend in [("cudnn", SDPBackend.CUDNN_ATTENTION), ("flash", SDPBackend.FLASH_ATTENTION),
                          ("efficient", SDPBackend.EFFICIENT_ATTENTION)]:
        try:
            with sdpa_kernel(backend), warnings.catch_warnings():
                warnings.simplefilter("ignore")  # a refusing backend explains itself in the exception
                fn = lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=True)  # noqa: E731
                fn()
                torch.cuda.synchronize()
                times[name] = median_us(fn)
                try:
                    graph_times[name] = graph_us([fn] * GRAPH_CALLS)
                except Exception as exc:  # a backend that cannot be captured still has its eager time
                    graph_times[name] = f"not capturable: {type(exc).__name__}: {str(exc)[:80]}"
        except Exception as exc:  # a backend that refuses the shape is reported, not fatal
            times[name] = graph_times[name] = f"unavailable: {type(exc).__name__}: {str(exc)[:80]}"
    return times, graph_times


def bench_decode(shape: dict, configs: list[DecodeConfig], limits: dict, gen, with_sdpa: bool) -> dict:
    b, ctx, hq, hkv, d = (shape[k] for k in ("batch", "context", "q_heads", "kv_heads", "head_dim"))
    k_cache, v_cache, tables, lens = paged_cache([ctx] * b, hkv, d, gen)
    q = torch.randn(b, hq, d, dtype=DTYPE, device=DEVICE, generator=gen)
    scale = d**-0.5
    kv_bytes = 2 * b * ctx * hkv * d * 2 + 2 * q.numel() * 2
    ref = decode_attention_ref(q[:4].float(), k_cache.float(), v_cache.float(), tables[:4], lens[:4], scale)
    rows = []
    for cfg in configs:
        try:
            out = decode_attention(q, k_cache, v_cache, tables, lens, scale, cfg)
            err = rel_err(out[:4], ref)
            call = lambda cfg=cfg: decode_attention(q, k_cache, v_cache, tables, lens, scale, cfg)  # noqa: E731
            us, g_us = median_us(call), graph_us([call] * GRAPH_CALLS)
            rows.append({"config": asdict(cfg), "us": us, "GBps": kv_bytes / us / 1e3,
                         "frac_copy_bw": kv_bytes / us / 1e3 / limits["copy_GBps"], "rel_err": err,
                         "graph_us": g_us, "graph_frac_copy_bw": kv_bytes / g_us / 1e3 / limits["copy_GBps"]})
        except Exception as exc:
            rows.append({"config": asdict(cfg), "error": f"{type(exc).__name__}: {str(exc)[:120]}"})
        print("  decode", shape["batch"], cfg, {k: v for k, v in rows[-1].items() if k != "config"}, flush=True)
    result = {"shape": shape, "bytes": kv_bytes, "variants": rows}
    good = [r for r in rows if "us" in r and r["rel_err"] < 2e-2]
    result["best"] = min(good, key=lambda r: r["us"]) if good else None
    result["best_in_graph"] = min(good, key=lambda r: r["graph_us"]) if good else None
    if with_sdpa:
        k, v = contiguous_kv(k_cache, v_cache, tables, lens)
        result["sdpa_contiguous_us"], result["sdpa_contiguous_graph_us"] = sdpa_times(q[:, :, None, :], k, v, causal=False)
    return result


def bench_prefill(shape: dict, configs: list[PrefillConfig], limits: dict, gen) -> dict:
    b, s, hq, hkv, d = (shape[k] for k in ("batch", "seqlen", "q_heads", "kv_heads", "head_dim"))
    k_cache, v_cache, tables, lens = paged_cache([s] * b, hkv, d, gen)
    q = torch.randn(b * s, hq, d, dtype=DTYPE, device=DEVICE, generator=gen)
    cu = torch.arange(0, b * s + 1, s, dtype=torch.int32, device=DEVICE)
    scale = d**-0.5
    flops = 4 * b * hq * s * s * d / 2  # causal: half the score matrix
    ref = prefill_attention_ref(q[:s].float(), k_cache.float(), v_cache.float(), tables[:1], cu[:2], lens[:1], scale)
    rows = []
    for cfg in configs:
        try:
            out = prefill_attention(q, k_cache, v_cache, tables, cu, lens, scale, max_seqlen_q=s, config=cfg)
            err = rel_err(out[:s], ref)
            call = lambda cfg=cfg: prefill_attention(q, k_cache, v_cache, tables, cu, lens, scale, max_seqlen_q=s, config=cfg)  # noqa: E731
            us, g_us = median_us(call), graph_us([call] * 4)
            rows.append({"config": asdict(cfg), "us": us, "TFLOPs": flops / us / 1e6,
                         "frac_matmul": flops / us / 1e6 / limits["matmul_bf16_TFLOPs"], "rel_err": err,
                         "graph_us": g_us})
        except Exception as exc:
            rows.append({"config": asdict(cfg), "error": f"{type(exc).__name__}: {str(exc)[:120]}"})
        print("  prefill", cfg, {k: v for k, v in rows[-1].items() if k != "config"}, flush=True)
    good = [r for r in rows if "us" in r and r["rel_err"] < 2e-2]
    k, v = contiguous_kv(k_cache, v_cache, tables, lens)
    qc = q.view(b, s, hq, d).transpose(1, 2).contiguous()
    sdpa, sdpa_graph = sdpa_times(qc, k, v, causal=True)
    return {"shape": shape, "flops": flops, "variants": rows, "best": min(good, key=lambda r: r["us"]) if good else None,
            "sdpa_contiguous_us": sdpa, "sdpa_contiguous_graph_us": sdpa_graph,
            "sdpa_TFLOPs": {n: flops / t / 1e6 for n, t in sdpa.items() if isinstance(t, float)}}


def bench_elementwise(limits: dict, gen) -> list[dict]:
    """Each small kernel beside its torch reference. `triton_fn(i)` / `torch_fn(i)` run on the i-th
    copy of the inputs: eager timing uses copy 0, the graph cycles through all of them."""
    tokens, hidden, inter, hq, hkv, d = (4096, 4096, 14336, 32, 8, 128) if DEVICE == "cuda" else (16, 256, 256, 4, 2, 64)
    copies = range(ELEMENTWISE_COPIES)
    rows = []

    def add(name, bytes_moved, triton_fn, torch_fn, check, torch_capturable=True):
        err = check()
        t_us, ref_us = median_us(lambda: triton_fn(0)), median_us(lambda: torch_fn(0))
        t_graph = graph_us([lambda i=i: triton_fn(i) for i in copies] * 4)
        ref_graph = (graph_us([lambda i=i: torch_fn(i) for i in copies] * 4) if torch_capturable
                     else "not capturable: boolean-mask indexing reads its count back to the host")
        rows.append({"kernel": name, "triton_us": t_us, "torch_us": ref_us, "GBps": bytes_moved / t_us / 1e3,
                     "frac_copy_bw": bytes_moved / t_us / 1e3 / limits["copy_GBps"], "rel_err": err,
                     "triton_graph_us": t_graph, "torch_graph_us": ref_graph,
                     "graph_frac_copy_bw": bytes_moved / t_graph / 1e3 / limits["copy_GBps"]})
        print("  ", rows[-1], flush=True)

    def randn(*shape):
        return [torch.randn(*shape, dtype=DTYPE, device=DEVICE, generator=gen) for _ in copies]

    x, r = randn(tokens, hidden), randn(tokens, hidden)
    w = torch.randn(hidden, dtype=DTYPE, device=DEVICE, generator=gen)
    add("rms_norm+residual [4096x4096]", 4 * tokens * hidden * 2, lambda i: rms_norm(x[i], w, 1e-5, r[i]),
        lambda i: rms_norm_ref(x[i], w, 1e-5, r[i]),
        lambda: rel_err(rms_norm(x[0], w, 1e-5, r[0])[0], rms_norm_ref(x[0], w, 1e-5, r[0])[0].float()))
    gu = randn(tokens, 2 * inter)
    add("silu_and_mul [4096x2x14336]", tokens * 2 * inter * 2 * 3 // 2, lambda i: silu_and_mul(gu[i]),
        lambda i: silu_and_mul_ref(gu[i]), lambda: rel_err(silu_and_mul(gu[0]), silu_and_mul_ref(gu[0].float())))
    q, k = randn(tokens, hq, d), randn(tokens, hkv, d)
    pos = torch.randint(0, 8192, (tokens,), device=DEVICE, generator=gen)
    # A true rotation table: rope runs in place hundreds of times while timed, so
    # a table of random numbers would blow q and k up to inf.
    angles = torch.arange(8192, device=DEVICE)[:, None] * (500000.0 ** (-torch.arange(0, d, 2, device=DEVICE) / d))[None, :]
    cache = torch.cat([angles.cos(), angles.sin()], dim=-1)

    def rope_check():
        q1, k1, q2, k2 = q[0].clone(), k[0].clone(), q[0].float(), k[0].float()
        rope(q1, k1, pos, cache)
        rope_ref(q2, k2, pos, cache)
        return max(rel_err(q1, q2), rel_err(k1, k2))

    add("rope q[4096,32,128] k[4096,8,128]", 2 * tokens * (hq + hkv) * d * 2 + tokens * d * 4,
        lambda i: rope(q[i], k[i], pos, cache), lambda i: rope_ref(q[i], k[i], pos, cache), rope_check)
    k = randn(tokens, hkv, d)  # fresh: rope rotated the others
    kc = [torch.zeros(tokens // PAGE + 8, PAGE, hkv, d, dtype=DTYPE, device=DEVICE) for _ in copies]
    vc = [torch.zeros_like(c) for c in kc]
    slots = torch.randperm(kc[0].shape[0] * PAGE, device=DEVICE, generator=gen)[:tokens]

    def kv_check():
        kc2, vc2 = kc[0].clone(), vc[0].clone()
        write_kv(k[0], k[0], kc[0], vc[0], slots)
        write_kv_ref(k[0], k[0], kc2, vc2, slots)
        return 0.0 if torch.equal(kc[0], kc2) and torch.equal(vc[0], vc2) else float("inf")

    add("write_kv [4096,8,128]", 4 * tokens * hkv * d * 2, lambda i: write_kv(k[i], k[i], kc[i], vc[i], slots),
        lambda i: write_kv_ref(k[i], k[i], kc[i], vc[i], slots), kv_check, torch_capturable=False)
    return rows


def decode_sweep() -> list[DecodeConfig]:
    """Tile configs, each used whether or not the launch splits the context."""
    return [DecodeConfig(block_n=n, num_warps=w, num_stages=s)
            for n in (32, 64, 128) for w in (4, 8) for s in (1, 2, 3, 4)]


def prefill_sweep() -> list[PrefillConfig]:
    return [PrefillConfig(block_m=m, block_n=n, num_warps=w, num_stages=s)
            for m in (64, 128) for n in (32, 64, 128) for w in (4, 8) for s in (2, 3)]


# -- skinny products for decode (kernels/gemv.py) ------------------------------------------------
# llama3-8b's decoder projections: (N, K, the prologue the engine would fuse into it).
GEMV_SHAPES = {"qkv": (6144, 4096, "norm"), "o": (4096, 4096, None), "gate_up": (28672, 4096, "norm"),
               "down": (4096, 14336, "silu_mul")}
GEMV_ROWS = (1, 2, 4, 8, 16)
GEMV_MARGIN = 0.98  # the kernel must be this much faster than what it replaces


def gemv_candidates(rows: int) -> list[GemvConfig]:
    """FMA configs (M <= 8, at most 128 float32 partial sums a thread, at least one 16-byte weight load
    a thread per step) and 16-row dot configs (pipelined stages under ~200 KB of shared memory)."""
    out = []
    if rows <= 8:
        bm = triton.next_power_of_2(rows)
        for bn in (4, 8, 16, 32):
            for bk in (256, 512, 1024):
                for nw in (4, 8):
                    if bm * bn * bk > 128 * 32 * nw or bn * bk * 2 < 16 * 32 * nw:
                        continue
                    out.append(GemvConfig(block_n=bn, block_k=bk, num_warps=nw, num_stages=3, use_dot=False))
    for bn in (16, 32, 64):
        for bk in (128, 256, 512):
            for nw, ns in ((4, 3), (4, 4), (8, 3)):
                if ns * (bn + 16) * bk * 2 > 200_000:
                    continue
                out.append(GemvConfig(block_n=bn, block_k=bk, num_warps=nw, num_stages=ns, use_dot=True))
    return out


def graph_us(calls: list[Callable[[], object]], replays: int = 5, rounds: int = 3) -> float:
    """Median time per call of `calls` run back to back inside one CUDA graph."""
    if DEVICE != "cuda":
        start = time.perf_counter()
        for c in calls:
            c()
        return (time.perf_counter() - start) * 1e6 / len(calls)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for c in calls:
            c()
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for c in calls:
            c()
    graph.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(rounds):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(replays):
            graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3 / (replays * len(calls)))
    del graph
    return sorted(times)[len(times) // 2]


def bench_gemv(limits: dict, gen, budget_s: float, shapes: dict = GEMV_SHAPES, rows_list=GEMV_ROWS) -> dict:
    started = time.time()
    copy_bw = limits["copy_GBps"]
    results: dict = {"shapes": {}, "margin": GEMV_MARGIN}
    stream_bytes = (1 << 30) if DEVICE == "cuda" else 1 << 16
    for name, (n, k, prologue) in shapes.items():
        wbytes = n * k * 2
        copies = max(3, min(64, -(-stream_bytes // wbytes)))
        ws = [torch.randn(n, k, dtype=DTYPE, device=DEVICE, generator=gen) / k**0.5 for _ in range(copies)]
        wts = [w.t().contiguous() for w in ws]
        nw = torch.randn(k, dtype=DTYPE, device=DEVICE, generator=gen)
        shape_res: dict = {"n": n, "k": k, "weight_bytes": wbytes, "copies": copies, "prologue": prologue, "rows": {}}
        results["shapes"][name] = shape_res
        for rows in rows_list:
            if time.time() - started > budget_s:
                shape_res["rows"][str(rows)] = {"skipped": "budget"}
                continue
            x = torch.randn(rows, k, dtype=DTYPE, device=DEVICE, generator=gen)

            def frac(us: float) -> float:
                return wbytes / us / 1e3 / copy_bw

            row: dict = {"cublas": {}}
            row["cublas"]["linear"] = graph_us([lambda w=w: torch.nn.functional.linear(x, w) for w in ws])
            row["cublas"]["kn_matmul"] = graph_us([lambda wt=wt: x @ wt for wt in wts])
            if rows == 1:
                row["cublas"]["mv"] = graph_us([lambda w=w: torch.mv(w, x[0]) for w in ws])
            ref = torch.nn.functional.linear(x.float(), ws[0].float())
            variants = []
            for cfg in gemv_candidates(rows):
                try:
                    err = rel_err(gemv(x, ws[0], config=cfg)[0], ref)
                    us = graph_us([lambda w=w, cfg=cfg: gemv(x, w, config=cfg) for w in ws])
                    variants.append({"config": asdict(cfg), "us": us, "frac_copy_bw": frac(us), "rel_err": err})
                except Exception as exc:
                    variants.append({"config": asdict(cfg), "error": f"{type(exc).__name__}: {str(exc)[:120]}"})
            good = sorted((v for v in variants if "us" in v and v["rel_err"] < 2e-2), key=lambda v: v["us"])
            row["variants"] = variants
            row["best"] = good[0] if good else None
            lin = row["cublas"]["linear"]
            row["linear_frac_copy_bw"] = frac(lin)
            use = good[0]["config"] if good and good[0]["us"] < GEMV_MARGIN * lin else None
            row["use"] = use
            plain_us = good[0]["us"] if use else lin
            # The fused prologue against [the separate Triton kernel + the faster plain product].
            if prologue is not None and good:
                if prologue == "norm":
                    res = torch.randn(rows, k, dtype=DTYPE, device=DEVICE, generator=gen)
                    xin = x
                    sep = lambda w: (gemv(rms_norm(xin, nw, 1e-5, res)[0], w, config=GemvConfig(**use))  # noqa: E731
                                     if use else torch.nn.functional.linear(rms_norm(xin, nw, 1e-5, res)[0], w))
                    fused = lambda w, cfg: gemv(xin, w, "norm", nw, 1e-5, res, config=cfg)  # noqa: E731
                    fref = torch.nn.functional.linear(rms_norm_ref(xin, nw, 1e-5, res)[0].float(), ws[0].float())
                else:
                    xin = torch.randn(rows, 2 * k, dtype=DTYPE, device=DEVICE, generator=gen)
                    sep = lambda w: (gemv(silu_and_mul(xin), w, config=GemvConfig(**use))  # noqa: E731
                                     if use else torch.nn.functional.linear(silu_and_mul(xin), w))
                    fused = lambda w, cfg: gemv(xin, w, "silu_mul", config=cfg)  # noqa: E731
                    fref = torch.nn.functional.linear(silu_and_mul_ref(xin.float()), ws[0].float())
                sep_us = graph_us([lambda w=w: sep(w) for w in ws])
                fvars = []
                for v in good[:4]:
                    cfg = GemvConfig(**v["config"])
                    try:
                        err = rel_err(fused(ws[0], cfg)[0], fref)
                        us = graph_us([lambda w=w, cfg=cfg: fused(w, cfg) for w in ws])
                        fvars.append({"config": v["config"], "us": us, "rel_err": err})
                    except Exception as exc:
                        fvars.append({"config": v["config"], "error": f"{type(exc).__name__}: {str(exc)[:120]}"})
                fgood = sorted((v for v in fvars if "us" in v and v["rel_err"] < 2e-2), key=lambda v: v["us"])
                row["fused"] = {"prologue": prologue, "separate_us": sep_us, "plain_us": plain_us,
                                "elementwise_us": sep_us - plain_us, "variants": fvars,
                                "best": fgood[0] if fgood else None,
                                "use": fgood[0]["config"] if fgood and fgood[0]["us"] < GEMV_MARGIN * sep_us else None}
            shape_res["rows"][str(rows)] = row
            b = row["best"]
            line = (f"  gemv {name:8s} M={rows:<2d} cuBLAS linear {lin:7.2f} us ({frac(lin):4.0%}) "
                    f"[K,N] {row['cublas']['kn_matmul']:7.2f}" + (f" mv {row['cublas']['mv']:7.2f}" if rows == 1 else "")
                    + (f" | triton {b['us']:7.2f} us ({b['frac_copy_bw']:4.0%}) {GemvConfig(**b['config']).key()}" if b else " | triton -")
                    + f" -> {'triton' if use else 'cuBLAS'}")
            if "fused" in row:
                f = row["fused"]
                fb = f["best"]
                line += (f"; {prologue}: separate {f['separate_us']:.2f} us, fused "
                         + (f"{fb['us']:.2f}" if fb else "-") + f" -> {'fused' if f['use'] else 'separate'}")
            print(line, flush=True)
        del ws, wts
        if DEVICE == "cuda":
            torch.cuda.empty_cache()
    results["elapsed_s"] = time.time() - started
    return results


def gemv_table(device: str, results: dict, existing: dict | None = None) -> dict:
    """The tuned table GemvPolicy reads: per shape, prologue and row bucket, the config or null.
    This device's entry replaces its old one; other devices' entries in `existing` are kept."""
    entries: dict = {}
    for res in results["shapes"].values():
        shape = entries.setdefault(f"{res['n']}x{res['k']}", {"none": {}})
        for rows, row in res["rows"].items():
            if "skipped" in row:
                continue
            shape["none"][rows] = row["use"]
            if "fused" in row:
                shape.setdefault(row["fused"]["prologue"], {})[rows] = row["fused"]["use"]
    devices = dict((existing or {}).get("devices", {}))
    devices[device] = entries
    return {"note": "written by `python -m benchmarks.kernels --gemv`; a null entry means cuBLAS (and the "
                    "separate elementwise kernel) measured faster", "measured": time.strftime("%Y-%m-%d"),
            "devices": devices}


def print_gemv(results: dict, limits: dict) -> None:
    rows = []
    for name, res in results["shapes"].items():
        for m, row in res["rows"].items():
            if "skipped" in row:
                rows.append([name, m, "skipped (budget)", "", "", "", ""])
                continue
            lin, b = row["cublas"]["linear"], row["best"]
            fused = row.get("fused") or {}
            rows.append([name, m, f"{lin:.2f} ({row['linear_frac_copy_bw']:.0%})",
                         f"{b['us']:.2f} ({b['frac_copy_bw']:.0%})" if b else "-",
                         f"{lin / b['us']:.2f}x" if b else "-", GemvConfig(**b["config"]).key() if b else "-",
                         (f"{fused['prologue']}: {fused['separate_us']:.2f} -> {fused['best']['us']:.2f}"
                          + (" (used)" if fused.get("use") else "")) if fused.get("best") else ""])
    print_table(["proj", "M", "F.linear us", "best Triton us", "speedup", "config", "prologue: separate -> fused us"],
                rows, title=f"gemv: us per call inside a CUDA graph (fraction of copy BW "
                            f"{limits['copy_GBps']:.0f} GB/s)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sweep", action="store_true", help="also try launch configurations and report the best")
    parser.add_argument("--smoke", action="store_true",
                        help="tiny shapes on the CPU interpreter: checks this script, times nothing; "
                             "results in a temporary folder")
    parser.add_argument("--long-sweep", action="store_true", help="try every decode tile config on the 2 x 32k shape")
    parser.add_argument("--gemv", action="store_true",
                        help="only the decode projections (kernels/gemv.py) against cuBLAS")
    parser.add_argument("--gemv-table", default=str(TUNED_PATH), help="where --gemv writes the tuned table")
    parser.add_argument("--budget-s", type=float, default=240.0, help="--gemv: skip row counts after this many seconds")
    add_results_args(parser, default_save=True)
    args = parser.parse_args()
    global DEVICE, DECODE, DECODE_LONG, PREFILL
    if args.smoke:
        DEVICE = "cpu"
        DECODE = dict(batch=4, context=40, q_heads=8, kv_heads=2, head_dim=64)
        DECODE_LONG = dict(batch=1, context=100, q_heads=8, kv_heads=2, head_dim=64)
        PREFILL = dict(batch=1, seqlen=40, q_heads=4, kv_heads=2, head_dim=64)
        args.out = tempfile.mkdtemp(prefix="kernels_smoke_")
        args.gemv_table = os.path.join(args.out, "gemv_tuned.json")
    elif not torch.cuda.is_available():
        sys.exit("benchmarks/kernels.py needs a CUDA GPU (the kernels' CPU tests are in tests/kernels/); try --smoke")
    device = torch.cuda.get_device_name() if DEVICE == "cuda" else "cpu-smoke"
    gen = torch.Generator(device=DEVICE).manual_seed(0)
    started = time.time()
    limits = measure_limits()
    run = run_info(device=device, torch=torch.__version__, triton=triton.__version__, limits=limits)
    print(f"{device}: copy {limits['copy_GBps']:.0f} GB/s (read+write), bf16 matmul "
          f"{limits['matmul_bf16_TFLOPs']:.0f} TFLOP/s", flush=True)
    if args.gemv:
        results = ResultsFile("kernels_gemv", device, args.out, args.copy_to, save=args.save)
        shapes = GEMV_SHAPES if not args.smoke else {"qkv": (48, 64, "norm"), "o": (32, 64, None),
                                                      "down": (32, 64, "silu_mul")}
        gemv_results = bench_gemv(limits, gen, args.budget_s, shapes, GEMV_ROWS if not args.smoke else (1, 3))
        results.put("gemv", gemv_results, {**run, "elapsed_s": time.time() - started})
        existing = json.loads(Path(args.gemv_table).read_text()) if Path(args.gemv_table).exists() else None
        with open(args.gemv_table, "w") as fh:
            json.dump(gemv_table(device, gemv_results, existing), fh, indent=1)
            fh.write("\n")
        print_gemv(gemv_results, limits)
        print(f"results: {results.path if args.save else 'not saved'}; tuned table: {args.gemv_table}")
        return
    results = ResultsFile("kernels", device, args.out, args.copy_to, save=args.save)
    measured: dict = {}

    def put(part: str, figures: dict) -> None:
        measured[part] = figures
        results.put(part, figures, {**run, "elapsed_s": time.time() - started})

    put("elementwise", {"rows": bench_elementwise(limits, gen)})
    decode_configs = decode_sweep() if args.sweep else [DECODE_DEFAULT]
    if args.smoke:
        decode_configs = [DecodeConfig(block_n=16, num_splits=s) for s in (None, 2)]
    put("decode", bench_decode(DECODE, decode_configs, limits, gen, with_sdpa=True))
    if args.sweep:  # does splitting help even when the grid already covers the GPU? Try it on the top three.
        ranked = sorted((r for r in measured["decode"]["variants"] if "us" in r), key=lambda r: r["us"])[:3]
        split_configs = [DecodeConfig(**{**r["config"], "num_splits": n}) for r in ranked for n in (2, 4)]
        put("decode-splits", bench_decode(DECODE, split_configs, limits, gen, with_sdpa=False))
    best = measured["decode"]["best"]
    base = DecodeConfig(**best["config"]) if best else DECODE_DEFAULT
    # The split count matters most at few sequences: always time a few fixed counts beside the rule's;
    # --long-sweep also tries tile shapes at the rule's split count.
    long_splits = (8, 16, 17, 24, 32, 33, 48, 64)
    long_configs = [base] + [DecodeConfig(**{**asdict(base), "num_splits": s}) for s in long_splits]
    if base.split_block_n is not None:  # and the same counts with the plain tile in split launches
        plain = DecodeConfig(**{**asdict(base), "split_block_n": None, "split_num_stages": None})
        long_configs += [plain] + [DecodeConfig(**{**asdict(plain), "num_splits": s}) for s in long_splits]
    if args.long_sweep:
        long_configs += [c for c in decode_sweep() if c != base]
    put("decode-long", bench_decode(DECODE_LONG, long_configs, limits, gen, with_sdpa=True))
    prefill_configs = prefill_sweep() if args.sweep else [PrefillConfig()]
    if args.smoke:
        prefill_configs = [PrefillConfig(block_m=16, block_n=16)]
    put("prefill", bench_prefill(PREFILL, prefill_configs, limits, gen))
    print_summary(device, limits, measured)
    print(f"results: {results.path if args.save else 'not saved'}")


def fastest(times: dict) -> tuple[str, float]:
    found = [(n, v) for n, v in times.items() if isinstance(v, float)]
    return min(found, key=lambda nv: nv[1]) if found else ("none", float("nan"))


def print_summary(device: str, limits: dict, parts: dict) -> None:
    rows = []
    for row in parts["elementwise"]["rows"]:
        torch_graph = row["torch_graph_us"] if isinstance(row["torch_graph_us"], float) else "-"
        rows.append([row["kernel"], row["triton_us"], row["triton_graph_us"], row["torch_us"], torch_graph,
                     f"{row['graph_frac_copy_bw']:.0%} of copy BW", f"{row['rel_err']:.1e}"])
    for key in ("decode", "decode-long"):
        dec = parts[key]
        shape = dec["shape"]
        name = f"{key} {shape['batch']} x {shape['context']}"
        eager, graph = dec["best"], dec.get("best_in_graph")
        _, sdpa_us = fastest(dec.get("sdpa_contiguous_us", {}))
        sdpa_name, sdpa_graph_us = fastest(dec.get("sdpa_contiguous_graph_us", {}))
        if eager and graph:
            rows.append([name, eager["us"], graph["graph_us"], sdpa_us, sdpa_graph_us,
                         f"{graph['graph_frac_copy_bw']:.0%} of copy BW, {graph['graph_us'] / sdpa_graph_us:.2f}x SDPA "
                         f"{sdpa_name}", f"{graph['rel_err']:.1e}"])
    pre = parts["prefill"]
    best = pre["best"]
    flash = pre["sdpa_TFLOPs"].get("flash", float("nan"))
    flash_us = pre["sdpa_contiguous_us"].get("flash")
    flash_graph = (pre.get("sdpa_contiguous_graph_us") or {}).get("flash")
    if best:
        rows.append([f"prefill {pre['shape']['batch']} x {pre['shape']['seqlen']}", best["us"], best["graph_us"],
                     flash_us if isinstance(flash_us, float) else "-",
                     flash_graph if isinstance(flash_graph, float) else "-",
                     f"{best['TFLOPs']:.0f} TFLOP/s = {best['TFLOPs'] / flash:.0%} of SDPA flash",
                     f"{best['rel_err']:.1e}"])
    print_table(["kernel", "Triton us", "in graph", "torch us", "in graph", "graph figure against its limit", "rel err"],
                rows,
                title=f"{device}: eager (do_bench median) and per call inside a CUDA graph; torch = the reference "
                      f"(attention: fastest SDPA on contiguous KV); copy {limits['copy_GBps']:.0f} GB/s, "
                      f"matmul {limits['matmul_bf16_TFLOPs']:.0f} TFLOP/s")
    for key in ("decode", "decode-long"):
        for label, best in (("eager", parts[key]["best"]), ("graph", parts[key].get("best_in_graph"))):
            if best:
                print(f"{key} best {label} config: {best['config']}")


if __name__ == "__main__":
    main()
