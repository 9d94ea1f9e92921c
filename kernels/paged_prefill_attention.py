"""Paged prefill / extend attention over a ragged batch of new tokens.

Each sequence b brings n_b new tokens (the last n_b of its context_lens[b]
tokens, already written to the paged cache); they attend to the cached prefix
and causally to each other. A plain prefill has an empty prefix; a chunked
prefill's later chunks and a prefix-cache hit have a non-empty one: one kernel
serves all three.

A program takes BLOCK_M new tokens of one sequence and one query head and walks
the context in BLOCK_N tiles gathered through the block table (flash-attention
style online softmax, float32 statistics). The walk has two loops: tiles wholly
before the program's first query position need no mask at all (the common
case, kept branch-free), and the few tiles on the diagonal get the causal and
length masks. Programs are ordered longest-first so the causal tail of long
sequences does not run last on an otherwise idle GPU.
"""

from __future__ import annotations

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


@dataclass(frozen=True)
class PrefillConfig:
    """Launch parameters. The defaults won benchmarks/kernels.py's sweep of 24 variants on an H100
    (4 x 4k causal, 32/8 heads, d=128, bf16, pages of 16): 384 TFLOP/s, 1.2x SDPA flash;
    the runner-up (128, 128, 8 warps, 3 stages) was 4% slower, the slowest 2.3x slower."""

    block_m: int = 128
    block_n: int = 32
    num_warps: int = 8
    num_stages: int = 2

    def __post_init__(self) -> None:
        for name in ("block_m", "block_n"):
            value = getattr(self, name)
            if value < 16 or value & (value - 1):
                raise ValueError(f"{name} must be a power of two >= 16, got {value}")
        if self.num_warps not in (1, 2, 4, 8, 16):
            raise ValueError(f"num_warps must be a power of two up to 16, got {self.num_warps}")


DEFAULT_CONFIG = PrefillConfig()


