"""Writing a run directory as the run goes (DESIGN.md "The run directory").

`run.json` is written at start (status `running`) and rewritten at the end;
requests and server-metric samples are appended to JSONL files and flushed
every `FLUSH_INTERVAL_S` or `FLUSH_ROWS` rows, so a crash loses at most that
much; `finish()` compacts both to parquet with the contract schemas and removes the
JSONL once the parquet file holds every row. JSON
files are replaced atomically (write to a temporary name, then rename) so a
reader never sees half a run.json.
"""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path
from typing import Any

from servescope.rundir.jsonio import dumps, read_jsonl, write_json_atomic
from servescope.rundir.schema import (
    FLOWS_JSONL,
    FLOWS_PARQUET,
    FORMAT_VERSION,
    REQUESTS_JSONL,
    REQUESTS_PARQUET,
    RUN_JSON,
    SERVER_METRICS_JSONL,
    SERVER_METRICS_PARQUET,
    RunDirError,
    conform_requests,
    conform_server_metrics,
    flow_table,
    request_table,
    server_metrics_arrow_schema,
)
from servescope.version import __version__

FLUSH_INTERVAL_S = 0.1
FLUSH_ROWS = 256
RUN_STATUSES = ("running", "complete", "interrupted", "failed")


def _row_json(row: dict[str, Any]) -> str:
    """One JSONL line. Rows are nearly always plain finite values, which the C encoder takes as
    they are; only a row it refuses (a NaN, a numpy value) goes through `to_jsonable`, which
    would otherwise cost the driver as much again per row at a thousand rows a second."""
    try:
        return json.dumps(row, separators=(",", ":"), allow_nan=False)
    except (ValueError, TypeError):
        return dumps(row, indent=None)


class _JsonlAppender:
    """Buffered, thread-safe JSONL appends with time- and size-based flushing."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._file = open(path, "a", encoding="utf-8")  # noqa: SIM115 - closed in close()
        self._buffer: list[str] = []
        self._last_flush = time.monotonic()
        self._lock = threading.Lock()
        self.rows = 0

    def add(self, rows: list[dict[str, Any]]) -> None:
        lines = [_row_json(row) for row in rows]
        with self._lock:
            self._buffer.extend(lines)
            self.rows += len(lines)
            if len(self._buffer) >= FLUSH_ROWS:
                self._flush_locked()

    def maybe_flush(self) -> None:
        with self._lock:
            if self._buffer and time.monotonic() - self._last_flush >= FLUSH_INTERVAL_S:
                self._flush_locked()

    def _flush_locked(self) -> None:
        if self._buffer:
            self._file.write("\n".join(self._buffer) + "\n")
            self._buffer.clear()
        self._file.flush()
        self._last_flush = time.monotonic()

    def close(self) -> None:
        with self._lock:
            self._flush_locked()
            self._file.close()


class RunDirWriter:
    """Owns one run directory from `start()` to `finish()`."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        if (self.path / RUN_JSON).exists():
            raise RunDirError(
                f"{self.path} already holds a run (run.json exists); "
                "choose another --out directory or delete that one"
            )
        try:
            self.path.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise RunDirError(f"--out {self.path}: cannot create the directory ({exc})") from exc
        self.meta: dict[str, Any] = {}
        self.ok_requests = 0
        self.requests = _JsonlAppender(self.path / REQUESTS_JSONL)
        self.metrics = _JsonlAppender(self.path / SERVER_METRICS_JSONL)
        self.flows: _JsonlAppender | None = None  # opened by the first flow: only scripted runs have flows

    def start(self, meta: dict[str, Any]) -> None:
        self.meta = {"format_version": FORMAT_VERSION, **meta, "status": "running"}
        write_json_atomic(self.path / RUN_JSON, self.meta)

    def update(self, **fields: Any) -> None:
        """Merge fields into run.json (e.g. the resolved model once known) and rewrite it."""
        self.meta.update(fields)
        write_json_atomic(self.path / RUN_JSON, self.meta)

    def add_records(self, rows: list[dict[str, Any]]) -> None:
        self.ok_requests += sum(1 for row in rows if row.get("status") == "ok")
        self.requests.add(rows)

    def add_flows(self, rows: list[dict[str, Any]]) -> None:
        """`FlowRecord.to_dict()` rows of scripted users' task invocations."""
        if self.flows is None:
            self.flows = _JsonlAppender(self.path / FLOWS_JSONL)
        self.flows.add(rows)

    def add_metric_samples(self, rows: list[dict[str, Any]]) -> None:
        """Rows of `{t, name, labels (JSON text), value}`; callable from the scraper thread."""
        self.metrics.add(rows)

    def tick(self) -> None:
        """Call often from the main loop: flushes whatever has waited long enough."""
        self.requests.maybe_flush()
        self.metrics.maybe_flush()
        if self.flows is not None:
            self.flows.maybe_flush()

    def finish(self, status: str, **fields: Any) -> None:
        """Flush, compact JSONL to parquet, and write the final run.json."""
        if status not in RUN_STATUSES[1:]:
            raise ValueError(f"final status must be one of {RUN_STATUSES[1:]}, got {status!r}")
        self.requests.close()
        self.metrics.close()
        if self.flows is not None:
            self.flows.close()
        compacted = {}
        try:
            compact_requests(self.path)
            compact_server_metrics(self.path)
            if self.flows is not None:
                compact_flows(self.path)
            compacted = {"compacted": True}
        except Exception as exc:  # noqa: BLE001 - the JSONL files stay; the analyzers read them
            compacted = {"compacted": False, "compaction_error": f"{type(exc).__name__}: {exc}"}
        self.meta.update(fields)
        self.meta.update(compacted)
        self.meta["status"] = status
        self.meta["requests_written"] = self.requests.rows
        self.meta["server_metric_samples"] = self.metrics.rows
        if self.flows is not None:
            self.meta["flows_written"] = self.flows.rows
        write_json_atomic(self.path / RUN_JSON, self.meta)


