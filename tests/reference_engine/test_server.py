"""The HTTP server: the official openai client streams from it; errors, 429, disconnects and metrics.

Every server test runs in both modes: the step loop in a thread of the server's process, and in an
engine process of its own (`--engine-process`); the handlers must not be able to tell.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import httpx
import pytest

from servescope.harness.targets.engine import free_port
from servescope.reference_engine.config import SpecConfig
from servescope.reference_engine.server import ServerThread


@pytest.fixture(scope="module", params=["--no-engine-process", "--engine-process"])
def cli_server(request):
    """`python -m servescope.reference_engine` as a real subprocess (what the harness starts), in each mode."""
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "servescope.reference_engine", "--port", str(port),
                             "--device", "cpu", "--num-kv-blocks", "256", "--spec", "ngram:k=3", request.param],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                break
        except httpx.TransportError:
            time.sleep(0.2)
        assert proc.poll() is None, proc.stdout.read().decode()
    else:
        proc.kill()
        pytest.fail("the engine did not answer /health within 60 s")
    yield url
    proc.terminate()
    proc.wait(15)


@pytest.fixture(params=["thread", "process"])
def server(request, engine_factory, launch_factory):
    servers = []

    def start(api_key: str | None = None, **overrides) -> ServerThread:
        source = engine_factory(**overrides) if request.param == "thread" else launch_factory(**overrides)
        srv = ServerThread(source, "tiny", api_key=api_key)
        servers.append(srv)
        return srv

    yield start
    for srv in servers:
        srv.stop()


def test_openai_client_streams_completions_and_chat(cli_server) -> None:
    from openai import OpenAI

    client = OpenAI(base_url=cli_server + "/v1", api_key="unused")
    assert [m.id for m in client.models.list()] == ["tiny"]
    chunks = list(client.completions.create(model="tiny", prompt="one two three one two three one two", max_tokens=12,
                                            temperature=0, stream=True, stream_options={"include_usage": True},
                                            extra_body={"ignore_eos": True}))
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text and chunks[-2].choices[0].finish_reason == "length"
    usage = chunks[-1].usage
    assert usage.completion_tokens == 12 and usage.prompt_tokens > 0
    assert usage.prompt_tokens_details.cached_tokens == 0
    assert usage.model_extra["spec_draft_tokens"] >= usage.model_extra["spec_accepted_tokens"] >= 0
    full = client.completions.create(model="tiny", prompt="one two three one two three one two", max_tokens=12,
                                     temperature=0, extra_body={"ignore_eos": True})
    assert full.choices[0].text == text  # greedy: streaming and not streaming agree

    stream = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hello"}],
                                            max_tokens=8, stream=True, stream_options={"include_usage": True},
                                            extra_body={"ignore_eos": True})
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    content = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert content and chunks[-1].usage.completion_tokens == 8


TOOLS = [{"type": "function", "function": {"name": "search_docs", "parameters": {"type": "object"}}},
         {"type": "function", "function": {"name": "read_file", "parameters": {"type": "object"}}}]


def test_a_forced_tool_choice_is_answered_as_a_streamed_tool_call(cli_server) -> None:
    from openai import OpenAI

    client = OpenAI(base_url=cli_server + "/v1", api_key="unused")
    ask = dict(model="tiny", messages=[{"role": "user", "content": "find the docs"}], tools=TOOLS, max_tokens=8,
               temperature=0, extra_body={"ignore_eos": True},
               tool_choice={"type": "function", "function": {"name": "read_file"}})
    full = client.chat.completions.create(**ask)
    call = full.choices[0].message.tool_calls[0]
    assert full.choices[0].finish_reason == "tool_calls" and call.function.name == "read_file"
    chunks = [c for c in client.chat.completions.create(**ask, stream=True) if c.choices]
    head = chunks[0].choices[0].delta.tool_calls[0]
    assert (head.index, head.type, head.function.name) == (0, "function", "read_file") and head.id.startswith("call_")
    fragments = [c.choices[0].delta.tool_calls[0].function.arguments for c in chunks[1:] if c.choices[0].delta.tool_calls]
    assert len(fragments) >= 2 and "".join(fragments) == call.function.arguments  # greedy: the same text both ways
    assert chunks[-1].choices[0].finish_reason == "tool_calls"
    required = client.chat.completions.create(**{**ask, "tool_choice": "required"})
    assert required.choices[0].message.tool_calls[0].function.name == "search_docs"  # the first tool
    plain = client.chat.completions.create(**{**ask, "tool_choice": "auto"})
    assert plain.choices[0].message.tool_calls is None and plain.choices[0].finish_reason == "length"
    with pytest.raises(Exception, match="not one of tools"):
        client.chat.completions.create(**{**ask, "tool_choice": {"type": "function", "function": {"name": "nope"}}})


def test_bad_requests_get_openai_style_400s(server) -> None:
    srv = server(max_model_len=256)
    cases = [
        (b"{not json", None),
        (json.dumps({"prompt": "hi", "max_tokens": "ten"}).encode(), "max_tokens"),
        (json.dumps({"prompt": "hi", "temperature": "hot"}).encode(), "temperature"),
        (json.dumps({"prompt": {"a": 1}}).encode(), "prompt"),
        (json.dumps({"prompt": "hi", "n": 2}).encode(), "n"),
        (json.dumps({"prompt": "word " * 300, "max_tokens": 4}).encode(), "prompt"),
        (json.dumps({"prompt": "hi", "model": "gpt-9"}).encode(), "model"),
    ]
    for body, param in cases:
        resp = httpx.post(srv.url + "/v1/completions", content=body, headers={"Content-Type": "application/json"})
        assert resp.status_code == 400, body
        error = resp.json()["error"]
        assert set(error) == {"message", "type", "param", "code"} and error["message"]
        assert error["type"] == "invalid_request_error" and error["param"] == param
    resp = httpx.post(srv.url + "/v1/chat/completions", json={"messages": "hello"})
    assert resp.status_code == 400 and resp.json()["error"]["param"] == "messages"


def _stream_until_first_token(client: httpx.Client, url: str, body: dict):
    """Open a streaming request and return (response, its line iterator) once a token arrived."""
    request = client.build_request("POST", url + "/v1/completions", json={**body, "stream": True})
    response = client.send(request, stream=True)
    assert response.status_code == 200, response.read()
    lines = response.iter_lines()
    for line in lines:
        if line.startswith("data: {"):
            return response, lines
    raise AssertionError("no token arrived")


def test_full_waiting_queue_answers_429_with_retry_after(server) -> None:
    srv = server(max_num_seqs=1, max_waiting=1)
    long_body = {"prompt": "busy", "max_tokens": 4000, "ignore_eos": True}
    with httpx.Client(timeout=30) as client:
        running, _ = _stream_until_first_token(client, srv.url, long_body)
        waiting = client.send(client.build_request("POST", srv.url + "/v1/completions",
                                                   json={**long_body, "stream": True}), stream=True)
        deadline = time.monotonic() + 10
        while httpx.get(srv.url + "/internal/engine").json()["waiting"] < 1 and time.monotonic() < deadline:
            time.sleep(0.02)
        refused = client.post(srv.url + "/v1/completions", json={"prompt": "more", "max_tokens": 2})
        assert refused.status_code == 429
        assert refused.headers["Retry-After"] == "1"
        assert refused.json()["error"]["code"] == "queue_full"
        running.close()
        waiting.close()


def test_client_disconnect_aborts_and_frees_blocks(server) -> None:
    srv = server()
    with httpx.Client(timeout=30) as client:
        response, _ = _stream_until_first_token(client, srv.url, {"prompt": "a b c " * 50, "max_tokens": 3000,
                                                                  "ignore_eos": True})
        state = httpx.get(srv.url + "/internal/engine").json()
        assert state["running"] == 1 and state["free_blocks"] < state["num_blocks"]
        response.close()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        state = httpx.get(srv.url + "/internal/engine").json()
        if state["running"] == 0:
            break
        time.sleep(0.05)
    assert state["running"] == 0 and state["free_blocks"] == state["num_blocks"]
    metrics = httpx.get(srv.url + "/metrics").text
    assert 'vllm:kv_cache_usage_perc{engine="servescope-reference",model_name="tiny"} 0.0' in metrics


def test_metrics_expose_vllm_names_and_count_prefix_hits(server) -> None:
    srv = server(spec=SpecConfig(k=2))
    shared = "shared context " * 40
    for suffix in ("first question", "second question"):
        resp = httpx.post(srv.url + "/v1/completions", json={"prompt": shared + suffix, "max_tokens": 3},
                          headers={"X-Tenant": "acme"}, timeout=30)
        assert resp.status_code == 200
    assert resp.json()["usage"]["prompt_tokens_details"]["cached_tokens"] > 0
    text = httpx.get(srv.url + "/metrics").text
    names = ["vllm:num_requests_running", "vllm:num_requests_waiting", "vllm:kv_cache_usage_perc",
             "vllm:num_preemptions_total", "vllm:prefix_cache_queries_total", "vllm:prefix_cache_hits_total",
             "vllm:spec_decode_num_draft_tokens_total", "vllm:spec_decode_num_accepted_tokens_total",
             "vllm:prompt_tokens_total", "vllm:generation_tokens_total",
             "vllm:time_to_first_token_seconds_bucket", "vllm:inter_token_latency_seconds_bucket",
             "vllm:request_queue_time_seconds_bucket", "vllm:e2e_request_latency_seconds_bucket"]
    for name in names:
        assert name + "{" in text, name
    values = {line.split("{")[0]: float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
              if line.startswith("vllm:") and "_bucket" not in line}
    assert values["vllm:prefix_cache_hits_total"] > 0
    assert values["vllm:prefix_cache_queries_total"] >= values["vllm:prefix_cache_hits_total"]
    assert values["vllm:generation_tokens_total"] == 6
    assert values["vllm:e2e_request_latency_seconds_count"] == 2


def test_precomputed_sse_chunks_equal_the_json_shape() -> None:
    from servescope.reference_engine.protocol import ResponseBuilder

    for api in ("completions", "chat"):
        builder = ResponseBuilder(api, "tiny")
        for text in ("plain", 'quote " and \\ backslash\n', "ünïcødé ✓"):
            raw = builder.sse_text_chunk(text)
            assert raw.startswith(b"data: {") and raw.endswith(b"}\n\n")
            assert json.loads(raw[6:]) == builder.text_chunk(text, None)


def test_api_key_guards_the_openai_and_internal_routes(server) -> None:
    srv = server(api_key="s3cret")
    body = {"prompt": "hi", "max_tokens": 2}
    denied = httpx.post(srv.url + "/v1/completions", json=body)
    assert denied.status_code == 401 and denied.json()["error"]["code"] == "invalid_api_key"
    allowed = httpx.post(srv.url + "/v1/completions", json=body, headers={"Authorization": "Bearer s3cret"}, timeout=30)
    assert allowed.status_code == 200 and allowed.json()["usage"]["completion_tokens"] >= 1
    assert httpx.get(srv.url + "/health").status_code == 200  # probes need no key
    assert httpx.get(srv.url + "/internal/engine").status_code == 401  # the engine's internals do
    wrong = httpx.get(srv.url + "/internal/engine", headers={"Authorization": "Bearer s3cre"})
    assert wrong.status_code == 401
    state = httpx.get(srv.url + "/internal/engine", headers={"Authorization": "Bearer s3cret"})
    assert state.status_code == 200 and state.json()["steps"] >= 1
