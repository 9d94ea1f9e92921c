"""Iteration-level continuous batching: `schedule()` picks this step's tokens, `postprocess()` consumes samples.

Chunked prefill (the default): running sequences go first, decodes (with their
speculative drafts) and unfinished prefills, then waiting requests are admitted
into whatever is left of the per-step token budget, their prompts cut into
chunks. With chunked prefill off, a waiting prompt is prefilled whole in a step
of its own and the decodes wait for it: the convoy effect, on purpose.

When the KV pool runs dry the latest-arrived running sequence is preempted: its
blocks are freed and it goes back to the head of the queue to be recomputed
(its own blocks often come back as prefix-cache hits).
"""

from __future__ import annotations

import bisect
import time
from collections import deque
from dataclasses import dataclass, field

from servescope.reference_engine.block_manager import BlockManager
from servescope.reference_engine.config import EngineConfig
from servescope.reference_engine.sequence import Sequence, SequenceStatus, stop_reason
from servescope.reference_engine.spec_decode import NgramProposer


@dataclass(slots=True)
class ScheduledSeq:
    seq: Sequence
    num_new_tokens: int  # tokens whose K/V this step computes (drafts included)
    drafts: list[int] = field(default_factory=list)

    @property
    def samples(self) -> bool:
        """Whether this step reaches the sequence's last token, so its logits give the next token."""
        return self.seq.num_computed_tokens + self.num_new_tokens - len(self.drafts) == self.seq.num_tokens

    @property
    def is_decode(self) -> bool:
        return self.num_new_tokens == 1


@dataclass(slots=True)
class SchedulerOutput:
    scheduled: list[ScheduledSeq]  # single-token decodes first, then multi-token segments

    @property
    def num_tokens(self) -> int:
        return sum(s.num_new_tokens for s in self.scheduled)


