"""The live page: its state, its HTTP server's safety checks, and a run watched and stopped through it."""

from __future__ import annotations

import io
import json
import re
import socket
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from rich.console import Console
from support.scripted_server import ScriptedServer

from servescope.errors import EXIT_INTERRUPTED
from servescope.harness.config import ConfigError, RunConfig
from servescope.harness.console import RunConsole
from servescope.harness.live.server import STOP_HEADER, TOKEN_HEADER, LiveServer
from servescope.harness.live.state import LiveState
from servescope.harness.loadgen.dispatcher import Progress
from servescope.harness.orchestration.repeat import execute_run

pytestmark = pytest.mark.timeout(120)

# One request takes 0.02 + 4 x 0.02 s and the server serves one at a time (about 10 req/s):
# at 25 req/s its queue grows from the first second.
SATURATING = {"tokens": 5, "first_token_delay_s": 0.02, "itl_s": 0.02}


def _row(i: int, end: float, status: str = "ok", ttft: float = 0.05) -> dict:
    return {"request_id": f"r{i}", "phase": "rate=5.0", "sent_at": end - 0.2, "first_token_at": end - 0.15,
            "end_at": end, "ttft_s": ttft, "e2e_s": 0.2, "itl_s": [0.01, 0.02], "output_tokens": 3,
            "status": status, "error_kind": None if status == "ok" else "http_5xx", "schedule_lag_s": 0.001}


class _Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_windows_are_sent_once_and_again_when_a_straggler_changes_them():
    clock = _Clock()
    state = LiveState([{"phase": "rate=5.0", "duration_s": 10.0}], clock)
    clock.now = 2.5
    state.add_records([_row(0, 0.4), _row(1, 0.6, ttft=0.15), _row(2, 1.2, status="error")])
    first = state.snapshot(0)
    assert [w["t0"] for w in first["windows"]] == [0.0, 1.0]
    zero = first["windows"][0]
    assert zero["completed"] == 2 and zero["ttft_p99"] == pytest.approx(0.15) and zero["itl_p50"] == pytest.approx(0.01)
    assert first["windows"][1]["errors"] == {"http_5xx": 1} and first["data_at"] == 2.5
    assert state.snapshot(first["version"])["windows"] == []  # nothing new
    state.add_records([_row(3, 0.9)])  # a late batch for the first window
    again = state.snapshot(first["version"])
    assert [w["t0"] for w in again["windows"]] == [0.0] and again["windows"][0]["completed"] == 3
    clock.now = 30.0  # long after: the windows keep their figures, their rows are let go
    state.snapshot(again["version"])
    state.add_records([_row(4, 0.8)])
    assert state.snapshot(0)["windows"][0]["completed"] == 3 and state.late_rows == 1


def test_progress_gives_the_phase_and_the_time_left():
    clock = _Clock()
    state = LiveState([{"phase": "rate=1.0", "duration_s": 10.0}, {"phase": "rate=2.0", "duration_s": 20.0}], clock)
    clock.now = 4.0
    state.add_progress(Progress(phase="rate=1.0", phase_index=0, phase_count=2, phase_started_at=1.0,
                                phase_duration_s=10.0, outstanding=7))
    current = state.snapshot(0)["current"]
    assert current["time_left_s"] == pytest.approx(7.0 + 20.0) and current["outstanding"] == 7


def test_scrapes_become_points_with_rates_since_the_previous_scrape():
    state = LiveState([], _Clock())

    def scrape(t: float, preempted: float, idle: float) -> list[dict]:
        return [{"t": t, "name": "vllm:num_requests_waiting", "labels": "{}", "value": 4.0, "source": "e"},
                {"t": t, "name": "vllm:num_preemptions_total", "labels": "{}", "value": preempted, "source": "e"},
                {"t": t, "name": "node_cpu_seconds_total", "labels": '{"cpu": "0", "mode": "idle"}', "value": idle,
                 "source": "e"},
                {"t": t, "name": "DCGM_FI_DEV_FB_USED", "labels": '{"gpu": "0"}', "value": 1024.0, "source": "e"}]

    state.add_samples(scrape(1.0, 10.0, 100.0))
    state.add_samples(scrape(3.0, 16.0, 101.0))
    points = state.snapshot(0)["server"]
    assert points[1]["waiting"] == 4.0 and points[1]["preemptions_per_s"] == pytest.approx(3.0)
    assert points[1]["host_cpu_busy"] == pytest.approx(50.0) and points[1]["gpu_mem_used"] == 2.0**30


