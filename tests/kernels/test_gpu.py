"""On a CUDA GPU: every kernel at benchmark-like shapes in bf16, with the default (tuned) configs."""

from __future__ import annotations

import pytest
import torch

from kernels.activation import silu_and_mul, silu_and_mul_ref
from kernels.paged_decode_attention import decode_attention, decode_attention_ref
from kernels.paged_prefill_attention import prefill_attention, prefill_attention_ref
from kernels.rmsnorm import rms_norm, rms_norm_ref

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
