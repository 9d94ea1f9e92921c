"""TritonOps: one attention layer's kernel calls in the order the engine makes them."""

from __future__ import annotations

import inspect

import pytest
import torch

from servescope.kernels.backend import TritonOps
from servescope.kernels.kv_write import write_kv_ref
from servescope.kernels.paged_decode_attention import DecodeConfig, decode_attention_ref
from servescope.kernels.paged_prefill_attention import PrefillConfig, prefill_attention_ref

OPS_METHODS = ["rms_norm", "rope", "silu_and_mul", "write_kv", "decode_attention", "prefill_attention",
               "rope_write_kv", "linear", "norm_linear", "silu_mul_linear"]


def test_prefill_then_decode_through_the_cache(generator, device, assert_close):
    """Chunked prefill of two sequences, then one decode step, all through TritonOps' paged cache."""
    ops = TritonOps(DecodeConfig(block_n=16, num_splits=2), PrefillConfig(block_m=16, block_n=16))
    kv_heads, q_heads, head_dim, page = 2, 8, 64, 16
    k_cache = torch.zeros(8, page, kv_heads, head_dim, device=device)
    v_cache = torch.zeros_like(k_cache)
    tables = torch.tensor([[3, 0, 5], [1, 6, 2]], dtype=torch.int32, device=device)
    prompt_lens = [21, 33]

    def slots(seq: int, positions: range) -> list[int]:
        return [int(tables[seq, p // page]) * page + p % page for p in positions]

    def rand(*shape):
        return torch.randn(*shape, generator=generator).to(device)

    # Step 1: the first 16 tokens of each prompt; step 2: the rest; step 3: one decode token each.
    steps = [
        [range(0, 16), range(0, 16)],
        [range(16, 21), range(16, 33)],
        [range(21, 22), range(33, 34)],
    ]
    for step, ranges in enumerate(steps):
        new = [len(r) for r in ranges]
        tokens = sum(new)
        k, v, q = rand(tokens, kv_heads, head_dim), rand(tokens, kv_heads, head_dim), rand(tokens, q_heads, head_dim)
        slot_mapping = torch.tensor(slots(0, ranges[0]) + slots(1, ranges[1]), device=device)
        k_ref, v_ref = k_cache.clone(), v_cache.clone()
        write_kv_ref(k, v, k_ref, v_ref, slot_mapping)
        ops.write_kv(k, v, k_cache, v_cache, slot_mapping)
        assert torch.equal(k_cache, k_ref) and torch.equal(v_cache, v_ref)
        context_lens = torch.tensor([r.stop for r in ranges], dtype=torch.int32, device=device)
        if step < 2:
            cu = torch.tensor([0, new[0], tokens], dtype=torch.int32, device=device)
            out = ops.prefill_attention(q, k_cache, v_cache, tables, cu, context_lens, head_dim**-0.5)
            ref = prefill_attention_ref(q, k_cache, v_cache, tables, cu, context_lens, head_dim**-0.5)
        else:
            out = ops.decode_attention(q, k_cache, v_cache, tables, context_lens, head_dim**-0.5)
            ref = decode_attention_ref(q, k_cache, v_cache, tables, context_lens, head_dim**-0.5)
        assert_close(out, ref)
    assert [r.stop for r in steps[-1]] == [p + 1 for p in prompt_lens]


def test_same_methods_as_torch_ops():
    """TritonOps is a drop-in for the engine's TorchOps: same method names and parameters."""
    ops_module = pytest.importorskip("servescope.reference_engine.ops", reason="reference_engine/ops.py not built yet")
    torch_ops = ops_module.TorchOps
    for name in OPS_METHODS:
        ours = list(inspect.signature(getattr(TritonOps, name)).parameters)
        theirs = list(inspect.signature(getattr(torch_ops, name)).parameters)
        assert ours == theirs, f"{name}: TritonOps takes {ours}, TorchOps takes {theirs}"