def _get(url: str, headers: dict[str, str] | None = None, method: str = "GET") -> tuple[int, bytes]:
    request = urllib.request.Request(url, headers=headers or {}, method=method, data=b"" if method == "POST" else None)
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def test_loopback_server_refuses_other_host_names_and_stop_without_its_header(tmp_path):
    state = LiveState([], _Clock())
    server = LiveServer(("127.0.0.1", 0), state, b"<html>page</html>", b"// js", None, tmp_path).start()
    base = f"http://127.0.0.1:{server.port}"
    try:
        assert _get(base + "/") == (200, b"<html>page</html>")
        assert _get(base + "/", {"Host": f"attacker.example:{server.port}"})[0] == 403  # DNS rebinding
        assert _get(base + "/api/state?since=x")[0] == 400
        assert _get(base + "/api/stop", method="POST")[0] == 400 and not state.stop_requested
        assert _get(base + "/api/stop", {STOP_HEADER: "1"}, method="POST")[0] == 200 and state.stop_requested
        assert json.loads(_get(base + "/api/state")[1])["stop_requested"] is True
        assert _get(base + "/report.html")[0] == 404
        status, plotly = _get(base + "/plotly.min.js")
        assert status == 200 and len(plotly) > 1_000_000  # served by the page itself: works offline
    finally:
        server.close()


def test_off_loopback_every_request_needs_the_token(tmp_path):
    state = LiveState([], _Clock())
    server = LiveServer(("0.0.0.0", 0), state, b"page", b"js", "s3cret-token", tmp_path).start()
    base = f"http://127.0.0.1:{server.port}"
    try:
        assert _get(base + "/")[0] == 403
        assert _get(base + "/?token=wrong")[0] == 403
        assert _get(base + "/?token=s3cret-token") == (200, b"page")
        assert _get(base + "/api/state", {TOKEN_HEADER: "s3cret-token"})[0] == 200
        assert _get(base + "/api/stop", {STOP_HEADER: "1"}, method="POST")[0] == 403 and not state.stop_requested
        assert _get(base + "/live.js") == (200, b"js")  # the scripts carry no run data
    finally:
        server.close()


def _console() -> tuple[RunConsole, io.StringIO]:
    text = io.StringIO()
    return RunConsole(show_progress=False, console=Console(file=text, width=200)), text


def _wait_for_url(text: io.StringIO, deadline: float) -> str:
    while time.monotonic() < deadline:
        found = re.search(r"live page: (http://\S+)", text.getvalue())
        if found:
            return found.group(1)
        time.sleep(0.05)
    raise AssertionError(f"no live page URL printed: {text.getvalue()!r}")


