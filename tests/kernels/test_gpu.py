"""On a CUDA GPU: every kernel at benchmark-like shapes in bf16, with the default (tuned) configs."""

from __future__ import annotations

import pytest
import torch

from servescope.kernels.activation import silu_and_mul, silu_and_mul_ref
from servescope.kernels.paged_decode_attention import decode_attention, decode_attention_ref
from servescope.kernels.paged_prefill_attention import prefill_attention, prefill_attention_ref
from servescope.kernels.rmsnorm import rms_norm, rms_norm_ref

pytestmark = pytest.mark.gpu


def test_decode_bf16_long_context(paged_batch, generator, assert_close):
    batch = paged_batch([4096, 1000, 4095, 17], 8, 128, page_size=16, dtype=torch.bfloat16, generator=generator)
    q = torch.randn(4, 32, 128, generator=generator).to(torch.bfloat16).cuda()
    args = (q, batch.k_cache, batch.v_cache, batch.block_tables, batch.context_lens, 128**-0.5)
    out = decode_attention(*args)
    ref = decode_attention_ref(q.float(), batch.k_cache.float(), batch.v_cache.float(), *args[3:])
    assert_close(out, ref)


def test_prefill_bf16_with_prefix(paged_batch, generator, assert_close):
    batch = paged_batch([1500, 700], 8, 128, page_size=16, dtype=torch.bfloat16, generator=generator)
    cu = torch.tensor([0, 1000, 1700], dtype=torch.int32, device="cuda")
    q = torch.randn(1700, 32, 128, generator=generator).to(torch.bfloat16).cuda()
    args = (batch.block_tables, cu, batch.context_lens, 128**-0.5)
    out = prefill_attention(q, batch.k_cache, batch.v_cache, *args)
    ref = prefill_attention_ref(q.float(), batch.k_cache.float(), batch.v_cache.float(), *args)
    assert_close(out, ref)


def test_elementwise_bf16(generator, assert_close):
    x = torch.randn(64, 4096, generator=generator).to(torch.bfloat16).cuda()
    r = torch.randn(64, 4096, generator=generator).to(torch.bfloat16).cuda()
    w = torch.randn(4096, generator=generator).to(torch.bfloat16).cuda()
    out, summed = rms_norm(x, w, 1e-5, r)
    ref, ref_summed = rms_norm_ref(x, w, 1e-5, r)
    assert torch.equal(summed, ref_summed)
    assert_close(out, ref.float())
    gate_up = torch.randn(64, 2 * 14336, generator=generator).to(torch.bfloat16).cuda()
    assert_close(silu_and_mul(gate_up), silu_and_mul_ref(gate_up.float()))


def test_gemv_decode_projections_bf16(generator, assert_close):
    """llama3-8b's decode projections at 1-16 rows, each prologue, with the config the tuned policy
    picks on this GPU (or the untuned default), plus one shape off the block grid."""
    from servescope.kernels.gemv import PROLOGUES, GemvPolicy, default_config, gemv, gemv_ref

    policy = GemvPolicy(torch.cuda.get_device_name(), mode="tuned")
    for n, k in [(6144, 4096), (4096, 4096), (28672, 4096), (4096, 14336), (6000, 4000)]:
        w = (torch.randn(n, k, generator=generator) / k**0.5).to(torch.bfloat16).cuda()
        nw = torch.randn(k, generator=generator).to(torch.bfloat16).cuda()
        for rows in (1, 2, 4, 8, 16):
            for prologue in PROLOGUES:
                width = 2 * k if prologue == "silu_mul" else k
                a = torch.randn(rows, width, generator=generator).to(torch.bfloat16).cuda()
                r = torch.randn(rows, k, generator=generator).to(torch.bfloat16).cuda() if prologue == "norm" else None
                config = policy.config(n, k, rows, prologue) or default_config(rows)
                out, summed = gemv(a, w, prologue, nw, 1e-5, r, config=config)
                ref, ref_summed = gemv_ref(a, w.float(), prologue, nw, 1e-5, r)
                assert_close(out, ref.float())
                if r is not None:
                    assert torch.equal(summed, ref_summed)


def test_rope_write_kv_bf16_is_rope_then_write_kv(generator):
    """llama3-8b's heads (32 query, 8 KV, d=128): the fused kernel equals the two kernels bit for bit."""
    from servescope.kernels.kv_write import write_kv
    from servescope.kernels.rope import rope, rope_write_kv

    tokens, hq, hkv, d, page = 5, 32, 8, 128, 16
    qkv = torch.randn(tokens, (hq + 2 * hkv) * d, generator=generator).to(torch.bfloat16).cuda()
    positions = torch.tensor([0, 7, 300, 4095, 8000], device="cuda")
    slots = torch.tensor([5, -1, 16 * 3 + 15, 64, 17], device="cuda")
    angles = torch.arange(8192, device="cuda")[:, None] * (500000.0 ** (-torch.arange(0, d, 2, device="cuda") / d))[None, :]
    cos_sin = torch.cat([angles.cos(), angles.sin()], dim=-1)
    caches = [torch.randn(8, page, hkv, d, generator=generator).to(torch.bfloat16).cuda() for _ in range(2)]

    def views(t):
        return (t[:, : hq * d].view(tokens, hq, d), t[:, hq * d : (hq + hkv) * d].view(tokens, hkv, d),
                t[:, (hq + hkv) * d :].view(tokens, hkv, d))

    two, fused = qkv.clone(), qkv.clone()
    two_caches, fused_caches = [c.clone() for c in caches], [c.clone() for c in caches]
    q, k, v = views(two)
    rope(q, k, positions, cos_sin)
    write_kv(k, v, *two_caches, slots)
    rope_write_kv(*views(fused), positions, cos_sin, *fused_caches, slots)
    assert torch.equal(fused, two)
    assert all(torch.equal(a, b) for a, b in zip(fused_caches, two_caches))
