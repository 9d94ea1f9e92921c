"""Process mode: the engine's step loop in a child process (as vLLM's EngineCore), and the asyncio client of it.

Why a process: the step loop is host-bound Python on a GPU, and as a thread of
the server it shares one GIL with the event loop that encodes and writes every
SSE chunk (docs/benchmarks.md measures both modes). In a child process the model, scheduler, detokenizer and
Prometheus metrics run on their own interpreter; the HTTP process only parses,
tokenizes, validates, admits (429) and streams.

Start-up (`start_engine_process`, blocking, before the HTTP port is bound): a
"spawn" child (no inherited CUDA state) builds `LLMEngine` and answers either
("ready", EngineFacts) or ("error", type name, message, traceback); a
ConfigError keeps its type so the CLI reports it as it always has.

The wire (`frames.py`) is a private socketpair carrying the step loop's
commands and messages (`step_loop.py`): HTTP process -> engine, each frame is
the list of commands posted in one event-loop iteration; engine -> HTTP
process, one frame per message. Arrival times are `time.perf_counter()`
(CLOCK_MONOTONIC on Linux), one clock for both processes, so TTFT and
queue-time metrics stay exact.

Neither side can deadlock on full socket buffers: the HTTP side never blocks (an
asyncio Protocol that buffers writes and reads whatever arrives), so the
engine's blocking `sendall` always drains. The engine reads commands without
blocking between steps and blocks only when it has nothing to run. It exits on
"stop" or when the HTTP process goes away (end of file); it ignores SIGINT, so a
Ctrl-C reaches the server, which stops it in order.
"""

from __future__ import annotations

import asyncio
import logging
import multiprocessing
import os
import select
import signal
import socket
import threading
import time
import traceback
from dataclasses import dataclass, field
from multiprocessing.process import BaseProcess
from pathlib import Path
from typing import Any

from servescope.reference_engine.config import EngineConfig
from servescope.reference_engine.engine_client import EngineClient, EngineFacts, EngineFailed
from servescope.reference_engine.errors import ConfigError
from servescope.reference_engine.frames import FrameDecoder, encode
from servescope.reference_engine.step_loop import StepLoop
from servescope.reference_engine.tokenization import EngineTokenizer, tokenizer_dir_for

log = logging.getLogger(__name__)

STOP_TIMEOUT_S = 10.0  # a step in flight finishes first; a stuck child is then terminated, then killed
_RECV_BYTES = 1 << 20


@dataclass(frozen=True)
class EngineLaunch:
    """Everything the child needs to build the engine: what `LLMEngine.build` takes, plus the metric
    label and torch's thread count (set in the child, where the model runs)."""

    config: EngineConfig
    preset_name: str | None = "tiny"
    model_path: str | None = None
    tokenizer_dir: str | None = None
    model_name: str = "tiny"
    torch_threads: int | None = None  # None: torch's default
    role: str | None = None  # disaggregated serving: "prefill" | "decode" (disagg/roles.py); None: colocated
    kv_transport: str = "shm"  # how a disaggregated engine's KV blocks travel (disagg/transport.py)

    @property
    def tokenizer_path(self) -> Path:
        return tokenizer_dir_for(self.model_path, self.tokenizer_dir)


class EngineStartError(RuntimeError):
    """The engine process failed to start for a reason other than a bad setting (the child's traceback)."""


# -- the child ------------------------------------------------------------------------------------

