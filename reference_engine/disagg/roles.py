"""The two step loops of disaggregated serving: a prefill engine hands each request off after its first
token, a decode engine takes it in with its KV blocks and decodes to the end.

Prefill (`PrefillLoop`): the engine prefills as it always does (chunked, with
the prefix cache) and samples the first token. A request that did not finish
on that token is handed off in the same step: its prompt's blocks are
gathered and sent through the transport, the request leaves the engine (its
full blocks stay in the prefix cache), and its output is a finished one with
finish reason "handoff" whose usage slot carries a `Handoff` instead of
usage. Overlapped scheduling and speculation are off here: the loop must see
the first token before it schedules the request again.

Decode (`DecodeLoop`): ("decode", key, prompt ids, params, tenant, request
id, Handoff) takes a request in. Its blocks are received on a loader thread
(the copy out of the transport overlaps the decode steps; torch releases the
GIL while it copies), or on the loop itself when they are small enough that
the copy costs less than waiting a step, and placed between steps when the
pool has room; the
request then joins the running batch with its prompt computed and its first
token as its last token, exactly where a colocated engine would stand after
the prefill step. An abort before that drops the transfer. Usage gains
`kv_transfer_s`.
"""

from __future__ import annotations

import bisect
import concurrent.futures
import time
from collections.abc import Hashable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from servescope.reference_engine.disagg.kv_blocks import blocks_for, gather_blocks, place_blocks
from servescope.reference_engine.disagg.pd_metrics import PDMetrics
from servescope.reference_engine.disagg.transport import KVHandle, KVTransport
from servescope.reference_engine.sequence import SamplingParams, Sequence, SequenceStatus
from servescope.reference_engine.step_loop import Output, StepLoop
from servescope.reference_engine.tokenization import IncrementalDetokenizer

if TYPE_CHECKING:
    from servescope.reference_engine.engine import LLMEngine
    from servescope.reference_engine.metrics import EngineMetrics

HANDOFF = "handoff"  # the finish reason of a prefill engine's output that continues on a decode engine
WAIT_SLICE_S = 0.02  # an idle decode loop waits for a transfer this long at a time, then reads commands
# A transfer this small is received on the loop itself and placed before the next step (its copy costs less
# than the step it would otherwise wait for); a larger one loads on the loader thread while steps run.
INLINE_BYTES = 4 << 20


@dataclass(frozen=True)
class Handoff:
    """What a decode engine needs to continue a request a prefill engine started (picklable)."""

    handle: KVHandle
    output_token_ids: tuple[int, ...]  # the first token (the prompt's KV is in the handle; this one's is not)
    num_cached_tokens: int  # prefix-cache hit at the prefill engine, for usage
    arrival_time: float
    first_scheduled_time: float | None
    first_token_time: float | None
    exported_at: float  # perf_counter when the prefill engine began the export (one clock for all processes)


