"""What the live page shows, kept up to date by the driver as the run goes.

`LiveState` receives what the main process already collects: every record
batch and progress tick the dispatcher hands its hooks, and every scrape of
every metrics endpoint. The workers never know it exists. Everything it
serves is stamped with a version, so a page that polls with `since=V` gets
only what changed after V: a long run costs each poll the last half-second of
news, not its whole history. A window's rows are let go FINAL_AFTER_S after
it ended (its figures stay), so memory does not grow with the run's length
beyond one small record per window and scrape.

Four kinds of thread touch it (the dispatcher's loop, the scrapers, the HTTP
handlers, the findings evaluator); one lock guards it and nothing slow runs
under it: window statistics are computed for the few windows that changed,
and the rules run on a copy of the rows outside the lock.
"""

from __future__ import annotations

import bisect
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import asdict
from typing import Any

from servescope.analyzers.live import (
    WINDOW_S,
    live_findings,
    one_liner,
    scrape_point,
    scrape_totals,
    window_index,
    window_stats,
)
from servescope.analyzers.server_metrics import canonical_name
from servescope.harness.loadgen.dispatcher import Progress

FINDINGS_EVERY_S = 3.0  # the rules run on the data so far this often...
MAX_FINDINGS_SHARE = 0.05  # ...or less often, so that judging takes at most this share of the driver's time
PROGRESS_EVERY_S = 0.25  # progress ticks arrive every 10 ms; the page needs a few per second
MAX_FINDING_ROWS = 10_000  # the rules judge the most recent rows (a minute at 160 req/s)
MAX_FINDING_SAMPLES = 100_000  # scraped samples of the keys the rules read, most recent (minutes of vLLM's)
FINAL_AFTER_S = 10.0  # a window this long past its end keeps its figures and lets its rows go


class _Stamped:
    """An append-only list of (version, item): `since(v)` is one bisection."""

    def __init__(self) -> None:
        self.versions: list[int] = []
        self.items: list[Any] = []

    def add(self, version: int, item: Any) -> None:
        self.versions.append(version)
        self.items.append(item)

    def since(self, version: int) -> list[Any]:
        return self.items[bisect.bisect_right(self.versions, version):]


class LiveState:
    """The run as the live page sees it. `clock` is the run clock (seconds since the run started)."""

    def __init__(self, phases: list[dict[str, Any]], clock: Callable[[], float] | None = None,
                 notify: Callable[[str], None] | None = None) -> None:
        self.phases = phases
        self.clock = clock or (lambda: 0.0)
        self.notify = notify or (lambda line: None)
        self._lock = threading.Lock()
        self.version = 0
        self._windows: dict[int, list[dict[str, Any]]] = {}
        self._window_stats: dict[int, tuple[int, dict[str, Any]]] = {}
        self._dirty: set[int] = set()
        self._final: set[int] = set()
        self.late_rows = 0
        self._points = _Stamped()
        self._progress = _Stamped()
        self._last_scrape: dict[str, tuple[float, dict[str, float]]] = {}
        self._rows: deque[dict[str, Any]] = deque(maxlen=MAX_FINDING_ROWS)
        self._samples: deque[dict[str, Any]] = deque(maxlen=MAX_FINDING_SAMPLES)
        self._findings: list[dict[str, Any]] = []
        self._findings_version = 0
        self._judged_records = 0
        self._announced: dict[str, str] = {}  # rule -> severity already printed
        self._progress_at = -1.0
        self.data_at: float | None = None  # run clock when the newest rows or samples arrived
        self.records = 0
        self.status = "running"  # running | stopping | finished
        self.outcome: dict[str, Any] = {}
        self.stop_requested = False
        self.run_meta: dict[str, Any] = {}
        self.run_dir = ""  # which run this is: a page that finds another run here starts over

    # -- what the driver feeds in -----------------------------------------------------------

    def add_records(self, rows: list[dict[str, Any]]) -> None:
        now = self.clock()
        with self._lock:
            self.version += 1
            for row in rows:
                end = row.get("end_at")
                index = window_index(end if end is not None else now)
                if index in self._final:
                    self.late_rows += 1  # its window's figures are final; the run directory has the row
                    continue
                self._windows.setdefault(index, []).append(row)
                self._dirty.add(index)
            self._rows.extend(_for_rules(row) for row in rows)
            self.records += len(rows)
            self.data_at = now

    def add_samples(self, rows: list[dict[str, Any]]) -> None:
        """One scrape of one endpoint (called from its scraper thread)."""
        if not rows:
            return
        source, t = str(rows[0].get("source") or ""), float(rows[0]["t"])
        totals = scrape_totals(rows)
        kept = [row for row in rows if canonical_name(row["name"]) is not None]
        with self._lock:
            point = scrape_point(t, totals, self._last_scrape.get(source))
            self._last_scrape[source] = (t, totals)
            self.version += 1
            self._points.add(self.version, {**point, "source": source})
            self._samples.extend(kept)
            self.data_at = self.clock()

    def add_progress(self, progress: Progress) -> None:
        now = self.clock()
        if now - self._progress_at < PROGRESS_EVERY_S and not progress.stopping:
            return
        self._progress_at = now
        item = {**asdict(progress), "t": now, "time_left_s": self._time_left(progress, now)}
        with self._lock:
            self.version += 1
            self._progress.add(self.version, item)
            if progress.stopping and self.status == "running":
                self.status = "stopping"

    def _time_left(self, p: Progress, now: float) -> float | None:
        """Seconds until the last phase ends; None when a phase is bounded by requests, not time."""
        if p.phase_started_at is None or p.phase_duration_s is None:
            return None
        later = [ph.get("duration_s") for ph in self.phases[p.phase_index + 1:]]
        if any(d is None for d in later):
            return None
        return max(0.0, p.phase_started_at + p.phase_duration_s - now) + sum(later)

    # -- findings ------------------------------------------------------------------------------

    def evaluate_findings(self) -> list[dict[str, Any]]:
        """Run the live rules on a copy of the rows so far; announce the new or more severe ones.

        Nothing new since the last judgement: the last findings stand (the rules are not run again).
        """
        with self._lock:
            if self.records == self._judged_records and self._findings_version:
                return self._findings
            self._judged_records = self.records
            rows, samples = list(self._rows), list(self._samples)
        now = self.clock()
        findings = [{**f.to_dict(), "t": now} for f in live_findings(rows, samples, self.run_meta)]
        for finding in findings:
            seen = self._announced.get(finding["rule"])
            if seen is None or _SEVERITY_RANK[finding["severity"]] < _SEVERITY_RANK[seen]:
                self._announced[finding["rule"]] = finding["severity"]
                self.notify(one_liner(finding))
        with self._lock:
            self.version += 1
            self._findings = findings
            self._findings_version = self.version
        return findings

    # -- what the page reads -----------------------------------------------------------------

    def snapshot(self, since: int = 0) -> dict[str, Any]:
        """Everything that changed after version `since` (0: everything), as JSON-ready data."""
        with self._lock:
            for index in self._dirty:
                self.version += 1
                self._window_stats[index] = (self.version, window_stats(self._windows[index]))
            self._dirty.clear()
            horizon = window_index(self.clock() - FINAL_AFTER_S)
            for index in [i for i in self._windows if i < horizon]:  # memory stays flat over a long run
                del self._windows[index]
                self._final.add(index)
            windows = [{"t0": index * WINDOW_S, **stats} for index, (v, stats) in sorted(self._window_stats.items())
                       if v > since]
            progress = self._progress.items[-1] if self._progress.items else None
            return {
                "version": self.version,
                "run_dir": self.run_dir,
                "now": self.clock(),
                "data_at": self.data_at,
                "status": self.status,
                "outcome": self.outcome,
                "window_s": WINDOW_S,
                "windows": windows,
                "server": self._points.since(since),
                "progress": self._progress.since(since),
                "current": progress,
                "phases": self.phases,
                "records": self.records,
                "findings": self._findings,
                "stop_requested": self.stop_requested,
            }

    def request_stop(self) -> None:
        with self._lock:
            self.stop_requested = True
            self.version += 1

    def finish(self, outcome: dict[str, Any]) -> None:
        with self._lock:
            self.status = "finished"
            self.outcome = outcome
            self.version += 1