def _child_main(launch: EngineLaunch, sock: socket.socket) -> None:
    """The engine process: build the engine, say ready (or why not), then serve commands until told to stop."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the server stops this process; Ctrl-C is the server's
    wire = _Wire(sock)
    try:
        import torch

        from servescope.reference_engine.engine import LLMEngine
        from servescope.reference_engine.metrics import EngineMetrics

        if launch.torch_threads:
            torch.set_num_threads(launch.torch_threads)
        metrics = EngineMetrics(launch.model_name)
        engine = LLMEngine.build(launch.config, preset_name=launch.preset_name, model_path=launch.model_path,
                                 tokenizer_dir=launch.tokenizer_dir, observer=metrics)
        metrics.refresh_idle(engine)
        ready: tuple = ("ready", EngineFacts.of(engine))
    except BaseException as exc:  # noqa: BLE001 - every failure must reach the parent, not just Exceptions
        ready = ("error", type(exc).__name__, str(exc), traceback.format_exc())
        engine = None
    try:
        wire.send(ready)
    except OSError:
        if engine is not None:
            engine.shutdown()
        return  # the server is gone already
    if engine is not None:
        if engine.tp_workers is not None:
            engine.tp_workers.on_fatal = wire.fatal
        try:
            _step_loop(launch, engine, metrics).run(wire.receive, wire.send)
        finally:
            engine.shutdown()  # the other tensor-parallel ranks stop with this one
    sock.close()


def _step_loop(launch: EngineLaunch, engine: Any, metrics: Any) -> StepLoop:
    if launch.role is None:
        return StepLoop(engine, metrics, "process")
    from servescope.reference_engine.disagg.roles import role_loop

    return role_loop(launch.role, engine, metrics, launch.kv_transport, launch.model_name)


class _Wire:
    """The engine process's end of the socket: the step loop's `receive` and `send`."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.decoder = FrameDecoder()
        self.lock = threading.Lock()

    def receive(self, block: bool) -> list[tuple] | None:
        """Every command that has arrived, without waiting unless `block` and none has; None at end of file."""
        commands: list[tuple] = []
        while True:
            try:
                data = self.sock.recv(_RECV_BYTES, socket.MSG_DONTWAIT)
            except BlockingIOError:
                if commands or not block:
                    return commands
                select.select([self.sock], [], [])  # idle: sleep until the server writes
                continue
            except OSError:
                return None
            if not data:
                return None
            for frame in self.decoder.feed(data):
                commands.extend(frame)

    def send(self, message: tuple) -> None:
        with self.lock:  # a fatal message may come from the tensor-parallel watchdog's thread
            self.sock.sendall(encode(message))  # OSError once the server is gone: the step loop ends

    def fatal(self, reason: str) -> None:
        """The engine cannot go on (a tensor-parallel rank died): tell the server why, then exit 1 at
        once, even if the step loop is stuck in a collective that will never complete."""
        log.error("%s; the engine process exits", reason)
        if self.lock.acquire(timeout=2.0):  # a send stuck on a full socket must not keep us alive
            try:
                self.sock.sendall(encode(("fatal", reason)))
            except OSError:
                pass
        os._exit(1)


# -- the parent: start-up and shutdown ----------------------------------------------------------------

@dataclass(eq=False)
class EngineProcessHandle:
    """A started, ready engine process and the parent's end of its socket."""

    process: BaseProcess
    sock: socket.socket
    facts: EngineFacts
    launch: EngineLaunch
    attached: bool = False  # an asyncio transport owns the socket now (ProcessEngineClient.start)
    stop_sent: bool = False
    _closed: bool = field(default=False, repr=False)

    @property
    def pid(self) -> int | None:
        return self.process.pid

    def shutdown(self, timeout: float = STOP_TIMEOUT_S) -> int | None:
        """Stop the child (blocking; safe to call twice): ask, wait, then SIGTERM, then SIGKILL.
        Returns its exit code."""
        if not self.attached and not self._closed:
            if not self.stop_sent:
                try:
                    self.sock.send(encode([("stop",)]), socket.MSG_DONTWAIT)
                except OSError:
                    pass
                self.stop_sent = True
            self.sock.close()  # end of file for the child too
            self._closed = True
        _reap(self.process, timeout)
        return self.process.exitcode


def _reap(process: BaseProcess, timeout: float) -> None:
    if process.pid is None:
        return
    process.join(timeout)
    if process.is_alive():
        log.warning("the engine process did not stop within %.0f s; terminating it", timeout)
        process.terminate()
        process.join(5.0)
    if process.is_alive():
        process.kill()
        process.join(5.0)


def start_engine_process(launch: EngineLaunch, timeout: float | None = None) -> EngineProcessHandle:
    """Spawn the engine process and wait (blocking) until its engine is built.

    Raises ConfigError for a bad setting found while building (as the in-process build would) and
    EngineStartError for anything else; the child is reaped either way, also on KeyboardInterrupt.
    """
    ctx = multiprocessing.get_context("spawn")  # a fresh interpreter: safe for CUDA, no copied locks
    parent_sock, child_sock = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    process = ctx.Process(target=_child_main, args=(launch, child_sock), name="servescope-engine", daemon=True)
    try:
        try:
            process.start()
        finally:
            child_sock.close()  # the child has its own copy; ours would hide its end of file
        message = _wait_ready(parent_sock, process, timeout)
    except BaseException:
        parent_sock.close()
        _reap(process, 0.0)
        raise
    if message[0] == "ready":
        return EngineProcessHandle(process, parent_sock, message[1], launch)
    parent_sock.close()
    _reap(process, STOP_TIMEOUT_S)
    _, type_name, text, trace = message
    if type_name == "ConfigError":
        raise ConfigError(text)
    raise EngineStartError(f"the engine process failed to start: {type_name}: {text}\n{trace}")


def _wait_ready(sock: socket.socket, process: BaseProcess, timeout: float | None) -> tuple:
    decoder = FrameDecoder()
    deadline = None if timeout is None else time.monotonic() + timeout
    while True:
        wait = 1.0 if deadline is None else max(0.0, min(1.0, deadline - time.monotonic()))
        readable, _, _ = select.select([sock], [], [], wait)
        if readable:
            data = sock.recv(_RECV_BYTES)
            if not data:
                process.join(5.0)
                raise EngineStartError(f"the engine process exited (exit code {process.exitcode}) "
                                       "before its engine was built; see its output above")
            messages = decoder.feed(data)
            if messages:
                return messages[0]
        elif deadline is not None and time.monotonic() >= deadline:
            raise EngineStartError(f"the engine process was not ready within {timeout:.0f} s")


