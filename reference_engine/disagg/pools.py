"""The front end's client of a disaggregated engine: P prefill and D decode engine processes behind one `EngineClient`.

`start_disaggregated` starts every engine process (in parallel, blocking until
all are built, so the HTTP port is bound only when requests can be served).
`DisaggEngineClient.generate` runs a request on the least-loaded live prefill
engine, streams its first token, forwards the prefill engine's `Handoff` (the
KV handle) to the least-loaded live decode engine, and streams the rest. A
handle that never reaches a decode engine (the client left in between) is
discarded here, so no transfer outlives its request.

A decode engine that dies fails its own requests (HTTP 500, or an error event
mid-stream) and leaves the routing; the others serve on. When no prefill or no
decode engine is left the whole engine is gone: /health answers 503 and
`serve` exits, as with one engine process.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, replace
from typing import Any

from servescope.reference_engine.disagg.merge import merge_pages
from servescope.reference_engine.disagg.roles import HANDOFF, Handoff
from servescope.reference_engine.disagg.transport import KVTransport, make_transport, resolve_transport
from servescope.reference_engine.engine_client import EngineClient, EngineFailed, RequestOutput
from servescope.reference_engine.engine_process import (
    EngineLaunch,
    EngineProcessHandle,
    ProcessEngineClient,
    start_engine_process,
)
from servescope.reference_engine.errors import ConfigError
from servescope.reference_engine.sequence import SamplingParams

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DisaggConfig:
    """`--disaggregate P:D` and `--kv-transport`."""

    prefill: int
    decode: int
    kv_transport: str = "auto"

    @classmethod
    def parse(cls, text: str, kv_transport: str = "auto") -> DisaggConfig:
        p, sep, d = text.partition(":")
        if not sep or not p.isdigit() or not d.isdigit() or int(p) < 1 or int(d) < 1:
            raise ConfigError(f"--disaggregate {text!r}: write P:D, the prefill and decode engine counts, "
                              "each at least 1, e.g. 1:1")
        return cls(int(p), int(d), kv_transport)


class _PrefillMember(ProcessEngineClient):
    """A prefill engine's client: a handoff whose request has left (aborted as it was handed off) is discarded."""

    def __init__(self, handle: EngineProcessHandle, transport: KVTransport) -> None:
        super().__init__(handle)
        self.transport = transport

    def _deliver(self, outputs: list[tuple], failures: list[tuple[int, str]]) -> None:
        for key, _, _, reason, handoff in outputs:
            if reason == HANDOFF and key not in self._streams:
                self.transport.discard(handoff.handle)
        super()._deliver(outputs, failures)


def start_disaggregated(launch: EngineLaunch, pd: DisaggConfig) -> DisaggEngineClient:
    """Start P prefill and D decode engine processes from one launch (blocking); stops them all on failure."""
    if launch.config.tensor_parallel_size > 1:
        raise ConfigError("--disaggregate with --tensor-parallel-size > 1 is not supported yet; use one or the other")
    transport = resolve_transport(pd.kv_transport, launch.config.device)
    # The prefill loop must see each first token before it schedules the request again: no overlap, no drafts.
    prefill = replace(launch, role="prefill", kv_transport=transport,
                      config=replace(launch.config, async_scheduling=False, spec=None))
    # The prefix cache lives on the prefill side; a decode engine's blocks all come from transfers.
    decode = replace(launch, role="decode", kv_transport=transport,
                     config=replace(launch.config, enable_prefix_caching=False))
    launches = [prefill] * pd.prefill + [decode] * pd.decode
    with concurrent.futures.ThreadPoolExecutor(len(launches)) as pool:
        futures = [pool.submit(start_engine_process, one) for one in launches]
        concurrent.futures.wait(futures)
    errors = [f.exception() for f in futures if f.exception() is not None]
    if errors:
        for f in futures:
            if f.exception() is None:
                f.result().shutdown()
        raise errors[0]
    handles = [f.result() for f in futures]
    store = make_transport(transport)
    return DisaggEngineClient([_PrefillMember(h, store) for h in handles[:pd.prefill]],
                              [ProcessEngineClient(h) for h in handles[pd.prefill:]], store)


