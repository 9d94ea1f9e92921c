"""The load generator on a real Ray cluster of two nodes on this machine (Ray's own test cluster).

Skipped, with the reason, where Ray is not installed or its cluster cannot start.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import textwrap
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from support.processes import interrupt_after
from support.scripted_server import ScriptedServer

from servescope.cli import main
from servescope.harness.config import RunConfig
from servescope.harness.orchestration.repeat import execute_run
from servescope.rundir.reader import load_run

ray = pytest.importorskip("ray", reason="Ray is not installed (pip install 'servescope[ray]')")
pytestmark = [pytest.mark.timeout(240), pytest.mark.slow]

PACING = {"first_token_delay_s": 0.02, "itl_s": 0.005}


@pytest.fixture(scope="module")
def cluster():
    from ray.cluster_utils import Cluster

    try:
        c = Cluster(initialize_head=True, head_node_args={"num_cpus": 2, "include_dashboard": False})
        c.add_node(num_cpus=2)
        c.wait_for_nodes(timeout=90)
    except Exception as exc:  # noqa: BLE001 - any failure to start is a reason to skip, said in full
        pytest.skip(f"a local Ray cluster could not start: {type(exc).__name__}: {exc}")
    yield c
    ray.shutdown()
    c.shutdown()


@pytest.fixture(scope="module")
def server():
    with ScriptedServer(default_script=PACING) as srv:
        yield srv


def _run(server, out: Path, **options):
    options.setdefault("target", server.base_url)
    options.setdefault("model", "scripted")
    return execute_run(RunConfig(out=str(out), report=False, show_progress=False, **options))


def _ttft_errors(run_dir: Path, log: dict[str, list[float]]) -> np.ndarray:
    run = load_run(run_dir)
    origin = run.run["clock_origin_perf_counter_s"]
    ok = run.requests[run.requests["status"] == "ok"]
    return np.array([origin + first - log[rid][0] for rid, first in zip(ok["response_id"], ok["first_token_at"])
                     if log.get(rid)])


def test_ray_workers_measure_like_local_workers_on_two_nodes(tmp_path, cluster, server):
    errors = {}
    for kind in ("local", "ray"):
        server.reset()
        extra = {"ray": cluster.address} if kind == "ray" else {}
        outcome = _run(server, tmp_path / kind, workers=2, concurrency=64, requests=640, prompt_tokens=16,
                       max_tokens=16, **extra)
        assert outcome.exit_code == 0
        run = load_run(tmp_path / kind)
        assert len(run.requests) == 640 and (run.requests["status"] == "ok").all()
        errors[kind] = _ttft_errors(tmp_path / kind, server.write_log())
        if kind == "ray":
            assert run.requests["node"].nunique() == 2  # SPREAD put one worker on each node
            meta = run.run["ray"]
            assert len(meta["nodes"]) == 2 and meta["lost_workers"] == []
            for node in meta["nodes"]:  # one host: every node reads the driver's own monotonic clock
                assert node["same_kernel"] and node["offset_s"] == 0.0
        else:
            assert run.requests["node"].isna().all()
    p99 = {kind: float(np.percentile(e, 99)) for kind, e in errors.items()}
    assert len(errors["ray"]) == 640
    assert p99["ray"] <= p99["local"] + 1e-3, p99  # within 1 ms of local workers at p99, 64 streams


def test_the_round_trip_estimate_finds_a_known_clock_offset(cluster, server):
    """Nodes on other hosts get their offset from round trips: on this host the truth is 0, and the
    estimate must land within its own stated uncertainty of it."""
    from servescope.harness.loadgen.ray_pool import RayWorkerPool, connect
    from servescope.harness.worker import WorkerSettings

    connect(cluster.address)
    client = {"base_url": server.base_url, "model": "scripted", "clock_origin": time.perf_counter()}
    pool = RayWorkerPool(1, [WorkerSettings(client=client)])
    try:
        half, offset = pool.estimate_offset(pool.actors[0], pings=30)
    finally:
        pool.close()
    assert 0 < half < 0.05 and abs(offset) <= half + 1e-4


def test_a_lost_worker_costs_only_its_in_flight_requests(tmp_path, cluster):
    with ScriptedServer(default_script={"first_token_delay_s": 0.3, "itl_s": 0.05}) as slow:
        killer = threading.Thread(target=_kill_one_worker_actor, args=(slow, 8), daemon=True)
        killer.start()
        outcome = _run(slow, tmp_path / "run", ray=cluster.address, workers=2, concurrency=8, duration_s="6s",
                       prompt_tokens=16, max_tokens=8)
        killer.join(timeout=5)
    assert outcome.exit_code == 0, outcome  # the run went on with the other worker
    run = load_run(tmp_path / "run")
    lost = run.requests[run.requests["error_kind"] == "worker_lost"]
    assert 1 <= len(lost) <= 4  # the lost worker's slots: 4 of the 8 streams
    assert set(lost["status"]) == {"cancelled"} and lost["worker"].nunique() == 1
    survivor = run.requests[(run.requests["worker"] != lost["worker"].iloc[0]) & (run.requests["status"] == "ok")]
    assert len(survivor) > 20  # the other worker kept going to the end
    assert run.run["lost_workers"] and run.run["lost_workers"][0]["in_flight_lost"] == len(lost)
    assert any("was lost" in p for p in run.run["problems"])


def _kill_one_worker_actor(server: ScriptedServer, after_requests: int) -> None:
    """What a node failure does to an actor: SIGKILL its process once the run is under way."""
    deadline = time.monotonic() + 60
    while server.stats()["requests"] < after_requests and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(0.5)
    for pid in sorted(int(p) for p in os.listdir("/proc") if p.isdigit()):
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            continue
        if b"ray::WorkerActor" in cmdline:
            os.kill(pid, signal.SIGKILL)
            return


def test_a_user_script_runs_through_ray_actors(tmp_path, cluster, server):
    script = tmp_path / "flows.py"
    script.write_text(textwrap.dedent("""
        from servescope import User, task

        class Two(User):
            @task
            async def twice(self):
                first = await self.client.completions(prompt=self.prompt(tokens=8), max_tokens=3)
                await self.client.completions(prompt=first.text, max_tokens=2)
    """))
    outcome = _run(server, tmp_path / "run", ray=cluster.address, workers=2, users=str(script), concurrency=4,
                   requests=12)
    assert outcome.exit_code == 0
    run = load_run(tmp_path / "run")
    assert len(run.flows) == 12 and (run.flows["calls"] == 2).all()
    assert run.flows["node"].nunique() == 2 and run.requests["node"].nunique() == 2


def test_ctrl_c_on_the_driver_keeps_what_was_measured(tmp_path, cluster):
    with ScriptedServer(default_script={"first_token_delay_s": 3.0}) as slow:
        out = tmp_path / "run"
        cmd = [sys.executable, "-m", "servescope", "run", "--target", slow.base_url, "--model", "scripted",
               "--ray", cluster.address, "--workers", "2", "--rate", "10", "--arrival", "constant", "--duration", "60s",
               "--prompt-tokens", "16", "--max-tokens", "2", "--out", str(out), "--no-report", "--grace", "0.5s"]
        code, output = interrupt_after(cmd, lambda: slow.stats()["requests"], 10, start_timeout=90, exit_timeout=60)
        sent = slow.stats()["requests"]
    assert code == 130, output
    assert json.loads((out / "run.json").read_text())["status"] == "interrupted"
    run = load_run(out)
    assert len(run.requests[run.requests["sent_at"].notna()]) == sent  # every request the server saw
    assert set(run.requests["status"]) == {"cancelled"}


def test_an_unreachable_cluster_is_exit_2_with_the_address(tmp_path):
    result = CliRunner().invoke(main, ["run", "--target", "http://127.0.0.1:9", "--model", "m",
                                       "--ray", "127.0.0.1:1", "--concurrency", "1", "--out", str(tmp_path / "never")])
    assert result.exit_code == 2, result.output
    assert "127.0.0.1:1" in result.output and "cannot join the Ray cluster" in result.output
    assert not (tmp_path / "never").exists()
