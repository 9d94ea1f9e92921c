"""`StreamingClient`: one per worker process; sends requests and fills their records.

`execute` never raises for a failed request: every failure becomes `status` /
`error_kind` on the record. On cancellation (the worker cancels in-flight tasks
after its grace period on Ctrl-C) it fills the record as `cancelled` and then
re-raises `asyncio.CancelledError`, so task groups and `gather` unwind normally.
"""

from __future__ import annotations

import asyncio
from time import perf_counter
from typing import TYPE_CHECKING

from servescope.harness.client.body import FORCE_FIELDS, api_path, forces_output_length, request_body
from servescope.harness.client.config import ClientConfig
from servescope.harness.client.endpoint import Endpoint
from servescope.harness.client.exchange import Exchange
from servescope.harness.client.reply import Reply
from servescope.harness.client.outcome import (
    ProtocolError,
    StreamError,
    apply_json,
    apply_stream,
    error_kind_for_status,
    server_error_message,
    truncate,
)
from servescope.harness.client.transports import make_transport
from servescope.rundir.schema import RequestRecord

if TYPE_CHECKING:  # the client only reads a spec's fields; no import-time tie to workloads
    from servescope.workloads.types import RequestSpec

# How the notice starts that says the target refused to have output lengths forced.
FORCE_REJECTED_NOTICE = f"the target rejected {' / '.join(FORCE_FIELDS)}"
# Labels copied from the spec when the worker has not set them.
_SPEC_LABELS = ("tenant", "prefix_group", "prompt_bucket", "output_bucket", "session_id", "turn", "prompt_tokens", "max_tokens")


