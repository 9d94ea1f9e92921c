"""What the HTTP front end sees of an engine, wherever its step loop runs.

`server.py`'s handlers talk only to an `EngineClient`: the thread client
(`async_engine.AsyncEngine`, the engine in the server's own process) or the
process client (`engine_process.ProcessEngineClient`, the engine in a child
process). Both give the same things: a tokenizer, the prompt check, the static
facts the front end needs (`EngineFacts`), the admission figure `num_waiting`,
`generate()` yielding `RequestOutput`s, and the metrics text and engine state
as coroutines (in process mode they are a round trip to the child). Handlers
never touch the scheduler or a `Sequence`, which may live in another process.

Both clients speak to one `step_loop.StepLoop`: `generate()` posts its "add"
and "abort" commands (`_post`, the one thing a mode supplies) and `_deliver`
hands each "out" message's outputs to the waiting handlers.
"""

from __future__ import annotations

import abc
import asyncio
import itertools
import time
from collections.abc import AsyncIterator, Callable
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
    device: str

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
        return cls(engine.limits, engine.config.max_waiting, str(engine.device))


class RequestOutput(NamedTuple):
    """One step's news for one request, as a handler needs it. A tuple: the client builds one per
    output from the plain tuples of the step loop's "out" messages."""

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
        self._streams: dict[int, asyncio.Queue] = {}  # key -> its handler's queue, until the finished output
        self._keys = itertools.count()
        self._adds_posted = 0
        self._lost: str | None = None  # why the engine can serve nothing more
        self.on_lost: Callable[[str], None] | None = None  # called once if the engine goes away on its own

    @property
    def max_model_len(self) -> int:
        return self.facts.max_model_len

    @property
    def max_waiting(self) -> int | None:
        return self.facts.max_waiting

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
        return self._lost is None

    @property
    def lost_reason(self) -> str | None:
        """Why the engine can serve nothing more (None while it can)."""
        return self._lost

    @abc.abstractmethod
    def _post(self, command: tuple) -> None:
        """Send one command (step_loop.py lists them) to the step loop, without blocking."""

    def generate(self, prompt_token_ids: list[int], params: SamplingParams, tenant: str = "",
                 request_id: str = "", arrival_time: float | None = None) -> AsyncIterator[RequestOutput]:
        """This request's outputs until the finished one; raises EngineFailed if the engine cannot serve it.
        Closing the iterator early aborts the request and frees its KV blocks."""
        return self.stream("add", prompt_token_ids, params, tenant, request_id,
                           arrival_time if arrival_time is not None else time.perf_counter())

    async def stream(self, kind: str, *args: Any) -> AsyncIterator[RequestOutput]:
        """Post the command (kind, key, *args) that starts a request ("add"; a decode engine's "decode")
        and yield its outputs until the finished one, aborting it if the iterator is closed early."""
        if self._lost is not None:
            raise EngineFailed(self._lost)
        key = next(self._keys)
        queue: asyncio.Queue = asyncio.Queue()
        self._streams[key] = queue
        self._adds_posted += 1
        self._post((kind, key, *args))
        finished = False
        try:
            while True:
                item = await queue.get()
                if isinstance(item, EngineFailed):
                    raise EngineFailed(*item.args)
                yield item
                if item.finished:
                    finished = True
                    return
        finally:
            if not finished:  # the client left (or the request failed): free its blocks
                self._streams.pop(key, None)
                self._post(("abort", key))

    def _deliver(self, outputs: list[tuple], failures: list[tuple[int, str]]) -> None:
        """An "out" message's outputs and failures, to their handlers (on the event loop)."""
        streams = self._streams
        for key, text, finished, finish_reason, usage in outputs:
            queue = streams.get(key)
            if queue is None:
                continue  # its handler left; the abort is on its way
            if finished:
                del streams[key]
            queue.put_nowait(RequestOutput(text, finished, finish_reason, usage))
        for key, error in failures:
            queue = streams.pop(key, None)
            if queue is not None:
                queue.put_nowait(EngineFailed(error))

    def _fail_all(self, reason: str) -> None:
        """Every waiting handler gets EngineFailed(reason)."""
        streams, self._streams = self._streams, {}
        for queue in streams.values():
            queue.put_nowait(EngineFailed(reason))

    @abc.abstractmethod
    async def render_metrics(self) -> bytes:
        """The Prometheus text of the engine's metrics."""

    @abc.abstractmethod
    async def engine_state(self) -> dict[str, Any]:
        """Block-pool and scheduler figures (`/internal/engine`)."""

    def shutdown_processes(self) -> None:
        """Stop and reap the engine's processes (blocking; safe after `stop`); nothing to do in thread mode."""

    @abc.abstractmethod
    async def start(self) -> None: ...

    @abc.abstractmethod
    async def stop(self) -> None: ...
