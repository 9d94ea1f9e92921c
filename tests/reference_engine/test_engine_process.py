"""Process mode: the step loop in an engine process behind the same HTTP server.

What only process mode can get wrong: output that differs from thread mode,
errors that must cross the process boundary (a refused add, a bad setting at
start-up, the engine process dying), admission figures reported by another
process, and child processes left behind when the server stops. The shared
handler behaviour (400s, 429, disconnects, metrics) runs in both modes in
test_server.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator

import httpx
import pytest

from servescope.harness.targets.engine import EngineProcess, free_port
from servescope.reference_engine.engine_client import EngineFailed
from servescope.reference_engine.frames import FrameDecoder, encode
from servescope.reference_engine.sequence import SamplingParams
from servescope.reference_engine.server import ServerThread
from support.processes import parent_of, process_gone, wait_until


@pytest.fixture(scope="module")
def servers(engine_factory, launch_factory):
    """One server per mode, built alike, shared by the module (an engine process costs ~2 s to start)."""
    process = ServerThread(launch_factory(), "tiny")
    thread = ServerThread(engine_factory(), "tiny")
    yield {"process": process, "thread": thread}
    process.stop()
    thread.stop()


def _run_on(srv: ServerThread, coro, timeout: float = 30.0):
    """Run a coroutine on the server's own event loop (where its engine client lives)."""
    return asyncio.run_coroutine_threadsafe(coro, srv._loop).result(timeout)


def test_frames_survive_any_split_of_the_byte_stream() -> None:
    messages = [[("add", 1, [1, 2, 3], SamplingParams(max_tokens=4), "t", "r", 1.5)], ("out", [], [], 3, 0),
                ("reply", 7, b"x" * 100_000)]
    data = b"".join(encode(m) for m in messages)
    for chunk in (1, 5, 4096, len(data)):
        decoder = FrameDecoder()
        got = []
        for i in range(0, len(data), chunk):
            got += decoder.feed(data[i:i + chunk])
        assert got == messages and decoder.pending == 0


def test_engine_runs_in_its_own_process(servers) -> None:
    srv = servers["process"]
    state = httpx.get(srv.url + "/internal/engine").json()
    assert state["mode"] == "process" and state["pid"] != os.getpid()
    assert parent_of(state["pid"]) == os.getpid()
    assert httpx.get(servers["thread"].url + "/internal/engine").json()["mode"] == "thread"
    models = httpx.get(srv.url + "/v1/models").json()["data"]
    assert models[0]["id"] == "tiny" and models[0]["max_model_len"] == 32768


def test_greedy_and_seeded_output_match_thread_mode(servers) -> None:
    bodies = [
        ("/v1/completions", {"prompt": "the quick brown fox", "max_tokens": 24, "temperature": 0, "ignore_eos": True}),
        ("/v1/completions", {"prompt": "one two three one two three", "max_tokens": 16, "temperature": 0.8,
                             "seed": 7, "ignore_eos": True}),
        ("/v1/completions", {"prompt": [0, 300, 301, 302], "max_tokens": 12, "temperature": 0, "stop": ["e"]}),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hello there"}], "max_tokens": 16,
                                  "temperature": 0, "ignore_eos": True}),
    ]
    with httpx.Client(timeout=30) as client:
        for path, body in bodies:
            answers = {mode: client.post(srv.url + path, json=body).json() for mode, srv in servers.items()}
            for answer in answers.values():
                answer.pop("id"), answer.pop("created")
            assert answers["process"] == answers["thread"], body
            assert answers["process"]["usage"]["completion_tokens"] > 0

            streamed = []  # the stream carries the same text, and usage at the end
            with client.stream("POST", servers["process"].url + path,
                               json={**body, "stream": True, "stream_options": {"include_usage": True}}) as resp:
                for line in resp.iter_lines():
                    if line.startswith("data: {"):
                        streamed.append(json.loads(line[6:]))
            choices = [c["choices"][0] for c in streamed if c["choices"]]
            text = "".join(c.get("text") or c.get("delta", {}).get("content") or "" for c in choices)
            full = answers["process"]["choices"][0]
            assert text == full.get("text", full.get("message", {}).get("content"))
            usage = {**streamed[-1]["usage"], "prompt_tokens_details": None}  # the repeat hits the prefix cache
            assert usage == {**answers["process"]["usage"], "prompt_tokens_details": None}