class DisaggEngineClient(EngineClient):
    mode = "disaggregated"

    def __init__(self, prefill: list[ProcessEngineClient], decode: list[ProcessEngineClient],
                 transport: KVTransport) -> None:
        super().__init__(prefill[0].facts, prefill[0].tokenizer)
        self.prefill = prefill
        self.decode = decode
        self.transport = transport
        self.on_lost = None  # called once when no prefill or no decode engine is left
        for member in (*prefill, *decode):
            member.on_lost = lambda reason, member=member: self._member_lost(member, reason)

    @property
    def members(self) -> list[ProcessEngineClient]:
        return [*self.prefill, *self.decode]

    def _member_lost(self, member: ProcessEngineClient, reason: str) -> None:
        pool = "prefill" if member in self.prefill else "decode"
        log.error("a %s engine (pid %s) is gone: %s", pool, member.handle.pid, reason)
        if self._lost is None and not (any(m.alive for m in self.prefill) and any(m.alive for m in self.decode)):
            self._lost = f"no {pool} engine is left (the last one: {reason})"
            if self.on_lost is not None:
                self.on_lost(self._lost)

    def _pick(self, pool: list[ProcessEngineClient]) -> ProcessEngineClient:
        """The live engine of `pool` with the fewest requests in flight."""
        alive = [m for m in pool if m.alive]
        if not alive or self._lost is not None:
            raise EngineFailed(self._lost or "no engine of this pool is left")
        return min(alive, key=lambda m: len(m._streams))

    # -- lifecycle -----------------------------------------------------------
    async def start(self) -> None:
        for member in self.members:
            await member.start()

    async def stop(self) -> None:
        await asyncio.gather(*(member.stop() for member in self.members))

    def shutdown_processes(self) -> None:
        for member in self.members:
            member.handle.shutdown()

    @property
    def num_waiting(self) -> int:
        return sum(m.num_waiting for m in self.members if m.alive)

    def _post(self, command: tuple) -> None:
        raise NotImplementedError("a disaggregated engine routes each request to its members")

    # -- requests --------------------------------------------------------------
    async def generate(self, prompt_token_ids: list[int], params: SamplingParams, tenant: str = "",
                       request_id: str = "", arrival_time: float | None = None) -> AsyncIterator[RequestOutput]:
        arrival = arrival_time if arrival_time is not None else time.perf_counter()
        handoff: Handoff | None = None
        first_text = ""
        async with contextlib.aclosing(self._pick(self.prefill).generate(
                prompt_token_ids, params, tenant, request_id, arrival)) as prefilled:
            async for out in prefilled:
                if out.finish_reason == HANDOFF:
                    handoff, first_text = out.usage, out.text
                else:
                    yield out  # finished on its first token (EOS, max_tokens 1, a stop string)
        if handoff is None:
            return
        posted = False
        try:
            if first_text:
                yield RequestOutput(first_text, False, None, None)
            decoded = self._pick(self.decode).stream("decode", prompt_token_ids, params, tenant, request_id, handoff)
            async with contextlib.aclosing(decoded):
                posted = True  # the first step of the iteration below posts it, before any await
                async for out in decoded:
                    yield out
        finally:
            if not posted:
                self.transport.discard(handoff.handle)

    async def render_metrics(self) -> bytes:
        live = [(pool, i, m) for pool, members in (("prefill", self.prefill), ("decode", self.decode))
                for i, m in enumerate(members) if m.alive]
        pages = await asyncio.gather(*(m.render_metrics() for _, _, m in live), return_exceptions=True)
        return merge_pages([({"pool": pool, "replica": str(i)}, page)
                            for (pool, i, _), page in zip(live, pages) if isinstance(page, bytes)])

    async def engine_state(self) -> dict[str, Any]:
        async def one(member: ProcessEngineClient) -> dict[str, Any]:
            if not member.alive:
                return {"alive": False, "reason": member.lost_reason, "pid": member.handle.pid}
            try:
                return {"alive": True, **await member.engine_state()}
            except EngineFailed as exc:
                return {"alive": False, "reason": str(exc), "pid": member.handle.pid}

        prefill = await asyncio.gather(*(one(m) for m in self.prefill))
        decode = await asyncio.gather(*(one(m) for m in self.decode))
        return {"mode": self.mode, "kv_transport": self.transport.name, "prefill": list(prefill),
                "decode": list(decode), "pids": [m.handle.pid for m in self.members]}
