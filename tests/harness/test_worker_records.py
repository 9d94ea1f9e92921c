"""The worker parses responses after the stream, off the measuring path: every record still arrives, complete.

Against the scripted server, whose write log says when each chunk really left:
many streams ending in the same millisecond, multi-turn sessions, failures and
a phase change must all come through with full records, and the worker count
must follow the CPUs this process may use, not the host's.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pyarrow.parquet as pq
import pytest
from support.scripted_server import ScriptedServer

from servescope.harness.config import RunConfig
from servescope.harness.console import RunConsole
from servescope.harness.loadgen.models import default_workers, plan_phases, usable_cpus
from servescope.harness.orchestration.repeat import execute_run

pytestmark = pytest.mark.timeout(120)


def _run(tmp_path, **options):
    config = RunConfig(model="scripted", report=False, out=str(tmp_path / "run"), show_progress=False, seed=3,
                       **options)
    outcome = execute_run(config, RunConsole(show_progress=False))
    frame = pq.read_table(outcome.run_dir / "requests.parquet").to_pandas()
    return outcome, frame, json.loads((outcome.run_dir / "run.json").read_text())


def test_streams_that_end_together_all_get_complete_records(tmp_path):
    """96 streams in lockstep (every response ends within a millisecond of the others), 3 waves:
    288 rows, each with its id, 12 chunk times that match the server's write log, usage and tokens."""
    with ScriptedServer(default_script={"first_token_delay_s": 0.02, "itl_s": 0.01}) as srv:
        outcome, frame, meta = _run(tmp_path, target=srv.base_url, concurrency=96, requests=288, prompt_tokens=16,
                                    max_tokens=12, workers=1)
        log = srv.write_log()
    assert outcome.status == "complete"
    assert len(frame) == 288 and frame["request_id"].is_unique
    assert (frame["status"] == "ok").all()
    assert frame["response_id"].notna().all() and set(frame["response_id"]) == set(log)
    assert (frame["output_tokens"] == 12).all() and (frame["output_tokens_source"] == "usage").all()
    assert frame["itl_s"].map(len).eq(11).all() and frame["chunk_tokens"].map(len).eq(12).all()
    assert frame["ttft_s"].notna().all() and frame["e2e_s"].notna().all() and frame["tpot_s"].notna().all()
    origin = meta["clock_origin_perf_counter_s"]
    for rid, first, end in zip(frame["response_id"], frame["first_token_at"], frame["end_at"]):
        written = log[rid]
        # Each record's times are its own response's: near that response's writes (the server logs
        # just after each write returns, so on a busy host either side can be a little first).
        assert len(written) == 12
        assert abs(origin + first - written[0]) < 0.25 and abs(origin + end - written[-1]) < 0.25


def test_multi_turn_sessions_count_think_time_from_the_end_of_the_previous_turn(tmp_path):
    """A turn's record is parsed later, but its end is known at once: the next turn waits from there."""
    path = tmp_path / "chat.yaml"
    path.write_text(
        "name: turns\nclasses:\n  - name: turns\n    api: completions\n"
        "    prompt_tokens: {dist: fixed, value: 16}\n    output_tokens: {dist: fixed, value: 4}\n"
        "    session: {turns: {dist: fixed, value: 3}, think_time_s: {dist: fixed, value: 0.05}}\n")
    with ScriptedServer(default_script={"first_token_delay_s": 0.01, "itl_s": 0.005}) as srv:
        outcome, frame, _ = _run(tmp_path, target=srv.base_url, concurrency=4, requests=8, workload=str(path),
                                 workers=1)
    assert outcome.status == "complete" and (frame["status"] == "ok").all()
    for _, turns in frame.groupby("session_id"):
        turns = turns.sort_values("turn")
        for prev, nxt in zip(turns.itertuples(), list(turns.itertuples())[1:]):
            assert nxt.scheduled_at == pytest.approx(prev.end_at + 0.05, abs=1e-6)
            assert nxt.sent_at >= prev.end_at + 0.05


def test_failed_requests_and_phase_changes_lose_no_record(tmp_path):
    """A warm-up then a measured phase, one request in three reset mid-stream: every request has its row,
    each in its own phase, failures with their kind and the chunks seen before the reset."""
    with ScriptedServer(default_script={"first_token_delay_s": 0.01, "itl_s": 0.002}) as srv:
        outcome, frame, meta = _run(tmp_path, target=srv.base_url, rate=200, arrival="constant", duration_s="1s",
                                    warmup_s="0.5s", prompt_tokens=16, max_tokens=8, workers=1)
        served = srv.stats()["requests"]
    assert outcome.status == "complete"
    assert len(frame) == served  # every request the server saw has its row
    assert set(frame["phase"]) == {"warmup", "rate=200.0"}
    assert (frame["phase"] == "rate=200.0").sum() == 200
    assert frame["schedule_lag_s"].notna().all()
    assert meta["client_check"]["schedule_lag_n"] == 200  # the measured phase's rows reached the dispatcher


def test_a_reset_mid_stream_is_recorded_with_what_came_before(tmp_path):
    with ScriptedServer(default_script={"fault": "reset", "fault_after": 3, "itl_s": 0.002}) as srv:
        outcome, frame, _ = _run(tmp_path, target=srv.base_url, concurrency=4, requests=12, prompt_tokens=16,
                                 max_tokens=8, workers=1)
    assert len(frame) == 12
    assert (frame["status"] == "error").all() and (frame["error_kind"] == "reset").all()
    assert frame["first_token_at"].notna().all()  # TTFT measured before the failure is kept


def test_the_worker_count_follows_the_cpus_this_process_may_use():
    phases = plan_phases(RunConfig(target="http://127.0.0.1:9", concurrency=512))
    assert default_workers(phases, cpu_count=2) == 1  # two cores: one worker beside the driver
    assert default_workers(phases, cpu_count=16) == 11
    assert usable_cpus() == len(os.sched_getaffinity(0))
    one_cpu = min(os.sched_getaffinity(0))
    code = ("import os; os.sched_setaffinity(0, {%d}); "
            "from servescope.harness.loadgen.models import usable_cpus; print(usable_cpus(), os.cpu_count())" % one_cpu)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    usable, host = (int(v) for v in out.stdout.split())
    assert usable == 1 and host == os.cpu_count()  # pinned to one CPU: one, whatever the host has
