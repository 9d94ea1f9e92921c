"""The serving step loop, one for both modes: take the commands that arrived, step the engine, send its outputs.

`LLMEngine.step()` schedules one batch and postprocesses its tokens; this loop
feeds it from the HTTP front end and hands the results back. Thread mode
(`async_engine.py`) runs it in a thread of the server, process mode
(`engine_process.py`) in a child process; the two differ only in how commands
come in (`receive`) and messages go out (`send`).

Commands, in the order the front end posted them:
    ("add", key, prompt ids, SamplingParams, tenant, request id, arrival time)
    ("decode", key, prompt ids, SamplingParams, tenant, request id, Handoff)  (a decode engine's: disagg/roles.py)
    ("abort", key)
    ("call", call id, "metrics" | "state")
    ("stop",)
Messages, one "out" per step (or per batch of commands that changed the admission figures):
    ("out", [(key, text, finished, finish reason, usage or None), ...],
            [(key, error message), ...], adds taken so far, scheduler waiting length)
    ("reply", call id, value)

An output that finishes a request is always sent, with or without new text: it
carries the finish reason and usage and ends the handler's stream. A mid-stream
output without new text (half a character, text held back as a possible stop
string) is not sent.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Hashable
from typing import TYPE_CHECKING, Any

from servescope.reference_engine.protocol import usage

if TYPE_CHECKING:
    from servescope.reference_engine.engine import LLMEngine
    from servescope.reference_engine.metrics import EngineMetrics
    from servescope.reference_engine.sequence import Sequence

log = logging.getLogger(__name__)

Output = tuple[Hashable, str, bool, str | None, dict[str, Any] | None]  # key, text, finished, reason, usage


class StepLoop:
    """Commands in, one engine step, one message out; the engine's only driver while it serves."""

    def __init__(self, engine: LLMEngine, metrics: EngineMetrics, mode: str) -> None:
        self.engine = engine
        self.metrics = metrics
        self.mode = mode  # "thread" | "process": reported in the engine state
        self.with_spec = engine.config.spec is not None
        self.seqs: dict[Hashable, Sequence] = {}  # key -> sequence, while it runs
        self.keys: dict[int, Hashable] = {}  # seq_id -> key
        self.failures: list[tuple[Hashable, str]] = []  # (key, message) not yet sent
        self.adds_taken = 0  # counted once the request sits in the scheduler's queue (or was refused)
        self.reported = (0, 0)  # (adds taken, waiting) as last sent
        self.running = True
        self.next_pause: float | None = None  # monotonic time of the next --debug-pause, once serving began

    def run(self, receive: Callable[[bool], list[tuple] | None], send: Callable[[tuple], None]) -> None:
        """Serve until a "stop" command, the end of the commands (`receive` returns None), or a `send`
        that raises OSError (nobody listens any more). `receive(block)` returns every command that
        has arrived, waiting for one only when `block` (the engine has nothing to run)."""
        try:
            while self.running:
                commands = receive(self.idle())
                if commands is None:
                    return
                for command in commands:
                    reply = self.handle(command)
                    if reply is not None:
                        send(reply)
                if not self.running:
                    return
                self.pause_if_due()
                self.before_step()
                message = self.step()
                if message is not None:
                    send(message)
        except OSError:
            return

    def idle(self) -> bool:
        """Whether the loop has nothing to do until a command arrives (it then blocks in `receive`)."""
        return not self.engine.has_unfinished()

    def before_step(self) -> None:
        """Work between the commands and the step (a role's loop takes in arrived KV transfers here)."""

    def num_waiting(self) -> int:
        """Requests taken but not running: the admission figure the front end compares with --max-waiting."""
        return len(self.engine.scheduler.waiting)

    def pause_if_due(self) -> None:
        """With --debug-pause EVERY:FOR, stand still FOR seconds every EVERY seconds once requests run:
        the whole server stalls, every request in flight waits, new ones queue."""
        pause = self.engine.config.debug_pause
        if pause is None or not self.engine.has_unfinished():
            return
        every, length = pause
        now = time.monotonic()
        if self.next_pause is None:
            self.next_pause = now + every
        elif now >= self.next_pause:
            time.sleep(length)
            self.next_pause = time.monotonic() + every

    def state(self) -> dict[str, Any]:
        return {**self.engine.snapshot(), "mode": self.mode}

    def handle(self, command: tuple) -> tuple | None:
        """Apply one command; returns the reply of a "call"."""
        kind = command[0]
        if kind == "add":
            _, key, prompt_token_ids, params, tenant, request_id, arrival_time = command
            try:
                seq = self.engine.add_request(prompt_token_ids, params, tenant, request_id, arrival_time)
            except Exception as exc:  # noqa: BLE001 - validated by the front end already: report, never crash the loop
                self.failures.append((key, str(exc)))
                return None
            finally:
                self.adds_taken += 1
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
            return ("reply", call_id, self.metrics.render() if name == "metrics" else self.state())
        elif kind == "stop":
            self.running = False
        return None

    def step(self) -> tuple | None:
        """One engine step when there is work; the "out" message, or None when there is nothing to tell."""
        outputs = self._step() if self.engine.has_unfinished() else []
        waiting = self.num_waiting()
        if not outputs and not self.failures and (self.adds_taken, waiting) == self.reported:
            return None
        failures, self.failures = self.failures, []
        self.reported = (self.adds_taken, waiting)
        return ("out", outputs, failures, self.adds_taken, waiting)

    def _step(self) -> list[Output]:
        engine = self.engine
        try:
            step_outputs = engine.step()
        except Exception as exc:  # keep serving: fail the requests in flight, not the loop
            log.exception("engine step failed")
            for key, seq in self.seqs.items():
                if not seq.finished:
                    engine.abort(seq)
                self.failures.append((key, str(exc)))
            self.seqs.clear()
            self.keys.clear()
            return []
        outputs: list[Output] = []
        keys = self.keys
        for out in step_outputs:
            key = keys.get(out.seq.seq_id)
            if key is None:
                continue
            if out.finished:
                del keys[out.seq.seq_id]
                del self.seqs[key]
                outputs.append((key, out.text, True, out.finish_reason, usage(out.seq, self.with_spec)))
            elif out.text:
                outputs.append((key, out.text, False, None, None))
        return outputs
