"""The fast transport: an asyncio.Protocol HTTP/1.1 keep-alive client on httptools.

Why not httpx on the hot path: httpx wakes a coroutine per body chunk and runs
each read through several layers (httpcore, h11, anyio); benchmarks/loadgen_capacity.py
measured it at several times the CPU per chunk of this transport, and it sends
a first wave of streams spread over milliseconds. Here each read costs one
`perf_counter()` (the first statement of `data_received`, before any parsing),
one call into httptools' C parser and two list appends; the awaiting coroutine
wakes once, when the response ends.

httptools (the C HTTP parser the uvloop authors maintain) handles status line,
headers, chunked transfer coding and Content-Length; bodies without either end
at EOF.
"""

from __future__ import annotations

import asyncio
import ssl
from time import perf_counter

import httptools

from servescope.harness.client.endpoint import PREWARM_PATHS
from servescope.harness.client.exchange import Exchange
from servescope.harness.client.transports.base import Transport


class _Connection(asyncio.Protocol):
    """One keep-alive connection; carries at most one request at a time."""

    def __init__(self, loop: asyncio.AbstractEventLoop, timeout_s: float) -> None:
        self.loop = loop
        self.timeout_s = timeout_s
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self.keep_alive = False
        self.used = False  # has carried a request before (for the stale keep-alive retry)
        self._ex: Exchange | None = None
        self._waiter: asyncio.Future[None] | None = None
        self._parser: httptools.HttpResponseParser | None = None
        self._t = 0.0  # arrival time of the read being parsed (and of the last one)
        self._got_bytes = False
        self._delimited = False  # body length given by Content-Length or chunked coding
        self._timer: asyncio.TimerHandle | None = None

    # --- asyncio.Protocol ---------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self._t = perf_counter()  # first statement: the time the bytes were seen
        parser = self._parser
        if parser is None:  # bytes with no request in flight: the server is confused; drop the connection
            self.closed = True
            self.transport.close()  # type: ignore[union-attr]
            return
        self._got_bytes = True
        try:
            parser.feed_data(data)
        except httptools.HttpParserError as exc:
            self._finish("protocol", f"malformed HTTP response: {exc}")
            self.abort()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self._ex is None:
            return
        ex = self._ex
        if ex.status is not None and not self._delimited:
            ex.complete = True  # body delimited by EOF: this is its normal end
            ex.end_at = self._t
            self._finish(None, None)
        elif not self._got_bytes:
            self._finish("reset", "server closed the connection before answering")
        else:
            self._finish("reset", f"connection closed mid-response ({exc or 'EOF'})")

    # --- httptools callbacks -----------------------------------------------
    def on_header(self, name: bytes, value: bytes) -> None:
        lname = name.lower()
        if lname == b"content-type":
            self._ex.content_type = value.decode("latin-1")  # type: ignore[union-attr]
        elif lname in (b"content-length", b"transfer-encoding"):
            self._delimited = True

    def on_headers_complete(self) -> None:
        self._ex.status = self._parser.get_status_code()  # type: ignore[union-attr]

    def on_body(self, body: bytes) -> None:
        ex = self._ex
        ex.pieces.append(body)  # type: ignore[union-attr]
        ex.times.append(self._t)  # type: ignore[union-attr]

    def on_message_complete(self) -> None:
        ex = self._ex
        ex.complete = True  # type: ignore[union-attr]
        ex.end_at = self._t  # type: ignore[union-attr]
        self.keep_alive = self._parser.should_keep_alive()  # type: ignore[union-attr]
        self._finish(None, None)

    # --- requests ----------------------------------------------------------
    def start(self, request: bytes, ex: Exchange) -> asyncio.Future[None]:
        """Send one request; the returned future resolves when the response ends or fails."""
        self._ex = ex
        self._waiter = waiter = self.loop.create_future()
        self._parser = httptools.HttpResponseParser(self)
        self._got_bytes = self._delimited = self.keep_alive = False
        self._timer = self.loop.call_later(self.timeout_s, self._check_idle)
        ex.sent_at = self._t = perf_counter()
        self.transport.write(request)  # type: ignore[union-attr]
        return waiter

    def _check_idle(self) -> None:
        # Re-armed from the last read time instead of reset on every read: keeps the read path free of timer work.
        idle = perf_counter() - self._t
        if idle >= self.timeout_s - 1e-3:
            self._timer = None
            what = "no response" if not self._got_bytes else "stream stalled"
            self._finish("timeout", f"{what}: no bytes for {self.timeout_s:g}s")
            self.abort()
        else:
            self._timer = self.loop.call_later(self.timeout_s - idle, self._check_idle)

    def _finish(self, kind: str | None, message: str | None) -> None:
        ex, waiter = self._ex, self._waiter
        if ex is None or waiter is None:
            return
        if kind is not None:
            ex.fail(kind, message or kind, perf_counter())
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._ex = self._waiter = None
        self._parser = None
        self.used = True
        if not waiter.done():
            waiter.set_result(None)

    def abort(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.abort()

    def detach(self) -> None:
        """Forget the in-flight request (after cancellation) without resolving it."""
        if self._timer is not None:
            self._timer.cancel()
        self._ex = self._waiter = self._parser = self._timer = None


class FastTransport(Transport):
    name = "fast"

    def __init__(self, *args, **kwargs) -> None:  # type: ignore[no-untyped-def]
        super().__init__(*args, **kwargs)
        self._idle: list[_Connection] = []  # LIFO: the most recently used connection is the warmest
        self._busy: set[_Connection] = set()
        self._ssl = ssl.create_default_context() if self.endpoint.tls else None
        head = [f"Host: {self.endpoint.host_header}"] + [f"{k}: {v}" for k, v in self.common_headers().items()]
        self._head_lines = "\r\n".join(head)
        self._post_heads: dict[str, bytes] = {}

    # --- connections ---------------------------------------------------------
    async def _open(self) -> _Connection:
        loop = asyncio.get_running_loop()
        ep = self.endpoint
        async with asyncio.timeout(self.config.timeout_s):
            _, conn = await loop.create_connection(
                lambda: _Connection(loop, self.config.timeout_s), ep.host, ep.port,
                ssl=self._ssl, server_hostname=ep.host if self._ssl else None,
            )
        return conn

    def _take_idle(self) -> _Connection | None:
        idle = self._idle
        while idle:
            conn = idle.pop()
            if not conn.closed:
                return conn
        return None

    def _release(self, conn: _Connection, ex: Exchange) -> None:
        self._busy.discard(conn)
        if ex.complete and conn.keep_alive and not conn.closed and len(self._idle) < self.config.pool_size:
            self._idle.append(conn)
        elif not conn.closed:
            conn.closed = True
            conn.transport.close()  # type: ignore[union-attr]

    def _post_head(self, path: str) -> bytes:
        head = self._post_heads.get(path)
        if head is None:
            head = f"POST {path} HTTP/1.1\r\n{self._head_lines}\r\nContent-Type: application/json\r\nContent-Length: ".encode()
            self._post_heads[path] = head
        return head

    # --- Transport API -------------------------------------------------------
    async def exchange(self, path: str, body: bytes, ex: Exchange) -> None:
        request = b"%s%d\r\n\r\n%s" % (self._post_head(path), len(body), body)
        await self._send(request, ex, retry_stale=True)

    async def _send(self, request: bytes, ex: Exchange, retry_stale: bool) -> None:
        conn = self._take_idle()
        if conn is None:
            t0 = perf_counter()
            try:
                conn = await self._open()
            except (OSError, TimeoutError, ssl.SSLError) as exc:
                ex.fail("connect", f"cannot connect to {self.endpoint.origin}: {_describe(exc)}", perf_counter())
                return
            ex.connect_s = perf_counter() - t0
        reused = conn.used
        self._busy.add(conn)
        try:
            await conn.start(request, ex)
        except asyncio.CancelledError:
            conn.detach()
            conn.abort()
            self._busy.discard(conn)
            ex.fail("cancelled", "cancelled by the load generator", perf_counter())
            raise
        self._release(conn, ex)
        if retry_stale and reused and ex.status is None and ex.error_kind == "reset" and not ex.pieces:
            # The server closed an idle keep-alive connection as we reused it (a race every
            # HTTP/1.1 client meets); it never answered, so send once more on a new connection.
            ex.error_kind = ex.error_message = ex.end_at = None
            await self._send(request, ex, retry_stale=False)

    async def prewarm(self, n: int) -> int:
        if n <= 0:
            return len(self._idle)
        path = await self._probe_path()
        if path is None:
            return len(self._idle)
        need = max(0, n - len(self._idle))
        await asyncio.gather(*(self._warm_one(path) for _ in range(need)))
        return len(self._idle)

    async def _probe_path(self) -> str | None:
        """The first of /health, /v1/models, / that answers 2xx (else the first that answered at all)."""
        answered: str | None = None
        for suffix in PREWARM_PATHS:
            path = self.endpoint.path(suffix)
            status = await self._warm_one(path)
            if status is None:
                return answered  # cannot connect: requests will record it
            if 200 <= status < 300:
                return path
            answered = answered or path
        return answered

    async def _warm_one(self, path: str) -> int | None:
        ex = Exchange()
        request = f"GET {path} HTTP/1.1\r\n{self._head_lines}\r\n\r\n".encode()
        try:
            conn = await self._open()
        except (OSError, TimeoutError, ssl.SSLError):
            return None
        await conn.start(request, ex)
        self._release(conn, ex)
        return ex.status

    async def aclose(self) -> None:
        for conn in [*self._idle, *self._busy]:
            if not conn.closed:
                conn.closed = True
                conn.transport.close()  # type: ignore[union-attr]
        self._idle.clear()
        self._busy.clear()


def _describe(exc: BaseException) -> str:
    if isinstance(exc, TimeoutError):
        return "timed out"
    return str(exc) or type(exc).__name__
