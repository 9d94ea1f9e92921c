"""Thread mode: runs `LLMEngine` in a thread of the server's own process and streams its outputs to asyncio handlers.

The HTTP event loop never runs a model step: it posts commands (add, abort)
to a thread-safe inbox, and the engine thread hands each step's outputs back
in ONE `loop.call_soon_threadsafe` call. torch releases the GIL inside its
ops, so the event loop keeps serving while a step computes; but the engine's
Python bookkeeping and the event loop's SSE writing still share one GIL, which
is why process mode (`engine_process.py`) exists. This is the other
`EngineClient`: no start-up cost, and the engine object stays reachable
(tests, benchmarks).
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from servescope.reference_engine.engine import LLMEngine
from servescope.reference_engine.engine_client import EngineClient, EngineFacts, EngineFailed, RequestOutput
from servescope.reference_engine.metrics import EngineMetrics
from servescope.reference_engine.protocol import usage
from servescope.reference_engine.sequence import SamplingParams, Sequence

__all__ = ["AsyncEngine", "EngineFailed", "RequestStream"]

log = logging.getLogger(__name__)


@dataclass(eq=False)
class RequestStream:
    """One request's mailbox between the engine thread and its HTTP handler."""

    prompt_token_ids: list[int]
    params: SamplingParams
    tenant: str
    request_id: str
    arrival_time: float
    queue: asyncio.Queue = field(default_factory=asyncio.Queue)
    seq: Sequence | None = None  # set by the engine thread
    aborted: bool = False


class AsyncEngine(EngineClient):
    mode = "thread"

    def __init__(self, engine: LLMEngine, metrics: EngineMetrics | None = None) -> None:
        super().__init__(EngineFacts.of(engine), engine.tokenizer)
        self.engine = engine
        self.metrics = metrics if metrics is not None else EngineMetrics(engine.config.served_model_name)
        engine.observer = self.metrics
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        # Adds posted (event loop writes) and taken (engine thread writes): each counter has one
        # writer, so their difference is a race-free count of requests not yet seen by the engine.
        self._adds_posted = 0
        self._adds_taken = 0
        self._streams: dict[int, RequestStream] = {}  # seq_id -> stream; engine thread only
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._stopping = False

    # -- lifecycle ----------------------------------------------------------
    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self.metrics.refresh_idle(self.engine)
        self._thread = threading.Thread(target=self._run, name="engine-step-loop", daemon=True)
        self._thread.start()

    async def stop(self) -> None:
        await asyncio.get_running_loop().run_in_executor(None, self.stop_blocking)

    def stop_blocking(self) -> None:
        self._stopping = True
        self._inbox.put(("stop", None))
        if self._thread is not None:
            self._thread.join(timeout=10)

    @property
    def num_waiting(self) -> int:
        """Requests not yet running: posted-but-unseen plus the scheduler's queue (read racily, which is
        fine for admission control)."""
        return self._adds_posted - self._adds_taken + len(self.engine.scheduler.waiting)

    async def render_metrics(self) -> bytes:
        return self.metrics.render()  # prometheus_client's values are thread-safe

    async def engine_state(self) -> dict[str, Any]:
        return {**self.engine.snapshot(), "mode": self.mode}

    # -- the asyncio side ---------------------------------------------------
    async def generate(self, prompt_token_ids: list[int], params: SamplingParams, tenant: str = "",
                       request_id: str = "", arrival_time: float | None = None) -> AsyncIterator[RequestOutput]:
        """Yield this request's outputs until it finishes; aborts it if the consumer goes away."""
        stream = RequestStream(prompt_token_ids, params, tenant, request_id,
                               arrival_time if arrival_time is not None else time.perf_counter())
        self._adds_posted += 1
        self._inbox.put(("add", stream))
        finished = False
        try:
            while True:
                item = await stream.queue.get()
                if isinstance(item, BaseException):
                    raise EngineFailed(str(item)) from item
                yield item
                if item.finished:
                    finished = True
                    return
        finally:
            if not finished:
                stream.aborted = True
                self._inbox.put(("abort", stream))

    def _deliver(self, batch: list[tuple[RequestStream, object]]) -> None:
        for stream, item in batch:
            stream.queue.put_nowait(item)

    # -- the engine thread --------------------------------------------------
    def _handle(self, command: str, stream: RequestStream | None) -> None:
        if command == "stop":
            self._stopping = True
        elif command == "add":
            try:
                self._add(stream)
            finally:  # counted only once the request sits in the scheduler's queue (or was refused)
                self._adds_taken += 1
        elif command == "abort":
            seq = stream.seq
            if seq is not None and not seq.finished:
                self.engine.abort(seq)
                self._streams.pop(seq.seq_id, None)
                self.metrics.refresh_idle(self.engine)

    def _add(self, stream: RequestStream) -> None:
        if stream.aborted:
            return
        try:
            seq = self.engine.add_request(stream.prompt_token_ids, stream.params, stream.tenant,
                                          stream.request_id, stream.arrival_time)
        except Exception as exc:  # validated by the server already; report rather than crash the loop
            self._post([(stream, exc)])
            return
        stream.seq = seq
        self._streams[seq.seq_id] = stream

    def _post(self, batch: list[tuple[RequestStream, object]]) -> None:
        if batch and self._loop is not None and not self._loop.is_closed():
            self._loop.call_soon_threadsafe(self._deliver, batch)

    def _run(self) -> None:
        engine = self.engine
        with_spec = self.facts.with_spec
        while not self._stopping:
            if not engine.has_unfinished():
                command, stream = self._inbox.get()  # idle: sleep until a request or abort arrives
                self._handle(command, stream)
            while True:  # take everything posted meanwhile before stepping
                try:
                    command, stream = self._inbox.get_nowait()
                except queue.Empty:
                    break
                self._handle(command, stream)
            if self._stopping or not engine.has_unfinished():
                continue
            try:
                outputs = engine.step()
            except Exception as exc:  # keep serving: fail the requests in flight, not the process
                log.exception("engine step failed")
                failed = list(self._streams.values())
                for stream in failed:
                    if stream.seq is not None:
                        engine.abort(stream.seq)
                self._streams.clear()
                self._post([(s, exc) for s in failed])
                continue
            batch = []
            for out in outputs:
                stream = self._streams.get(out.seq.seq_id)
                if stream is None:
                    continue
                if out.finished:
                    del self._streams[out.seq.seq_id]
                    batch.append((stream, RequestOutput(out.text, True, out.finish_reason, usage(out.seq, with_spec))))
                else:
                    batch.append((stream, RequestOutput(out.text, False, None, None)))
            self._post(batch)
