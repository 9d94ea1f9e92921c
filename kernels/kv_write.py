"""KV write: scatter each new token's K and V into its slot of the paged cache.

slot_mapping[t] = block * block_size + offset names the slot of token t; a
negative slot means "do not write" (padding tokens, or tokens whose KV is
already cached). One program copies one token's K and V for every KV head.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from servescope.kernels.common import check_dtype, check_last_dim_contiguous, check_shape


def write_kv_ref(
    k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, slot_mapping: torch.Tensor
) -> None:
    """k/v [T, Hkv, D] into caches [num_blocks, block_size, Hkv, D] at slot_mapping (negative: skip)."""
    valid = slot_mapping >= 0
    slots = slot_mapping[valid]
    k_cache.view(-1, *k_cache.shape[2:])[slots] = k[valid].to(k_cache.dtype)
    v_cache.view(-1, *v_cache.shape[2:])[slots] = v[valid].to(v_cache.dtype)


@triton.jit(do_not_specialize_on_alignment=["slot_ptr"])
def _write_kv_kernel(
    k_ptr, v_ptr, k_cache_ptr, v_cache_ptr, slot_ptr,
    stride_kt, stride_kh, stride_vt, stride_vh,
    stride_cache_slot, stride_cache_h,
    num_heads,
    HEAD_DIM: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr,
):
    token = tl.program_id(0).to(tl.int64)
    slot = tl.load(slot_ptr + token).to(tl.int64)
    heads = tl.arange(0, BLOCK_H)[:, None]
    cols = tl.arange(0, BLOCK_D)[None, :]
    valid = (tl.zeros([BLOCK_H, 1], dtype=tl.int64) + slot) >= 0  # broadcast: a scalar mask trips the interpreter
    mask = (heads < num_heads) & (cols < HEAD_DIM) & valid
    dst = slot * stride_cache_slot + heads * stride_cache_h + cols
    k = tl.load(k_ptr + token * stride_kt + heads * stride_kh + cols, mask=mask)
    tl.store(k_cache_ptr + dst, k.to(k_cache_ptr.dtype.element_ty), mask=mask)
    v = tl.load(v_ptr + token * stride_vt + heads * stride_vh + cols, mask=mask)
    tl.store(v_cache_ptr + dst, v.to(v_cache_ptr.dtype.element_ty), mask=mask)


def write_kv(
    k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, slot_mapping: torch.Tensor
) -> None:
    """Triton KV write; see write_kv_ref. k/v may be strided views (e.g. slices of a fused QKV output)."""
    for name, t in (("k", k), ("v", v), ("k_cache", k_cache), ("v_cache", v_cache)):
        check_dtype(name, t)
        check_last_dim_contiguous(name, t)
    if k.dim() != 3:
        raise ValueError(f"k must be [T, Hkv, D], got {tuple(k.shape)}")
    tokens, heads, head_dim = k.shape
    check_shape("v", v, (tokens, heads, head_dim))
    check_shape("k_cache", k_cache, (None, None, heads, head_dim))
    check_shape("v_cache", v_cache, tuple(k_cache.shape))
    check_shape("slot_mapping", slot_mapping, (tokens,))
    if not (k_cache.is_contiguous() and v_cache.is_contiguous()):
        raise ValueError("k_cache and v_cache must be contiguous [num_blocks, block_size, Hkv, D] tensors")
    if tokens == 0:
        return
    _write_kv_kernel[(tokens,)](
        k, v, k_cache, v_cache, slot_mapping,
        k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        k_cache.stride(1), k_cache.stride(2),
        heads,
        HEAD_DIM=head_dim, BLOCK_H=triton.next_power_of_2(heads), BLOCK_D=triton.next_power_of_2(head_dim),
        num_warps=4,
    )
