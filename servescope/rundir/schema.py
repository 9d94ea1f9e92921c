"""The run directory's names and schemas: one definition each, imported by every writer and reader.

The load generator fills `RequestRecord`s, `RunDirWriter` persists them with
`request_arrow_schema()`, and `load_run` reads them back through the same
schema. Times are seconds on one monotonic clock (`time.perf_counter`),
relative to the run start.

`FORMAT_VERSION` is written into run.json and checked on read; raise it on any
change that an older reader would misread (a column renamed, retyped or given
a new meaning). Adding a nullable column is not such a change: readers fill
columns a file lacks with nulls.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any

from servescope.errors import UsageError

FORMAT_VERSION = 1


class RunDirError(UsageError):
    """A run directory that cannot be written or read; the message says why and what to do."""


# Allowed values, so writers and readers agree on spelling.
STATUSES = ("ok", "error", "timeout", "cancelled")
ERROR_KINDS = (
    "http_4xx",
    "http_5xx",
    "http_429",
    "connect",
    "reset",
    "protocol",
    "timeout",
    "cancelled",
    "client",
    "worker_lost",
)
OUTPUT_TOKENS_SOURCES = ("usage", "tokenizer", "chunks")


@dataclass(slots=True)
class RequestRecord:
    """Everything measured about one request. Unknown values stay None."""

    request_id: str
    response_id: str | None = None
    worker: int = 0
    phase: str = ""
    session_id: str | None = None
    turn: int | None = None
    tenant: str | None = None
    prefix_group: str | None = None
    prompt_bucket: str | None = None
    output_bucket: str | None = None
    api: str = "completions"
    prompt_tokens: int | None = None
    max_tokens: int | None = None
    scheduled_at: float | None = None
    sent_at: float | None = None
    first_token_at: float | None = None
    end_at: float | None = None
    ttft_s: float | None = None
    e2e_s: float | None = None
    tpot_s: float | None = None
    itl_s: list[float] = field(default_factory=list)
    chunk_tokens: list[int] = field(default_factory=list)
    output_tokens: int | None = None
    output_tokens_source: str | None = None
    usage_prompt_tokens: int | None = None
    cached_tokens: int | None = None
    spec_accepted_tokens: int | None = None
    spec_draft_tokens: int | None = None
    kv_transfer_s: float | None = None  # disaggregated serving: the server's KV transfer time (usage extension)
    status: str = "ok"
    error_kind: str | None = None
    http_status: int | None = None
    error_message: str | None = None
    schedule_lag_s: float | None = None
    connect_s: float | None = None
    node: str | None = None
    user_class: str | None = None
    task: str | None = None
    flow_id: str | None = None
    step: int | None = None
    ttft_from_scheduled_s: float | None = None
    e2e_from_scheduled_s: float | None = None

    def to_dict(self) -> dict[str, Any]:
        # Shallow: the row shares `itl_s` and `chunk_tokens` with the record, which is never
        # changed once handed off. asdict() deep-copied every float of them, a third of a
        # worker's per-request CPU at 64 chunks a request.
        return {name: getattr(self, name) for name in REQUEST_COLUMNS}


REQUEST_COLUMNS: tuple[str, ...] = tuple(f.name for f in fields(RequestRecord))


def request_arrow_schema():
    """The pyarrow schema of `requests.parquet` (imported lazily: pyarrow is slow to import)."""
    import pyarrow as pa

    s, i, f = pa.string(), pa.int64(), pa.float64()
    types = {
        "request_id": s, "response_id": s, "worker": i, "phase": s,
        "session_id": s, "turn": i, "tenant": s, "prefix_group": s,
        "prompt_bucket": s, "output_bucket": s, "api": s,
        "prompt_tokens": i, "max_tokens": i,
        "scheduled_at": f, "sent_at": f, "first_token_at": f, "end_at": f,
        "ttft_s": f, "e2e_s": f, "tpot_s": f,
        "itl_s": pa.list_(f), "chunk_tokens": pa.list_(i),
        "output_tokens": i, "output_tokens_source": s,
        "usage_prompt_tokens": i, "cached_tokens": i,
        "spec_accepted_tokens": i, "spec_draft_tokens": i, "kv_transfer_s": f,
        "status": s, "error_kind": s, "http_status": i, "error_message": s,
        "schedule_lag_s": f, "connect_s": f,
        "node": s, "user_class": s, "task": s, "flow_id": s, "step": i,
        "ttft_from_scheduled_s": f, "e2e_from_scheduled_s": f,
    }
    assert tuple(types) == REQUEST_COLUMNS, "arrow schema out of step with RequestRecord"
    return pa.schema([(name, types[name]) for name in REQUEST_COLUMNS])


def request_table(rows: list[dict[str, Any]]):
    """An Arrow table of request rows with `request_arrow_schema()`: unknown keys dropped, missing ones null."""
    import pyarrow as pa

    schema = request_arrow_schema()
    names = set(schema.names)
    clean = [{k: v for k, v in row.items() if k in names} for row in rows]
    for row in clean:
        for list_col in ("itl_s", "chunk_tokens"):
            if row.get(list_col) is None:
                row[list_col] = []
    return pa.Table.from_pylist(clean, schema=schema)


def conform_requests(table):
    """Add missing columns as nulls and cast to the contract schema (older or foreign writers)."""
    return conform_table(table, request_arrow_schema())


def conform_table(table, schema):
    """`table` with exactly `schema`'s columns: missing ones null, others cast to the contract's type."""
    import pyarrow as pa

    columns = []
    for f in schema:
        if f.name in table.column_names:
            col = table.column(f.name)
            columns.append(col if col.type == f.type else col.cast(f.type))
        else:
            columns.append(pa.nulls(table.num_rows, f.type))
    return pa.Table.from_arrays(columns, schema=schema)


FLOW_STATUSES = ("ok", "error", "script_error", "cancelled")


@dataclass(slots=True)
class FlowRecord:
    """One task invocation of a scripted user (a flow): what the user waited for, end to end.

    `status`: `ok` when every call succeeded; `error` when a call failed (the
    script went on or returned); `script_error` when the task raised (then
    `error_type`, `error_message` and `error_location`, the script's file:line,
    say what); `cancelled` when the run stopped while it was running.
    """

    flow_id: str
    user_class: str
    task: str
    user_id: str | None = None
    worker: int = 0
    node: str | None = None
    phase: str = ""
    scheduled_at: float | None = None
    start_at: float | None = None
    end_at: float | None = None
    duration_s: float | None = None
    calls: int = 0
    failed_calls: int = 0
    prompt_tokens: int = 0
    output_tokens: int = 0
    status: str = "ok"
    error_type: str | None = None
    error_message: str | None = None
    error_location: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


FLOW_COLUMNS: tuple[str, ...] = tuple(f.name for f in fields(FlowRecord))


def flow_arrow_schema():
    """The pyarrow schema of `flows.parquet` (one row per task invocation of a scripted user)."""
    import pyarrow as pa

    s, i, f = pa.string(), pa.int64(), pa.float64()
    types = {
        "flow_id": s, "user_class": s, "task": s, "user_id": s, "worker": i, "node": s, "phase": s,
        "scheduled_at": f, "start_at": f, "end_at": f, "duration_s": f,
        "calls": i, "failed_calls": i, "prompt_tokens": i, "output_tokens": i,
        "status": s, "error_type": s, "error_message": s, "error_location": s,
    }
    assert tuple(types) == FLOW_COLUMNS, "arrow schema out of step with FlowRecord"
    return pa.schema([(name, types[name]) for name in FLOW_COLUMNS])


def flow_table(rows: list[dict[str, Any]]):
    """An Arrow table of flow rows with `flow_arrow_schema()`: unknown keys dropped, missing ones null."""
    import pyarrow as pa

    schema = flow_arrow_schema()
    names = set(schema.names)
    return pa.Table.from_pylist([{k: v for k, v in row.items() if k in names} for row in rows], schema=schema)


# `source`: the metrics endpoint a sample came from (one run may scrape several: the engine, a DCGM
# exporter, node-exporter). Run directories written before it existed have no such column; readers
# fill it with nulls, so it is not a format change.
SERVER_METRIC_COLUMNS = ("t", "name", "labels", "value", "source")


def server_metrics_arrow_schema():
    """The pyarrow schema of `server_metrics.parquet`: `t` (s since run start), `name`, `labels` (JSON text),
    `value`, `source` (the endpoint's URL; null in older run directories)."""
    import pyarrow as pa

    return pa.schema([("t", pa.float64()), ("name", pa.string()), ("labels", pa.string()), ("value", pa.float64()),
                      ("source", pa.string())])


def conform_server_metrics(table):
    """Add the columns an older or foreign writer left out (as nulls) and cast to the contract schema."""
    return conform_table(table, server_metrics_arrow_schema())


# File names of the run directory.
RUN_JSON = "run.json"
REQUESTS_JSONL = "requests.jsonl"
REQUESTS_PARQUET = "requests.parquet"
SERVER_METRICS_JSONL = "server_metrics.jsonl"
SERVER_METRICS_PARQUET = "server_metrics.parquet"
SUMMARY_JSON = "summary.json"
FINDINGS_JSON = "findings.json"
REPORT_HTML = "report.html"
FLOWS_JSONL = "flows.jsonl"
FLOWS_PARQUET = "flows.parquet"