class Scheduler:
    def __init__(self, config: EngineConfig, block_manager: BlockManager, eos_token_ids: tuple[int, ...],
                 proposer: NgramProposer | None = None) -> None:
        self.config = config
        self.bm = block_manager
        self.eos_token_ids = frozenset(eos_token_ids)
        self.proposer = proposer
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []  # sorted by arrival time: the last one is the preemption victim
        self.num_preemptions = 0
        self.spec_draft_tokens = 0
        self.spec_accepted_tokens = 0

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def finish(self, seq: Sequence, reason: str) -> None:
        """Finish (or abort) a sequence wherever it is and return its blocks."""
        if seq.status is SequenceStatus.FINISHED:
            return
        if seq.status is SequenceStatus.RUNNING:
            self.running.remove(seq)
        else:
            try:
                self.waiting.remove(seq)
            except ValueError:
                pass
        seq.status = SequenceStatus.FINISHED
        seq.finish_reason = reason
        self.bm.free(seq)

    # -- scheduling ---------------------------------------------------------
    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self.bm.free(seq)
        seq.status = SequenceStatus.WAITING
        seq.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(seq)

    def _drafts(self, seq: Sequence, budget: int, most: int) -> list[int]:
        if self.proposer is None or most <= 0:
            return []
        # Never draft past max_tokens: the bonus token already covers the last position.
        room = min(most, budget - 1, seq.params.max_tokens - seq.num_output_tokens - 1,
                   (self.config.max_model_len or 1 << 62) - seq.num_tokens)
        return self.proposer.propose(seq, room) if room > 0 else []

    def _schedule_running(self, budget: int, scheduled: list[ScheduledSeq], preempted: list[Sequence],
                          decodes_only: bool, draft_lengths: dict[int, int]) -> int:
        for seq in list(self.running):
            if seq.status is not SequenceStatus.RUNNING or budget <= 0:
                continue
            remaining = seq.num_tokens - seq.num_computed_tokens
            if remaining == 1:
                drafts = self._drafts(seq, budget, draft_lengths.get(seq.seq_id, 0))
                num_new = 1 + len(drafts)
            elif decodes_only:
                continue
            else:
                drafts, num_new = [], min(remaining, budget)
            if drafts and not self.bm.can_append(seq, num_new):
                drafts, num_new = [], 1
            while not self.bm.can_append(seq, num_new):
                victim = self.running[-1]
                self._preempt(victim)
                preempted.append(victim)
                if victim is seq:
                    break
            if seq.status is not SequenceStatus.RUNNING:
                continue
            self.bm.append_slots(seq, num_new)
            scheduled.append(ScheduledSeq(seq, num_new, drafts))
            budget -= num_new
        return budget

    def _admit_waiting(self, budget: int, scheduled: list[ScheduledSeq], whole_prompts: bool) -> int:
        now = time.perf_counter()
        while self.waiting and len(self.running) < self.config.max_num_seqs:
            seq = self.waiting[0]
            hits = self.bm.lookup(seq)
            cached = len(hits) * self.bm.block_size
            remaining = seq.num_tokens - cached
            if whole_prompts:
                # A prompt longer than the budget still runs, alone, rather than never.
                if remaining > budget and scheduled:
                    break
                num_new = remaining
            else:
                if budget <= 0:
                    break
                num_new = min(remaining, budget)
            if not self.bm.can_admit(hits, num_new):
                break
            self.waiting.popleft()
            self.bm.admit(seq, hits)
            self.bm.append_slots(seq, num_new)
            seq.status = SequenceStatus.RUNNING
            if seq.first_scheduled_time is None:
                seq.first_scheduled_time = now
            bisect.insort(self.running, seq, key=lambda s: s.arrival_time)
            scheduled.append(ScheduledSeq(seq, num_new))
            budget -= num_new
        return budget

    def schedule(self, draft_lengths: dict[int, int] | None = None) -> SchedulerOutput:
        """This step's batch; `draft_lengths`: the most drafts each decoding sequence (by seq_id) may
        carry (the engine's drafter decides; none when absent)."""
        draft_lengths = draft_lengths or {}
        budget = self.config.max_num_batched_tokens
        scheduled: list[ScheduledSeq] = []
        preempted: list[Sequence] = []
        if self.config.chunked_prefill:
            budget = self._schedule_running(budget, scheduled, preempted, decodes_only=False,
                                            draft_lengths=draft_lengths)
            if not preempted:
                self._admit_waiting(budget, scheduled, whole_prompts=False)
        else:
            # Prefill first, alone: decodes stall behind every admitted prompt.
            self._admit_waiting(budget, scheduled, whole_prompts=True)
            if not scheduled:
                self._schedule_running(budget, scheduled, preempted, decodes_only=True,
                                       draft_lengths=draft_lengths)
        scheduled.sort(key=lambda s: not s.is_decode)  # stable: decode rows first
        return SchedulerOutput(scheduled)

    # -- after the forward pass --------------------------------------------
    def postprocess(self, out: SchedulerOutput, sampled: list[list[int]]) -> list[tuple[Sequence, list[int]]]:
        """Apply the sampled tokens (one list per sampling ScheduledSeq, in order); returns
        (sequence, tokens appended this step) for every sequence that got tokens."""
        results: list[tuple[Sequence, list[int]]] = []
        samples = iter(sampled)
        now = time.perf_counter()
        for item in out.scheduled:
            seq = item.seq
            if not item.samples:
                seq.num_computed_tokens += item.num_new_tokens
                self.bm.commit(seq)
                continue
            tokens = next(samples)
            accepted = len(tokens) - 1
            seq.num_computed_tokens += item.num_new_tokens - (len(item.drafts) - accepted)
            if item.drafts:
                seq.spec_draft_tokens += len(item.drafts)
                seq.spec_accepted_tokens += accepted
                self.spec_draft_tokens += len(item.drafts)
                self.spec_accepted_tokens += accepted
            appended, reason = self._append(seq, tokens)
            if seq.first_token_time is None:
                seq.first_token_time = now
            else:
                seq.last_token_gap = now - seq.last_token_time
            seq.last_token_time = now
            if reason is None:
                self.bm.commit(seq)
            else:
                self.finish(seq, reason)
            results.append((seq, appended))
        return results

    def _append(self, seq: Sequence, tokens: list[int]) -> tuple[list[int], str | None]:
        """Append tokens up to the first that ends the sequence; returns them and why it ends (or None)."""
        appended: list[int] = []
        for token in tokens:
            seq.token_ids.append(token)
            appended.append(token)
            reason = stop_reason(seq, seq.num_tokens, self.eos_token_ids, self.config.max_model_len)
            if reason is not None:
                return appended, reason
        return appended, None
