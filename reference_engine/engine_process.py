"""Process mode: the engine's step loop in a child process (as vLLM's EngineCore), and the asyncio client of it.

Why a process: the step loop is host-bound Python on a GPU, and as a thread of
the server it shares one GIL with the event loop that encodes and writes every
SSE chunk; served throughput measured 60% of in-process throughput on an H200
(README, part (e)). In a child process the model, scheduler, detokenizer and
Prometheus metrics run on their own interpreter; the HTTP process only parses,
tokenizes, validates, admits (429) and streams.

Start-up (`start_engine_process`, blocking, before the HTTP port is bound): a
"spawn" child (no inherited CUDA state) builds `LLMEngine` and answers either
("ready", EngineFacts) or ("error", type name, message, traceback); a
ConfigError keeps its type so the CLI reports it as it always has.

The wire (`frames.py`) is a private socketpair. HTTP process -> engine: each
frame is a list of commands, all the commands posted in one event-loop
iteration:
    ("add", key, prompt ids, SamplingParams, tenant, request id, arrival time)
    ("abort", key)
    ("call", call id, "metrics" | "state")
    ("stop",)
Engine -> HTTP process, one frame per step (or per batch of commands that
changed the admission figures):
    ("out", [(key, text, finished, finish reason, usage or None), ...],
            [(key, error message), ...], adds taken so far, scheduler waiting length)
    ("reply", call id, value)
Arrival times are `time.perf_counter()` (CLOCK_MONOTONIC on Linux), one clock
for both processes, so TTFT and queue-time metrics stay exact.

Neither side can deadlock on full socket buffers: the HTTP side never blocks (an
asyncio Protocol that buffers writes and reads whatever arrives), so the
engine's blocking `sendall` always drains. The engine reads commands without
blocking between steps and blocks only when it has nothing to run. It exits on
"stop" or when the HTTP process goes away (end of file); it ignores SIGINT, so a
Ctrl-C reaches the server, which stops it in order.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import multiprocessing
import select
import signal
import socket
import time
import traceback
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from multiprocessing.process import BaseProcess
from pathlib import Path
from typing import TYPE_CHECKING, Any

from servescope.reference_engine.config import EngineConfig
from servescope.reference_engine.engine_client import EngineClient, EngineFacts, EngineFailed, RequestOutput
from servescope.reference_engine.errors import ConfigError
from servescope.reference_engine.frames import FrameDecoder, encode
from servescope.reference_engine.protocol import usage
from servescope.reference_engine.sequence import SamplingParams
from servescope.reference_engine.tokenization import EngineTokenizer, tokenizer_dir_for

if TYPE_CHECKING:
    from servescope.reference_engine.engine import LLMEngine
    from servescope.reference_engine.metrics import EngineMetrics
    from servescope.reference_engine.sequence import Sequence

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

    @property
    def tokenizer_path(self) -> Path:
        return tokenizer_dir_for(self.model_path, self.tokenizer_dir)


class EngineStartError(RuntimeError):
    """The engine process failed to start for a reason other than a bad setting (the child's traceback)."""


# -- the child ------------------------------------------------------------------------------------

def _child_main(launch: EngineLaunch, sock: socket.socket) -> None:
    """The engine process: build the engine, say ready (or why not), then serve commands until told to stop."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the server stops this process; Ctrl-C is the server's
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
        sock.sendall(encode(ready))
    except OSError:
        return  # the server is gone already
    if engine is not None:
        _EngineLoop(engine, metrics, sock).run()
    sock.close()


class _EngineLoop:
    """The child's step loop: drain commands, step, send one frame with the step's outputs."""

    def __init__(self, engine: LLMEngine, metrics: EngineMetrics, sock: socket.socket) -> None:
        self.engine = engine
        self.metrics = metrics
        self.sock = sock
        self.with_spec = engine.config.spec is not None
        self.decoder = FrameDecoder()
        self.seqs: dict[int, Sequence] = {}  # key -> sequence, while it runs
        self.keys: dict[int, int] = {}  # seq_id -> key
        self.failures: list[tuple[int, str]] = []  # (key, message) not yet sent
        self.adds_taken = 0
        self.reported = (0, 0)  # (adds taken, waiting) the parent last heard
        self.running = True

    def run(self) -> None:
        engine = self.engine
        while self.running:
            commands = self._receive(block=not engine.has_unfinished())
            if commands is None:  # end of file: the server went away
                return
            for command in commands:
                self._handle(command)
            if not self.running:
                return
            outputs = self._step() if engine.has_unfinished() else []
            waiting = len(engine.scheduler.waiting)
            if outputs or self.failures or (self.adds_taken, waiting) != self.reported:
                self._send(("out", outputs, self.failures, self.adds_taken, waiting))
                self.failures = []
                self.reported = (self.adds_taken, waiting)

    def _receive(self, block: bool) -> list[tuple] | None:
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

    def _send(self, message: tuple) -> None:
        try:
            self.sock.sendall(encode(message))
        except OSError:  # the server is gone: nothing left to serve
            self.running = False

    def _handle(self, command: tuple) -> None:
        kind = command[0]
        if kind == "add":
            _, key, prompt_token_ids, params, tenant, request_id, arrival_time = command
            self.adds_taken += 1
            try:
                seq = self.engine.add_request(prompt_token_ids, params, tenant, request_id, arrival_time)
            except Exception as exc:  # validated by the front end already; report, never crash the loop
                self.failures.append((key, str(exc)))
                return
            self.seqs[key] = seq
            self.keys[seq.seq_id] = key
        elif kind == "abort":
            seq = self.seqs.pop(command[1], None)
            if seq is not None:
                del self.keys[seq.seq_id]
                if not seq.finished:
                    self.engine.abort(seq)  # frees its KV blocks now
                    self.metrics.refresh_idle(self.engine)
        elif kind == "call":
            _, call_id, name = command
            if name == "metrics":
                value: Any = self.metrics.render()
            else:
                value = {**self.engine.snapshot(), "mode": "process"}
            self._send(("reply", call_id, value))
        elif kind == "stop":
            self.running = False

    def _step(self) -> list[tuple]:
        engine = self.engine
        try:
            step_outputs = engine.step()
        except Exception as exc:  # keep serving: fail the requests in flight, not the process
            log.exception("engine step failed")
            for key, seq in self.seqs.items():
                if not seq.finished:
                    engine.abort(seq)
                self.failures.append((key, str(exc)))
            self.seqs.clear()
            self.keys.clear()
            return []
        outputs = []
        keys = self.keys
        for out in step_outputs:
            key = keys.get(out.seq.seq_id)
            if key is None:
                continue
            if out.finished:
                del keys[out.seq.seq_id]
                del self.seqs[key]
                outputs.append((key, out.text, True, out.finish_reason, usage(out.seq, self.with_spec)))
            elif out.text:  # a token that adds no text yet (half a character, a held-back stop) needs no frame
                outputs.append((key, out.text, False, None, None))
        return outputs


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

    def __init__(self, handle: EngineProcessHandle, on_lost: Callable[[str], None] | None = None) -> None:
        super().__init__(handle.facts, EngineTokenizer(handle.launch.tokenizer_path))
        self.handle = handle
        self.on_lost = on_lost  # called once if the engine process goes away on its own
        self._loop: asyncio.AbstractEventLoop | None = None
        self._transport: asyncio.Transport | None = None
        self._streams: dict[int, asyncio.Queue] = {}  # key -> the handler's queue
        self._calls: dict[int, asyncio.Future] = {}
        self._keys = itertools.count()
        self._pending: list[tuple] = []  # commands of this event-loop iteration, sent in one frame
        self._adds_posted = 0
        self._adds_taken = 0  # as last reported by the engine
        self._waiting = 0  # the scheduler's waiting length, as last reported
        self._lost: str | None = None  # why the engine can serve nothing more
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

    @property
    def alive(self) -> bool:
        return self._lost is None

    @property
    def num_waiting(self) -> int:
        """Adds the engine has not taken yet plus its scheduler's waiting queue at its last report."""
        return self._adds_posted - self._adds_taken + self._waiting

    # -- requests -------------------------------------------------------------
    async def generate(self, prompt_token_ids: list[int], params: SamplingParams, tenant: str = "",
                       request_id: str = "", arrival_time: float | None = None) -> AsyncIterator[RequestOutput]:
        if self._lost is not None:
            raise EngineFailed(self._lost)
        key = next(self._keys)
        queue: asyncio.Queue = asyncio.Queue()
        self._streams[key] = queue
        self._adds_posted += 1
        self._post(("add", key, prompt_token_ids, params, tenant, request_id,
                    arrival_time if arrival_time is not None else time.perf_counter()))
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
            streams = self._streams
            for key, text, finished, finish_reason, usage_ in outputs:
                queue = streams.get(key)
                if queue is None:
                    continue  # its handler left; the abort is on its way
                if finished:
                    del streams[key]
                queue.put_nowait(RequestOutput(text, finished, finish_reason, usage_))
            for key, error in failures:
                queue = streams.pop(key, None)
                if queue is not None:
                    queue.put_nowait(EngineFailed(error))
            self._adds_taken = adds_taken
            self._waiting = waiting
        elif kind == "reply":
            future = self._calls.get(message[1])
            if future is not None and not future.done():
                future.set_result(message[2])

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
        streams, self._streams = self._streams, {}
        for queue in streams.values():
            queue.put_nowait(EngineFailed(reason))
        for future in self._calls.values():
            if not future.done():
                future.set_exception(EngineFailed(reason))
