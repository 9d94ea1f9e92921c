"""Thread mode: runs the step loop in a thread of the server's own process and streams its outputs to asyncio handlers.

The HTTP event loop never runs a model step: it posts commands (add, abort)
to a thread-safe inbox, and the engine thread hands each step's "out" message
back in ONE `loop.call_soon_threadsafe` call. torch releases the GIL inside its
ops, so the event loop keeps serving while a step computes; but the engine's
Python bookkeeping and the event loop's SSE writing still share one GIL, which
is why process mode (`engine_process.py`) exists. This is the other
`EngineClient`: no start-up cost, and the engine object stays reachable
(tests, benchmarks).
"""

from __future__ import annotations

import asyncio
import queue
import threading
from typing import Any

from servescope.reference_engine.engine import LLMEngine
from servescope.reference_engine.engine_client import EngineClient, EngineFacts, EngineFailed
from servescope.reference_engine.metrics import EngineMetrics
from servescope.reference_engine.step_loop import StepLoop

__all__ = ["AsyncEngine", "EngineFailed"]


class AsyncEngine(EngineClient):
    mode = "thread"

    def __init__(self, engine: LLMEngine, metrics: EngineMetrics | None = None) -> None:
        super().__init__(EngineFacts.of(engine), engine.tokenizer)
        self.engine = engine
        self.metrics = metrics if metrics is not None else EngineMetrics(engine.config.served_model_name)
        engine.observer = self.metrics
        self.step_loop = StepLoop(engine, self.metrics, self.mode)
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None

    # -- lifecycle ----------------------------------------------------------
    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self.metrics.refresh_idle(self.engine)
        self._thread = threading.Thread(target=self.step_loop.run, args=(self._receive, self._send),
                                        name="engine-step-loop", daemon=True)
        self._thread.start()

    async def stop(self) -> None:
        await asyncio.get_running_loop().run_in_executor(None, self.stop_blocking)

    def stop_blocking(self) -> None:
        self._inbox.put(("stop",))
        if self._thread is not None:
            self._thread.join(timeout=10)
        self.engine.shutdown()  # the other tensor-parallel ranks, if any

    @property
    def num_waiting(self) -> int:
        """Requests not yet running: posted-but-untaken plus the scheduler's queue. Each counter has one
        writer (posted: the event loop; taken: the engine thread), so their difference is race-free;
        the queue length is read racily, which is fine for admission control."""
        return self._adds_posted - self.step_loop.adds_taken + len(self.engine.scheduler.waiting)

    async def render_metrics(self) -> bytes:
        return self.metrics.render()  # prometheus_client's values are thread-safe

    async def engine_state(self) -> dict[str, Any]:
        return self.step_loop.state()

    # -- the asyncio side ---------------------------------------------------
    def _post(self, command: tuple) -> None:
        self._inbox.put(command)

    def _dispatch(self, message: tuple) -> None:
        if message[0] == "out":
            self._deliver(message[1], message[2])

    # -- the engine thread --------------------------------------------------
    def _receive(self, block: bool) -> list[tuple]:
        commands = [self._inbox.get()] if block else []  # idle: sleep until a command arrives
        while True:  # and take everything posted meanwhile
            try:
                commands.append(self._inbox.get_nowait())
            except queue.Empty:
                return commands

    def _send(self, message: tuple) -> None:
        loop = self._loop
        if loop is not None and not loop.is_closed():
            loop.call_soon_threadsafe(self._dispatch, message)
