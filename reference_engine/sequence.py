"""One request as the engine sees it: its tokens, its KV blocks, its sampling rules and its clock.

The scheduler moves a `Sequence` between WAITING, RUNNING and FINISHED; the
block manager owns its `block_table`; `num_computed_tokens` counts tokens whose
K/V are in the cache (after preemption it drops back to 0: recompute).
"""

from __future__ import annotations

import enum
import itertools
import time
from dataclasses import dataclass, field

from servescope.reference_engine.errors import InvalidRequest


@dataclass
class SamplingParams:
    """OpenAI request knobs the engine honours. temperature 0 means greedy."""

    max_tokens: int = 16
    min_tokens: int = 0
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1  # -1 or 0: off
    seed: int | None = None
    ignore_eos: bool = False
    stop: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.max_tokens < 1:
            raise InvalidRequest(f"max_tokens must be >= 1, got {self.max_tokens}", "max_tokens")
        if not 0 <= self.min_tokens <= self.max_tokens:
            raise InvalidRequest(f"min_tokens must be between 0 and max_tokens ({self.max_tokens}), "
                                 f"got {self.min_tokens}", "min_tokens")
        if not 0.0 <= self.temperature <= 100.0:
            raise InvalidRequest(f"temperature must be in [0, 100], got {self.temperature}", "temperature")
        if not 0.0 < self.top_p <= 1.0:
            raise InvalidRequest(f"top_p must be in (0, 1], got {self.top_p}", "top_p")
        if self.top_k < -1:
            raise InvalidRequest(f"top_k must be -1 (off) or >= 0, got {self.top_k}", "top_k")
        if any(not isinstance(s, str) or not s for s in self.stop):
            raise InvalidRequest("stop must be a non-empty string or a list of them", "stop")

    @property
    def greedy(self) -> bool:
        return self.temperature < 1e-5 or self.top_k == 1


class SequenceStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


_ids = itertools.count()


@dataclass(eq=False)
class Sequence:
    prompt_token_ids: list[int]
    params: SamplingParams
    tenant: str = ""
    request_id: str = ""
    arrival_time: float = field(default_factory=time.perf_counter)
    seq_id: int = field(default_factory=lambda: next(_ids))

    def __post_init__(self) -> None:
        self.token_ids: list[int] = list(self.prompt_token_ids)
        self.num_prompt_tokens = len(self.prompt_token_ids)
        self.status = SequenceStatus.WAITING
        self.block_table: list[int] = []
        self.num_computed_tokens = 0
        self.num_hashed_blocks = 0  # leading full blocks registered in the prefix cache
        self.num_cached_tokens: int | None = None  # prompt tokens found in the prefix cache at first admission
        self.finish_reason: str | None = None
        self.num_preemptions = 0
        self.spec_draft_tokens = 0
        self.spec_accepted_tokens = 0
        self.first_scheduled_time: float | None = None
        self.first_token_time: float | None = None
        self.last_token_time: float | None = None
        self.last_token_gap: float | None = None  # seconds between this request's last two token steps
        self.generator = None  # torch.Generator for seeded sampling, made lazily by the sampler
        self.ngram_index = None  # spec_decode.NgramIndex, made lazily by the proposer
        self.draft_acceptance = None  # draft_policy.Acceptance, made lazily by the drafter

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens:]

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED


def stop_reason(seq: Sequence, num_tokens: int, eos_token_ids: frozenset[int], max_model_len: int | None,
                stop_string: bool = False) -> str | None:
    """Why `seq` ends at its `num_tokens`-th token (prompt included): "length", "stop", or None to go on.

    The one set of stop rules, in order: max_tokens ("length"); an EOS id, unless ignore_eos or
    fewer than min_tokens outputs ("stop"); the context limit ("length"); a stop string the
    detokenizer found in the text up to this token (`stop_string`, "stop"), so a stop string never
    overrides a length finish of the same token. A placeholder token (negative: not sampled yet) is
    never an EOS id, so only the length rules can end a sequence at one.
    """
    params = seq.params
    produced = num_tokens - seq.num_prompt_tokens
    if produced >= params.max_tokens:
        return "length"
    if seq.token_ids[num_tokens - 1] in eos_token_ids and not params.ignore_eos and produced >= params.min_tokens:
        return "stop"
    if max_model_len and num_tokens >= max_model_len:
        return "length"
    return "stop" if stop_string else None
