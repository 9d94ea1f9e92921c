"""A target that dies mid-run: the run stops as failed, keeps what it measured, and still reports.

The scripted server is a real process; it is stopped (its port then refuses
connections) while a closed loop is running against it.
"""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from support.scripted_server import ScriptedServer

from servescope.harness.api import TargetDownWatch
from servescope.harness.orchestration.repeat import execute_run
from servescope.errors import EXIT_FAILED
from servescope.harness.config import RunConfig

pytestmark = pytest.mark.timeout(120)


def test_a_dead_target_ends_the_run_as_failed_with_its_records(tmp_path: Path) -> None:
    srv = ScriptedServer().start()
    killer = threading.Timer(2.0, srv.stop)
    config = RunConfig(target=srv.base_url, model="scripted", prompt_tokens=16, max_tokens=4, concurrency=4,
                       duration_s=60.0, out=str(tmp_path / "run"), show_progress=False)
    started = time.monotonic()
    killer.start()
    try:
        outcome = execute_run(config)
    finally:
        killer.cancel()
        srv.stop()
    elapsed = time.monotonic() - started
    assert elapsed < 2.0 + TargetDownWatch.TARGET_DOWN_S + 15, elapsed  # stopped, not the full 60 s
    assert outcome.status == "failed" and outcome.exit_code == EXIT_FAILED
    meta = json.loads((outcome.run_dir / "run.json").read_text())
    assert any("stopped accepting connections" in p for p in meta["problems"])
    rows = pq.read_table(outcome.run_dir / "requests.parquet").to_pandas()
    assert (rows["status"] == "ok").sum() > 10  # what was measured before the server died is kept
    assert (rows["error_kind"] == "connect").sum() >= TargetDownWatch.MIN_FAILURES
    findings = json.loads((outcome.run_dir / "findings.json").read_text())
    assert any(f["rule"] == "errors" for f in findings)
    assert (outcome.run_dir / "report.html").exists()


def test_answers_reset_the_watch_and_only_connection_failures_count() -> None:
    watch = TargetDownWatch()
    refused = [{"status": "error", "error_kind": "connect"}] * 30
    watch.observe(refused, now=10.0)
    assert watch.verdict(now=12.0) is None  # not long enough yet
    assert watch.verdict(now=15.5) is not None
    watch.observe([{"status": "error", "error_kind": "http_5xx"}], now=16.0)  # the server answered: it is up
    assert watch.verdict(now=30.0) is None
    watch.observe([{"status": "cancelled", "error_kind": "connect"}] * 30, now=31.0)
    watch.observe([{"status": "cancelled"}], now=31.5)  # a cancelled request says nothing about the target
    assert watch.verdict(now=40.0) is not None


def test_closed_loop_users_back_off_from_a_refusing_port(tmp_path: Path) -> None:
    """A port nobody listens on: each user retries at 50 ms doubling to 1 s, not thousands of times a second."""
    import socket

    with socket.socket() as sock:  # a free port, closed again: connections are refused
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    config = RunConfig(target=f"http://127.0.0.1:{port}", model="m", prompt_tokens=16, max_tokens=4, concurrency=2,
                       duration_s=3.0, out=str(tmp_path / "run"), show_progress=False, report=False)
    outcome = execute_run(config)
    rows = pq.read_table(outcome.run_dir / "requests.parquet").to_pandas()
    assert set(rows["error_kind"]) == {"connect"}
    # 2 users x (0 + 0.05 + 0.1 + 0.2 + 0.4 + 0.8 + 1.0 ...) within 3 s: about 7 attempts each.
    assert 6 <= len(rows) <= 20, len(rows)
    # The back-off moves the next send's scheduled time (so it never reads as the generator's lateness):
    # consecutive attempts of a user are scheduled further and further apart.
    waves = sorted({round(t, 2) for t in rows["scheduled_at"]})
    gaps = [b - a for a, b in zip(waves, waves[1:])]
    assert gaps[0] < 0.1 and max(gaps) >= 0.5, waves