def compact_requests(run_dir: Path) -> Path:
    """requests.jsonl -> requests.parquet with `request_arrow_schema()`."""
    return _compact(run_dir, REQUESTS_JSONL, REQUESTS_PARQUET, request_table)


def compact_flows(run_dir: Path) -> Path:
    """flows.jsonl -> flows.parquet with `flow_arrow_schema()`."""
    return _compact(run_dir, FLOWS_JSONL, FLOWS_PARQUET, flow_table)


def _compact(run_dir: Path, jsonl: str, parquet: str, to_table: Any) -> Path:
    """One JSONL file of rows -> its parquet file; the JSONL goes once the parquet file holds every row."""
    import pyarrow.parquet as pq

    table = to_table(read_jsonl(run_dir / jsonl))
    out = run_dir / parquet
    pq.write_table(table, out)
    (run_dir / jsonl).unlink(missing_ok=True)
    return out


def compact_server_metrics(run_dir: Path) -> Path | None:
    """server_metrics.jsonl -> server_metrics.parquet (columns t, name, labels, value, source)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    source = run_dir / SERVER_METRICS_JSONL
    rows = read_jsonl(source) if source.exists() else []
    schema = server_metrics_arrow_schema()
    table = pa.Table.from_pylist(rows, schema=schema) if rows else schema.empty_table()
    out = run_dir / SERVER_METRICS_PARQUET
    pq.write_table(table, out)
    source.unlink(missing_ok=True)
    return out


def write_run_json(run_dir: Path, meta: dict[str, Any]) -> Path:
    """run.json for a run directory written in one go (an imported log, a simulation), with its format version."""
    return write_json_atomic(Path(run_dir) / RUN_JSON, {"format_version": FORMAT_VERSION, **meta})


def write_run_dir(run_dir: str | Path, meta: dict[str, Any], requests: Any, server_metrics: Any = None,
                  flows: list[dict[str, Any]] | None = None) -> Path:
    """A complete run directory written in one go (an imported log, a simulation).

    `requests` is an Arrow table (missing columns become nulls) or a list of
    row dicts; `server_metrics` an Arrow table of `t, name, labels, value` (and `source`) or None.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    out = Path(run_dir)
    if (out / RUN_JSON).exists():
        raise RunDirError(f"{out} already holds a run (run.json exists); choose another directory or delete that one")
    out.mkdir(parents=True, exist_ok=True)
    table = conform_requests(requests) if isinstance(requests, pa.Table) else request_table(requests)
    pq.write_table(table, out / REQUESTS_PARQUET)
    if server_metrics is not None:
        pq.write_table(conform_server_metrics(server_metrics), out / SERVER_METRICS_PARQUET)
    if flows is not None:
        pq.write_table(flow_table(flows), out / FLOWS_PARQUET)
    return write_run_json(out, {"servescope_version": __version__, **meta}).parent
