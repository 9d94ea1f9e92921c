"""The SSE splitter on hand-made byte pieces: line endings, splits and comments."""

from __future__ import annotations

from servescope.harness.client.sse import split_events


def test_events_split_across_reads_keep_the_time_of_the_read_that_ended_them() -> None:
    ev = split_events([b"data: {\"a\"", b": 1}\n", b"\ndata: x\n\ndata: y\n\n"], [1.0, 2.0, 3.0])
    assert ev.data == [b'{"a": 1}', b"x", b"y"]
    assert ev.times == [3.0, 3.0, 3.0]


def test_crlf_split_between_reads_is_one_line_ending() -> None:
    ev = split_events([b"data: a\r\n\r", b"\ndata: b\r\n\r\n"], [1.0, 2.0])
    assert ev.data == [b"a", b"b"]
    assert ev.times == [2.0, 2.0]  # "a" ends only when the LF completing CRLF arrives


def test_comments_event_lines_and_multiline_data() -> None:
    ev = split_events([b": keep-alive\n\nevent: completion\ndata: 1\ndata: 2\nid: 7\n\n"], [5.0])
    assert ev.data == [b"1\n2"]
    assert ev.malformed is None


def test_missing_final_blank_line_still_yields_the_last_event() -> None:
    ev = split_events([b"data: a\n\ndata: b"], [1.0])
    assert ev.data == [b"a", b"b"]


def test_a_block_with_no_sse_field_is_reported_malformed() -> None:
    ev = split_events([b"data: a\n\n{\"not\": \"sse\"}\n\n"], [1.0])
    assert ev.data == [b"a"]
    assert ev.malformed == b'{"not": "sse"}'
