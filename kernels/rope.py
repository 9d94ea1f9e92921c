"""Rotary position embedding applied in place to Q and K (neox / HF Llama layout).

The cos/sin cache [max_pos, D] holds cos in its first D/2 columns and sin in its
last D/2, already carrying any frequency scaling (llama3 included), so the
kernel only gathers a row per token and rotates. One program handles every Q
and K head of one token, so the cos/sin row is read once per token.

`rope_write_kv` also scatters the rotated K and the V of each token into the
paged cache (kernels/kv_write.py's job) in the same program: one launch per
layer instead of two, which is what counts at batch 1, where both are
launch-bound.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from servescope.kernels.common import check_dtype, check_last_dim_contiguous, check_shape


def rope_ref(q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, cos_sin_cache: torch.Tensor) -> None:
    """In place: x = x * cos + rotate_half(x) * sin for q [T, Hq, D] and k [T, Hkv, D]."""
    half = q.shape[-1] // 2
    cos_sin = cos_sin_cache[positions].float()
    cos, sin = cos_sin[:, None, :half], cos_sin[:, None, half:]
    for x in (q, k):
        x1, x2 = x[..., :half].float(), x[..., half:].float()
        rotated = torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)
        x.copy_(rotated.to(x.dtype))


@triton.jit
def _rotate_heads(x_ptr, stride_t, stride_h, token, num_heads, cos, sin,
                  HALF: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_HALF: tl.constexpr):
    heads = tl.arange(0, BLOCK_H)
    cols = tl.arange(0, BLOCK_HALF)
    mask = (heads[:, None] < num_heads) & (cols[None, :] < HALF)
    first = x_ptr + token * stride_t + heads[:, None] * stride_h + cols[None, :]
    x1 = tl.load(first, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(first + HALF, mask=mask, other=0.0).to(tl.float32)
    out1 = x1 * cos[None, :] - x2 * sin[None, :]
    out2 = x2 * cos[None, :] + x1 * sin[None, :]
    tl.store(first, out1.to(x_ptr.dtype.element_ty), mask=mask)
    tl.store(first + HALF, out2.to(x_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _cos_sin(positions_ptr, cache_ptr, token, cols, stride_cache, HALF: tl.constexpr):
    """This token's cos and sin rows (float32) from the [max_pos, D] cache: cos in the first half, sin in the second."""
    pos = tl.load(positions_ptr + token).to(tl.int64)
    cmask = cols < HALF
    cos = tl.load(cache_ptr + pos * stride_cache + cols, mask=cmask, other=0.0).to(tl.float32)
    sin = tl.load(cache_ptr + pos * stride_cache + HALF + cols, mask=cmask, other=0.0).to(tl.float32)
    return cos, sin


@triton.jit(do_not_specialize_on_alignment=["positions_ptr"])
def _rope_kernel(
    q_ptr, k_ptr, positions_ptr, cache_ptr,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_cache,
    num_q_heads, num_k_heads,
    HALF: tl.constexpr, BLOCK_HQ: tl.constexpr, BLOCK_HK: tl.constexpr, BLOCK_HALF: tl.constexpr,
):
    token = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_HALF)
    cos, sin = _cos_sin(positions_ptr, cache_ptr, token, cols, stride_cache, HALF)
    _rotate_heads(q_ptr, stride_qt, stride_qh, token, num_q_heads, cos, sin, HALF, BLOCK_HQ, BLOCK_HALF)
    _rotate_heads(k_ptr, stride_kt, stride_kh, token, num_k_heads, cos, sin, HALF, BLOCK_HK, BLOCK_HALF)


def rope(q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, cos_sin_cache: torch.Tensor) -> None:
    """Triton RoPE, in place on q [T, Hq, D] and k [T, Hkv, D] (views with any row strides work)."""
    check_dtype("q", q)
    check_dtype("k", k)
    if q.dim() != 3 or k.dim() != 3:
        raise ValueError(f"q and k must be [T, heads, D]; got {tuple(q.shape)} and {tuple(k.shape)}")
    tokens, _, head_dim = q.shape
    if head_dim % 2:
        raise ValueError(f"head dim must be even for RoPE, got {head_dim}")
    check_shape("k", k, (tokens, None, head_dim))
    check_shape("positions", positions, (tokens,))
    check_shape("cos_sin_cache", cos_sin_cache, (None, head_dim))
    for name, t in (("q", q), ("k", k), ("cos_sin_cache", cos_sin_cache)):
        check_last_dim_contiguous(name, t)
    if tokens == 0:
        return
    half = head_dim // 2
    _rope_kernel[(tokens,)](
        q, k, positions, cos_sin_cache,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), cos_sin_cache.stride(0),
        q.shape[1], k.shape[1],
        HALF=half, BLOCK_HQ=triton.next_power_of_2(q.shape[1]), BLOCK_HK=triton.next_power_of_2(k.shape[1]),
        BLOCK_HALF=triton.next_power_of_2(half), num_warps=4,
    )


def rope_write_kv_ref(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor, cos_sin_cache: torch.Tensor,
    k_cache: torch.Tensor, v_cache: torch.Tensor, slot_mapping: torch.Tensor,
) -> None:
    """rope_ref on q and k in place, then k and v into the paged caches at slot_mapping (negative: skip)."""
    from servescope.kernels.kv_write import write_kv_ref

    rope_ref(q, k, positions, cos_sin_cache)
    write_kv_ref(k, v, k_cache, v_cache, slot_mapping)


