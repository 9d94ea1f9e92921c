"""Paged decode and prefill/extend attention against their plain-torch references.

Lengths are chosen to end mid-page, exactly on a page edge and at one token;
block tables are shuffled and wider than needed, so wrong indirection shows.
"""

from __future__ import annotations

import pytest
import torch

from servescope.kernels.paged_decode_attention import (
    DecodeConfig,
    choose_num_splits,
    decode_attention,
    decode_attention_ref,
)
from servescope.kernels.paged_prefill_attention import PrefillConfig, prefill_attention, prefill_attention_ref

# 1 token, mid-page, a page edge (16, 48), one past an edge, several pages.
DECODE_LENS = [1, 7, 16, 17, 48, 70]


@pytest.mark.parametrize("group", [1, 4, 8])
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("num_splits", [1, 3])
def test_decode_matches_reference(group, head_dim, num_splits, paged_batch, generator, device, assert_close):
    kv_heads = 2 if group < 8 else 1
    batch = paged_batch(DECODE_LENS, kv_heads, head_dim, page_size=16, dtype=torch.float32, generator=generator)
    q = torch.randn(len(DECODE_LENS), kv_heads * group, head_dim, generator=generator).to(device)
    config = DecodeConfig(block_n=16, num_splits=num_splits)
    args = (q, batch.k_cache, batch.v_cache, batch.block_tables, batch.context_lens, head_dim**-0.5)
    assert_close(decode_attention(*args, config=config), decode_attention_ref(*args))


@pytest.mark.parametrize(
    "page_size,block_n", [(4, 32), (64, 16), (8, 8 * 2)], ids=["tile-spans-pages", "page-spans-tiles", "equal-ish"]
)
def test_decode_page_and_tile_sizes_differ(page_size, block_n, paged_batch, generator, device, assert_close):
    batch = paged_batch([3, 64, 65, 100], 2, 64, page_size=page_size, dtype=torch.float32, generator=generator)
    q = torch.randn(4, 8, 64, generator=generator).to(device)
    args = (q, batch.k_cache, batch.v_cache, batch.block_tables, batch.context_lens, 0.125)
    assert_close(decode_attention(*args, config=DecodeConfig(block_n=block_n, num_splits=2)), decode_attention_ref(*args))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_decode_half_precision(dtype, paged_batch, generator, device, assert_close):
    batch = paged_batch([5, 33, 64], 2, 128, page_size=16, dtype=dtype, generator=generator)
    q = torch.randn(3, 8, 128, generator=generator).to(dtype).to(device)
    args = (q, batch.k_cache, batch.v_cache, batch.block_tables, batch.context_lens, 128**-0.5)
    out = decode_attention(*args, config=DecodeConfig(block_n=32, num_splits=2))
    assert out.dtype == dtype
    assert_close(out, decode_attention_ref(q.float(), batch.k_cache.float(), batch.v_cache.float(), *args[3:]))


def test_decode_default_config_chooses_splits_for_small_batches(paged_batch, generator, device, assert_close):
    # One sequence, one KV head: the default config splits the context to fill the GPU.
    batch = paged_batch([600], 1, 64, page_size=16, dtype=torch.float32, generator=generator)
    assert choose_num_splits(1, 1, batch.block_tables.shape[1] * 16, DecodeConfig(), torch.device("cpu")) > 1
    q = torch.randn(1, 4, 64, generator=generator).to(device)
    args = (q, batch.k_cache, batch.v_cache, batch.block_tables, batch.context_lens, 0.125)
    assert_close(decode_attention(*args), decode_attention_ref(*args))


def test_decode_rejects_head_counts_that_do_not_group(paged_batch, generator, device):
    batch = paged_batch([4], 3, 64, page_size=16, dtype=torch.float32, generator=generator)
    q = torch.randn(1, 4, 64).to(device)
    with pytest.raises(ValueError, match="multiple of KV heads"):
        decode_attention(q, batch.k_cache, batch.v_cache, batch.block_tables, batch.context_lens, 0.125)


def test_decode_config_validates():
    with pytest.raises(ValueError, match="power of two"):
        DecodeConfig(block_n=48)


