"""Reading a run directory back: `load_run(run_dir) -> RunData`.

Every analyzer starts here, so it is the one place that knows the file layout
(DESIGN.md "The run directory") and the fallbacks: a run that died before
compaction still has `requests.jsonl`, and a run against a target without
`/metrics` has no server metrics at all.

Both request files go through one Arrow table with `harness.records.request_arrow_schema()`,
so a JSONL run and a parquet run give identical columns and dtypes.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from servescope.rundir.jsonio import read_jsonl
from servescope.rundir.schema import (
    FLOWS_JSONL,
    FLOWS_PARQUET,
    FORMAT_VERSION,
    REQUESTS_JSONL,
    REQUESTS_PARQUET,
    RUN_JSON,
    SERVER_METRIC_COLUMNS,
    SERVER_METRICS_JSONL,
    SERVER_METRICS_PARQUET,
    RunDirError,
    conform_requests,
    conform_table,
    flow_arrow_schema,
    flow_table,
    request_arrow_schema,
    request_table,
)
from servescope.version import __version__


@dataclass
class RunData:
    """One run, loaded: metadata, one row per request, server metric samples, and
    (scripted users only) one row per flow, i.e. per task invocation.

    `itl_values` / `itl_lengths` hold the `itl_s` lists flattened once at load
    time: pooled ITL percentiles over millions of gaps would otherwise walk
    a Python object column.
    """

    run: dict[str, Any]
    requests: pd.DataFrame
    server_metrics: pd.DataFrame
    path: Path | None = None
    flows: pd.DataFrame = field(default_factory=lambda: empty_flows())
    itl_values: np.ndarray = field(default_factory=lambda: np.empty(0))
    itl_lengths: np.ndarray = field(default_factory=lambda: np.empty(0, dtype=np.int64))

    def __post_init__(self) -> None:
        if not isinstance(self.run, dict):
            raise TypeError(f"RunData.run must be the dict of run.json, got {type(self.run).__name__}")
        if len(self.itl_lengths) == 0 and len(self.requests) and "itl_s" in self.requests:
            self.itl_values, self.itl_lengths = _flatten_lists(self.requests["itl_s"])
        if len(self.itl_lengths) != len(self.requests):
            raise ValueError("itl_lengths must have one entry per request row")

    @cached_property
    def itl_max(self) -> np.ndarray:
        """Largest inter-token gap of each request (NaN when it had none): its worst stall."""
        out = np.full(len(self.itl_lengths), np.nan)
        has = self.itl_lengths > 0
        if has.any():
            starts = np.concatenate(([0], np.cumsum(self.itl_lengths)[:-1]))
            out[has] = np.maximum.reduceat(self.itl_values, starts[has])
        return out

    def pooled_itl(self, mask: np.ndarray | pd.Series | None = None) -> np.ndarray:
        """Every inter-token gap of the selected rows (all rows when mask is None)."""
        if mask is None:
            return self.itl_values
        mask = np.asarray(mask, dtype=bool)
        return self.itl_values[np.repeat(mask, self.itl_lengths)]


def load_run(run_dir: str | Path) -> RunData:
    """Read `run.json`, the requests and the server metrics of one run directory."""
    path = Path(run_dir)
    if not path.is_dir():
        raise RunDirError(f"{path}: no such directory (expected a run directory written by `servescope run --out DIR`)")
    run_json = path / RUN_JSON
    has_requests = (path / REQUESTS_PARQUET).exists() or (path / REQUESTS_JSONL).exists()
    if not run_json.exists() and not has_requests:
        raise RunDirError(
            f"{path} is not a run directory: it has neither {RUN_JSON} nor {REQUESTS_PARQUET}/{REQUESTS_JSONL}. "
            "Pass the --out directory of a `servescope run`."
        )
    run = _read_run_json(run_json) if run_json.exists() else {"status": "unknown"}
    table = _read_requests(path)
    requests = _requests_frame(table)
    itl_values, itl_lengths = _flatten_arrow_list(table.column("itl_s"))
    return RunData(
        run=run,
        requests=requests,
        server_metrics=_read_server_metrics(path),
        path=path,
        flows=_read_flows(path),
        itl_values=itl_values,
        itl_lengths=itl_lengths,
    )


def requests_from_records(rows: list[dict[str, Any]]) -> pd.DataFrame:
    """A requests DataFrame from dicts (missing keys become null), typed like the parquet file."""
    return _requests_frame(request_table(rows))


def _read_run_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise RunDirError(f"{path}: not valid JSON ({exc}); the run may have been cut off while writing it") from exc
    if not isinstance(data, dict):
        raise RunDirError(f"{path}: expected a JSON object, got {type(data).__name__}")
    check_format_version(data, path)
    return data


def check_format_version(run: dict[str, Any], path: Path | str = RUN_JSON) -> int:
    """The run directory's format version; a version this reader does not know is refused.

    A run.json without `format_version` predates the field and has the layout of version 1.
    """
    version = run.get("format_version", 1)
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise RunDirError(f"{path}: format_version must be a positive integer, got {version!r}")
    if version > FORMAT_VERSION:
        raise RunDirError(
            f"{path}: written in run-directory format {version} by servescope {run.get('servescope_version', '?')}; "
            f"this servescope ({__version__}) reads formats up to {FORMAT_VERSION}: upgrade servescope to read it"
        )
    return version


def _read_requests(path: Path) -> pa.Table:
    parquet, jsonl = path / REQUESTS_PARQUET, path / REQUESTS_JSONL
    if parquet.exists():
        table = pq.read_table(parquet)
        return conform_requests(table)
    if jsonl.exists():
        return request_table(read_jsonl(jsonl))
    return request_arrow_schema().empty_table()


def empty_flows() -> pd.DataFrame:
    """A flows frame with no rows and the contract's columns (runs without scripted users)."""
    return flow_arrow_schema().empty_table().to_pandas()


