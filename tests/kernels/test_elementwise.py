"""RMSNorm, SiLU-and-mul, RoPE and KV write against their plain-torch references."""

from __future__ import annotations

import pytest
import torch

from servescope.kernels.activation import silu_and_mul, silu_and_mul_ref
from servescope.kernels.kv_write import write_kv, write_kv_ref
from servescope.kernels.rmsnorm import rms_norm, rms_norm_ref
from servescope.kernels.rope import rope, rope_ref, rope_write_kv, rope_write_kv_ref

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def _randn(generator, *shape, dtype, device, scale=1.0):
    return (torch.randn(*shape, generator=generator) * scale).to(dtype).to(device)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("tokens,hidden", [(1, 64), (5, 100), (3, 512)])
@pytest.mark.parametrize("with_residual", [False, True])
def test_rms_norm_matches_reference(dtype, tokens, hidden, with_residual, generator, device, assert_close):
    x = _randn(generator, tokens, hidden, dtype=dtype, device=device, scale=3.0)
    weight = _randn(generator, hidden, dtype=dtype, device=device)
    residual = _randn(generator, tokens, hidden, dtype=dtype, device=device) if with_residual else None
    out, summed = rms_norm(x, weight, 1e-6, residual)
    ref_out, ref_summed = rms_norm_ref(x, weight, 1e-6, residual)
    assert out.shape == x.shape and out.dtype == dtype
    assert_close(out, ref_out)
    if with_residual:
        # One rounding of an exact sum; Triton's interpreter truncates to bf16 instead of rounding (1 ulp).
        rtol = 2**-7 if dtype == torch.bfloat16 else 0.0
        torch.testing.assert_close(summed, ref_summed, rtol=rtol, atol=0)
    else:
        assert summed is None


def test_rms_norm_rejects_mismatched_weight(device):
    x = torch.randn(2, 64, device=device)
    with pytest.raises(ValueError, match="weight has shape"):
        rms_norm(x, torch.ones(32, device=device), 1e-6)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("tokens,inner", [(1, 16), (4, 1100)])
def test_silu_and_mul_matches_reference(dtype, tokens, inner, generator, device, assert_close):
    x = _randn(generator, tokens, 2 * inner, dtype=dtype, device=device, scale=2.0)
    out = silu_and_mul(x)
    assert out.shape == (tokens, inner)
    assert_close(out, silu_and_mul_ref(x.float()))


def test_silu_and_mul_rejects_odd_width(device):
    with pytest.raises(ValueError, match="even"):
        silu_and_mul(torch.randn(2, 7, device=device))