def prefill_attention_ref(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """Plain-torch paged extend attention in float32: ragged q [T, Hq, D] -> [T, Hq, D]."""
    group = q.shape[1] // k_cache.shape[2]
    out = torch.empty_like(q)
    cu = cu_seqlens_q.tolist()
    for b in range(len(cu) - 1):
        context_len, new = int(context_lens[b]), cu[b + 1] - cu[b]
        if new == 0:
            continue
        k, v = gather_context(k_cache, v_cache, block_tables[b], context_len)
        k = k.float().repeat_interleave(group, dim=1)
        v = v.float().repeat_interleave(group, dim=1)
        scores = torch.einsum("thd,nhd->htn", q[cu[b] : cu[b + 1]].float(), k) * scale
        query_pos = torch.arange(context_len - new, context_len, device=q.device)
        visible = torch.arange(context_len, device=q.device)[None, :] <= query_pos[:, None]
        probs = scores.masked_fill(~visible, float("-inf")).softmax(dim=-1)
        out[cu[b] : cu[b + 1]] = torch.einsum("htn,nhd->thd", probs, v).to(q.dtype)
    return out


@triton.jit
def _attend_tile(
    q, m_i, l_i, acc, k_cache_ptr, v_cache_ptr, table, head_offset, tile_start, query_pos, context_len, dims,
    dim_mask, qk_scale, stride_cache_block, stride_cache_tok,
    PAGE_SIZE: tl.constexpr, BLOCK_N: tl.constexpr, MASKED: tl.constexpr, EVEN_D: tl.constexpr,
    UPCAST_DOT: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """One online-softmax step over BLOCK_N cached tokens starting at tile_start."""
    tokens = tile_start + tl.arange(0, BLOCK_N)
    if MASKED:
        tok_mask = tokens < context_len
        pages = tl.load(table + tokens // PAGE_SIZE, mask=tok_mask, other=0).to(tl.int64)
    else:
        pages = tl.load(table + tokens // PAGE_SIZE).to(tl.int64)
    offsets = (pages * stride_cache_block + (tokens % PAGE_SIZE) * stride_cache_tok + head_offset)[:, None] + dims[None, :]
    if MASKED:
        kv_mask = tok_mask[:, None] & dim_mask[None, :]
        k = tl.load(k_cache_ptr + offsets, mask=kv_mask, other=0.0)
        v = tl.load(v_cache_ptr + offsets, mask=kv_mask, other=0.0)
    elif EVEN_D:  # the hot path: no predicate on the loads
        k = tl.load(k_cache_ptr + offsets)
        v = tl.load(v_cache_ptr + offsets)
    else:
        k = tl.load(k_cache_ptr + offsets, mask=dim_mask[None, :], other=0.0)
        v = tl.load(v_cache_ptr + offsets, mask=dim_mask[None, :], other=0.0)
    if UPCAST_DOT:
        k = k.to(tl.float32)
        v = v.to(tl.float32)
    scores = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale
    if MASKED:
        visible = (tokens[None, :] <= query_pos[:, None]) & tok_mask[None, :]
        scores = tl.where(visible, scores, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(scores, axis=1))
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(scores - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, axis=1)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
    return m_new, l_i, acc


# Not specialized on per-step values (see the note in paged_decode_attention.py): the table width,
# the query-block count and the packed metadata's alignment change from step to step.
@triton.jit(do_not_specialize=["stride_table", "num_m_blocks"],
            do_not_specialize_on_alignment=["block_tables_ptr", "cu_seqlens_ptr", "context_lens_ptr"])
def _prefill_kernel(
    q_ptr, k_cache_ptr, v_cache_ptr, block_tables_ptr, cu_seqlens_ptr, context_lens_ptr, out_ptr,
    qk_scale,
    stride_qt, stride_qh, stride_ot, stride_oh,
    stride_cache_block, stride_cache_tok, stride_cache_head, stride_table,
    num_m_blocks,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, PAGE_SIZE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, UPCAST_DOT: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    m_block = num_m_blocks - 1 - tl.program_id(0)  # longest-first: the last query blocks see the most keys
    head = tl.program_id(1)
    seq = tl.program_id(2).to(tl.int64)
    q_start = tl.load(cu_seqlens_ptr + seq)
    num_new = tl.load(cu_seqlens_ptr + seq + 1) - q_start
    if m_block * BLOCK_M < num_new:
        context_len = tl.load(context_lens_ptr + seq)
        prefix_len = context_len - num_new
        rows = m_block * BLOCK_M + tl.arange(0, BLOCK_M)
        row_mask = rows < num_new
        dims = tl.arange(0, BLOCK_D)
        dim_mask = dims < HEAD_DIM
        q_offsets = (q_start + rows).to(tl.int64)[:, None] * stride_qt + head * stride_qh + dims[None, :]
        q = tl.load(q_ptr + q_offsets, mask=row_mask[:, None] & dim_mask[None, :], other=0.0)
        if UPCAST_DOT:
            q = q.to(tl.float32)
        query_pos = prefix_len + rows

        m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
        acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
        table = block_tables_ptr + seq * stride_table
        head_offset = (head // GROUP) * stride_cache_head
        # Tiles that end before this block's first query position: every key is visible.
        unmasked_end = (prefix_len + m_block * BLOCK_M) // BLOCK_N * BLOCK_N
        for tile_start in range(0, unmasked_end, BLOCK_N):
            m_i, l_i, acc = _attend_tile(
                q, m_i, l_i, acc, k_cache_ptr, v_cache_ptr, table, head_offset, tile_start, query_pos,
                context_len, dims, dim_mask, qk_scale, stride_cache_block, stride_cache_tok,
                PAGE_SIZE, BLOCK_N, False, HEAD_DIM == BLOCK_D, UPCAST_DOT, DOT_PRECISION,
            )
        # The diagonal: causal and length masks.
        masked_end = tl.minimum(prefix_len + (m_block + 1) * BLOCK_M, context_len)
        for tile_start in range(unmasked_end, masked_end, BLOCK_N):
            m_i, l_i, acc = _attend_tile(
                q, m_i, l_i, acc, k_cache_ptr, v_cache_ptr, table, head_offset, tile_start, query_pos,
                context_len, dims, dim_mask, qk_scale, stride_cache_block, stride_cache_tok,
                PAGE_SIZE, BLOCK_N, True, HEAD_DIM == BLOCK_D, UPCAST_DOT, DOT_PRECISION,
            )
        out = acc / l_i[:, None]
        out_offsets = (q_start + rows).to(tl.int64)[:, None] * stride_ot + head * stride_oh + dims[None, :]
        tl.store(out_ptr + out_offsets, out.to(out_ptr.dtype.element_ty), mask=row_mask[:, None] & dim_mask[None, :])


def prefill_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float,
    max_seqlen_q: int | None = None,
    config: PrefillConfig = DEFAULT_CONFIG,
) -> torch.Tensor:
    """Triton paged extend attention; see prefill_attention_ref and the module docstring.

    max_seqlen_q (the most new tokens of any sequence) sizes the grid; when not
    given it is read from cu_seqlens_q, which costs one device-to-host copy.
    """
    check_dtype("q", q)
    check_last_dim_contiguous("q", q)
    if q.dim() != 3:
        raise ValueError(f"q must be [T, Hq, D], got {tuple(q.shape)}")
    tokens, num_q_heads, head_dim = q.shape
    check_paged_cache(k_cache, v_cache, head_dim)
    if k_cache.dtype != q.dtype:
        raise TypeError(f"q ({q.dtype}) and the KV cache ({k_cache.dtype}) must share a dtype")
    _, page_size, num_kv_heads, _ = k_cache.shape
    if num_q_heads % num_kv_heads:
        raise ValueError(f"query heads ({num_q_heads}) must be a multiple of KV heads ({num_kv_heads})")
    if cu_seqlens_q.dim() != 1 or cu_seqlens_q.numel() < 1:
        raise ValueError(f"cu_seqlens_q must be [B+1], got {tuple(cu_seqlens_q.shape)}")
    batch = cu_seqlens_q.numel() - 1
    check_shape("block_tables", block_tables, (batch, None))
    check_shape("context_lens", context_lens, (batch,))
    check_last_dim_contiguous("block_tables", block_tables)
    out = torch.empty_like(q)
    if batch == 0 or tokens == 0:
        return out
    if max_seqlen_q is None:
        max_seqlen_q = int((cu_seqlens_q[1:] - cu_seqlens_q[:-1]).max())
    num_m_blocks = triton.cdiv(max_seqlen_q, config.block_m)
    _prefill_kernel[(num_m_blocks, num_q_heads, batch)](
        q, k_cache, v_cache, block_tables, cu_seqlens_q, context_lens, out,
        scale * LOG2E,
        q.stride(0), q.stride(1), out.stride(0), out.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), block_tables.stride(0),
        num_m_blocks,
        GROUP=num_q_heads // num_kv_heads, HEAD_DIM=head_dim, BLOCK_D=triton.next_power_of_2(head_dim),
        PAGE_SIZE=page_size, BLOCK_M=config.block_m, BLOCK_N=config.block_n,
        UPCAST_DOT=upcast_dots(q.dtype), DOT_PRECISION=dot_precision(q.dtype), num_warps=config.num_warps, num_stages=config.num_stages,
    )
    return out
