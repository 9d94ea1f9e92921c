"""Block pool invariants: nothing leaks, prefixes hit exactly whole blocks, tenants never share, LRU eviction."""

from __future__ import annotations

import random

from servescope.reference_engine.block_manager import BlockManager
from servescope.reference_engine.sequence import SamplingParams, Sequence

BS = 4


def _seq(tokens: list[int], tenant: str = "") -> Sequence:
    return Sequence(tokens, SamplingParams(max_tokens=8), tenant=tenant)


def _admit_and_compute(bm: BlockManager, seq: Sequence) -> int:
    """Admit, give slots to the uncached rest, mark it computed and register full blocks."""
    hits = bm.lookup(seq)
    assert bm.can_admit(hits, seq.num_tokens - len(hits) * BS)
    cached = bm.admit(seq, hits)
    bm.append_slots(seq, seq.num_tokens - cached)
    seq.num_computed_tokens = seq.num_tokens
    bm.commit(seq)
    return cached


def test_random_allocations_finishes_aborts_and_preemptions_leave_every_block_free() -> None:
    rng = random.Random(7)
    bm = BlockManager(num_blocks=64, block_size=BS)
    live: list[Sequence] = []
    shared_prefix = [rng.randrange(100) for _ in range(10)]
    for _ in range(400):
        action = rng.random()
        if action < 0.45:
            tokens = (shared_prefix if rng.random() < 0.5 else []) + [rng.randrange(100) for _ in range(rng.randint(1, 14))]
            seq = _seq(tokens, tenant=rng.choice(["", "a"]))
            hits = bm.lookup(seq)
            if bm.can_admit(hits, seq.num_tokens - len(hits) * BS):
                _admit_and_compute(bm, seq)
                live.append(seq)
        elif action < 0.75 and live:  # decode a few tokens
            seq = rng.choice(live)
            for _ in range(rng.randint(1, 6)):
                if not bm.can_append(seq, 1):
                    break
                bm.append_slots(seq, 1)
                seq.num_computed_tokens += 1
                seq.token_ids.append(rng.randrange(100))
                bm.commit(seq)
        elif live:  # finish, abort or preempt: all of them release every block
            seq = live.pop(rng.randrange(len(live)))
            bm.free(seq)
        used = sum(len(s.block_table) for s in live)
        assert bm.num_free_blocks >= bm.num_blocks - used
        assert all(b.ref_count >= 0 for b in bm.blocks)
    for seq in live:
        bm.free(seq)
    assert bm.num_free_blocks == bm.num_blocks
    assert all(b.ref_count == 0 for b in bm.blocks)
    assert bm.usage == 0.0


def test_shared_prefix_hits_exactly_the_whole_blocks() -> None:
    bm = BlockManager(num_blocks=32, block_size=BS)
    base = list(range(100, 111))  # 11 tokens: blocks [0:4] and [4:8] are full
    first = _seq(base)
    assert _admit_and_compute(bm, first) == 0
    assert _admit_and_compute(bm, _seq(base[:8] + [1, 2, 3])) == 8
    assert _admit_and_compute(bm, _seq(base[:7] + [9, 9, 9, 9])) == 4  # 2nd block differs in its last token
    assert _admit_and_compute(bm, _seq(base[:8])) == 4  # the block holding the last token is always computed
    assert _admit_and_compute(bm, _seq([5] + base[1:])) == 0
    assert bm.prefix_hits == 8 + 4 + 4
    # Shared blocks are counted once: the two full blocks of `base` are referenced by several sequences.
    assert bm.blocks[first.block_table[0]].ref_count == 4


def test_tenants_never_share_blocks() -> None:
    bm = BlockManager(num_blocks=32, block_size=BS)
    tokens = list(range(20))
    a1, b1, a2 = _seq(tokens, "alice"), _seq(tokens, "bob"), _seq(tokens, "alice")
    assert _admit_and_compute(bm, a1) == 0
    assert _admit_and_compute(bm, b1) == 0
    assert _admit_and_compute(bm, a2) == 16
    assert not set(a1.block_table) & set(b1.block_table)
    assert set(a1.block_table[:4]) == set(a2.block_table[:4])


def test_freed_prefix_stays_cached_until_the_pool_needs_it_then_lru_goes_first() -> None:
    bm = BlockManager(num_blocks=6, block_size=BS)
    old, new = _seq(list(range(9))), _seq(list(range(50, 59)))
    _admit_and_compute(bm, old)
    _admit_and_compute(bm, new)
    bm.free(old)
    bm.free(new)
    assert bm.num_free_blocks == 6 and bm.usage == 0.0
    assert _admit_and_compute(bm, _seq(list(range(9)))) == 8  # still cached after being freed
    bm.free(bm_seq := _seq(list(range(9))))  # no-op for a sequence without blocks
    assert not bm_seq.block_table
    hog = _seq(list(range(200, 209)))  # needs 3 blocks: 1 uncached free + 2 evicted
    _admit_and_compute(bm, hog)
    assert bm.lookup(_seq(list(range(50, 59)))) == []  # the least recently freed prefix was evicted
