"""The aiohttp transport: a second widely used client, kept for comparison and odd servers.

Send and connect times come from aiohttp's TraceConfig hooks (request headers
sent, connection create start/end), so TTFT starts when the request goes out.
"""

from __future__ import annotations

import asyncio
from time import perf_counter
from types import SimpleNamespace
from typing import Any

import aiohttp

from servescope.harness.client.endpoint import PREWARM_PATHS
from servescope.harness.client.exchange import Exchange
from servescope.harness.client.transports.base import Transport


async def _mark(name: str, session: Any, ctx: SimpleNamespace, params: Any) -> None:
    marks = ctx.trace_request_ctx
    if isinstance(marks, dict):
        marks[name] = perf_counter()


def _tracer() -> aiohttp.TraceConfig:
    trace = aiohttp.TraceConfig()
    trace.on_connection_create_start.append(lambda s, c, p: _mark("connect_start", s, c, p))
    trace.on_connection_create_end.append(lambda s, c, p: _mark("connect_end", s, c, p))
    trace.on_request_headers_sent.append(lambda s, c, p: _mark("sent", s, c, p))
    return trace


class AiohttpTransport(Transport):
    name = "aiohttp"

    def __init__(self, *args, **kwargs) -> None:  # type: ignore[no-untyped-def]
        super().__init__(*args, **kwargs)
        self._session: aiohttp.ClientSession | None = None
        self._timeout = aiohttp.ClientTimeout(total=None, sock_connect=self.config.timeout_s,
                                              sock_read=self.config.timeout_s)

    def _client(self) -> aiohttp.ClientSession:
        # Created lazily: a ClientSession binds to the running event loop.
        if self._session is None:
            self._session = aiohttp.ClientSession(
                base_url=self.endpoint.origin, headers=self.common_headers(), timeout=self._timeout,
                connector=aiohttp.TCPConnector(limit=0, limit_per_host=0, keepalive_timeout=300),
                trace_configs=[_tracer()], auto_decompress=False,
            )
        return self._session

    async def exchange(self, path: str, body: bytes, ex: Exchange) -> None:
        marks: dict[str, float] = {}
        ex.sent_at = perf_counter()
        try:
            async with self._client().post(path, data=body, headers={"Content-Type": "application/json"},
                                           trace_request_ctx=marks) as response:
                ex.status = response.status
                ex.content_type = response.headers.get("Content-Type", "")
                pieces, times = ex.pieces, ex.times
                async for data in response.content.iter_any():
                    t = perf_counter()
                    pieces.append(data)
                    times.append(t)
                ex.end_at = times[-1] if times else perf_counter()
                ex.complete = True
        except asyncio.CancelledError:
            ex.fail("cancelled", "cancelled by the load generator", perf_counter())
            raise
        except aiohttp.ClientConnectorError as exc:
            ex.fail("connect", f"cannot connect to {self.endpoint.origin}: {exc.os_error or exc}", perf_counter())
        except (aiohttp.ServerTimeoutError, asyncio.TimeoutError) as exc:
            if "connect" in str(exc).lower():
                ex.fail("connect", f"cannot connect to {self.endpoint.origin}: timed out", perf_counter())
            else:
                what = "no response" if ex.status is None else "stream stalled"
                ex.fail("timeout", f"{what}: no bytes for {self.config.timeout_s:g}s", perf_counter())
        except (aiohttp.ServerDisconnectedError, aiohttp.ClientPayloadError, aiohttp.ClientOSError) as exc:
            ex.fail("reset", f"{type(exc).__name__}: {exc}", perf_counter())
        except aiohttp.ClientResponseError as exc:
            ex.fail("protocol", f"malformed HTTP response: {exc.message}", perf_counter())
        finally:
            if "sent" in marks:
                ex.sent_at = marks["sent"]
            if "connect_start" in marks:
                ex.connect_s = marks.get("connect_end", perf_counter()) - marks["connect_start"]

    async def prewarm(self, n: int) -> int:
        session = self._client()
        path = None
        for suffix in PREWARM_PATHS:
            candidate = self.endpoint.path(suffix)
            try:
                async with session.get(candidate) as response:
                    await response.read()
            except aiohttp.ClientError:
                return 0
            path = path or candidate
            if 200 <= response.status < 300:
                path = candidate
                break

        # Hold every response open until all have answered (see HttpxTransport.prewarm).
        results = await asyncio.gather(*(session.get(path) for _ in range(n)), return_exceptions=True)  # type: ignore[arg-type]
        opened = [r for r in results if isinstance(r, aiohttp.ClientResponse)]
        for response in opened:
            await response.read()
            response.release()
        return len(opened)

    async def aclose(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None