def test_a_saturated_run_watched_live_shows_queueing_and_stops_from_the_page(tmp_path):
    """The page's JSON changes as the run goes, the queueing finding fires on the data so far,
    and stop ends the run as Ctrl-C does: exit 130, status interrupted, every record kept."""
    console, text = _console()
    seen: dict = {}

    def watch() -> None:
        url = _wait_for_url(text, time.monotonic() + 30).rstrip("/")
        deadline = time.monotonic() + 40
        versions = []
        while time.monotonic() < deadline:
            state = json.loads(_get(url + "/api/state")[1])
            versions.append((state["version"], state["records"]))
            if any(f["rule"] == "queueing" for f in state["findings"]):
                seen["finding"] = next(f for f in state["findings"] if f["rule"] == "queueing")
                seen["windows"] = state["windows"]
                seen["server"] = state["server"]
                break
            time.sleep(0.3)
        seen["versions"] = versions
        seen["stop"] = _get(url + "/api/stop", {STOP_HEADER: "1"}, method="POST")[0]

    with ScriptedServer(slots=1, default_script=SATURATING) as srv:
        watcher = threading.Thread(target=watch, daemon=True)
        watcher.start()
        config = RunConfig(target=srv.base_url, model="scripted", rate=25, duration_s="60s", prompt_tokens=16,
                           max_tokens=5, out=str(tmp_path / "run"), workers=1, live=0, grace_s="1s")
        started = time.monotonic()
        outcome = execute_run(config, console)
        watcher.join(timeout=10)
    assert seen.get("stop") == 200, text.getvalue()
    assert time.monotonic() - started < 50  # stopped long before its 60 s
    assert outcome.exit_code == EXIT_INTERRUPTED and outcome.status == "interrupted"
    records = [r for _, r in seen["versions"]]
    assert records[-1] > records[0]  # the data changed between reads
    finding = seen["finding"]
    assert finding["severity"] in ("high", "medium") and finding["evidence"]["arrival_rate"] > finding["evidence"]["completion_rate"]
    assert any(p.get("waiting", 0) > 0 for p in seen["server"])
    assert "finding [" in text.getvalue() and "queueing" in text.getvalue()  # the console's one-liner
    run_dir = Path(outcome.run_dir)
    frame = pq.read_table(run_dir / "requests.parquet").to_pandas()
    assert (frame["status"] == "ok").sum() >= 20
    meta = json.loads((run_dir / "run.json").read_text())
    assert meta["status"] == "interrupted" and (run_dir / "report.html").exists()
    assert meta["live"]["polls"] >= 2 and "queueing" in meta["live"]["findings_fired"]
    assert meta["live"]["findings_evaluations"] >= 1 and not meta["live"]["token_required"]


def test_a_busy_live_port_is_a_usage_error_before_anything_is_written(tmp_path):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        config = RunConfig(target="http://127.0.0.1:9", requests=1, out=str(tmp_path / "run"), live=port)
        with pytest.raises(ConfigError, match=f"--live {port}"):
            execute_run(config, _console()[0])
    assert not (tmp_path / "run").exists()


def test_live_options_are_checked():
    with pytest.raises(ConfigError, match="--live"):
        RunConfig(target="http://127.0.0.1:9", live=70000)
    assert RunConfig(target="http://127.0.0.1:9", metrics_url="http://127.0.0.1:9/metrics").metrics_url == (
        "http://127.0.0.1:9/metrics",)
    with pytest.raises(ConfigError, match="--metrics-url"):
        RunConfig(target="http://127.0.0.1:9", metrics_url=("http://127.0.0.1:9/metrics", "ftp://x"))


def test_repeat_serves_each_repetition_on_one_port_and_lingers_only_after_the_last(tmp_path):
    """A page kept open through --repeat 2: the first repetition closes its page at once (the
    second serves the next on the same port); the last stays up while the page still polls."""
    from servescope.harness.targets import free_port

    port = free_port()
    runs_seen: list[tuple[str, str]] = []
    done = threading.Event()

    def keep_polling() -> None:
        while not done.is_set():
            try:
                state = json.loads(_get(f"http://127.0.0.1:{port}/api/state")[1])
                runs_seen.append((Path(state["run_dir"]).name, state["status"]))
                if state["run_dir"].endswith("run-2") and state["status"] == "finished":
                    return  # the page is closed: the last repetition stops lingering
            except OSError:
                pass  # between repetitions nothing listens
            time.sleep(0.2)

    with ScriptedServer(default_script={"tokens": 3}) as srv:
        poller = threading.Thread(target=keep_polling, daemon=True)
        poller.start()
        config = RunConfig(target=srv.base_url, model="scripted", concurrency=2, duration_s="1s", prompt_tokens=8,
                           max_tokens=3, out=str(tmp_path / "runs"), workers=1, live=port, repeat=2, report=False)
        started = time.monotonic()
        outcome = execute_run(config, _console()[0])
        elapsed = time.monotonic() - started
        done.set()
    assert outcome.exit_code == 0 and [o.status for o in outcome.runs] == ["complete", "complete"]
    assert {name for name, _ in runs_seen} == {"run-1", "run-2"}
    assert elapsed < 60  # a page watching the first repetition would have held it up to two minutes
    assert ("run-2", "finished") in runs_seen  # the last one stayed up for the page to read its end
    for name in ("run-1", "run-2"):
        assert json.loads((tmp_path / "runs" / name / "run.json").read_text())["live"]["port"] == port
