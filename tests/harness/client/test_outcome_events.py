"""apply_stream parses a response's events in one go when it can, and event by event when it must.

The one-parse path must give exactly what parsing each event alone gives; a
stream it cannot take whole (a malformed event, data that is not an object,
events that only parse when joined) must fail as before, at the first bad
event, with an error the server reported earlier still winning.
"""

from __future__ import annotations

import json

import pytest

from servescope.harness.client.exchange import Exchange
from servescope.harness.client.outcome import ProtocolError, StreamError, apply_stream
from servescope.rundir.schema import RequestRecord


def _exchange(datas: list[bytes], gap: float = 0.01) -> Exchange:
    ex = Exchange(sent_at=0.0, status=200, content_type="text/event-stream", complete=True)
    for i, data in enumerate(datas):
        ex.pieces.append(b"data: " + data + b"\n\n")
        ex.times.append(1.0 + i * gap)
    ex.end_at = ex.times[-1] if ex.times else 0.0
    return ex


def _chunk(text: str | None, rid: str = "cmpl-1", **extra) -> bytes:
    choices = [] if text is None else [{"index": 0, "text": text, "finish_reason": None}]
    return json.dumps({"id": rid, "choices": choices, **extra}).encode()


def test_content_chunks_are_timed_and_counted_from_one_parse():
    usage = {"prompt_tokens": 7, "completion_tokens": 3, "prompt_tokens_details": {"cached_tokens": 4}}
    datas = [_chunk(""), _chunk(" a"), _chunk(" b"), _chunk(" c"), _chunk(None, usage=usage), b"[DONE]"]
    record = RequestRecord("r1", api="completions")
    apply_stream(record, _exchange(datas), 0.0, None)
    assert record.response_id == "cmpl-1"
    assert record.first_token_at == pytest.approx(1.01)  # the empty first chunk carries no text
    assert record.itl_s == pytest.approx([0.01, 0.01])
    assert (record.output_tokens, record.output_tokens_source, record.cached_tokens) == (3, "usage", 4)
    assert record.chunk_tokens == [1, 1, 1]


def test_a_malformed_event_names_itself():
    datas = [_chunk(" a"), b'{"id": "cmpl-1", "choices": [{"text": ', _chunk(" b")]
    with pytest.raises(ProtocolError, match="malformed JSON in SSE data"):
        apply_stream(RequestRecord("r1", api="completions"), _exchange(datas), 0.0, None)


def test_data_that_is_not_an_object_is_refused():
    with pytest.raises(ProtocolError, match="not a JSON object"):
        apply_stream(RequestRecord("r1", api="completions"), _exchange([_chunk(" a"), b"[1, 2]"]), 0.0, None)


def test_events_that_only_parse_when_joined_are_refused():
    """Two halves of one object (the array parse would see one object where there are two events)."""
    datas = [b'{"id": "cmpl-1", "choices": [{"index": 0, "text": " a"}]', b'"x": 1}']
    with pytest.raises(ProtocolError, match="malformed JSON"):
        apply_stream(RequestRecord("r1", api="completions"), _exchange(datas), 0.0, None)


def test_an_error_the_server_reported_wins_over_a_later_malformed_event():
    error = json.dumps({"error": {"message": "engine died", "code": 500}}).encode()
    with pytest.raises(StreamError, match="engine died"):
        apply_stream(RequestRecord("r1", api="completions"), _exchange([_chunk(" a"), error, b"{broken"]), 0.0, None)
