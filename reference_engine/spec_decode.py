"""N-gram (prompt lookup) draft proposer: guess the next tokens by finding the last n tokens earlier on.

No draft model: when the recent n-gram occurred before in the prompt or the
output, the k tokens that followed it are proposed. Each sequence keeps an
index {n-gram: position after its latest occurrence} that grows with its
tokens, so a proposal is a few dict lookups per step instead of a scan of a
16k-token prompt.
"""

from __future__ import annotations

from servescope.reference_engine.config import SpecConfig
from servescope.reference_engine.sequence import Sequence


class NgramIndex:
    """Latest end position of every 1..n-gram of a growing token list."""

    __slots__ = ("n", "positions", "indexed_upto")

    def __init__(self, n: int) -> None:
        self.n = n
        self.positions: dict[tuple[int, ...], int] = {}
        self.indexed_upto = 0  # n-grams ending before this position are indexed

    def update(self, token_ids: list[int], upto: int) -> None:
        for end in range(max(self.indexed_upto, 1), upto):
            for size in range(1, min(self.n, end) + 1):
                self.positions[tuple(token_ids[end - size:end])] = end
        self.indexed_upto = max(self.indexed_upto, upto)


class NgramProposer:
    def __init__(self, config: SpecConfig) -> None:
        self.k = config.k
        self.n = config.n

    def propose(self, seq: Sequence, max_drafts: int) -> list[int]:
        """Up to min(k, max_drafts) tokens that followed the latest earlier occurrence of the trailing
        n-gram (trying n, n-1, ..., 1); [] when nothing matches."""
        limit = min(self.k, max_drafts)
        tokens = seq.token_ids
        total = len(tokens)
        if limit <= 0 or total < 2:
            return []
        index = seq.ngram_index
        if index is None:
            index = seq.ngram_index = NgramIndex(self.n)
        # Index n-grams that end strictly before the trailing one, so a match is an EARLIER occurrence.
        index.update(tokens, total)
        for size in range(min(self.n, total - 1), 0, -1):
            end = index.positions.get(tuple(tokens[total - size:]))
            if end is not None and end < total:
                return tokens[end:end + limit]
        return []
