"""Turn what a transport saw (an `Exchange`) into the columns of a `RequestRecord`.

Runs after the response ended, so nothing here costs measured time. TTFT and
ITL come from the stored per-event arrival times: an event counts as a content
chunk only if it carries generated text (a chat role-only chunk, an empty
delta and the usage-only final chunk do not).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, Callable

from servescope.harness.client.body import loads
from servescope.harness.client.exchange import Exchange
from servescope.harness.client.reply import Reply
from servescope.harness.client.sse import split_events
from servescope.rundir.schema import RequestRecord

MAX_ERROR_MESSAGE = 500
# Per-request speculative-decoding counters inside `usage`: the reference
# engine's names first, then names other servers use for the same figures.
SPEC_ACCEPTED_KEYS = ("spec_accepted_tokens", "num_accepted_tokens", "accepted_tokens", "spec_num_accepted_tokens")
SPEC_DRAFT_KEYS = ("spec_draft_tokens", "num_draft_tokens", "draft_tokens", "spec_num_draft_tokens")


class ProtocolError(Exception):
    """The body is not the SSE/JSON an OpenAI-compatible server sends."""


class StreamError(Exception):
    """The server reported an error inside a 200 stream (vLLM does this mid-generation)."""

    def __init__(self, obj: dict[str, Any]) -> None:
        err = obj.get("error")
        code = err.get("code") if isinstance(err, dict) else None
        self.status = code if isinstance(code, int) and 400 <= code < 600 else 500
        super().__init__(truncate(_message_of(obj) or str(obj)))



def truncate(message: str) -> str:
    message = message.strip()
    return message if len(message) <= MAX_ERROR_MESSAGE else message[: MAX_ERROR_MESSAGE - 3] + "..."


def error_kind_for_status(status: int) -> str:
    if status == 429:
        return "http_429"
    return "http_4xx" if 400 <= status < 500 else "http_5xx"


def server_error_message(body: bytes) -> str:
    """The message of an OpenAI-style error body ({"error": {"message": ...}}), else the raw text."""
    try:
        obj = loads(body)
    except ValueError:
        return truncate(body.decode("utf-8", "replace")) or "(empty body)"
    return truncate(_message_of(obj) or body.decode("utf-8", "replace"))


def _message_of(obj: Any) -> str | None:
    if not isinstance(obj, dict):
        return None
    err = obj.get("error")
    if isinstance(err, dict) and err.get("message"):
        return str(err["message"])
    if isinstance(err, str):
        return err
    for key in ("message", "detail"):  # vLLM's older {"object": "error", ...}; FastAPI's {"detail": ...}
        if obj.get(key):
            return str(obj[key])
    return None


def _choice_text(choices: list[Any], chat: bool) -> str:
    parts: list[str] = []
    for choice in choices:
        if chat:
            delta = choice.get("delta") or choice.get("message") or {}
            text = delta.get("content") or delta.get("reasoning_content") or delta.get("reasoning")
            if not text and delta.get("tool_calls"):  # generated too: count the arguments
                text = "".join((c.get("function") or {}).get("arguments") or "" for c in delta["tool_calls"])
        else:
            text = choice.get("text")
        if text:
            parts.append(text)
    return "".join(parts)


def _first_int(d: dict[str, Any], keys: tuple[str, ...]) -> int | None:
    for key in keys:
        value = d.get(key)
        if isinstance(value, (int, float)):
            return int(value)
    return None


def _apply_usage(record: RequestRecord, usage: dict[str, Any]) -> None:
    record.usage_prompt_tokens = _first_int(usage, ("prompt_tokens",))
    details = usage.get("prompt_tokens_details")
    if isinstance(details, dict):
        record.cached_tokens = _first_int(details, ("cached_tokens",))
    record.spec_accepted_tokens = _first_int(usage, SPEC_ACCEPTED_KEYS)
    record.spec_draft_tokens = _first_int(usage, SPEC_DRAFT_KEYS)
    transfer = usage.get("kv_transfer_s")
    record.kv_transfer_s = float(transfer) if isinstance(transfer, (int, float)) and not isinstance(transfer, bool) else None


def _set_output_tokens(
    record: RequestRecord, usage: dict[str, Any] | None, text: str, n_chunks: int,
    count_tokens: Callable[[str], int] | None,
) -> None:
    completion = _first_int(usage, ("completion_tokens",)) if usage else None
    if completion is not None:
        record.output_tokens, record.output_tokens_source = completion, "usage"
    elif count_tokens is not None:
        record.output_tokens, record.output_tokens_source = count_tokens(text), "tokenizer"
    else:
        record.output_tokens, record.output_tokens_source = n_chunks, "chunks"


def apply_stream(record: RequestRecord, ex: Exchange, origin: float, count_tokens: Callable[[str], int] | None,
                 reply: Reply | None = None) -> None:
    """Fill timings, tokens and usage from an SSE body (and `reply`, when given, with what it said).

    Raises ProtocolError on a malformed stream."""
    chat = record.api == "chat"
    events = split_events(ex.pieces, ex.times)
    content_times: list[float] = []
    texts: list[str] = []
    usage: dict[str, Any] | None = None
    finish_reason: str | None = None
    timed = [(t, data) for t, data in zip(events.times, events.data) if data != b"[DONE]"]
    for (t, _), obj in zip(timed, _event_objects([data for _, data in timed])):
        if record.response_id is None and obj.get("id") is not None:
            record.response_id = str(obj["id"])
        choices = obj.get("choices")
        if "error" in obj and not choices:
            raise StreamError(obj)
        if obj.get("usage"):
            usage = obj["usage"]
        if choices:
            text = _choice_text(choices, chat)
            if text:
                content_times.append(t)
                texts.append(text)
            finish_reason = _finish_reason(choices) or finish_reason
            if reply is not None:
                for choice in choices:
                    if isinstance(choice, dict):
                        reply.add_choice(choice, chat)
    if events.malformed is not None:
        raise ProtocolError(f"malformed SSE (no data/event/comment line): {truncate(events.malformed.decode('utf-8', 'replace'))}")
    if usage:
        _apply_usage(record, usage)
        if reply is not None:
            reply.usage = usage
    if content_times:
        record.first_token_at = content_times[0] - origin
        record.itl_s = [b - a for a, b in zip(content_times, content_times[1:])]
    _set_output_tokens(record, usage, "".join(texts), len(texts), count_tokens)
    total = record.output_tokens
    if total is not None and record.output_tokens_source == "usage" and finish_reason == "stop" and total > len(texts):
        total -= 1  # the stop token (EOS): counted in usage, it carried no text, so no chunk holds it
    record.chunk_tokens = chunk_token_counts(texts, total, count_tokens)


def _event_objects(datas: list[bytes]) -> Iterator[dict[str, Any]]:
    """Each event's JSON object, in order; raises ProtocolError at the first event that is not one.

    One parse of all events joined as a JSON array costs a third of one parse per event
    (the per-call overhead dominates for 100-byte events). It is taken only when it gives
    one object per event; anything else is parsed event by event, lazily, so an error the
    server reported in an earlier event still wins over a later malformed one.
    """
    if not datas:
        return
    try:
        objs = loads(b"[" + b",".join(datas) + b"]")
    except ValueError:
        objs = None
    if objs is not None and len(objs) == len(datas) and all(isinstance(obj, dict) for obj in objs):
        yield from objs
        return
    for data in datas:
        try:
            obj = loads(data)
        except ValueError:
            raise ProtocolError(f"malformed JSON in SSE data: {truncate(data.decode('utf-8', 'replace'))}") from None
        if not isinstance(obj, dict):
            raise ProtocolError(f"SSE data is not a JSON object: {truncate(data.decode('utf-8', 'replace'))}")
        yield obj


def _finish_reason(choices: list[Any]) -> str | None:
    for choice in choices:
        if isinstance(choice, dict) and choice.get("finish_reason"):
            return str(choice["finish_reason"])
    return None


def chunk_token_counts(texts: list[str], total: int | None, count_tokens: Callable[[str], int] | None) -> list[int]:
    """Tokens carried by each content chunk, adding up to `total` (the generated tokens that carried text).

    One token per chunk when the chunk count equals the total (the usual stream,
    exact). Otherwise some chunks carried several tokens (a server that fell
    behind flushes what it generated meanwhile in one chunk): the tokenizer's
    count of each chunk's text says which, and the counts are then scaled to the
    server's total, since per-chunk text does not tokenize exactly as the whole
    (merges across chunk edges, partial UTF-8 decoded as U+FFFD). Without a
    tokenizer the total is spread evenly. A request that ended on a stop token
    has that token in output_tokens but in no chunk (the caller leaves it out).
    """
    n = len(texts)
    if n == 0:
        return []
    if total is None or total == n:
        return [1] * n
    estimate = [max(1, count_tokens(t)) for t in texts] if count_tokens is not None else [1] * n
    if sum(estimate) == total:
        return estimate
    if total > n:  # every chunk carried at least one token: share out the extra ones
        extra = [e - 1 for e in estimate]
        return [1 + k for k in _apportion(total - n, extra if any(extra) else [1] * n)]
    return _apportion(max(0, total), estimate)  # fewer tokens than chunks: some chunks held none


def _apportion(units: int, weights: list[int]) -> list[int]:
    """Split `units` in proportion to `weights` (largest remainder; ties go to the earlier chunk)."""
    whole = sum(weights)
    quotas = [units * w / whole for w in weights]
    shares = [int(q) for q in quotas]
    left = units - sum(shares)
    for i in sorted(range(len(weights)), key=lambda i: (shares[i] - quotas[i], i))[:left]:
        shares[i] += 1
    return shares


def apply_json(record: RequestRecord, ex: Exchange, count_tokens: Callable[[str], int] | None,
               reply: Reply | None = None) -> None:
    """Fill tokens and usage from a non-streamed completion body (E2E only), and `reply` when given."""
    body = b"".join(ex.pieces)
    try:
        obj = loads(body)
    except ValueError:
        raise ProtocolError(f"malformed JSON body: {truncate(body.decode('utf-8', 'replace'))}") from None
    if not isinstance(obj, dict):
        raise ProtocolError("response body is not a JSON object")
    if obj.get("id") is not None:
        record.response_id = str(obj["id"])
    usage = obj.get("usage") or None
    if usage:
        _apply_usage(record, usage)
    if reply is not None:
        reply.usage = usage
        for choice in obj.get("choices") or []:
            if isinstance(choice, dict):
                reply.add_choice(choice, record.api == "chat")
    text = _choice_text(obj.get("choices") or [], record.api == "chat")
    _set_output_tokens(record, usage, text, 1 if text else 0, count_tokens)
