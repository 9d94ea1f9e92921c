"""The JSON body of one generation request, serialized before the send time is taken."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable

from servescope.harness.client.config import ClientConfig
from servescope.harness.client.endpoint import API_PATHS

if TYPE_CHECKING:
    from servescope.workloads.types import RequestSpec

try:  # orjson is optional: about 5x faster than json.dumps for these bodies.
    import orjson

    def dumps(obj: Any) -> bytes:
        return orjson.dumps(obj)

    loads: Callable[[bytes | str], Any] = orjson.loads
except ImportError:  # pragma: no cover - depends on the environment
    import json

    def dumps(obj: Any) -> bytes:
        return json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode()

    loads = json.loads


def api_path(spec: RequestSpec) -> str:
    try:
        return API_PATHS[spec.api]
    except KeyError:
        raise ValueError(f"request {spec.request_id}: api {spec.api!r} is not one of {', '.join(API_PATHS)}") from None


FORCE_FIELDS = ("min_tokens", "ignore_eos")  # what forces the output length (vLLM and SGLang accept both)


def forces_output_length(spec: RequestSpec, config: ClientConfig) -> bool:
    """Whether `request_body` adds FORCE_FIELDS for this spec (before any fallback)."""
    return config.force_output_length and (spec.min_tokens is not None or bool(spec.ignore_eos))


def request_body(spec: RequestSpec, config: ClientConfig, force_output_length: bool | None = None) -> bytes:
    """model, prompt|messages, max_tokens, stream (+ usage in the stream), extra_body.

    `force_output_length` (default: the config's) adds min_tokens / ignore_eos;
    the client turns it off once the target rejects those fields.
    """
    force = config.force_output_length if force_output_length is None else force_output_length
    body: dict[str, Any] = {"model": config.model}
    if spec.api == "chat":
        if spec.messages is None:
            raise ValueError(f"request {spec.request_id}: a chat request needs messages")
        body["messages"] = spec.messages
    else:
        if spec.prompt is None:
            raise ValueError(f"request {spec.request_id}: a completions request needs a prompt")
        body["prompt"] = spec.prompt
    body["max_tokens"] = spec.max_tokens
    body["stream"] = config.stream
    if config.stream:
        body["stream_options"] = {"include_usage": True}
    if force:
        if spec.min_tokens is not None:
            body["min_tokens"] = spec.min_tokens
        if spec.ignore_eos:
            body["ignore_eos"] = True
    body.update(spec.extra_body)
    return dumps(body)