def flows_from_records(rows: list[dict[str, Any]]) -> pd.DataFrame:
    """A flows DataFrame from dicts (missing keys become null), typed like flows.parquet."""
    return flow_table(rows).to_pandas()


def _read_flows(path: Path) -> pd.DataFrame:
    parquet, jsonl = path / FLOWS_PARQUET, path / FLOWS_JSONL
    if parquet.exists():
        return conform_table(pq.read_table(parquet), flow_arrow_schema()).to_pandas()
    if jsonl.exists():
        return flow_table(read_jsonl(jsonl)).to_pandas()
    return empty_flows()


def _requests_frame(table: pa.Table) -> pd.DataFrame:
    # Nullable ints stay float (NaN) rather than pandas' Int64: numpy math on them is
    # what every analyzer does, and NaN means "unknown" there too.
    frame = table.to_pandas()
    for col in ("itl_s", "chunk_tokens"):
        frame[col] = frame[col].map(lambda v: v if v is not None else np.empty(0))
    return frame


def _flatten_arrow_list(column: pa.ChunkedArray) -> tuple[np.ndarray, np.ndarray]:
    column = column.combine_chunks() if column.num_chunks != 1 else column.chunk(0)
    lengths = column.value_lengths().fill_null(0).to_numpy(zero_copy_only=False).astype(np.int64)
    values = column.flatten().to_numpy(zero_copy_only=False).astype(np.float64)
    return values, lengths


def _flatten_lists(series: pd.Series) -> tuple[np.ndarray, np.ndarray]:
    arrays = [np.asarray(v if v is not None else [], dtype=np.float64) for v in series]
    lengths = np.fromiter((len(a) for a in arrays), dtype=np.int64, count=len(arrays))
    values = np.concatenate(arrays) if arrays else np.empty(0)
    return values, lengths


def _read_server_metrics(path: Path) -> pd.DataFrame:
    parquet, jsonl = path / SERVER_METRICS_PARQUET, path / SERVER_METRICS_JSONL
    if parquet.exists():
        frame = pq.read_table(parquet).to_pandas()
    elif jsonl.exists():
        frame = pd.DataFrame.from_records(read_jsonl(jsonl))
    else:
        frame = pd.DataFrame()
    for col in SERVER_METRIC_COLUMNS:
        if col not in frame:
            frame[col] = pd.Series(dtype="float64" if col in ("t", "value") else "object")
    frame = frame[list(SERVER_METRIC_COLUMNS)]
    frame["labels"] = frame["labels"].map(_labels_text)
    return frame


def _labels_text(labels: Any) -> str:
    """Labels as canonical JSON text (writers may store a dict or a string)."""
    if labels is None or (isinstance(labels, float) and np.isnan(labels)):
        return "{}"
    if isinstance(labels, str):
        return labels
    return json.dumps(labels, sort_keys=True)