def test_a_refused_add_fails_only_its_own_request(servers) -> None:
    """The front end validates first; an add the engine still refuses comes back as EngineFailed."""
    srv = servers["process"]
    client = srv.client

    async def refused() -> str:
        with pytest.raises(EngineFailed) as info:
            async for _ in client.generate([], SamplingParams(max_tokens=2)):
                pass
        return str(info.value)

    assert "the prompt is empty" in _run_on(srv, refused())
    wait_until(lambda: client.num_waiting == 0, what="the refused add to be counted as taken")
    ok = httpx.post(srv.url + "/v1/completions", json={"prompt": "still serving", "max_tokens": 3}, timeout=30)
    assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] == 3


def test_num_waiting_counts_adds_the_engine_has_not_reported(servers) -> None:
    srv = servers["process"]
    client = srv.client

    async def finish_reasons(stream) -> list[str]:
        return [out.finish_reason async for out in stream if out.finished]

    async def burst() -> tuple[int, list[list[str]]]:
        params = SamplingParams(max_tokens=4, temperature=0, ignore_eos=True)
        tasks = [asyncio.ensure_future(finish_reasons(client.generate([0, 300 + i], params))) for i in range(5)]
        await asyncio.sleep(0)  # the adds are posted; the engine has reported none of them yet
        posted_now = client.num_waiting
        return posted_now, await asyncio.gather(*tasks)

    posted_now, reasons = _run_on(srv, burst())
    assert posted_now == 5 and reasons == [["length"]] * 5
    wait_until(lambda: client.num_waiting == 0, what="num_waiting to settle")


def test_config_error_reaches_the_cli_as_a_usage_error() -> None:
    result = subprocess.run([sys.executable, "-m", "servescope.reference_engine", "--engine-process", "--device", "cpu",
                             "--kv-cache-memory", "1KB", "--port", str(free_port())],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2, result.stderr
    assert "Error: --kv-cache-memory 1024 bytes holds 0 blocks" in result.stderr
    assert "Traceback" not in result.stderr


@contextlib.contextmanager
def _cli_server(*args: str) -> Iterator[tuple[subprocess.Popen, str]]:
    """`python -m servescope.reference_engine --engine-process` until /health answers; killed at the end if still up."""
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "servescope.reference_engine", "--port", str(port),
                             "--device", "cpu", "--num-kv-blocks", "256", "--engine-process", *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "the engine did not answer /health within 60 s"
            try:
                if httpx.get(url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.1)
        yield proc, url
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.communicate(timeout=10)


@pytest.mark.parametrize("stop", ["sigterm", "harness", "sigkill"])
def test_stopping_the_server_leaves_no_engine_process(stop: str) -> None:
    """SIGTERM and the harness's SIGINT stop the engine process in order; a server killed outright
    leaves it at end of file on its socket, where it exits by itself."""
    with contextlib.ExitStack() as stack:
        if stop == "harness":  # the harness's own start/stop (SIGINT first), as `servescope run` does it
            engine = stack.enter_context(EngineProcess(
                extra_args=("--device", "cpu", "--num-kv-blocks", "256", "--engine-process"), health_timeout_s=60))
            url, server_pid = engine.base_url, engine.process.pid
        else:
            proc, url = stack.enter_context(_cli_server())
            server_pid = proc.pid
        child = httpx.get(url + "/internal/engine").json()["pid"]
        assert child != server_pid and parent_of(child) == server_pid
        reply = httpx.post(url + "/v1/completions", json={"prompt": "hi", "max_tokens": 2}, timeout=30)
        assert reply.status_code == 200
        if stop == "sigterm":
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(20) == 0
        elif stop == "sigkill":
            proc.kill()
            proc.wait(10)
        else:
            assert engine.stop() == 0, engine.stderr_tail()
        wait_until(lambda: process_gone(child), timeout=10, what=f"engine process {child} to exit")


def test_a_dead_engine_process_fails_its_requests_and_stops_the_server() -> None:
    with _cli_server() as (proc, url):
        child = httpx.get(url + "/internal/engine").json()["pid"]
        lines = []
        with httpx.Client(timeout=30) as client:
            with client.stream("POST", url + "/v1/completions", json={"prompt": "long", "max_tokens": 3000,
                                                                      "ignore_eos": True, "stream": True}) as resp:
                for line in resp.iter_lines():
                    lines.append(line)
                    if len(lines) == 3:
                        os.kill(child, signal.SIGKILL)
        assert "data: [DONE]" not in lines  # the stream did not pretend to finish
        errors = [json.loads(line[6:]) for line in lines if line.startswith('data: {"error"')]
        assert errors and "the engine process exited unexpectedly" in errors[0]["error"]["message"]
        assert proc.wait(20) == 1
        assert "engine process exited unexpectedly" in proc.stderr.read()