_SEVERITY_RANK = {"high": 0, "medium": 1, "low": 2, "info": 3}


# The columns the live rules read (the rest become nulls in their frame).
_RULE_COLUMNS = ("request_id", "phase", "status", "error_kind", "http_status", "error_message", "scheduled_at",
                 "sent_at", "first_token_at", "end_at", "ttft_s", "e2e_s", "schedule_lag_s", "output_tokens",
                 "prompt_tokens", "cached_tokens")


def _for_rules(row: dict[str, Any]) -> dict[str, Any]:
    """A row as the live rules need it: their columns, and of its gaps only the largest (the preemption
    rule's stall). Building the rules' frame from whole rows with every gap cost most of each judgement."""
    gaps = row.get("itl_s") or ()
    kept = {key: row.get(key) for key in _RULE_COLUMNS}
    kept["itl_s"] = [max(gaps)] if gaps else []
    return kept


class FindingsLoop:
    """Evaluates the live rules every `every_s` (longer when one judgement takes more than
    MAX_FINDINGS_SHARE of that) on a daemon thread until `stop()`.

    A rule that raises is reported once on the console and the loop goes on:
    a bug in a live judgement must never cost the measurement.
    """

    def __init__(self, state: LiveState, every_s: float = FINDINGS_EVERY_S,
                 warn: Callable[[str], None] | None = None) -> None:
        self.state, self.every_s = state, every_s
        self.warn = warn or (lambda text: None)
        self.evaluations = 0
        self.seconds = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="live-findings", daemon=True)
        self._failed = False

    def start(self) -> "FindingsLoop":
        self._thread.start()
        return self

    def _loop(self) -> None:
        pause = self.every_s
        while not self._stop.wait(pause):
            started = time.perf_counter()
            try:
                self.state.evaluate_findings()
            except Exception as exc:  # noqa: BLE001 - see the class docstring
                if not self._failed:
                    self._failed = True
                    self.warn(f"live findings disabled for this run ({type(exc).__name__}: {exc})")
                return
            self.evaluations += 1
            took = time.perf_counter() - started
            self.seconds += took
            pause = max(self.every_s, took / MAX_FINDINGS_SHARE)  # the driver's CPU goes to driving first

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=30)