def _prefill_case(context_lens, new_lens, kv_heads, group, head_dim, dtype, paged_batch, generator, device):
    batch = paged_batch(context_lens, kv_heads, head_dim, page_size=16, dtype=dtype, generator=generator)
    cu = torch.tensor([0, *torch.tensor(new_lens).cumsum(0).tolist()], dtype=torch.int32, device=device)
    q = torch.randn(int(cu[-1]), kv_heads * group, head_dim, generator=generator).to(dtype).to(device)
    return q, batch.k_cache, batch.v_cache, batch.block_tables, cu, batch.context_lens, head_dim**-0.5


# (context, new) per sequence: plain prefill, prefix-cache hit ending mid-page, a chunk whose
# prefix ends on a page edge, a single new token, and a sequence with nothing new this step.
PREFILL_MIX = ([20, 45, 48, 9, 16], [20, 13, 16, 1, 0])


@pytest.mark.parametrize("group", [1, 4, 8])
@pytest.mark.parametrize("head_dim", [64, 128])
def test_prefill_matches_reference(group, head_dim, paged_batch, generator, device, assert_close):
    kv_heads = 2 if group < 8 else 1
    args = _prefill_case(*PREFILL_MIX, kv_heads, group, head_dim, torch.float32, paged_batch, generator, device)
    out = prefill_attention(*args, config=PrefillConfig(block_m=16, block_n=16))
    assert_close(out, prefill_attention_ref(*args))


@pytest.mark.parametrize("block_m,block_n", [(32, 16), (16, 32)])
def test_prefill_tile_shapes(block_m, block_n, paged_batch, generator, device, assert_close):
    # A long chunk after a long prefix: several unmasked tiles, then the diagonal.
    args = _prefill_case([90, 37], [40, 37], 2, 2, 64, torch.float32, paged_batch, generator, device)
    out = prefill_attention(*args, max_seqlen_q=40, config=PrefillConfig(block_m=block_m, block_n=block_n))
    assert_close(out, prefill_attention_ref(*args))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_prefill_half_precision(dtype, paged_batch, generator, device, assert_close):
    q, k_cache, v_cache, *rest = _prefill_case([40, 21], [24, 21], 2, 4, 128, dtype, paged_batch, generator, device)
    out = prefill_attention(q, k_cache, v_cache, *rest, config=PrefillConfig(block_m=16, block_n=32))
    assert out.dtype == dtype
    assert_close(out, prefill_attention_ref(q.float(), k_cache.float(), v_cache.float(), *rest))


def test_prefill_single_token_extend_equals_decode(paged_batch, generator, device, assert_close):
    # One new token per sequence through the extend path must give what the decode kernel gives.
    args = _prefill_case([17, 32, 5], [1, 1, 1], 2, 4, 64, torch.float32, paged_batch, generator, device)
    q, k_cache, v_cache, tables, _, context_lens, scale = args
    extend = prefill_attention(*args, config=PrefillConfig(block_m=16, block_n=16))
    decode = decode_attention(q, k_cache, v_cache, tables, context_lens, scale, DecodeConfig(block_n=16, num_splits=1))
    assert_close(extend, decode.float())


def test_default_config_split_tiles_match_reference(paged_batch, generator, device, assert_close) -> None:
    """The default config streams long splits in its bigger split tiles (128 tokens, 2 stages):
    contexts ending mid-page and mid-tile, one shorter than a tile, against the reference."""
    from dataclasses import replace

    from servescope.kernels.paged_decode_attention import DEFAULT_CONFIG, SPLIT_TILES_MIN

    assert DEFAULT_CONFIG.split_block_n == 128 and DEFAULT_CONFIG.block_n == 64
    batch = paged_batch([1500, 95, 2000], 2, 64, 16, torch.bfloat16, generator)
    q = torch.randn(3, 8, 64, generator=generator).to(torch.bfloat16).to(device)
    args = (q, batch.k_cache, batch.v_cache, batch.block_tables, batch.context_lens, 0.125)
    # Two splits of ~1k tokens: long enough for the split tile; the rule's own choice uses short ones.
    assert batch.block_tables.shape[1] * 16 // 2 >= SPLIT_TILES_MIN * 128
    for config in (replace(DEFAULT_CONFIG, num_splits=2), DEFAULT_CONFIG):
        assert_close(decode_attention(*args, config=config), decode_attention_ref(*args))