# -- the parent: the asyncio client ----------------------------------------------------------------

class _EngineConnection(asyncio.Protocol):
    """The parent's end of the socket on the event loop: parses frames as bytes arrive, never blocks."""

    def __init__(self, client: ProcessEngineClient) -> None:
        self.client = client
        self.decoder = FrameDecoder()

    def data_received(self, data: bytes) -> None:
        for message in self.decoder.feed(data):
            self.client._dispatch(message)

    def connection_lost(self, exc: Exception | None) -> None:
        self.client._connection_lost()


class ProcessEngineClient(EngineClient):
    """`EngineClient` of an engine process: the front end tokenizes with its own tokenizer (same files)."""

    mode = "process"

    def __init__(self, handle: EngineProcessHandle) -> None:
        super().__init__(handle.facts, EngineTokenizer(handle.launch.tokenizer_path))
        self.handle = handle
        self._loop: asyncio.AbstractEventLoop | None = None
        self._transport: asyncio.Transport | None = None
        self._calls: dict[int, asyncio.Future] = {}
        self._pending: list[tuple] = []  # commands of this event-loop iteration, sent in one frame
        self._adds_taken = 0  # as last reported by the engine
        self._waiting = 0  # the scheduler's waiting length, as last reported
        self._stopping = False

    # -- lifecycle ----------------------------------------------------------
    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._transport, _ = await self._loop.create_unix_connection(
            lambda: _EngineConnection(self), sock=self.handle.sock)
        self.handle.attached = True

    async def stop(self) -> None:
        """Tell the engine to stop, close the socket (end of file), and reap the process off the loop."""
        self._stopping = True
        if self._transport is not None and not self._transport.is_closing():
            self._post(("stop",))
            self._flush()
            self.handle.stop_sent = True
            self._transport.close()  # written out first, then closed
        await asyncio.get_running_loop().run_in_executor(None, self.handle.shutdown)
        self._fail_all("the server is shutting down")

    def shutdown_processes(self) -> None:
        self.handle.shutdown()

    @property
    def num_waiting(self) -> int:
        """Adds the engine has not taken yet plus its scheduler's waiting queue at its last report."""
        return self._adds_posted - self._adds_taken + self._waiting

    # -- requests -------------------------------------------------------------
    async def render_metrics(self) -> bytes:
        return await self._call("metrics")

    async def engine_state(self) -> dict[str, Any]:
        return await self._call("state")

    async def _call(self, name: str) -> Any:
        if self._lost is not None:
            raise EngineFailed(self._lost)
        call_id = next(self._keys)
        future = self._loop.create_future()
        self._calls[call_id] = future
        self._post(("call", call_id, name))
        try:
            return await future
        finally:
            self._calls.pop(call_id, None)

    # -- the wire ---------------------------------------------------------------
    def _post(self, command: tuple) -> None:
        if self._lost is not None or self._transport is None:
            return
        self._pending.append(command)
        if len(self._pending) == 1:  # first of this iteration: the rest join it in one frame
            self._loop.call_soon(self._flush)

    def _flush(self) -> None:
        if not self._pending:
            return
        commands, self._pending = self._pending, []
        if self._transport is not None and not self._transport.is_closing():
            self._transport.write(encode(commands))  # buffered by the transport: never blocks

    def _dispatch(self, message: tuple) -> None:
        kind = message[0]
        if kind == "out":
            _, outputs, failures, adds_taken, waiting = message
            self._deliver(outputs, failures)
            self._adds_taken = adds_taken
            self._waiting = waiting
        elif kind == "reply":
            future = self._calls.get(message[1])
            if future is not None and not future.done():
                future.set_result(message[2])
        elif kind == "fatal":  # the engine process is exiting, and says why (a tensor-parallel rank died)
            self._lost = message[1]
            self._fail_all(self._lost)
            log.error("%s; the server cannot serve requests any more", self._lost)
            if self.on_lost is not None:
                self.on_lost(self._lost)

    def _connection_lost(self) -> None:
        if self._lost is not None:
            return
        if not self._stopping:
            self.handle.process.join(1.0)  # a rare path: wait a moment so the message can give the exit code
        code = self.handle.process.exitcode
        self._lost = ("the engine process stopped" if self._stopping else
                      f"the engine process exited unexpectedly (exit code {code})" if code is not None else
                      "the engine process closed its connection")
        self._fail_all(self._lost)
        if not self._stopping:
            log.error("%s; the server cannot serve requests any more", self._lost)
            if self.on_lost is not None:
                self.on_lost(self._lost)

    def _fail_all(self, reason: str) -> None:
        super()._fail_all(reason)
        for future in self._calls.values():
            if not future.done():
                future.set_exception(EngineFailed(reason))
