"""What the HTTP front end sees of an engine, wherever its step loop runs.

`server.py`'s handlers talk only to an `EngineClient`: the thread client
(`async_engine.AsyncEngine`, the engine in the server's own process) or the
process client (`engine_process.ProcessEngineClient`, the engine in a child
process). Both give the same things: a tokenizer, the prompt check, the static
facts the front end needs (`EngineFacts`), the admission figure `num_waiting`,
`generate()` yielding `RequestOutput`s, and the metrics text and engine state
as coroutines (in process mode they are a round trip to the child). Handlers
never touch the scheduler or a `Sequence`, which may live in another process.
"""

from __future__ import annotations

import abc
import os
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, NamedTuple

from servescope.reference_engine.limits import PromptLimits
from servescope.reference_engine.sequence import SamplingParams
from servescope.reference_engine.tokenization import EngineTokenizer

if TYPE_CHECKING:
    from servescope.reference_engine.engine import LLMEngine


@dataclass(frozen=True)
class EngineFacts:
    """What the front end must know about the engine, fixed once it is built (picklable: the engine
    process sends it in its "ready" message)."""

    limits: PromptLimits
    max_waiting: int | None
    with_spec: bool  # usage then carries spec_accepted_tokens / spec_draft_tokens
    device: str
    pid: int  # the process that runs the step loop

    @property
    def max_model_len(self) -> int:
        return self.limits.max_model_len

    @property
    def num_blocks(self) -> int:
        return self.limits.num_blocks

    @property
    def block_size(self) -> int:
        return self.limits.block_size

    @classmethod
    def of(cls, engine: LLMEngine) -> EngineFacts:
        return cls(engine.limits, engine.config.max_waiting, engine.config.spec is not None, str(engine.device),
                   os.getpid())


class RequestOutput(NamedTuple):
    """One step's news for one request, as a handler needs it. A tuple: the process client builds one
    per token from the plain tuples the engine process sends."""

    text: str
    finished: bool
    finish_reason: str | None
    usage: dict[str, Any] | None  # OpenAI usage (protocol.usage), on the finished output only


class EngineFailed(RuntimeError):
    """The engine could not serve this request (a failed step, a refused add, or the engine is gone)."""


class EngineClient(abc.ABC):
    """The front end's handle on an engine; `start()` and `stop()` run on the server's event loop."""

    mode: str  # "thread" | "process" (reported by /internal/engine)

    def __init__(self, facts: EngineFacts, tokenizer: EngineTokenizer) -> None:
        self.facts = facts
        self.tokenizer = tokenizer

    @property
    def max_model_len(self) -> int:
        return self.facts.max_model_len

    @property
    def max_waiting(self) -> int | None:
        return self.facts.max_waiting

    @property
    def with_spec(self) -> bool:
        return self.facts.with_spec

    def validate_prompt(self, prompt_token_ids: list[int], params: SamplingParams) -> None:
        """InvalidRequest when the engine could never serve this request (checked before admission)."""
        self.facts.limits.check(prompt_token_ids, params)

    @property
    @abc.abstractmethod
    def num_waiting(self) -> int:
        """Requests admitted but not yet running (the 429 check compares it with max_waiting)."""

    @property
    def alive(self) -> bool:
        """False once the engine can serve nothing more (its process died); /health then answers 503."""
        return True

    @abc.abstractmethod
    def generate(self, prompt_token_ids: list[int], params: SamplingParams, tenant: str = "",
                 request_id: str = "", arrival_time: float | None = None) -> AsyncIterator[RequestOutput]:
        """This request's outputs until the finished one; raises EngineFailed if the engine cannot serve it.
        Closing the iterator early aborts the request and frees its KV blocks."""

    @abc.abstractmethod
    async def render_metrics(self) -> bytes:
        """The Prometheus text of the engine's metrics."""

    @abc.abstractmethod
    async def engine_state(self) -> dict[str, Any]:
        """Block-pool and scheduler figures (`/internal/engine`)."""

    @abc.abstractmethod
    async def start(self) -> None: ...

    @abc.abstractmethod
    async def stop(self) -> None: ...