class PrefillLoop(StepLoop):
    def __init__(self, engine: LLMEngine, metrics: EngineMetrics, transport: KVTransport, pd: PDMetrics) -> None:
        super().__init__(engine, metrics, "process")
        self.transport = transport
        self.pd = pd
        self.handoffs = 0

    def state(self) -> dict:
        return {**super().state(), "role": "prefill", "handoffs": self.handoffs}

    def _step(self) -> list[Output]:
        started = time.perf_counter()
        outputs = super()._step()
        by_key = {out[0]: i for i, out in enumerate(outputs)}
        for key, seq in list(self.seqs.items()):
            if seq.status is SequenceStatus.RUNNING and seq.num_output_tokens > 0:
                handoff = self._hand_off(key, seq)
                if key in by_key:
                    text = outputs[by_key[key]][1]
                    outputs[by_key[key]] = (key, text, True, HANDOFF, handoff)
                else:  # the first token brought no text yet (half a character, or held back)
                    outputs.append((key, "", True, HANDOFF, handoff))
        if by_key:
            self.metrics.refresh_idle(self.engine)  # the step's gauges counted the requests handed off
        self.pd.step_seconds.observe(time.perf_counter() - started)
        return outputs

    def _hand_off(self, key: Hashable, seq: Sequence) -> Handoff:
        """Send the prompt's blocks and let the request go; its full blocks stay in the prefix cache."""
        engine = self.engine
        exported_at = time.perf_counter()
        prompt_blocks = seq.block_table[:blocks_for(seq.num_prompt_tokens, engine.config.block_size)]
        handle = self.transport.send(gather_blocks(engine.runner.kv_caches, prompt_blocks))
        handoff = Handoff(handle, tuple(seq.output_token_ids), seq.num_cached_tokens or 0, seq.arrival_time,
                          seq.first_scheduled_time, seq.first_token_time, exported_at)
        engine.scheduler.finish(seq, HANDOFF)
        engine.detokenizers.pop(seq.seq_id, None)
        del self.seqs[key], self.keys[seq.seq_id]
        self.handoffs += 1
        return handoff


@dataclass(eq=False)
class _Incoming:
    """A request taken in whose blocks are on their way (or waiting for room in the pool)."""

    key: Hashable
    prompt_token_ids: list[int]
    params: SamplingParams
    tenant: str
    request_id: str
    handoff: Handoff
    load: concurrent.futures.Future


