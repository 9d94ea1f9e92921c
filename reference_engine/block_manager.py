"""Paged KV block pool with reference counts and a prefix cache keyed by chained block hashes.

A FULL block's key is hash(parent key, tenant salt, its token ids): equal keys
mean an equal token prefix for the same tenant, so prefix caching falls out of
allocation. Tenants never share a block because the salt enters the first
block's key and every later key chains from it. Freed blocks that carry a key
stay cached (LRU order) until the pool needs them; blocks without a key are
handed out first, so a cached prefix is evicted only under pressure.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

from servescope.reference_engine.sequence import Sequence


@dataclass(slots=True)
class Block:
    block_id: int
    ref_count: int = 0
    key: int | None = None  # prefix-cache key when the block is full and registered
    token_ids: tuple[int, ...] = ()  # kept beside the key to rule out hash collisions


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True) -> None:
        self.block_size = block_size
        self.num_blocks = num_blocks
        self.enable_prefix_caching = enable_prefix_caching
        self.blocks = [Block(i) for i in range(num_blocks)]
        self.free_uncached: list[int] = list(range(num_blocks - 1, -1, -1))  # stack
        self.free_cached: OrderedDict[int, None] = OrderedDict()  # LRU: first = evicted first
        self.key_to_block: dict[int, int] = {}
        self.prefix_queries = 0  # prompt tokens looked up (vLLM counts tokens)
        self.prefix_hits = 0

    # -- accounting -------------------------------------------------------
    @property
    def num_free_blocks(self) -> int:
        return len(self.free_uncached) + len(self.free_cached)

    @property
    def usage(self) -> float:
        """Fraction of blocks held by live sequences (cached free blocks count as free, as in vLLM)."""
        return 1.0 - self.num_free_blocks / self.num_blocks

    def _block_key(self, parent: int | None, salt: str, tokens: tuple[int, ...]) -> int:
        return hash((parent, salt if parent is None else None, tokens))

    # -- allocation -------------------------------------------------------
    def _take_free_block(self) -> Block:
        if self.free_uncached:
            block = self.blocks[self.free_uncached.pop()]
        else:
            block_id, _ = self.free_cached.popitem(last=False)
            block = self.blocks[block_id]
            del self.key_to_block[block.key]  # evict
            block.key, block.token_ids = None, ()
        block.ref_count = 1
        return block

    def lookup(self, seq: Sequence) -> list[Block]:
        """Leading full blocks of `seq` already in the cache (never the block holding its last token,
        whose logits must be computed)."""
        if not self.enable_prefix_caching:
            return []
        hits: list[Block] = []
        parent: int | None = None
        bs = self.block_size
        for i in range((seq.num_tokens - 1) // bs):
            tokens = tuple(seq.token_ids[i * bs:(i + 1) * bs])
            key = self._block_key(parent, seq.tenant, tokens)
            block_id = self.key_to_block.get(key)
            if block_id is None or self.blocks[block_id].token_ids != tokens:
                break
            hits.append(self.blocks[block_id])
            parent = key
        return hits

    def can_admit(self, hits: list[Block], num_new_tokens: int) -> bool:
        """Whether a sequence holding no blocks can take `hits` plus room for `num_new_tokens` more."""
        reused_free = sum(1 for b in hits if b.ref_count == 0)
        needed = -(-(len(hits) * self.block_size + num_new_tokens) // self.block_size) - len(hits)
        return needed + reused_free <= self.num_free_blocks

    def admit(self, seq: Sequence, hits: list[Block]) -> int:
        """Attach the cached prefix blocks (from `lookup`) to a fresh sequence; returns the tokens they cover."""
        assert not seq.block_table, "admit() is for sequences holding no blocks"
        for block in hits:
            if block.ref_count == 0:
                del self.free_cached[block.block_id]
            block.ref_count += 1
            seq.block_table.append(block.block_id)
        cached = len(hits) * self.block_size
        seq.num_computed_tokens = cached
        seq.num_hashed_blocks = len(hits)
        if seq.num_cached_tokens is None:  # the first admission is what the client's usage reports
            seq.num_cached_tokens = cached
            self.prefix_queries += seq.num_tokens
            self.prefix_hits += cached
        return cached

    def blocks_short(self, seq: Sequence, num_new_tokens: int) -> int:
        """How many more blocks `seq` needs to hold `num_new_tokens` beyond its computed ones."""
        need = -(-(seq.num_computed_tokens + num_new_tokens) // self.block_size)
        return max(0, need - len(seq.block_table))

    def can_append(self, seq: Sequence, num_new_tokens: int) -> bool:
        return self.blocks_short(seq, num_new_tokens) <= self.num_free_blocks

    def append_slots(self, seq: Sequence, num_new_tokens: int) -> None:
        """Grow the block table so `num_new_tokens` more tokens have slots (caller checked can_append)."""
        for _ in range(self.blocks_short(seq, num_new_tokens)):
            seq.block_table.append(self._take_free_block().block_id)

    # -- after a step -----------------------------------------------------
    def commit(self, seq: Sequence) -> None:
        """Register newly filled blocks in the prefix cache and drop blocks past the computed tokens
        (rejected speculative drafts)."""
        bs = self.block_size
        keep = -(-seq.num_tokens // bs)  # room for every token, including the next one to compute
        while len(seq.block_table) > keep:
            self._release(seq.block_table.pop())
        if not self.enable_prefix_caching:
            return
        full = seq.num_computed_tokens // bs
        parent = self.blocks[seq.block_table[seq.num_hashed_blocks - 1]].key if seq.num_hashed_blocks else None
        for i in range(seq.num_hashed_blocks, full):
            block = self.blocks[seq.block_table[i]]
            tokens = tuple(seq.token_ids[i * bs:(i + 1) * bs])
            key = self._block_key(parent, seq.tenant, tokens)
            # Where another sequence registered the same prefix first, this copy stays private; its
            # children still chain from the shared key, so later lookups work.
            if block.key is None and key not in self.key_to_block:
                block.key, block.token_ids = key, tokens
                self.key_to_block[key] = block.block_id
            parent = key
            seq.num_hashed_blocks = i + 1

    # -- release ----------------------------------------------------------
    def _release(self, block_id: int) -> None:
        block = self.blocks[block_id]
        block.ref_count -= 1
        assert block.ref_count >= 0, f"block {block_id} released twice"
        if block.ref_count == 0:
            if block.key is not None:
                self.free_cached[block_id] = None
            else:
                self.free_uncached.append(block_id)

    def free(self, seq: Sequence) -> None:
        """Return every block of `seq` (finish, abort or preemption). Tail blocks go to the LRU first,
        so they are evicted before the shared head of the prefix."""
        for block_id in reversed(seq.block_table):
            self._release(block_id)
        seq.block_table.clear()
        seq.num_computed_tokens = 0
        seq.num_hashed_blocks = 0
