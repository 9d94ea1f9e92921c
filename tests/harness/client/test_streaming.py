"""Timings, tokens and usage measured against the real scripted server, on every transport."""

from __future__ import annotations

import pytest

TOL = 0.002  # 2 ms: the DESIGN's bar at low load, held by the default (fast) transport
# The fallbacks parse in Python objects between the socket and the caller; httpx in
# particular was seen 3 ms late on a first chunk (benchmarks/loadgen_capacity.py
# measures each). Their bar here is looser so the suite tests behaviour, not luck.
FALLBACK_TOL = 0.006


def _tol(transport: str) -> float:
    return TOL if transport == "fast" else FALLBACK_TOL


def _content_times(record) -> list[float]:
    times = [record.first_token_at]
    for gap in record.itl_s:
        times.append(times[-1] + gap)
    return times


@pytest.mark.parametrize("api", ["completions", "chat"])
def test_ttft_and_itl_match_the_script_and_the_server_write_times(server, transport, api, send, make_spec) -> None:
    script = {"first_token_delay_s": 0.04, "itl_s": [0.01, 0.02, 0.005, 0.015]}
    rec = send(server.base_url, transport, make_spec(api, script, max_tokens=5), clock_origin=0.0)
    assert rec.status == "ok", rec.error_message
    assert rec.connect_s is None  # the prewarmed connection was reused
    # Against the server's own write log (same clock): each chunk seen within 2 ms after its write.
    writes = server.write_log(rec.response_id)
    seen = _content_times(rec)
    assert len(writes) == len(seen) == 5
    lags = [c - w for c, w in zip(seen, writes)]
    tol = _tol(transport)
    # The server stamps just after its write() returns; on a loaded machine it can be
    # descheduled in between, so the client may legitimately stamp a little earlier.
    assert all(-tol < lag < tol for lag in lags), lags
    # Against the script: within 2 ms, plus however late the server's own timer fired.
    server_itl = [b - a for a, b in zip(writes, writes[1:])]
    for got, want, served in zip(rec.itl_s, script["itl_s"], server_itl):
        assert abs(got - want) <= tol + abs(served - want), (rec.itl_s, server_itl)
    assert abs(rec.ttft_s - 0.04) <= tol + abs(writes[0] - (rec.sent_at + 0.04))
    assert rec.output_tokens == 5 and rec.output_tokens_source == "usage"
    assert rec.tpot_s == pytest.approx((rec.e2e_s - rec.ttft_s) / 4)
    assert rec.api == api and rec.max_tokens == 5


def test_chat_role_only_chunk_does_not_count_as_first_token(server, transport, send, make_spec) -> None:
    # The role-only chunk goes out at once; the first text 60 ms later.
    rec = send(server.base_url, transport, make_spec("chat", {"first_token_delay_s": 0.06, "role_chunk": True}, 3))
    assert rec.status == "ok", rec.error_message
    assert rec.ttft_s == pytest.approx(0.06, abs=TOL + 0.002)  # + the server's timer slack
    assert len(rec.itl_s) == 2


def test_multi_token_chunks_are_counted_with_the_tokenizer(server, transport, send, make_spec) -> None:
    spec = make_spec("completions", {"tokens": 10, "tokens_per_chunk": 3, "usage": "none"}, max_tokens=10)
    rec = send(server.base_url, transport, spec, count_tokens=lambda text: len(text.split()))
    assert rec.status == "ok", rec.error_message
    assert rec.chunk_tokens == [3, 3, 3, 1]
    assert len(rec.itl_s) == 3
    assert (rec.output_tokens, rec.output_tokens_source) == (10, "tokenizer")


@pytest.mark.parametrize("usage", ["finish", "separate"])
def test_usage_on_the_finish_chunk_or_a_separate_chunk(server, transport, usage, send, make_spec) -> None:
    script = {"usage": usage, "tokens": 6, "tokens_per_chunk": 2, "cached_tokens": 4,
              "spec_accepted_tokens": 5, "spec_draft_tokens": 8, "kv_transfer_s": 0.0125}
    rec = send(server.base_url, transport, make_spec("chat", script, 6))
    assert rec.status == "ok", rec.error_message
    assert (rec.output_tokens, rec.output_tokens_source) == (6, "usage")
    assert len(rec.chunk_tokens) == 3  # usage-only chunk is not a content chunk
    assert (rec.usage_prompt_tokens, rec.cached_tokens) == (7, 4)
    assert (rec.spec_accepted_tokens, rec.spec_draft_tokens) == (5, 8)
    assert rec.kv_transfer_s == 0.0125


def test_no_usage_falls_back_to_counting_chunks(server, transport, send, make_spec) -> None:
    rec = send(server.base_url, transport, make_spec("completions", {"usage": "none", "tokens": 4}, 4))
    assert rec.status == "ok", rec.error_message
    assert (rec.output_tokens, rec.output_tokens_source) == (4, "chunks")
    assert rec.usage_prompt_tokens is None and rec.cached_tokens is None


@pytest.mark.parametrize(
    "variant",
    [
        {"done": False},
        {"crlf": True},
        {"comments": True},
        {"split_events": True},
        {"coalesce": True},
        {"framing": "length"},
        {"framing": "eof", "done": False},
        {"crlf": True, "comments": True, "split_events": True, "framing": "length"},
    ],
    ids=lambda v: ",".join(f"{k}={val}" for k, val in v.items()),
)
def test_sse_and_http_framing_variants(server, transport, variant, send, make_spec) -> None:
    script = {"tokens": 4, "itl_s": 0.002, **variant}
    rec = send(server.base_url, transport, make_spec("chat", script, 4))
    assert rec.status == "ok", rec.error_message
    assert (rec.output_tokens, len(rec.chunk_tokens), len(rec.itl_s)) == (4, 4, 3)
    assert rec.response_id is not None and rec.end_at >= rec.first_token_at


def test_non_streaming_request_measures_e2e_only(server, transport, send, make_spec) -> None:
    spec = make_spec("completions", {"first_token_delay_s": 0.03, "tokens": 3}, 3)
    rec = send(server.base_url, transport, spec, stream=False)
    assert rec.status == "ok", rec.error_message
    assert rec.ttft_s is None and rec.itl_s == []
    assert rec.e2e_s == pytest.approx(0.03, abs=0.005)
    assert (rec.output_tokens, rec.output_tokens_source) == (3, "usage")