def _cos_sin_cache(max_pos: int, head_dim: int, device) -> torch.Tensor:
    inv_freq = 1.0 / (500000.0 ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    angles = torch.arange(max_pos, dtype=torch.float32)[:, None] * inv_freq[None, :]
    return torch.cat([angles.cos(), angles.sin()], dim=-1).to(device)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("q_heads,kv_heads,head_dim", [(4, 4, 64), (8, 2, 128), (6, 1, 64)])
def test_rope_in_place_on_strided_views(dtype, q_heads, kv_heads, head_dim, generator, device, assert_close):
    tokens = 5
    # q and k as views into one fused QKV projection output: row strides are not their own widths.
    qkv = _randn(generator, tokens, (q_heads + 2 * kv_heads) * head_dim, dtype=dtype, device=device)
    q = qkv[:, : q_heads * head_dim].view(tokens, q_heads, head_dim)
    k = qkv[:, q_heads * head_dim : (q_heads + kv_heads) * head_dim].view(tokens, kv_heads, head_dim)
    v_before = qkv[:, (q_heads + kv_heads) * head_dim :].clone()
    positions = torch.tensor([0, 3, 17, 17, 100], device=device)
    cache = _cos_sin_cache(128, head_dim, device)
    q_ref, k_ref = q.float().clone(), k.float().clone()
    rope_ref(q_ref, k_ref, positions, cache)
    rope(q, k, positions, cache)
    assert_close(q, q_ref)
    assert_close(k, k_ref)
    assert torch.equal(qkv[:, (q_heads + kv_heads) * head_dim :], v_before), "RoPE wrote outside q and k"


def test_rope_position_zero_is_identity(device):
    q = torch.randn(1, 2, 64, device=device)
    k = torch.randn(1, 1, 64, device=device)
    q0, k0 = q.clone(), k.clone()
    rope(q, k, torch.zeros(1, dtype=torch.long, device=device), _cos_sin_cache(4, 64, device))
    assert torch.equal(q, q0) and torch.equal(k, k0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("kv_heads,head_dim,page_size", [(2, 64, 16), (1, 128, 8), (3, 64, 4)])
def test_write_kv_scatters_and_skips_negative_slots(dtype, kv_heads, head_dim, page_size, generator, device):
    tokens, num_blocks = 6, 5
    kv = _randn(generator, tokens, 2, kv_heads, head_dim, dtype=dtype, device=device)
    k, v = kv[:, 0], kv[:, 1]  # strided views, as sliced from a fused projection
    slots = torch.tensor([3, -1, page_size, 4 * page_size + page_size - 1, -1, 2 * page_size + 1], device=device)
    caches = [_randn(generator, num_blocks, page_size, kv_heads, head_dim, dtype=dtype, device=device) for _ in range(2)]
    k_cache, v_cache = (c.clone() for c in caches)
    k_ref, v_ref = (c.clone() for c in caches)
    write_kv(k, v, k_cache, v_cache, slots)
    write_kv_ref(k, v, k_ref, v_ref, slots)
    assert torch.equal(k_cache, k_ref) and torch.equal(v_cache, v_ref)
    flat = k_cache.view(-1, kv_heads, head_dim)
    assert torch.equal(flat[page_size], k[2])
    untouched = torch.ones(num_blocks * page_size, dtype=torch.bool)
    untouched[slots[slots >= 0].cpu()] = False
    assert torch.equal(flat[untouched.to(device)], caches[0].view(-1, kv_heads, head_dim)[untouched.to(device)])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("q_heads,kv_heads,head_dim,page_size", [(4, 4, 64, 16), (8, 2, 128, 8), (6, 1, 64, 4)])
def test_rope_write_kv_is_rope_then_write_kv(dtype, q_heads, kv_heads, head_dim, page_size, generator, device,
                                             assert_close):
    """The fused kernel gives bit for bit what the two kernels give, on views of a fused QKV output,
    with negative (skipped) slots, and agrees with the float32 reference."""
    tokens, num_blocks = 6, 5
    width = (q_heads + 2 * kv_heads) * head_dim
    qkv = _randn(generator, tokens, width, dtype=dtype, device=device)
    positions = torch.tensor([0, 3, 17, 17, 100, 5], device=device)
    slots = torch.tensor([3, -1, page_size, 4 * page_size + page_size - 1, -1, 2 * page_size + 1], device=device)
    cos_sin = _cos_sin_cache(128, head_dim, device)
    caches = [_randn(generator, num_blocks, page_size, kv_heads, head_dim, dtype=dtype, device=device) for _ in range(2)]

    def views(t):
        q = t[:, : q_heads * head_dim].view(tokens, q_heads, head_dim)
        k = t[:, q_heads * head_dim : (q_heads + kv_heads) * head_dim].view(tokens, kv_heads, head_dim)
        v = t[:, (q_heads + kv_heads) * head_dim :].view(tokens, kv_heads, head_dim)
        return q, k, v

    two, fused, ref = qkv.clone(), qkv.clone(), qkv.float()
    two_caches, fused_caches = [c.clone() for c in caches], [c.clone() for c in caches]
    ref_caches = [c.float() for c in caches]
    q, k, v = views(two)
    rope(q, k, positions, cos_sin)
    write_kv(k, v, *two_caches, slots)
    rope_write_kv(*views(fused), positions, cos_sin, *fused_caches, slots)
    rope_write_kv_ref(*views(ref), positions, cos_sin, *ref_caches, slots)
    assert torch.equal(fused, two)
    assert all(torch.equal(a, b) for a, b in zip(fused_caches, two_caches))
    assert_close(fused, ref)
    for got, want in zip(fused_caches, ref_caches):
        assert_close(got, want)


def test_write_kv_rejects_cache_of_other_head_count(device):
    k = torch.randn(2, 2, 64, device=device)
    cache = torch.zeros(4, 16, 4, 64, device=device)
    with pytest.raises(ValueError, match="k_cache has shape"):
        write_kv(k, k, cache, cache.clone(), torch.zeros(2, dtype=torch.long, device=device))