class StreamingClient:
    def __init__(self, config: ClientConfig) -> None:
        self.config = config
        self.endpoint = Endpoint.from_url(config.base_url)
        self._transport = make_transport(config, self.endpoint)
        # Set (to the server's words) once the target rejected min_tokens/ignore_eos: from then
        # on this client sends neither, and the run reports that lengths were not forced.
        self.force_rejected: str | None = None
        self.notices: list[str] = []  # things the run should tell the user (collected by the worker)

    @property
    def transport_name(self) -> str:
        return self._transport.name

    async def prewarm(self, n: int) -> int:
        """Open `n` keep-alive connections concurrently with a cheap GET (/health, /v1/models, /).

        Any HTTP answer counts (even 404 or 500); no generation request is sent.
        Returns how many connections are open and idle (0: the target is unreachable,
        and requests will record `connect` errors).
        """
        return await self._transport.prewarm(n)

    async def execute(self, spec: RequestSpec, record: RequestRecord, reply: Reply | None = None) -> None:
        """Send `spec`, fill `record` (and `reply` with the answer's text and tool calls, when given)."""
        ex = await self.send(spec, record, reply)
        if ex is not None:
            self.finish(record, ex, reply)

    async def send(self, spec: RequestSpec, record: RequestRecord, reply: Reply | None = None) -> Exchange | None:
        """Send `spec` and wait for the response to end; `finish(record, exchange)` then parses it.

        The two halves let a caller take parsing off the measuring path (harness/worker.py
        finishes records between reads). Returns None when the record is already final (a
        request that could not be built); on cancellation the record is finished here.
        """
        _copy_labels(spec, record)
        force = forces_output_length(spec, self.config) and self.force_rejected is None
        try:
            path = self.endpoint.path(api_path(spec))
            body = request_body(spec, self.config, force)
        except (ValueError, TypeError) as exc:
            record.status, record.error_kind, record.error_message = "error", "client", truncate(str(exc))
            return None
        ex = Exchange()
        try:
            await self._transport.exchange(path, body, ex)
            if force and self._rejects_forced_length(ex):
                # "Forced where the target allows": a strict server (transformers serve answers 422
                # "Unexpected fields") refuses the fields; send this request again without them
                # and never send them again, instead of failing every request of the run.
                self._note_force_rejected(ex)
                ex = Exchange()
                await self._transport.exchange(path, request_body(spec, self.config, False), ex)
        except asyncio.CancelledError:
            ex.fail("cancelled", "cancelled by the load generator", perf_counter())
            self.finish(record, ex, reply)
            raise
        except Exception as exc:  # a transport bug must cost one record, not the worker
            ex.fail("client", f"{type(exc).__name__}: {exc}", perf_counter())
        return ex

    @staticmethod
    def _rejects_forced_length(ex: Exchange) -> bool:
        """A 4xx answer (not 429) whose error names min_tokens or ignore_eos."""
        if ex.error_kind is not None or ex.status is None or not 400 <= ex.status < 500 or ex.status == 429:
            return False
        message = b"".join(ex.pieces)
        return any(field.encode() in message for field in FORCE_FIELDS)

    def _note_force_rejected(self, ex: Exchange) -> None:
        said = server_error_message(b"".join(ex.pieces))
        if self.force_rejected is None:
            self.force_rejected = said
            self.notices.append(
                f"{FORCE_REJECTED_NOTICE} (HTTP {ex.status}: {said}); requests were sent "
                "without them, so output lengths were not forced: outputs may stop before max_tokens")

    async def aclose(self) -> None:
        await self._transport.aclose()

    # ------------------------------------------------------------------------
    def finish(self, record: RequestRecord, ex: Exchange, reply: Reply | None = None) -> None:
        """Fill `record` (and `reply`) from what `send` saw; never raises for a failed request."""
        origin = self.config.clock_origin
        record.http_status = ex.status
        record.connect_s = ex.connect_s
        if ex.sent_at is not None:
            record.sent_at = ex.sent_at - origin
            if record.scheduled_at is not None:
                record.schedule_lag_s = record.sent_at - record.scheduled_at
        if ex.end_at is not None:
            record.end_at = ex.end_at - origin
        if ex.error_kind is not None:
            self._fill_failure(record, ex, reply)
        elif ex.status is None or not 200 <= ex.status < 300:
            self._fill_http_error(record, ex)
        else:
            self._fill_success(record, ex, reply)
        if record.sent_at is not None:
            if record.first_token_at is not None:
                record.ttft_s = record.first_token_at - record.sent_at
            if record.end_at is not None:
                record.e2e_s = record.end_at - record.sent_at
        if record.scheduled_at is not None:  # what a user saw when the generator was late
            if record.first_token_at is not None:
                record.ttft_from_scheduled_s = record.first_token_at - record.scheduled_at
            if record.end_at is not None:
                record.e2e_from_scheduled_s = record.end_at - record.scheduled_at
        if (record.status == "ok" and record.ttft_s is not None and record.e2e_s is not None
                and record.output_tokens is not None and record.output_tokens > 1):
            record.tpot_s = (record.e2e_s - record.ttft_s) / (record.output_tokens - 1)

    def _fill_failure(self, record: RequestRecord, ex: Exchange, reply: Reply | None = None) -> None:
        kind = ex.error_kind
        record.status = {"timeout": "timeout", "cancelled": "cancelled"}.get(kind, "error")  # type: ignore[arg-type]
        record.error_kind, record.error_message = kind, truncate(ex.error_message or "")
        if self.config.stream and ex.status == 200 and ex.pieces:
            try:  # keep what was measured before the failure (TTFT, chunks so far)
                apply_stream(record, ex, self.config.clock_origin, self.config.count_tokens, reply)
            except (ProtocolError, StreamError, ValueError):
                pass

    def _fill_http_error(self, record: RequestRecord, ex: Exchange) -> None:
        record.status = "error"
        status = ex.status or 0
        if status >= 400:
            record.error_kind = error_kind_for_status(status)
            record.error_message = server_error_message(b"".join(ex.pieces))
        else:
            record.error_kind = "protocol"
            record.error_message = f"unexpected HTTP status {status} (want 200 or an error status)"

    def _fill_success(self, record: RequestRecord, ex: Exchange, reply: Reply | None = None) -> None:
        cfg = self.config
        try:
            if not cfg.stream:
                apply_json(record, ex, cfg.count_tokens, reply)
            elif ex.content_type and "text/event-stream" not in ex.content_type.lower():
                raise ProtocolError(
                    f"asked for a stream but got Content-Type {ex.content_type!r}: "
                    f"{truncate(b''.join(ex.pieces).decode('utf-8', 'replace'))}"
                )
            else:
                apply_stream(record, ex, cfg.clock_origin, cfg.count_tokens, reply)
        except ProtocolError as exc:
            record.status, record.error_kind, record.error_message = "error", "protocol", truncate(str(exc))
        except StreamError as exc:
            record.status, record.error_kind, record.error_message = "error", error_kind_for_status(exc.status), str(exc)


def _copy_labels(spec: RequestSpec, record: RequestRecord) -> None:
    for name in _SPEC_LABELS:
        if getattr(record, name) is None:
            setattr(record, name, getattr(spec, name))
    if record.api != spec.api:
        record.api = spec.api
