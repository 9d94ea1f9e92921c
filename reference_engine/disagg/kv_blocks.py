"""A prompt's KV blocks out of one engine's paged cache and into another's.

The paged cache is, per layer, a (K, V) pair of [num_blocks, block_size,
kv_heads, head_dim] tensors (`ModelRunner.kv_caches`). A transfer carries the
blocks that hold the prompt, stacked as [layers, 2, blocks, block_size,
kv_heads, head_dim]; the receiving engine places them in blocks of its own
pool, whose ids differ. The tail of the last block past the prompt travels as
whatever it held: the decode engine writes those slots before it reads them.
"""

from __future__ import annotations

import torch
from torch import Tensor


def blocks_for(num_tokens: int, block_size: int) -> int:
    return -(-num_tokens // block_size)


def gather_blocks(kv_caches: list[tuple[Tensor, Tensor]], block_ids: list[int]) -> Tensor:
    """The blocks `block_ids` of every layer, as one [L, 2, n, block_size, heads, head_dim] tensor."""
    index = torch.tensor(block_ids, dtype=torch.long, device=kv_caches[0][0].device)
    return torch.stack([torch.stack((k.index_select(0, index), v.index_select(0, index))) for k, v in kv_caches])


def place_blocks(kv_caches: list[tuple[Tensor, Tensor]], block_ids: list[int], kv: Tensor) -> None:
    """Write a gathered tensor into the blocks `block_ids` of this engine's cache (same model, same layout)."""
    k0 = kv_caches[0][0]
    expected = (len(kv_caches), 2, len(block_ids), *k0.shape[1:])
    if tuple(kv.shape) != expected:
        raise ValueError(f"KV transfer of shape {tuple(kv.shape)} does not fit this engine's cache {expected}: "
                         "the prefill and decode engines must serve the same model and block size")
    index = torch.tensor(block_ids, dtype=torch.long, device=k0.device)
    kv = kv.to(device=k0.device, dtype=k0.dtype)
    for layer, (k, v) in enumerate(kv_caches):
        k.index_copy_(0, index, kv[layer, 0])
        v.index_copy_(0, index, kv[layer, 1])