class DecodeLoop(StepLoop):
    def __init__(self, engine: LLMEngine, metrics: EngineMetrics, transport: KVTransport, pd: PDMetrics) -> None:
        super().__init__(engine, metrics, "process")
        self.transport = transport
        self.pd = pd
        self.loader = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="kv-loader")
        self.incoming: dict[Hashable, _Incoming] = {}  # in arrival order
        self.transfer_s: dict[Hashable, float] = {}  # key -> its transfer time, until its usage is sent
        self.transfers = 0
        self.loaded_aside = 0  # transfers received on the loader thread (the rest on the loop)
        self.transfer_wait_s = 0.0

    def state(self) -> dict:
        return {**super().state(), "role": "decode", "transfers": self.transfers, "loaded_aside": self.loaded_aside,
                "transfer_queue": len(self.incoming), "transfer_wait_s": self.transfer_wait_s}

    def idle(self) -> bool:
        return not self.incoming and super().idle()

    def num_waiting(self) -> int:
        return super().num_waiting() + len(self.incoming)

    def handle(self, command: tuple) -> tuple | None:
        kind = command[0]
        if kind == "decode":
            _, key, prompt_token_ids, params, tenant, request_id, handoff = command
            self.adds_taken += 1
            if handoff.handle.nbytes <= INLINE_BYTES:
                load = concurrent.futures.Future()
                try:
                    load.set_result(self.transport.receive(handoff.handle, self.engine.device))
                except Exception as exc:  # noqa: BLE001 - placed as a failed transfer of its own request
                    load.set_exception(exc)
            else:
                load = self.loader.submit(self.transport.receive, handoff.handle, self.engine.device)
                self.loaded_aside += 1
            self.incoming[key] = _Incoming(key, prompt_token_ids, params, tenant, request_id, handoff, load)
            self.pd.queue_depth.set(len(self.incoming))
            return None
        if kind == "abort":
            self.transfer_s.pop(command[1], None)
            if command[1] in self.incoming:
                self._drop(self.incoming.pop(command[1]))
                self.pd.queue_depth.set(len(self.incoming))
                return None
        if kind == "stop":
            for item in self.incoming.values():
                self._drop(item)
            self.incoming.clear()
            self.loader.shutdown(wait=True)
        return super().handle(command)

    def _drop(self, item: _Incoming) -> None:
        """A transfer nobody will decode: release its handle whether or not the load ran."""
        if item.load.cancel():
            self.transport.discard(item.handoff.handle)

    def before_step(self) -> None:
        """Place every arrived transfer that fits; with nothing else to run, wait for one (time lost to transfer)."""
        if not self.incoming:
            return
        if not self.engine.has_unfinished():
            pending = [item.load for item in self.incoming.values()]
            if not any(f.done() for f in pending):
                started = time.perf_counter()
                concurrent.futures.wait(pending, timeout=WAIT_SLICE_S, return_when=concurrent.futures.FIRST_COMPLETED)
                waited = time.perf_counter() - started
                self.transfer_wait_s += waited
                self.pd.wait_seconds.inc(waited)
        for key in list(self.incoming):
            item = self.incoming[key]
            if not item.load.done():
                continue  # later transfers may be placed first: each holds its own blocks
            if not self._place(item):
                break  # no room: keep arrival order among those waiting for room
            del self.incoming[key]
        self.pd.queue_depth.set(len(self.incoming))

    def _place(self, item: _Incoming) -> bool:
        """Put a received request into the running batch; False when the pool has no room for it yet."""
        engine, sched, bm = self.engine, self.engine.scheduler, self.engine.block_manager
        handoff = item.handoff
        try:
            kv = item.load.result()
        except Exception as exc:  # noqa: BLE001 - a failed transfer fails its request, not the loop
            self.failures.append((item.key, f"the KV transfer failed: {exc}"))
            return True
        seq = Sequence(list(item.prompt_token_ids), item.params, tenant=item.tenant, request_id=item.request_id,
                       arrival_time=handoff.arrival_time)
        seq.token_ids.extend(handoff.output_token_ids)
        num_prompt_blocks = blocks_for(seq.num_prompt_tokens, engine.config.block_size)
        if len(sched.running) >= engine.config.max_num_seqs or not bm.can_append(seq, seq.num_prompt_tokens):
            return False
        bm.append_slots(seq, seq.num_prompt_tokens)
        place_blocks(engine.runner.kv_caches, seq.block_table[:num_prompt_blocks], kv)
        seq.num_computed_tokens = seq.num_prompt_tokens  # the first token's K/V: the next step computes it
        seq.num_cached_tokens = handoff.num_cached_tokens
        seq.first_scheduled_time = handoff.first_scheduled_time
        seq.first_token_time = seq.last_token_time = handoff.first_token_time
        seq.status = SequenceStatus.RUNNING
        detok = IncrementalDetokenizer(engine.tokenizer, seq.prompt_token_ids, item.params.stop)
        detok.push(list(handoff.output_token_ids))  # the prefill engine streamed this text already
        engine.detokenizers[seq.seq_id] = detok
        bisect.insort(sched.running, seq, key=lambda s: s.arrival_time)
        self.seqs[item.key] = seq
        self.keys[seq.seq_id] = item.key
        transfer_s = time.perf_counter() - handoff.exported_at
        self.transfer_s[item.key] = transfer_s
        self.transfers += 1
        self.pd.transfer_seconds.observe(transfer_s)
        self.pd.transfer_bytes.observe(handoff.handle.nbytes)
        return True

    def _step(self) -> list[Output]:
        started = time.perf_counter()
        outputs = super()._step()
        self.pd.step_seconds.observe(time.perf_counter() - started)
        for key, _, finished, _, usage in outputs:
            if finished:
                transfer_s = self.transfer_s.pop(key, None)
                if usage is not None and transfer_s is not None:
                    usage["kv_transfer_s"] = round(transfer_s, 6)
        return outputs


def role_loop(role: str, engine: LLMEngine, metrics: EngineMetrics, transport: str, model_name: str) -> StepLoop:
    """The step loop of an engine process started for `role` ("prefill" | "decode")."""
    from servescope.reference_engine.disagg.transport import make_transport

    pd = PDMetrics(metrics.registry, model_name, role)
    loop_class = {"prefill": PrefillLoop, "decode": DecodeLoop}[role]
    return loop_class(engine, metrics, make_transport(transport), pd)
