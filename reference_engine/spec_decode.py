"""N-gram (prompt lookup) speculation: the draft proposer, and the engine's drafting state around it.

No draft model: when the recent n-gram occurred before in the prompt or the
output, the k tokens that followed it are proposed. Each sequence keeps an
index {n-gram: position after its latest occurrence} that grows with its
tokens, so a proposal is a few dict lookups per step instead of a scan of a
16k-token prompt.

`Drafter` decides, step by step, who drafts and how far (draft_policy.py says
how): it feeds each request's verified drafts, and shadow proposals checked
against the tokens a request produced without drafting, into its acceptance
rate, and the engine's measured step times into the step-time table.
"""

from __future__ import annotations

from servescope.reference_engine.config import SpecConfig
from servescope.reference_engine.draft_policy import (
    PLAIN,
    POPULATION_DECAY,
    SPEC,
    Acceptance,
    DraftCandidate,
    StepTimes,
    drafting_can_pay,
    plan_drafts,
)
from servescope.reference_engine.sequence import Sequence, SequenceStatus


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

    def propose(self, seq: Sequence, max_drafts: int, context_len: int | None = None) -> list[int]:
        """Up to min(k, max_drafts) tokens that followed the latest earlier occurrence of the trailing
        n-gram (trying n, n-1, ..., 1), continued periodically where they run into the trailing
        n-gram itself; [] when nothing matches. `context_len`: propose from the first
        that many tokens only (the rest are not sampled yet)."""
        limit = min(self.k, max_drafts)
        tokens = seq.token_ids
        total = len(tokens) if context_len is None else context_len
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
                # The match ends `period` tokens back: past the known tokens the same run repeats, so
                # a match in a short loop still proposes `limit` tokens (the loop, continued).
                period = total - end
                return [tokens[end + i % period] for i in range(limit)]
        return []


class Drafter:
    """The engine's speculation: this step's draft lengths, and what was learnt from the last ones.

    With `SpecConfig.adaptive` off every decoding request drafts up to k tokens each step (the fixed
    policy, kept to measure against)."""

    def __init__(self, config: SpecConfig) -> None:
        self.proposer = NgramProposer(config)
        self.k = config.k
        self.adaptive = config.adaptive
        self.population = Acceptance()  # every request's outcomes: the prior of one with little history
        self.times = StepTimes()
        self.other_tokens = 0  # prefill tokens of the last step: the next one likely has as many
        # Whether shadow proposals are made and scored: only while drafting could pay at this batch size.
        self.tracking = True

    @staticmethod
    def acceptance(seq: Sequence) -> Acceptance:
        if seq.draft_acceptance is None:
            seq.draft_acceptance = Acceptance()
        return seq.draft_acceptance

    def plan(self, running: list[Sequence], max_model_len: int) -> dict[int, int]:
        """Most drafts per decoding sequence (by seq_id) for the next step; {}: a plain step."""
        decoding = [s for s in running
                    if s.status is SequenceStatus.RUNNING and s.num_tokens - s.num_computed_tokens == 1]
        if not self.adaptive:
            return {s.seq_id: self.k for s in decoding}
        prior = self.population.rate()
        candidates = [DraftCandidate(s.seq_id, self.acceptance(s).rate(prior),
                                     min(self.k, s.params.max_tokens - s.num_output_tokens - 1,
                                         max_model_len - s.num_tokens))
                      for s in decoding]
        most = sum(max(0, c.room) for c in candidates)
        self.tracking = drafting_can_pay(len(decoding), self.other_tokens, most, self.times)
        if not self.tracking:
            return {}
        return plan_drafts(candidates, len(decoding), self.other_tokens, self.times)

    def verified(self, seq: Sequence, drafted: int, accepted: int) -> None:
        """A verified draft: `accepted` of its `drafted` tokens were kept."""
        acc = self.acceptance(seq)
        acc.record(drafted, accepted)
        self.population.record(drafted, accepted, POPULATION_DECAY)
        acc.shadow_at = -1  # the pending shadow overlaps tokens the real draft just judged

    def shadow(self, seq: Sequence, known: int) -> None:
        """A request that did not draft now knows its first `known` tokens: score its pending shadow
        proposal against them, and make a new one when none is pending."""
        if not self.adaptive or not self.tracking:
            return
        acc = self.acceptance(seq)
        if acc.shadow_at >= 0:
            got = seq.token_ids[acc.shadow_at:known]
            matched = 0
            for draft, token in zip(acc.shadow, got):
                if draft != token:
                    break
                matched += 1
            if matched == len(got) < len(acc.shadow):
                return  # all matched so far, more tokens to come
            acc.record(len(acc.shadow), matched)
            self.population.record(len(acc.shadow), matched, POPULATION_DECAY)
            acc.shadow_at = -1
        room = min(self.k, seq.params.max_tokens - (known - seq.num_prompt_tokens) - 1)
        drafts = self.proposer.propose(seq, room, context_len=known) if room > 0 else []
        if drafts:
            acc.shadow, acc.shadow_at = drafts, known

    def step_timed(self, drafted: bool, tokens: int, other_tokens: int, seconds: float) -> None:
        """A finished step's wall seconds (from its start to the next step's), its size and kind."""
        self.times.observe(SPEC if drafted else PLAIN, tokens, seconds)
        self.other_tokens = other_tokens
