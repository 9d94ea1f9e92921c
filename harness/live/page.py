"""`--live [PORT]`: one run's live page, from binding its port to closing it after the report.

The port is bound before the run directory is written, so a port in use is a
usage error (exit 2) that costs nothing. During the run the page reads only
what the driver already collects: `LiveHooks` wraps the dispatcher's hooks
(every record batch, every tick) and `tee` the scrapers' sink. The stop
button is a graceful stop, exactly as one Ctrl-C. At the end the page links
to report.html and the server stays up while a page still polls it (at most
`LINGER_MAX_S`), so the link can be opened.
"""

from __future__ import annotations

import secrets
import socket
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from servescope.harness.config import LIVE_DEFAULT_PORT, ConfigError, RunConfig
from servescope.harness.live.server import LiveServer, is_loopback
from servescope.harness.live.state import FindingsLoop, LiveState
from servescope.harness.loadgen.dispatcher import Hooks, Progress

LINGER_IDLE_S = 5.0  # a page that has not polled for this long is closed (a finished page polls every 2 s)
LINGER_MAX_S = 120.0


def render_page(token: str | None) -> tuple[bytes, bytes]:
    """The page's HTML and its script (report_templates/live.html.j2 and live.js)."""
    from servescope.report_templates.render import TEMPLATE_DIR, environment

    html = environment().get_template("live.html.j2").render(token=token or "")
    return html.encode("utf-8"), (TEMPLATE_DIR / "live.js").read_bytes()


class LivePage:
    """The live page of one run directory; use `open()`, then `attach()` once the run clock exists."""

    def __init__(self, server: LiveServer, state: LiveState, host: str, token: str | None,
                 info: Callable[[str], None]) -> None:
        self.server, self.state, self.host, self.token, self.info = server, state, host, token, info
        self.findings: FindingsLoop | None = None

    @classmethod
    def open(cls, config: RunConfig, run_dir: Path, phases: list[dict[str, Any]], console: Any) -> "LivePage":
        """Bind the port and start serving; ConfigError (exit 2) when it cannot be bound."""
        host = config.live_host.strip()
        token = None if is_loopback(host) else secrets.token_urlsafe(18)
        state = LiveState(phases, notify=console.info)
        state.run_dir = str(run_dir)
        page, script = render_page(token)
        port = LIVE_DEFAULT_PORT if config.live is None else config.live
        try:
            server = LiveServer((host, port), state, page, script, token, run_dir)
        except OSError as exc:
            if port != LIVE_DEFAULT_PORT:
                raise ConfigError(f"--live {port} on {host}: cannot listen there ({exc.strerror or exc}); "
                                  "give another port, or --live 0 for any free one") from None
            server = LiveServer((host, 0), state, page, script, token, run_dir)  # the default port is busy
        live = cls(server.start(), state, host, token, console.info)
        console.info(f"live page: {live.url}" + ("" if token is None else "  (the token is required off loopback)"))
        return live

    @property
    def url(self) -> str:
        shown = socket.gethostname() if self.host in ("0.0.0.0", "::", "") else self.host
        shown = f"[{shown}]" if ":" in shown else shown
        return f"http://{shown}:{self.server.port}/" + (f"?token={self.token}" if self.token else "")

    def attach(self, clock: Callable[[], float], run_meta: dict[str, Any], warn: Callable[[str], None]) -> None:
        """The run clock has started: stamp data with it and judge the live rules every few seconds."""
        self.state.clock = clock
        self.state.run_meta = run_meta
        self.findings = FindingsLoop(self.state, warn=warn).start()

    def hooks(self, inner: Hooks) -> "LiveHooks":
        return LiveHooks(inner, self.state)

    def tee(self, sink: Callable[[list[dict[str, Any]]], None]) -> Callable[[list[dict[str, Any]]], None]:
        """The scrapers' sink: the run directory first, then the page."""
        def both(rows: list[dict[str, Any]]) -> None:
            sink(rows)
            self.state.add_samples(rows)

        return both

    def run_ended(self) -> None:
        """The load is over: no more live judgements (the report's diagnosis follows on everything measured)."""
        if self.findings is not None:
            self.findings.stop()

    def describe(self) -> dict[str, Any]:
        """run.json's `live`: where the page was and what judging on the data so far cost the driver."""
        loop = self.findings
        return {"url": self.url.split("?")[0], "host": self.host, "port": self.server.port,
                "token_required": self.token is not None, "polls": self.server.polls,
                "findings_evaluations": loop.evaluations if loop else 0,
                "findings_seconds": round(loop.seconds, 4) if loop else 0.0,
                "findings_fired": sorted({f["rule"] for f in self.state.snapshot(0)["findings"]})}

    def finished(self, status: str, exit_code: int, linger: bool = True) -> None:
        """Link the report, then stay up while a page still watches (Ctrl-C closes it at once).

        Without `linger` (a repetition that another follows) the page is closed at once; the
        next repetition serves a new one on the same port, which the open page reloads.
        """
        _record_in_run_json(self.server.run_dir, self.describe())
        report = (self.server.run_dir / "report.html").exists()
        self.state.finish({"status": status, "exit_code": exit_code,
                           "report": "report.html" + (f"?token={self.token}" if self.token else "") if report else None,
                           "run_dir": str(self.server.run_dir)})
        if not linger or not self._watched():
            return
        self.info(f"live page: the run is over; it stays up while open (at most {LINGER_MAX_S:.0f} s, Ctrl-C closes it)")
        deadline = time.monotonic() + LINGER_MAX_S
        try:
            while self._watched() and time.monotonic() < deadline:
                time.sleep(0.2)
        except KeyboardInterrupt:
            pass

    def _watched(self) -> bool:
        last = self.server.last_poll
        return last is not None and time.monotonic() - last < LINGER_IDLE_S

    def close(self) -> None:
        if self.findings is not None:
            self.findings.stop()
        self.server.close()


def _record_in_run_json(run_dir: Path, live: dict[str, Any]) -> None:
    """Add the `live` section to a finished run's run.json (a run directory that failed early may have none)."""
    import json

    from servescope.rundir.schema import RUN_JSON
    from servescope.rundir.writer import write_json_atomic

    path = run_dir / RUN_JSON
    try:
        meta = json.loads(path.read_text())
    except (OSError, ValueError):
        return
    write_json_atomic(path, {**meta, "live": live})


class LiveHooks:
    """The dispatcher's hooks with the live page listening in; the stop button counts as one Ctrl-C."""

    def __init__(self, inner: Hooks, state: LiveState) -> None:
        self.inner, self.state = inner, state

    def records(self, rows: list[dict[str, Any]]) -> None:
        self.inner.records(rows)
        self.state.add_records(rows)

    def flows(self, rows: list[dict[str, Any]]) -> None:
        self.inner.flows(rows)

    def notice(self, text: str) -> None:
        self.inner.notice(text)

    def tick(self, progress: Progress) -> None:
        self.inner.tick(progress)
        self.state.add_progress(progress)

    def stop_requested(self) -> int:
        return max(self.inner.stop_requested(), 1 if self.state.stop_requested else 0)

    def failure(self) -> str | None:
        return self.inner.failure()
