"""Every failure becomes a record with its own error_kind; execute never raises."""

from __future__ import annotations

import asyncio
import socket
import time

import pytest

from servescope.harness.client import ClientConfig, StreamingClient
from servescope.rundir.schema import RequestRecord


@pytest.mark.parametrize(
    ("script", "status", "kind", "message"),
    [
        ({"fault": "http_error", "fault_status": 400, "fault_message": "prompt too long"}, 400, "http_4xx", "prompt too long"),
        ({"fault": "http_error", "fault_status": 429, "fault_message": "slow down"}, 429, "http_429", "slow down"),
        ({"fault": "http_error", "fault_status": 503, "fault_message": "overloaded"}, 503, "http_5xx", "overloaded"),
        ({"fault": "stream_error", "fault_message": "engine died"}, 200, "http_5xx", "engine died"),
        ({"fault": "malformed_json"}, 200, "protocol", "malformed JSON"),
        ({"fault": "malformed_sse"}, 200, "protocol", "malformed SSE"),
        ({"fault": "non_sse"}, 200, "protocol", "application/json"),
        ({"fault": "reset", "fault_after": 2}, 200, "reset", ""),
        ({"fault": "close"}, None, "reset", ""),
    ],
    ids=lambda v: v["fault"] + str(v.get("fault_status", "")) if isinstance(v, dict) else None,
)
def test_faults_land_as_their_own_error_kind(server, transport, script, status, kind, message, send, make_spec) -> None:
    rec = send(server.base_url, transport, make_spec("completions", {"tokens": 4, **script}, 4))
    assert (rec.status, rec.error_kind, rec.http_status) == ("error", kind, status), rec.error_message
    assert message in (rec.error_message or "")
    assert len(rec.error_message or "") <= 500
    if script["fault"] == "reset":  # what was measured before the reset is kept
        assert rec.first_token_at is not None and len(rec.chunk_tokens) == 2


def test_connection_refused_is_a_connect_error(transport, send, make_spec) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    rec = send(f"http://127.0.0.1:{port}", transport, make_spec(), prewarm=0)
    assert (rec.status, rec.error_kind) == ("error", "connect")
    assert f"127.0.0.1:{port}" in rec.error_message or "onnect" in rec.error_message


def test_server_that_never_answers_times_out_on_time(server, transport, send, make_spec) -> None:
    rec = send(server.base_url, transport, make_spec("completions", {"fault": "hang"}), timeout_s=0.3)
    assert (rec.status, rec.error_kind) == ("timeout", "timeout")
    assert rec.e2e_s == pytest.approx(0.3, abs=0.1)


def test_mid_stream_stall_times_out(server, transport, send, make_spec) -> None:
    script = {"fault": "stall", "fault_after": 2, "tokens": 5}
    rec = send(server.base_url, transport, make_spec("completions", script), timeout_s=0.3)
    assert (rec.status, rec.error_kind) == ("timeout", "timeout")
    assert rec.first_token_at is not None and len(rec.chunk_tokens) == 2
    assert rec.e2e_s == pytest.approx(0.3, abs=0.1)


def test_cancellation_fills_the_record_then_reraises(server, transport, make_spec) -> None:
    async def go() -> RequestRecord:
        client = StreamingClient(ClientConfig(server.base_url, "m", time.perf_counter(), transport=transport))
        record = RequestRecord("r")
        task = asyncio.create_task(client.execute(make_spec("completions", {"fault": "hang"}), record))
        await asyncio.sleep(0.1)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await client.aclose()
        return record

    rec = asyncio.run(go())
    assert (rec.status, rec.error_kind) == ("cancelled", "cancelled")
    assert rec.e2e_s == pytest.approx(0.1, abs=0.05)


def test_bad_spec_is_a_client_error_not_an_exception(server, send, make_spec) -> None:
    spec = make_spec("completions")
    spec.prompt = None
    rec = send(server.base_url, "fast", spec, prewarm=0)
    assert (rec.status, rec.error_kind) == ("error", "client")
    assert "needs a prompt" in rec.error_message
