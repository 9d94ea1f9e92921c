"""The live page's HTTP server: the standard library's threaded server, in daemon threads of the driver.

Routes: `GET /` the page; `GET /live.js` and `GET /plotly.min.js` its scripts
(plotly.js from the plotly package, so the page works offline); `GET
/api/state?since=V` the run's news since version V; `POST /api/stop` the stop
button (a graceful stop, as Ctrl-C); `GET /report.html` the report once built.

http.server rather than an async framework: the harness must run without
aiohttp, the page is polled by one or two browsers, and a thread per request
keeps the server out of the dispatcher's loop.

Safety: bound to loopback by default. Bound anywhere else, every request but
the two static scripts must carry the token printed on the console (`?token=`
or the `X-Servescope-Token` header). On loopback the Host header must name
loopback (a page elsewhere cannot reach it through DNS rebinding), and stop
needs a custom header, which a cross-origin page cannot send without a CORS
preflight this server never approves.
"""

from __future__ import annotations

import hmac
import ipaddress
import json
import socket
import threading
from functools import lru_cache
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

from servescope.harness.live.state import LiveState
from servescope.rundir.jsonio import dumps

STOP_HEADER = "X-Servescope-Stop"
TOKEN_HEADER = "X-Servescope-Token"
LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1", "[::1]")


def is_loopback(host: str) -> bool:
    if host in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


@lru_cache(maxsize=1)
def plotly_bundle() -> bytes:
    """plotly.min.js as shipped in the plotly package (about 4.8 MB), read once."""
    from plotly.offline import get_plotlyjs

    return get_plotlyjs().encode("utf-8")


class LiveServer(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, address: tuple[str, int], state: LiveState, page: bytes, script: bytes,
                 token: str | None, run_dir: Path) -> None:
        if ":" in address[0]:
            self.address_family = socket.AF_INET6  # `--live-host ::` or an IPv6 address
        super().__init__(address, _Handler)
        self.state, self.page, self.script, self.token, self.run_dir = state, page, script, token, run_dir
        self.loopback = is_loopback(address[0])
        self.last_poll: float | None = None  # time.monotonic() of the page's latest state request
        self.polls = 0
        self._thread = threading.Thread(target=self.serve_forever, kwargs={"poll_interval": 0.2},
                                        name="live-page", daemon=True)

    @property
    def port(self) -> int:
        return int(self.server_address[1])

    def start(self) -> "LiveServer":
        self._thread.start()
        return self

    def close(self) -> None:
        self.shutdown()
        self.server_close()
        self._thread.join(timeout=5)


class _Handler(BaseHTTPRequestHandler):
    server: LiveServer
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the base class's name
        """Silent: the run's console is for the run."""

    # -- checks -------------------------------------------------------------------------------

    def _allowed(self, needs_token: bool) -> bool:
        if self.server.loopback:
            host = (self.headers.get("Host") or "").rsplit(":", 1)[0]
            if not is_loopback(host):
                self._send(403, b"forbidden: this page answers on loopback only", "text/plain")
                return False
        if needs_token and self.server.token is not None:
            given = self.headers.get(TOKEN_HEADER) or parse_qs(urlsplit(self.path).query).get("token", [""])[0]
            if not hmac.compare_digest(given.encode(), self.server.token.encode()):
                self._send(403, b"forbidden: add ?token=... as printed on the console when the run started",
                           "text/plain")
                return False
        return True

    # -- routes -------------------------------------------------------------------------------

    def do_GET(self) -> None:  # noqa: N802 - http.server's name
        path = urlsplit(self.path).path
        if path in ("/live.js", "/plotly.min.js", "/favicon.ico"):
            if not self._allowed(needs_token=False):
                return
            if path == "/favicon.ico":
                self._send(204, b"", "image/x-icon", cache=True)  # no icon, and no 404 in the browser's console
                return
            body = self.server.script if path == "/live.js" else plotly_bundle()
            self._send(200, body, "text/javascript; charset=utf-8", cache=True)
            return
        if not self._allowed(needs_token=True):
            return
        if path == "/":
            self._send(200, self.server.page, "text/html; charset=utf-8")
        elif path == "/api/state":
            import time

            self.server.last_poll = time.monotonic()
            self.server.polls += 1
            since = parse_qs(urlsplit(self.path).query).get("since", ["0"])[0]
            try:
                version = int(since)
            except ValueError:
                self._send(400, b'{"error": "since must be an integer version"}', "application/json")
                return
            self._send(200, dumps(self.server.state.snapshot(version), indent=None).encode(), "application/json")
        elif path == "/report.html":
            report = self.server.run_dir / "report.html"
            if report.exists():
                self._send(200, report.read_bytes(), "text/html; charset=utf-8")
            else:
                self._send(404, b"the report is not built yet", "text/plain")
        else:
            self._send(404, b"not found", "text/plain")

    def do_POST(self) -> None:  # noqa: N802
        length = int(self.headers.get("Content-Length") or 0)
        if length:
            self.rfile.read(min(length, 65536))  # a kept-alive connection must not read it as the next request
        if urlsplit(self.path).path != "/api/stop":
            self._send(404, b"not found", "text/plain")
            return
        if not self._allowed(needs_token=True):
            return
        if self.headers.get(STOP_HEADER) != "1":
            self._send(400, f"stop needs the header {STOP_HEADER}: 1".encode(), "text/plain")
            return
        self.server.state.request_stop()
        self._send(200, json.dumps({"stopping": True}).encode(), "application/json")

    def _send(self, status: int, body: bytes, content_type: str, cache: bool = False) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "max-age=3600" if cache else "no-store")
        self.end_headers()
        self.wfile.write(body)
