"""What real servers do that vLLM does not, against the scripted server emulating them (no mocks).

Seen with `transformers serve` (docs/real_servers.md): usage rides on the finish
chunk, chat opens with a bare `{"role": "assistant"}` chunk, the stream ends
without `[DONE]`, a server that falls behind flushes many tokens in one chunk,
and unknown body fields (min_tokens, ignore_eos) are refused with a 422.
"""

from __future__ import annotations

import asyncio
import time

import pytest
from support.scripted_server import ScriptedServer

from servescope.harness.client import ClientConfig, StreamingClient
from servescope.harness.client.client import FORCE_REJECTED_NOTICE
from servescope.harness.client.outcome import chunk_token_counts
from servescope.rundir.schema import RequestRecord
from servescope.workloads.tokenizer import load_tokenizer

TOL = 0.005


@pytest.fixture(scope="module")
def hf_like():
    with ScriptedServer.transformers_like() as srv:
        yield srv


def _plain_counter():
    """The bundled tokenizer counting plain text (no BOS), the way the worker counts output."""
    tok = load_tokenizer(None)
    return lambda text: len(tok.encode_plain(text))


def test_chat_stream_like_transformers_serve(hf_like, transport, send, make_spec) -> None:
    # Bare role chunk at once, first text 50 ms later, 3 tokens a chunk, usage on the finish chunk, no [DONE].
    spec = make_spec("chat", {"tokens": 7, "first_token_delay_s": 0.05, "itl_s": 0.005}, max_tokens=7)
    rec = send(hf_like.base_url, transport, spec, count_tokens=_plain_counter())
    assert rec.status == "ok", rec.error_message
    assert rec.ttft_s == pytest.approx(0.05, abs=TOL)  # the role-only chunk did not count
    assert (rec.output_tokens, rec.output_tokens_source) == (7, "usage")
    assert rec.chunk_tokens == [3, 3, 1] and len(rec.itl_s) == 2
    assert rec.usage_prompt_tokens == 7
    assert rec.tpot_s == pytest.approx((rec.e2e_s - rec.ttft_s) / 6)


def test_a_first_chunk_carrying_many_tokens_is_attributed_to_it(hf_like, transport, send, make_spec) -> None:
    # A server that fell behind: the first chunk carries 12 tokens, then one per chunk.
    spec = make_spec("completions", {"tokens": 15, "chunk_sizes": [12]}, max_tokens=15)
    rec = send(hf_like.base_url, transport, spec, count_tokens=_plain_counter())
    assert rec.status == "ok", rec.error_message
    assert rec.chunk_tokens == [12, 1, 1, 1]
    assert sum(rec.chunk_tokens) == rec.output_tokens == 15


def test_chunk_tokens_without_a_tokenizer_spread_the_usage_count(hf_like, send, make_spec) -> None:
    rec = send(hf_like.base_url, "fast", make_spec("chat", {"tokens": 6, "tokens_per_chunk": 2}, max_tokens=6))
    assert rec.status == "ok", rec.error_message
    assert rec.chunk_tokens == [2, 2, 2] and rec.output_tokens_source == "usage"


def test_one_token_per_chunk_needs_no_tokenizer(server, send, make_spec) -> None:
    def never(text: str) -> int:
        raise AssertionError("tokenized although usage already said one token per chunk")

    rec = send(server.base_url, "fast", make_spec("completions", {"tokens": 5}, max_tokens=5), count_tokens=never)
    assert rec.status == "ok", rec.error_message
    assert rec.chunk_tokens == [1] * 5


@pytest.mark.parametrize("usage", ["finish", "separate"])
def test_a_stop_token_counted_by_usage_is_in_no_chunk(server, usage, send, make_spec) -> None:
    # vLLM: a request that ends on EOS has usage.completion_tokens = text tokens + 1.
    spec = make_spec("chat", {"tokens": 4, "eos": True, "usage": usage}, max_tokens=16)
    rec = send(server.base_url, "fast", spec, count_tokens=_plain_counter())
    assert rec.status == "ok", rec.error_message
    assert (rec.output_tokens, rec.output_tokens_source) == (5, "usage")
    assert rec.chunk_tokens == [1, 1, 1, 1]


def test_chunk_token_counts_scale_tokenizer_estimates_to_the_servers_total() -> None:
    # Per-chunk text of byte-level tokens decoded alone becomes U+FFFD, which tokenizes into 3.
    estimate = {"a": 1, "\ufffd": 3, "long": 40}
    count = estimate.__getitem__
    assert chunk_token_counts(["a", "\ufffd", "a"], 3, count) == [1, 1, 1]
    assert chunk_token_counts(["long", "a", "\ufffd"], 30, count) == [27, 1, 2]
    assert chunk_token_counts(["a", "a", "a"], 2, count) == [1, 1, 0]  # more chunks than tokens
    assert chunk_token_counts(["a", "a"], None, None) == [1, 1]
    assert chunk_token_counts([], 0, count) == []
    for total in range(0, 60):
        got = chunk_token_counts(["long", "a", "\ufffd", "a"], total, count)
        assert sum(got) == total and len(got) == 4 and min(got) >= 0


def _send_many(base_url: str, transport: str, specs, **cfg) -> tuple[list[RequestRecord], StreamingClient]:
    async def go():
        client = StreamingClient(ClientConfig(base_url, "m", time.perf_counter(), transport=transport, **cfg))
        try:
            await client.prewarm(1)
            records = []
            for spec in specs:
                record = RequestRecord(spec.request_id)
                await client.execute(spec, record)
                records.append(record)
            return records, client
        finally:
            await client.aclose()

    return asyncio.run(go())


def test_rejected_forced_length_fields_are_dropped_once_and_for_all(hf_like, transport, make_spec) -> None:
    specs = [make_spec("completions", {"tokens": 3}, max_tokens=3, min_tokens=3, ignore_eos=True) for _ in range(3)]
    before = hf_like.stats()["rejected"]
    records, client = _send_many(hf_like.base_url, transport, specs, force_output_length=True)
    assert [r.status for r in records] == ["ok"] * 3, [r.error_message for r in records]
    assert all(r.http_status == 200 and r.output_tokens == 3 for r in records)
    assert hf_like.stats()["rejected"] - before == 1  # only the first request carried the fields
    assert client.force_rejected and "Unexpected fields" in client.force_rejected
    assert len(client.notices) == 1 and client.notices[0].startswith(FORCE_REJECTED_NOTICE)


def test_other_client_errors_are_not_retried(server, make_spec) -> None:
    script = {"fault": "http_error", "fault_status": 400, "fault_message": "prompt is too long"}
    spec = make_spec("completions", script, max_tokens=3, min_tokens=3, ignore_eos=True)
    before = server.stats()["requests"]
    records, client = _send_many(server.base_url, "fast", [spec], force_output_length=True)
    assert (records[0].status, records[0].http_status, records[0].error_kind) == ("error", 400, "http_4xx")
    assert server.stats()["requests"] - before == 1
    assert client.force_rejected is None and client.notices == []


def test_forced_length_fields_are_kept_where_the_target_accepts_them(server, make_spec) -> None:
    spec = make_spec("completions", {"tokens": 2}, max_tokens=2, min_tokens=2, ignore_eos=True)
    records, client = _send_many(server.base_url, "fast", [spec], force_output_length=True)
    assert records[0].status == "ok" and client.force_rejected is None
    assert {"min_tokens", "ignore_eos"} <= set(server.stats()["last_body_keys"])