# positions and slots are slices of the engine's packed per-step upload: their alignment varies.
@triton.jit(do_not_specialize_on_alignment=["positions_ptr", "slot_ptr"])
def _rope_write_kv_kernel(
    q_ptr, k_ptr, v_ptr, positions_ptr, cache_ptr, k_cache_ptr, v_cache_ptr, slot_ptr,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_cache,
    stride_cache_slot, stride_cache_h,
    num_q_heads, num_k_heads,
    HALF: tl.constexpr, BLOCK_HQ: tl.constexpr, BLOCK_HK: tl.constexpr, BLOCK_HALF: tl.constexpr,
):
    token = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_HALF)
    cos, sin = _cos_sin(positions_ptr, cache_ptr, token, cols, stride_cache, HALF)
    _rotate_heads(q_ptr, stride_qt, stride_qh, token, num_q_heads, cos, sin, HALF, BLOCK_HQ, BLOCK_HALF)

    slot = tl.load(slot_ptr + token).to(tl.int64)
    heads = tl.arange(0, BLOCK_HK)[:, None]
    c = cols[None, :]
    kmask = (heads < num_k_heads) & (c < HALF)
    valid = (tl.zeros([BLOCK_HK, 1], dtype=tl.int64) + slot) >= 0  # broadcast: a scalar mask trips the interpreter
    wmask = kmask & valid
    first = k_ptr + token * stride_kt + heads * stride_kh + c
    x1 = tl.load(first, mask=kmask, other=0.0).to(tl.float32)
    x2 = tl.load(first + HALF, mask=kmask, other=0.0).to(tl.float32)
    out1 = (x1 * cos[None, :] - x2 * sin[None, :]).to(k_ptr.dtype.element_ty)
    out2 = (x2 * cos[None, :] + x1 * sin[None, :]).to(k_ptr.dtype.element_ty)
    tl.store(first, out1, mask=kmask)
    tl.store(first + HALF, out2, mask=kmask)
    dst = slot * stride_cache_slot + heads * stride_cache_h + c
    tl.store(k_cache_ptr + dst, out1.to(k_cache_ptr.dtype.element_ty), mask=wmask)
    tl.store(k_cache_ptr + dst + HALF, out2.to(k_cache_ptr.dtype.element_ty), mask=wmask)
    vsrc = v_ptr + token * stride_vt + heads * stride_vh + c
    v1 = tl.load(vsrc, mask=wmask)
    v2 = tl.load(vsrc + HALF, mask=wmask)
    tl.store(v_cache_ptr + dst, v1.to(v_cache_ptr.dtype.element_ty), mask=wmask)
    tl.store(v_cache_ptr + dst + HALF, v2.to(v_cache_ptr.dtype.element_ty), mask=wmask)


def rope_write_kv(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor, cos_sin_cache: torch.Tensor,
    k_cache: torch.Tensor, v_cache: torch.Tensor, slot_mapping: torch.Tensor,
) -> None:
    """Triton RoPE on q [T, Hq, D] and k [T, Hkv, D] in place, and the rotated k and v [T, Hkv, D] into
    the paged caches [num_blocks, block_size, Hkv, D] at slot_mapping; see rope_write_kv_ref."""
    for name, t in (("q", q), ("k", k), ("v", v), ("k_cache", k_cache), ("v_cache", v_cache)):
        check_dtype(name, t)
    if q.dim() != 3 or k.dim() != 3:
        raise ValueError(f"q and k must be [T, heads, D]; got {tuple(q.shape)} and {tuple(k.shape)}")
    tokens, _, head_dim = q.shape
    heads = k.shape[1]
    if head_dim % 2:
        raise ValueError(f"head dim must be even for RoPE, got {head_dim}")
    check_shape("k", k, (tokens, None, head_dim))
    check_shape("v", v, (tokens, heads, head_dim))
    check_shape("positions", positions, (tokens,))
    check_shape("cos_sin_cache", cos_sin_cache, (None, head_dim))
    check_shape("slot_mapping", slot_mapping, (tokens,))
    check_shape("k_cache", k_cache, (None, None, heads, head_dim))
    check_shape("v_cache", v_cache, tuple(k_cache.shape))
    for name, t in (("q", q), ("k", k), ("v", v), ("cos_sin_cache", cos_sin_cache)):
        check_last_dim_contiguous(name, t)
    if not (k_cache.is_contiguous() and v_cache.is_contiguous()):
        raise ValueError("k_cache and v_cache must be contiguous [num_blocks, block_size, Hkv, D] tensors")
    if tokens == 0:
        return
    half = head_dim // 2
    _rope_write_kv_kernel[(tokens,)](
        q, k, v, positions, cos_sin_cache, k_cache, v_cache, slot_mapping,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1), cos_sin_cache.stride(0),
        k_cache.stride(1), k_cache.stride(2),
        q.shape[1], heads,
        HALF=half, BLOCK_HQ=triton.next_power_of_2(q.shape[1]), BLOCK_HK=triton.next_power_of_2(heads),
        BLOCK_HALF=triton.next_power_of_2(half), num_warps=4,
    )
