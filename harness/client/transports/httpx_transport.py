"""The httpx transport: the reference implementation the fast transport is checked against.

Slower per chunk (see benchmarks/loadgen_capacity.py), but it is the most
widely used async HTTP client in Python and handles proxies and odd servers;
pick it with `transport="httpx"` when the fast transport meets a server it
cannot talk to. Send time and connect time come from httpcore's trace
extension, so TTFT starts when the request bytes go out, as in the fast transport.
"""

from __future__ import annotations

import asyncio
from time import perf_counter
from typing import Any

import httpx

from servescope.harness.client.endpoint import PREWARM_PATHS
from servescope.harness.client.exchange import Exchange
from servescope.harness.client.transports.base import Transport


class HttpxTransport(Transport):
    name = "httpx"

    def __init__(self, *args, **kwargs) -> None:  # type: ignore[no-untyped-def]
        super().__init__(*args, **kwargs)
        cfg = self.config
        self._client = httpx.AsyncClient(
            base_url=self.endpoint.origin,
            headers=self.common_headers(),
            # No cap on open connections (the load model sets the concurrency); keep pool_size idle.
            limits=httpx.Limits(max_connections=None, max_keepalive_connections=cfg.pool_size, keepalive_expiry=None),
            timeout=httpx.Timeout(cfg.timeout_s),  # read timeout = idle timeout between reads
            http1=True, http2=False, trust_env=False,
        )

    async def exchange(self, path: str, body: bytes, ex: Exchange) -> None:
        marks: dict[str, float] = {}

        async def trace(name: str, info: dict[str, Any]) -> None:
            if name in ("connection.connect_tcp.started", "connection.connect_tcp.complete",
                        "connection.start_tls.complete", "http11.send_request_headers.started"):
                marks[name] = perf_counter()

        ex.sent_at = perf_counter()
        try:
            request = self._client.build_request(
                "POST", path, content=body, headers={"Content-Type": "application/json"},
                extensions={"trace": trace},
            )
            response = await self._client.send(request, stream=True)
            try:
                ex.status = response.status_code
                ex.content_type = response.headers.get("content-type", "")
                pieces, times = ex.pieces, ex.times
                async for raw in response.aiter_raw():
                    t = perf_counter()
                    pieces.append(raw)
                    times.append(t)
                ex.end_at = times[-1] if times else perf_counter()
                ex.complete = True
            finally:
                await response.aclose()
        except asyncio.CancelledError:
            ex.fail("cancelled", "cancelled by the load generator", perf_counter())
            raise
        except httpx.ConnectTimeout as exc:
            ex.fail("connect", f"cannot connect to {self.endpoint.origin}: timed out ({exc})", perf_counter())
        except httpx.TimeoutException:
            what = "no response" if ex.status is None else "stream stalled"
            ex.fail("timeout", f"{what}: no bytes for {self.config.timeout_s:g}s", perf_counter())
        except httpx.ConnectError as exc:
            ex.fail("connect", f"cannot connect to {self.endpoint.origin}: {exc}", perf_counter())
        except (httpx.ReadError, httpx.WriteError, httpx.RemoteProtocolError) as exc:
            kind = "reset" if _is_disconnect(exc) else "protocol"
            ex.fail(kind, f"{type(exc).__name__}: {exc}", perf_counter())
        finally:
            sent = marks.get("http11.send_request_headers.started")
            if sent is not None:
                ex.sent_at = sent
            if "connection.connect_tcp.started" in marks:
                done = marks.get("connection.start_tls.complete") or marks.get("connection.connect_tcp.complete")
                ex.connect_s = (done or perf_counter()) - marks["connection.connect_tcp.started"]

    async def prewarm(self, n: int) -> int:
        """n concurrent GETs: httpx opens one connection per request still in flight."""
        path = None
        for suffix in PREWARM_PATHS:
            candidate = self.endpoint.path(suffix)
            try:
                response = await self._client.get(candidate)
            except httpx.HTTPError:
                return 0
            path = path or candidate
            if response.is_success:
                path = candidate
                break
        # Hold every response open until all have answered: a GET that finished early would hand
        # its connection to the next one and fewer than n connections would be opened.
        requests = [self._client.build_request("GET", path) for _ in range(n)]  # type: ignore[arg-type]
        results = await asyncio.gather(*(self._client.send(r, stream=True) for r in requests), return_exceptions=True)
        opened = [r for r in results if isinstance(r, httpx.Response)]
        for response in opened:
            await response.aread()
            await response.aclose()
        return len(opened)

    async def aclose(self) -> None:
        await self._client.aclose()


def _is_disconnect(exc: Exception) -> bool:
    text = str(exc).lower()
    return isinstance(exc, (httpx.ReadError, httpx.WriteError)) or "disconnect" in text or "closed" in text or "incomplete" in text
