"""`servescope run` end to end against real servers on 127.0.0.1 (bounded in time and count)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from servescope.cli import main
from servescope.harness.config import RunConfig
from servescope.harness.console import RunConsole
from servescope.harness.orchestration.repeat import execute_run
from servescope.harness.targets import free_port
from servescope.rundir.schema import REQUEST_COLUMNS, request_arrow_schema

pytestmark = pytest.mark.timeout(90)


def _quiet() -> RunConsole:
    return RunConsole(show_progress=False)


def _requests(run_dir: Path):
    return pq.read_table(run_dir / "requests.parquet").to_pandas()


def _run_json(run_dir: Path) -> dict:
    return json.loads((run_dir / "run.json").read_text())


def test_open_loop_keeps_its_schedule_when_the_server_is_slow(tmp_path, slow_server_factory):
    """rate 50/s for 2 s against a server taking 1 s per request: ~100 sends, each on time."""
    server = slow_server_factory("--first-token-delay", "1.0")
    config = RunConfig(target=server.base_url, rate=50, arrival="constant", duration_s="2s",
                       prompt_tokens=16, max_tokens=2, out=str(tmp_path / "run"), report=False, workers=1)
    outcome = execute_run(config, _quiet())
    assert outcome.status == "complete" and outcome.exit_code == 0
    frame = _requests(outcome.run_dir)
    assert len(frame) == 100
    assert (frame["status"] == "ok").all()
    lag = frame["schedule_lag_s"]
    assert lag.quantile(0.99) < 0.05, f"sends were late: {lag.describe()}"
    sent = frame["sent_at"].sort_values().to_numpy()
    assert sent[-1] - sent[0] == pytest.approx(1.98, abs=0.1)  # not stretched by the 1 s replies
    stats = server.stats()
    assert stats["max_in_flight"] >= 40  # open loop: ~50 outstanding at once, never waiting on replies
    assert frame["ttft_s"].min() >= 1.0


def test_closed_loop_never_exceeds_its_concurrency(tmp_path, slow_server_factory):
    server = slow_server_factory("--first-token-delay", "0.03", "--itl", "0.005")
    config = RunConfig(target=server.base_url, concurrency=6, duration_s="1.5s", prompt_tokens=16,
                       max_tokens=3, out=str(tmp_path / "run"), report=False, workers=1)
    outcome = execute_run(config, _quiet())
    assert outcome.exit_code == 0
    stats = server.stats()
    assert stats["max_in_flight"] == 6
    frame = _requests(outcome.run_dir)
    assert len(frame) == stats["requests"] > 6 * 10
    # In the client's own records too: at no send time were more than 6 requests open.
    opens = sorted([(t, 1) for t in frame["sent_at"]] + [(t, -1) for t in frame["end_at"]], key=lambda x: (x[0], x[1]))
    level, peak = 0, 0
    for _, step in opens:
        level += step
        peak = max(peak, level)
    assert peak == 6
    server_metrics = pq.read_table(outcome.run_dir / "server_metrics.parquet").to_pandas()
    assert list(server_metrics.columns) == ["t", "name", "labels", "value", "source"]
    assert set(server_metrics["source"]) == {f"{server.base_url}/metrics"}
    assert {"vllm:num_requests_running", "vllm:e2e_request_latency_seconds_bucket",
            "vllm:e2e_request_latency_seconds_count"} <= set(server_metrics["name"])
    assert json.loads(server_metrics["labels"].iloc[0]) is not None


def test_sweep_and_warmup_phases_are_labelled_and_run_json_is_complete(tmp_path, slow_server_factory, monkeypatch):
    server = slow_server_factory("--first-token-delay", "0.01", "--no-metrics")
    monkeypatch.setenv("SERVESCOPE_RUN_TEST_KEY", "sk-do-not-write-this-anywhere")
    config = RunConfig(target=server.base_url, sweep="concurrency:1,3", warmup_s="0.3s", requests=6,
                       prompt_tokens=16, max_tokens=2, out=str(tmp_path / "run"), report=False, seed=7,
                       api_key_env="SERVESCOPE_RUN_TEST_KEY", command_line=("servescope", "run", "--sweep", "concurrency:1,3"))
    outcome = execute_run(config, _quiet())
    assert outcome.exit_code == 0
    frame = _requests(outcome.run_dir)
    counts = frame.groupby("phase").size().to_dict()
    assert counts["concurrency=1"] == 6 and counts["concurrency=3"] == 6 and counts["warmup"] >= 1
    first_sent = frame.groupby("phase")["sent_at"].min().sort_values()
    assert list(first_sent.index) == ["warmup", "concurrency=1", "concurrency=3"]

    table = pq.read_table(outcome.run_dir / "requests.parquet")
    assert tuple(table.schema.names) == REQUEST_COLUMNS and table.schema.equals(request_arrow_schema())
    meta = _run_json(outcome.run_dir)
    assert meta["status"] == "complete"
    for key in ("servescope_version", "command_line", "target", "model", "workload", "load", "seed", "started_at",
                "ended_at", "host", "tokenizer", "prompt_lengths_exact", "client_check", "server_metrics"):
        assert meta.get(key) is not None, key
    assert meta["model"] == "slow-model" and meta["seed"] == 7
    assert meta["server_metrics"]["available"] is False
    assert [p["phase"] for p in meta["load"]["phases"]] == ["warmup", "concurrency=1", "concurrency=3"]
    assert {"hostname", "cpu_count", "python", "platform"} <= set(meta["host"])
    summary = json.loads((outcome.run_dir / "summary.json").read_text())
    assert meta["client_check"]["client_bound"] is summary["client"]["client_bound"]  # one verdict, both files
    assert meta["client_check"]["reasons"] == summary["client"]["reasons"]
    assert "schedule_lag_p99_s" in meta["client_check"] and "loop_lag_max_s" in meta["client_check"]
    assert meta["prompt_lengths_exact"] is False  # bundled tokenizer against a foreign target
    on_disk = "".join(p.read_text(errors="replace") for p in outcome.run_dir.iterdir() if p.suffix == ".json")
    assert "sk-do-not-write-this-anywhere" not in on_disk
    assert "SERVESCOPE_RUN_TEST_KEY" in on_disk  # the variable's name is fine


def test_a_target_that_refuses_connections_still_leaves_a_run(tmp_path):
    port = free_port()  # nothing listens there
    config = RunConfig(target=f"http://127.0.0.1:{port}", model="m", concurrency=2, requests=5,
                       prompt_tokens=16, max_tokens=2, out=str(tmp_path / "run"), report=False)
    outcome = execute_run(config, _quiet())
    assert outcome.status == "failed" and outcome.exit_code == 1
    frame = _requests(outcome.run_dir)
    assert len(frame) == 5
    assert set(frame["error_kind"]) == {"connect"} and set(frame["status"]) == {"error"}
    meta = _run_json(outcome.run_dir)
    assert meta["status"] == "failed" and meta["server_metrics"]["available"] is False


@pytest.mark.parametrize("args, message", [
    (["--rate", "0"], "--rate"),
    (["--duration", "ten"], "500ms"),
    (["--concurrency", "2", "--rate", "3"], "choose one load model"),
    (["--target", "127.0.0.1:1"], "http"),
    (["--sweep", "rate:a,b"], "numbers"),
    (["--workload", "no-such-preset-xyz", "--target", "http://127.0.0.1:1", "--model", "m"], "no-such-preset-xyz"),
])
def test_bad_flags_exit_2_with_a_helpful_message(args, message, tmp_path):
    result = CliRunner().invoke(main, ["run", *args, "--out", str(tmp_path / "never")])
    assert result.exit_code == 2, result.output
    assert message in result.output
    assert not (tmp_path / "never").exists()


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "sigterm"])
def test_ctrl_c_stops_cleanly_and_keeps_every_record(sig, tmp_path, slow_server_factory):
    server = slow_server_factory("--first-token-delay", "3.0")
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "servescope", "run", "--target", server.base_url, "--rate", "20", "--arrival", "constant",
           "--duration", "30s", "--prompt-tokens", "16", "--max-tokens", "2", "--out", str(out), "--no-report",
           "--grace", "0.5s"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 30
        while server.stats()["requests"] < 15 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert server.stats()["requests"] >= 15, "the run never started sending"
        proc.send_signal(sig)
        output, _ = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, output
    meta = _run_json(out)
    assert meta["status"] == "interrupted"
    frame = _requests(out)
    sent = frame[frame["sent_at"].notna()]
    assert len(sent) == server.stats()["requests"]  # every request the server saw has its record
    assert set(frame["status"]) == {"cancelled"}  # 3 s replies, 0.5 s grace: all were cut off
    assert not (out / "requests.jsonl").exists()  # compacted


@pytest.mark.skipif(not os.path.exists("/proc/self"), reason="needs procfs")
def test_repeat_writes_numbered_runs(tmp_path, slow_server_factory):
    server = slow_server_factory("--no-metrics")
    config = RunConfig(target=server.base_url, concurrency=2, requests=4, prompt_tokens=8, max_tokens=2,
                       out=str(tmp_path / "rep"), report=False, repeat=2)
    outcome = execute_run(config, _quiet())
    assert outcome.exit_code == 0 and [o.run_dir.name for o in outcome.runs] == ["run-1", "run-2"]
    assert all(len(_requests(o.run_dir)) == 4 for o in outcome.runs)
    # Each repetition its own seed (the same prompts again would be prefix-cache hits on a real server).
    assert [_run_json(o.run_dir)["seed"] for o in outcome.runs] == [0, 1]


def test_the_bundled_engine_is_started_measured_and_stopped(tmp_path):
    config = RunConfig(concurrency=2, requests=4, prompt_tokens=24, max_tokens=4, out=str(tmp_path / "run"),
                       report=False)
    outcome = execute_run(config, _quiet())
    assert outcome.status == "complete", _run_json(outcome.run_dir).get("problems")
    meta = _run_json(outcome.run_dir)
    assert meta["target"]["kind"] == "reference" and meta["model"] == "tiny"
    assert meta["prompt_lengths_exact"] is True  # bundled tokenizer = the engine's vocabulary
    frame = _requests(outcome.run_dir)
    assert len(frame) == 4 and (frame["status"] == "ok").all()
    assert (frame["usage_prompt_tokens"] == frame["prompt_tokens"]).all()
    port = int(meta["target"]["base_url"].rsplit(":", 1)[1])
    import socket

    with socket.socket() as s:  # the engine is gone: its port no longer accepts connections
        assert s.connect_ex(("127.0.0.1", port)) != 0


def test_an_engine_that_cannot_start_leaves_a_failed_run_with_its_stderr(tmp_path):
    config = RunConfig(engine_args=("--no-such-engine-flag",), requests=2, out=str(tmp_path / "run"), report=False)
    console = RunConsole(show_progress=False)
    outcome = execute_run(config, console)
    assert outcome.status == "failed" and outcome.exit_code == 1
    meta = _run_json(outcome.run_dir)
    assert meta["status"] == "failed"
    assert "no-such-engine-flag" in "\n".join(meta["problems"])  # the engine's own stderr, quoted
