"""Paged decode attention: one new query token per sequence against its paged KV cache.

Decode is bound by reading the KV cache, so the kernel is built to read each
cached byte exactly once:
- GQA: one program serves every query head of a KV group, so a KV head's pages
  are read once for the whole group (not once per query head). The group's
  heads form the M side of a tensor-core dot, padded to 16 rows.
- Paging: each tile of BLOCK_N tokens gathers its rows through the block table
  (token -> page -> row), so any page size works, including pages smaller or
  larger than the tile.
- Split-K (flash-decoding): with few sequences or KV heads there are too few
  programs to fill the GPU, so the context is cut into splits that run in
  parallel; each writes a partial output and its log-sum-exp, and a small
  reduction kernel merges them. With one split the kernel writes the output
  directly and the reduction is skipped. The split count is chosen on the
  host from the block table's width (no device read: CUDA-graph capturable);
  each sequence cuts its own context into that many pieces inside the kernel,
  so short contexts in a graph sized for long ones still spread out.
Softmax runs in the exp2 domain with float32 statistics and accumulators.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from servescope.kernels.common import (
    check_dtype,
    check_last_dim_contiguous,
    check_paged_cache,
    check_shape,
    dot_precision,
    gather_context,
    upcast_dots,
)

LOG2E = 1.4426950408889634
MIN_GROUP_ROWS = 16  # tl.dot needs at least 16 rows on the M side


@dataclass(frozen=True)
class DecodeConfig:
    """Launch parameters. The defaults won benchmarks/kernels.py's sweep of 24 variants on an H100
    (batch 64 x 4k, 32/8 heads, d=128, bf16, pages of 16): 368 us, 97% of copy bandwidth;
    block_n 32 or 128 and 8 warps were 1-20% slower (benchmarks/results/kernels_nvidia_h100_80gb_hbm3.json)."""

    block_n: int = 64
    num_warps: int = 4
    num_stages: int = 3
    num_splits: int | None = None  # None: choose from the grid size (see choose_num_splits)
    min_tokens_per_split: int = 256
    # Tiles of launches that split the context (few sequences, long contexts); None: as above.
    split_block_n: int | None = None
    split_num_stages: int | None = None

    def __post_init__(self) -> None:
        for name in ("block_n", "split_block_n"):
            n = getattr(self, name)
            if n is not None and (n < 16 or n & (n - 1)):
                raise ValueError(f"{name} must be a power of two >= 16, got {n}")
        if self.num_splits is not None and self.num_splits < 1:
            raise ValueError(f"num_splits must be >= 1 or None, got {self.num_splits}")
        if self.num_warps not in (1, 2, 4, 8, 16):
            raise ValueError(f"num_warps must be a power of two up to 16, got {self.num_warps}")


# Split launches whose splits are long (at least SPLIT_TILES_MIN split tiles each) give each program
# a long range to stream, and there bigger tiles with fewer stages keep more bytes in flight: 2 x 32k
# on the H200 takes 70.1-70.6 us at 128/2 against 77.9-78.2 us at 64/3 per call inside a CUDA graph
# over two runs (`python benchmarks/kernels.py --long-sweep`; eagerly the launch's host time hides
# the difference). Short splits (batch-1 decode graphs sized for 8k: 32 splits
# of 256) keep the 64/3 tile, which measured faster there (128 against 149 us per token, 32 layers).
DEFAULT_CONFIG = DecodeConfig(split_block_n=128, split_num_stages=2)
SPLIT_TILES_MIN = 4


def decode_attention_ref(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """Plain-torch paged decode attention in float32: q [B, Hq, D] -> [B, Hq, D]."""
    batch, num_q_heads, _ = q.shape
    group = num_q_heads // k_cache.shape[2]
    out = torch.empty_like(q)
    for b in range(batch):
        k, v = gather_context(k_cache, v_cache, block_tables[b], int(context_lens[b]))
        k = k.float().repeat_interleave(group, dim=1)
        v = v.float().repeat_interleave(group, dim=1)
        probs = (torch.einsum("hd,nhd->hn", q[b].float(), k) * scale).softmax(dim=-1)
        out[b] = torch.einsum("hn,nhd->hd", probs, v).to(q.dtype)
    return out


# Per-step values (table width, split count, and the metadata tensors, which the engine slices out of
# one packed upload at offsets that vary step to step) are not specialized on: each new value class or
# pointer alignment would otherwise compile a new variant in the middle of serving, a 0.5-1.5 s stall of
# every request in flight (tests/kernels/test_specialization.py guards it).
@triton.jit(do_not_specialize=["stride_table", "num_splits"],
            do_not_specialize_on_alignment=["block_tables_ptr", "context_lens_ptr"])
def _decode_split_kernel(
    q_ptr, k_cache_ptr, v_cache_ptr, block_tables_ptr, context_lens_ptr,
    out_ptr, part_out_ptr, part_lse_ptr,
    qk_scale,
    stride_qb, stride_qh, stride_ob, stride_oh,
    stride_cache_block, stride_cache_tok, stride_cache_head, stride_table,
    num_q_heads, num_splits,
    GROUP: tl.constexpr, BLOCK_H: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    PAGE_SIZE: tl.constexpr, BLOCK_N: tl.constexpr,
    DIRECT_OUTPUT: tl.constexpr, UPCAST_DOT: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    seq = tl.program_id(0).to(tl.int64)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)

    context_len = tl.load(context_lens_ptr + seq)
    # Each sequence cuts its own context into num_splits tile-aligned pieces: a short context in a
    # batch sized for long ones still spreads over several programs (trailing splits stay empty).
    tokens_per_split = tl.cdiv(tl.cdiv(context_len, num_splits), BLOCK_N) * BLOCK_N
    start = split * tokens_per_split
    end = tl.minimum(start + tokens_per_split, context_len)

    rows = tl.arange(0, BLOCK_H)
    heads = kv_head * GROUP + rows
    row_mask = rows < GROUP
    dims = tl.arange(0, BLOCK_D)
    dim_mask = dims < HEAD_DIM
    q = tl.load(
        q_ptr + seq * stride_qb + heads[:, None] * stride_qh + dims[None, :],
        mask=row_mask[:, None] & dim_mask[None, :], other=0.0,
    )
    if UPCAST_DOT:
        q = q.to(tl.float32)

    m_i = tl.full([BLOCK_H], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_H], dtype=tl.float32)
    acc = tl.zeros([BLOCK_H, BLOCK_D], dtype=tl.float32)
    table = block_tables_ptr + seq * stride_table
    head_offset = kv_head * stride_cache_head
    for tile_start in range(start, end, BLOCK_N):
        tokens = tile_start + tl.arange(0, BLOCK_N)
        tok_mask = tokens < end
        pages = tl.load(table + tokens // PAGE_SIZE, mask=tok_mask, other=0).to(tl.int64)
        row_offsets = pages * stride_cache_block + (tokens % PAGE_SIZE) * stride_cache_tok + head_offset
        kv_offsets = row_offsets[:, None] + dims[None, :]
        kv_mask = tok_mask[:, None] & dim_mask[None, :]
        k = tl.load(k_cache_ptr + kv_offsets, mask=kv_mask, other=0.0)
        v = tl.load(v_cache_ptr + kv_offsets, mask=kv_mask, other=0.0)
        if UPCAST_DOT:
            k = k.to(tl.float32)
            v = v.to(tl.float32)
        scores = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale
        scores = tl.where(tok_mask[None, :], scores, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(scores, axis=1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(scores - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        m_i = m_new

    out_mask = row_mask[:, None] & dim_mask[None, :]
    if DIRECT_OUTPUT:
        out = acc / l_i[:, None]
        tl.store(out_ptr + seq * stride_ob + heads[:, None] * stride_oh + dims[None, :],
                 out.to(out_ptr.dtype.element_ty), mask=out_mask)
    else:
        # An empty split (context shorter than its start) stores zeros and lse = -inf: weight 0.
        has_data = l_i > 0
        out = acc / tl.where(has_data, l_i, 1.0)[:, None]
        lse = tl.where(has_data, m_i + tl.log2(tl.where(has_data, l_i, 1.0)), float("-inf"))
        part_row = (seq * num_q_heads + heads) * num_splits + split
        tl.store(part_out_ptr + part_row[:, None] * HEAD_DIM + dims[None, :], out, mask=out_mask)
        tl.store(part_lse_ptr + part_row, lse, mask=row_mask)


@triton.jit(do_not_specialize=["num_splits"])
def _decode_reduce_kernel(
    part_out_ptr, part_lse_ptr, out_ptr,
    stride_ob, stride_oh, num_q_heads, num_splits,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_S: tl.constexpr,
):
    seq = tl.program_id(0).to(tl.int64)
    head = tl.program_id(1)
    splits = tl.arange(0, BLOCK_S)
    split_mask = splits < num_splits
    dims = tl.arange(0, BLOCK_D)
    dim_mask = dims < HEAD_DIM
    part_row = (seq * num_q_heads + head) * num_splits + splits
    lse = tl.load(part_lse_ptr + part_row, mask=split_mask, other=float("-inf"))
    weights = tl.exp2(lse - tl.max(lse, axis=0))
    parts = tl.load(part_out_ptr + part_row[:, None] * HEAD_DIM + dims[None, :],
                    mask=split_mask[:, None] & dim_mask[None, :], other=0.0)
    out = tl.sum(parts * weights[:, None], axis=0) / tl.sum(weights, axis=0)
    tl.store(out_ptr + seq * stride_ob + head * stride_oh + dims, out.to(out_ptr.dtype.element_ty), mask=dim_mask)


@functools.lru_cache(maxsize=8)
def _multiprocessor_count(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 132  # the interpreter has no SMs; pretend to be an H100 so CPU tests see the GPU's choice


def choose_num_splits(batch: int, num_kv_heads: int, max_context: int, config: DecodeConfig, device: torch.device) -> int:
    """Enough splits that the grid covers the GPU about twice, each split at least min_tokens_per_split long.

    Bounded by the block table's capacity rather than the actual lengths so that
    choosing needs no device-to-host copy (and the launch stays graph-capturable).
    """
    if config.num_splits is not None:
        return config.num_splits
    programs = batch * num_kv_heads
    wanted = math.ceil(2 * _multiprocessor_count(device) / max(programs, 1))
    longest = max(1, max_context // config.min_tokens_per_split)
    return max(1, min(wanted, longest, 64))


def decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float,
    config: DecodeConfig = DEFAULT_CONFIG,
) -> torch.Tensor:
    """Triton paged decode attention; see decode_attention_ref and the module docstring.

    q [B, Hq, D]; caches [num_blocks, block_size, Hkv, D]; block_tables [B, max_blocks]
    int32; context_lens [B] int32 (>= 1, the new token already written) -> [B, Hq, D].
    """
    check_dtype("q", q)
    check_last_dim_contiguous("q", q)
    if q.dim() != 3:
        raise ValueError(f"q must be [B, Hq, D], got {tuple(q.shape)}")
    batch, num_q_heads, head_dim = q.shape
    check_paged_cache(k_cache, v_cache, head_dim)
    _, page_size, num_kv_heads, _ = k_cache.shape
    if num_q_heads % num_kv_heads:
        raise ValueError(f"query heads ({num_q_heads}) must be a multiple of KV heads ({num_kv_heads})")
    check_shape("block_tables", block_tables, (batch, None))
    check_shape("context_lens", context_lens, (batch,))
    check_last_dim_contiguous("block_tables", block_tables)
    if k_cache.dtype != q.dtype:
        raise TypeError(f"q ({q.dtype}) and the KV cache ({k_cache.dtype}) must share a dtype")
    out = torch.empty_like(q)
    if batch == 0:
        return out
    group = num_q_heads // num_kv_heads
    max_context = block_tables.shape[1] * page_size
    num_splits = choose_num_splits(batch, num_kv_heads, max_context, config, q.device)
    direct = num_splits == 1
    if direct:
        part_out = part_lse = out  # unused by the kernel
    else:
        part_out = torch.empty((batch, num_q_heads, num_splits, head_dim), dtype=torch.float32, device=q.device)
        part_lse = torch.empty((batch, num_q_heads, num_splits), dtype=torch.float32, device=q.device)
    block_d = triton.next_power_of_2(head_dim)
    block_n, num_stages = config.block_n, config.num_stages
    split_block_n = config.split_block_n or block_n
    if not direct and max_context // num_splits >= SPLIT_TILES_MIN * split_block_n:
        block_n, num_stages = split_block_n, config.split_num_stages or num_stages
    _decode_split_kernel[(batch, num_kv_heads, num_splits)](
        q, k_cache, v_cache, block_tables, context_lens,
        out, part_out, part_lse,
        scale * LOG2E,
        q.stride(0), q.stride(1), out.stride(0), out.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), block_tables.stride(0),
        num_q_heads, num_splits,
        GROUP=group, BLOCK_H=max(MIN_GROUP_ROWS, triton.next_power_of_2(group)),
        HEAD_DIM=head_dim, BLOCK_D=block_d, PAGE_SIZE=page_size, BLOCK_N=block_n,
        DIRECT_OUTPUT=direct, UPCAST_DOT=upcast_dots(q.dtype), DOT_PRECISION=dot_precision(q.dtype),
        num_warps=config.num_warps, num_stages=num_stages,
    )
    if not direct:
        _decode_reduce_kernel[(batch, num_q_heads)](
            part_out, part_lse, out,
            out.stride(0), out.stride(1), num_q_heads, num_splits,
            HEAD_DIM=head_dim, BLOCK_D=block_d, BLOCK_S=triton.next_power_of_2(num_splits), num_warps=4,
        )
    return out
