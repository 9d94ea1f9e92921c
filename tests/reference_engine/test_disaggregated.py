"""Disaggregated prefill and decode (`--disaggregate P:D`): the same tokens as one colocated engine, and no
leaked blocks or transfers whichever way a request ends.

What only disaggregation can get wrong: the handoff point (the first token
comes from the prefill engine, the rest from a decode engine that continues
from transferred KV), the prefix cache on the prefill side, a client that
leaves while its KV is between the engines, and a decode engine that dies
while others serve on.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import os
import signal
from pathlib import Path

import httpx
import pytest
import torch
from click.testing import CliRunner

from servescope.harness.targets.engine import EngineProcess
from servescope.reference_engine.cli import serve as serve_command
from servescope.reference_engine.disagg.kv_blocks import gather_blocks, place_blocks
from servescope.reference_engine.disagg.pools import DisaggConfig, start_disaggregated
from servescope.reference_engine.disagg.transport import make_transport
from servescope.reference_engine.errors import ConfigError
from servescope.reference_engine.sequence import SamplingParams
from servescope.reference_engine.server import ServerThread
from support.processes import parent_of, process_gone, wait_until

SHM = Path("/dev/shm")
WORDS = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi omicron pi rho sigma tau".split()


def _prompt(n_words: int, offset: int = 0) -> str:
    return " ".join(WORDS[(offset + i) % len(WORDS)] for i in range(n_words))


def _kv_segments() -> set[str]:
    return {p.name for p in SHM.glob("servescope-kv-*")}


@pytest.fixture(scope="module")
def servers(launch_factory):
    """A 1:1 disaggregated server and the colocated engine it must agree with, built alike."""
    pd = ServerThread(start_disaggregated(launch_factory(), DisaggConfig(1, 1)), "tiny")
    colocated = ServerThread(launch_factory(), "tiny")
    yield {"pd": pd, "colocated": colocated}
    pd.stop()
    colocated.stop()


def _complete(url: str, body: dict) -> dict:
    response = httpx.post(url + "/v1/completions", json=body, timeout=120)
    assert response.status_code == 200, response.text
    return response.json()


def _both(servers, bodies: list[dict]) -> tuple[list[dict], list[dict]]:
    """Each body on both servers, all at once on each (continuous batching mixes their steps)."""
    with concurrent.futures.ThreadPoolExecutor(len(bodies)) as pool:
        pd = list(pool.map(lambda b: _complete(servers["pd"].url, b), bodies))
        colocated = list(pool.map(lambda b: _complete(servers["colocated"].url, b), bodies))
    return pd, colocated


def _pools_idle(url: str) -> bool:
    state = httpx.get(url + "/internal/engine").json()
    engines = state["prefill"] + state["decode"]
    return all(e["free_blocks"] == e["num_blocks"] and e["running"] == 0 and e["waiting"] == 0 for e in engines) \
        and all(e["transfer_queue"] == 0 for e in state["decode"])


def test_greedy_output_equals_the_colocated_engine_for_mixed_lengths(servers) -> None:
    bodies = [{"prompt": _prompt(n, n), "max_tokens": m, "temperature": 0, "ignore_eos": True}
              for n, m in ((3, 24), (40, 16), (150, 8), (9, 1), (70, 30), (300, 5), (1100, 6))]
    bodies.append({"prompt": _prompt(20), "max_tokens": 12, "temperature": 0, "stop": ["a"]})  # held-back text
    pd, colocated = _both(servers, bodies)
    for body, got, want in zip(bodies, pd, colocated):
        assert got["choices"][0]["text"] == want["choices"][0]["text"], body
        assert got["choices"][0]["finish_reason"] == want["choices"][0]["finish_reason"]
        usage = got["usage"]
        assert usage["completion_tokens"] == want["usage"]["completion_tokens"]
        if usage["completion_tokens"] > 1:  # decoded on the decode engine: its transfer is in the usage
            assert usage["kv_transfer_s"] > 0
        else:
            assert "kv_transfer_s" not in usage
    wait_until(lambda: _pools_idle(servers["pd"].url), what="both pools idle with every block free")
    assert not _kv_segments()
    decode = httpx.get(servers["pd"].url + "/internal/engine").json()["decode"][0]
    assert decode["loaded_aside"] >= 1  # the long prompt's blocks loaded on the loader thread, the rest inline


def test_prefix_hits_are_served_by_the_prefill_side(servers) -> None:
    shared = _prompt(96, 3)
    bodies = [{"prompt": shared + f" tail {i} " + _prompt(5 + i), "max_tokens": 10, "temperature": 0,
               "ignore_eos": True} for i in range(3)]
    _complete(servers["pd"].url, bodies[0])  # the shared prefix is computed once
    pd, colocated = _both(servers, bodies)
    for got, want in zip(pd, colocated):
        assert got["choices"][0]["text"] == want["choices"][0]["text"]
        assert got["usage"]["prompt_tokens_details"]["cached_tokens"] >= 80
    state = httpx.get(servers["pd"].url + "/internal/engine").json()
    assert state["kv_transport"] == "shm" and state["mode"] == "disaggregated"
    wait_until(lambda: _pools_idle(servers["pd"].url), what="both pools idle with every block free")


def test_a_client_leaving_after_the_first_token_leaks_nothing_on_either_side(servers) -> None:
    url = servers["pd"].url
    for n in (30, 120, 250):
        body = {"prompt": _prompt(n), "max_tokens": 200, "temperature": 0, "ignore_eos": True, "stream": True}
        with httpx.Client(timeout=60) as client, client.stream("POST", url + "/v1/completions", json=body) as resp:
            for line in resp.iter_lines():
                if line.startswith("data: ") and json.loads(line[6:])["choices"][0]["text"]:
                    break  # the first token, from the prefill engine: leave now
    wait_until(lambda: _pools_idle(url), what="both pools idle with every block free")
    assert not _kv_segments()


def test_a_handoff_that_never_reaches_a_decode_engine_is_discarded(servers) -> None:
    """Closing the stream right after the first token, before the front end forwards the KV: the front end
    discards the transfer itself."""
    client = servers["pd"].client
    seen: list[str] = []

    async def first_token_then_leave() -> None:
        prompt = client.tokenizer.encode(_prompt(64))
        outputs = client.generate(prompt, SamplingParams(max_tokens=50, temperature=0, ignore_eos=True))
        async for out in outputs:
            seen.append(out.text)
            seen.extend(_kv_segments())  # the transfer exists now, between the engines
            break
        await outputs.aclose()

    asyncio.run_coroutine_threadsafe(first_token_then_leave(), servers["pd"]._loop).result(60)
    assert len(seen) == 2 and seen[1].startswith("servescope-kv-")
    assert not _kv_segments()
    wait_until(lambda: _pools_idle(servers["pd"].url), what="both pools idle with every block free")


def test_metrics_name_each_pool_and_the_transfer(servers) -> None:
    text = httpx.get(servers["pd"].url + "/metrics").text
    assert 'vllm:num_requests_running{engine="servescope-reference",model_name="tiny",pool="prefill",replica="0"}' in text
    assert 'pool="decode"' in text
    for name in ("servescope:kv_transfer_seconds_count", "servescope:kv_transfer_bytes_sum",
                 "servescope:kv_transfer_queue_depth", "servescope:kv_transfer_wait_seconds_total",
                 "servescope:engine_step_seconds_count"):
        assert name in text, name
    assert text.count("# TYPE vllm:num_requests_running gauge") == 1  # one family, both pools


def test_a_dead_decode_engine_fails_its_requests_and_the_other_serves_on(launch_factory) -> None:
    srv = ServerThread(start_disaggregated(launch_factory(), DisaggConfig(1, 2)), "tiny")
    try:
        body = {"prompt": _prompt(20), "max_tokens": 400, "temperature": 0, "ignore_eos": True}
        with concurrent.futures.ThreadPoolExecutor(6) as pool:
            futures = [pool.submit(httpx.post, srv.url + "/v1/completions", json=body, timeout=120) for _ in range(6)]

            def both_decoding() -> bool:
                return all(e["running"] > 0 for e in httpx.get(srv.url + "/internal/engine").json()["decode"])

            wait_until(both_decoding, timeout=60, what="both decode engines running requests")
            victim = httpx.get(srv.url + "/internal/engine").json()["decode"][0]["pid"]
            os.kill(victim, signal.SIGKILL)
            codes = sorted(f.result().status_code for f in futures)
        assert 500 in codes and 200 in codes, codes
        wait_until(lambda: process_gone(victim), what="the killed decode engine reaped")
        assert httpx.get(srv.url + "/health").status_code == 200
        assert _complete(srv.url, {**body, "max_tokens": 5})["usage"]["completion_tokens"] == 5
        state = httpx.get(srv.url + "/internal/engine").json()
        assert [e["alive"] for e in state["decode"]] == [False, True]
        os.kill(state["decode"][1]["pid"], signal.SIGKILL)  # the last decode engine: the engine is gone
        wait_until(lambda: httpx.get(srv.url + "/health").status_code == 503, what="/health 503")
        assert httpx.post(srv.url + "/v1/completions", json=body, timeout=30).status_code == 503
    finally:
        srv.stop()


def test_bad_disaggregate_values_are_usage_errors() -> None:
    for value in ("1", "0:1", "a:b", "1:-1"):
        with pytest.raises(ConfigError, match="P:D"):
            DisaggConfig.parse(value)
    result = CliRunner().invoke(serve_command, ["--disaggregate", "2", "--device", "cpu"])
    assert result.exit_code == 2 and "P:D" in result.output


@pytest.mark.parametrize("name", ["shm", "socket"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_transport_delivers_the_blocks_bit_for_bit_and_releases_them(name: str, dtype: torch.dtype) -> None:
    transport = make_transport(name)
    kv = torch.randn(2, 2, 3, 16, 2, 8).to(dtype)
    received = transport.receive(transport.send(kv), torch.device("cpu"))
    assert received.dtype == dtype and torch.equal(received, kv)
    dropped = transport.send(kv)
    transport.discard(dropped)
    transport.discard(dropped)  # twice, or after a receive: nothing left to release, no error
    assert not _kv_segments()


def test_placed_blocks_equal_the_gathered_ones_and_a_wrong_shape_is_refused() -> None:
    caches = [(torch.randn(6, 4, 2, 8), torch.randn(6, 4, 2, 8)) for _ in range(3)]
    kv = gather_blocks(caches, [4, 1])
    other = [(torch.zeros(6, 4, 2, 8), torch.zeros(6, 4, 2, 8)) for _ in range(3)]
    place_blocks(other, [0, 5], kv)
    for (k, v), (k2, v2) in zip(caches, other):
        assert torch.equal(k2[0], k[4]) and torch.equal(v2[5], v[1]) and not k2[1:5].any()
    with pytest.raises(ValueError, match="same model and block size"):
        place_blocks(other[:2], [0, 5], kv)


def test_the_socket_transport_serves_the_same_tokens(launch_factory, servers) -> None:
    srv = ServerThread(start_disaggregated(launch_factory(), DisaggConfig(1, 1, "socket")), "tiny")
    try:
        assert httpx.get(srv.url + "/internal/engine").json()["kv_transport"] == "socket"
        body = {"prompt": _prompt(90, 5), "max_tokens": 12, "temperature": 0, "ignore_eos": True}
        got, want = _complete(srv.url, body), _complete(servers["colocated"].url, body)
        assert got["choices"][0]["text"] == want["choices"][0]["text"] and got["usage"]["kv_transfer_s"] > 0
    finally:
        srv.stop()


def test_the_served_command_stops_every_engine_and_exits_1_when_no_decode_engine_is_left() -> None:
    """`servescope serve --disaggregate 1:1`: SIGTERM stops both engine processes in order; a server whose last
    decode engine died exits 1 with the reason on stderr."""
    for ending in ("sigterm", "decode engine killed"):
        engine = EngineProcess(extra_args=("--device", "cpu", "--num-kv-blocks", "256", "--disaggregate", "1:1"),
                               health_timeout_s=90)
        engine.start()
        try:
            state = httpx.get(engine.base_url + "/internal/engine").json()
            pids = state["pids"]
            assert len(pids) == 2 and all(parent_of(pid) == engine.process.pid for pid in pids)
            reply = httpx.post(engine.base_url + "/v1/completions", json={"prompt": "hi", "max_tokens": 3}, timeout=30)
            assert reply.status_code == 200 and reply.json()["usage"]["completion_tokens"] == 3
            if ending == "sigterm":
                engine.process.send_signal(signal.SIGTERM)
                assert engine.process.wait(30) == 0
            else:
                os.kill(state["decode"][0]["pid"], signal.SIGKILL)
                assert engine.process.wait(30) == 1
                assert "no decode engine is left" in engine.stderr_tail()
            for pid in pids:
                wait_until(lambda pid=pid: process_gone(pid), timeout=15, what=f"engine process {pid} to exit")
        finally:
            engine.close()
