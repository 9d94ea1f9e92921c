"""Importing production request logs (JSONL or CSV) into a run directory, so on-call can slice them.

A log row becomes one row of `requests.parquet`. The fields servescope
understands, and the log columns it looks for when no mapping is given:

| field           | meaning                                  | looked for (first found)                         |
| --------------- | ---------------------------------------- | ------------------------------------------------ |
| `arrival`       | when the request arrived (required)      | arrival, arrival_time, timestamp, start_time, time, created, sent_at |
| `e2e`           | end-to-end latency (required)            | e2e, e2e_latency, latency, total_time, duration  |
| `ttft`          | time to first token                      | ttft, time_to_first_token, first_token_latency   |
| `tpot`          | time per output token (else derived)     | tpot, time_per_output_token                      |
| `prompt_tokens` | prompt length                            | prompt_tokens, input_tokens                      |
| `output_tokens` | generated tokens                         | output_tokens, completion_tokens, generated_tokens |
| `cached_tokens` | prompt tokens served from the prefix cache | cached_tokens, cache_hit_tokens                |
| `status`        | outcome: text (ok/error/timeout) or an HTTP code | status                                    |
| `http_status`   | HTTP status code                         | http_status, status_code, http_status_code, response_code, http_code |
| `tenant`        | who sent it                              | tenant, tenant_id, org_id, org, organization, customer, customer_id, user_id, user, api_key_id |
| `model`         | model served (kept in `phase` as `model=NAME`) | model, model_name, model_id, deployment, deployment_name |
| `retry_after`   | the server's Retry-After (s unless suffixed) | retry_after, retry_after_s, retry_after_ms   |
| `max_tokens`, `error_kind`, `error_message`, `request_id`, `session_id`, `prefix_group`, `prompt_bucket`, `output_bucket`, `api` | as in the run schema | the same name |

Every name above also matches with a unit suffix (`ttft_ms`, `e2e_s`,
`latency_us`), which sets the column's unit. Durations without a suffix use
`time_unit` (default seconds). `arrival` may be epoch seconds or
milliseconds (`--map arrival=ts:ms`), an ISO-8601 string, or seconds from the
log's start; it is stored as seconds since the first request.

`status` values: ok/success/succeeded/completed/200-299 are `ok`; timeout,
cancelled/canceled/aborted keep their meaning; any other value (or an HTTP
code >= 300) is `error`. An HTTP code, in `status` or in `http_status`, also
fills the run's `http_status`, and a failed row without an `error_kind` gets
`http_429`, `http_4xx` or `http_5xx` from it. An `http_status` column that holds
words rather than codes (`OK`, `ERROR`) is read as `status` when the log has no
`status` column. The request schema has no model column: each model gets its
own phase (`model=NAME`), so the report slices by model. Nor has it a
Retry-After column: a failed row's Retry-After is appended to its
`error_message` (`retry-after 2s`). Missing prompt/output buckets are derived
from the token counts.

run.json's `source.columns` lists every field that was read, named on the
command line or found by name, as `{column, unit, found_by}` (`unit` is the
unit the values were read in for time fields, `iso8601` for a textual arrival,
null for the others; `found_by` is `map` or `name`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pandas as pd

from servescope.errors import UsageError
from servescope.workloads.spec import Buckets

TIME_UNITS: dict[str, float] = {"us": 1e-6, "ms": 1e-3, "s": 1.0}
_SUFFIX_UNITS: dict[str, str] = {"us": "us", "ms": "ms", "s": "s", "sec": "s", "secs": "s", "seconds": "s", "millis": "ms"}
DURATION_FIELDS = ("ttft", "e2e", "tpot")
INT_FIELDS = ("prompt_tokens", "output_tokens", "cached_tokens", "max_tokens", "http_status",
              "spec_accepted_tokens", "spec_draft_tokens")
TEXT_FIELDS = ("request_id", "tenant", "model", "status", "error_kind", "error_message", "session_id",
               "prefix_group", "prompt_bucket", "output_bucket", "api")
# Durations outside the latency figures: their unit defaults to seconds, whatever `time_unit` says
# (Retry-After is defined in seconds).
SECONDS_FIELDS = ("retry_after",)
REQUIRED_FIELDS = ("arrival", "e2e")
ALIASES: dict[str, tuple[str, ...]] = {
    "arrival": ("arrival", "arrival_time", "timestamp", "start_time", "time", "created", "sent_at"),
    "e2e": ("e2e", "e2e_latency", "latency", "total_time", "duration"),
    "ttft": ("ttft", "time_to_first_token", "first_token_latency"),
    "tpot": ("tpot", "time_per_output_token"),
    "prompt_tokens": ("prompt_tokens", "input_tokens"),
    "output_tokens": ("output_tokens", "completion_tokens", "generated_tokens"),
    "cached_tokens": ("cached_tokens", "cache_hit_tokens"),
    "status": ("status",),
    "http_status": ("http_status", "status_code", "http_status_code", "response_code", "http_code"),
    # Most specific first: a log with both tenant_id and user_id slices by tenant.
    "tenant": ("tenant", "tenant_id", "org_id", "org", "organization", "customer", "customer_id", "user_id", "user",
               "api_key_id"),
    "model": ("model", "model_name", "model_id", "deployment", "deployment_name"),
    "retry_after": ("retry_after",),
}
FIELDS: tuple[str, ...] = ("arrival", *DURATION_FIELDS, *INT_FIELDS, *TEXT_FIELDS, *SECONDS_FIELDS)

# Logs without bucket labels get the workloads' default buckets, so an imported
# log and a load test of the same traffic slice the same way.
_BUCKETS = Buckets()

_OK_STATUSES = {"ok", "success", "succeeded", "completed", "complete", "done", "finished"}
_KEPT_STATUSES = {"timeout": "timeout", "timed_out": "timeout", "cancelled": "cancelled", "canceled": "cancelled",
                  "aborted": "cancelled"}


class LogImportError(UsageError):
    """The log cannot be read as asked; the message names the column/field and what the file has."""


@dataclass(frozen=True)
class ColumnMapping:
    """Which log column holds each field, and the unit of time columns."""

    columns: dict[str, str] = field(default_factory=dict)  # field -> log column
    units: dict[str, str] = field(default_factory=dict)  # field -> us|ms|s (time fields)
    time_unit: str = "s"  # unit of duration columns with no suffix and no explicit unit

    def __post_init__(self) -> None:
        unknown = sorted(set(self.columns) - set(FIELDS))
        if unknown:
            raise LogImportError(f"unknown field(s) {', '.join(unknown)} in the mapping; fields are: {', '.join(FIELDS)}")
        for name, unit in {**self.units, "time_unit": self.time_unit}.items():
            if unit not in TIME_UNITS:
                raise LogImportError(f"unit of {name} must be one of us, ms, s; got {unit!r}")

    @classmethod
    def parse(cls, pairs: list[str] | tuple[str, ...] = (), yaml_file: str | Path | None = None,
              time_unit: str | None = None) -> "ColumnMapping":
        """From a YAML file (`columns:`, `units:`, `time_unit:`) and then `--map FIELD=COLUMN[:UNIT]` flags."""
        columns: dict[str, str] = {}
        units: dict[str, str] = {}
        default_unit = "s"
        if yaml_file is not None:
            columns, units, default_unit = _read_mapping_yaml(Path(yaml_file))
        for pair in pairs:
            key, sep, value = pair.partition("=")
            if not sep or not key.strip() or not value.strip():
                raise LogImportError(f"--map {pair!r}: write FIELD=COLUMN or FIELD=COLUMN:UNIT, e.g. ttft=time_to_first_token_ms")
            column, colon, unit = value.strip().rpartition(":") if ":" in value else (value.strip(), "", "")
            if colon and unit not in TIME_UNITS:  # a colon that is part of the column name
                column, unit = value.strip(), ""
            columns[key.strip()] = column
            if unit:
                units[key.strip()] = unit
        return cls(columns=columns, units=units, time_unit=time_unit or default_unit)


def _read_mapping_yaml(path: Path) -> tuple[dict[str, str], dict[str, str], str]:
    import yaml

    try:
        data = yaml.safe_load(path.read_text())
    except OSError as exc:
        raise LogImportError(f"--mapping {path}: cannot read it ({exc})") from exc
    except yaml.YAMLError as exc:
        raise LogImportError(f"--mapping {path}: not valid YAML ({exc})") from exc
    if not isinstance(data, dict):
        raise LogImportError(f"--mapping {path}: expected a mapping with a `columns:` section")
    raw_columns = data.get("columns", {k: v for k, v in data.items() if k not in ("units", "time_unit")})
    if not isinstance(raw_columns, dict):
        raise LogImportError(f"--mapping {path}: `columns:` must map field names to log column names")
    columns, units = {}, dict(data.get("units") or {})
    for key, value in raw_columns.items():
        if isinstance(value, dict):  # ttft: {column: first_token_ms, unit: ms}
            if "column" not in value:
                raise LogImportError(f"--mapping {path}: {key}: give `column:` (and optionally `unit:`)")
            columns[str(key)] = str(value["column"])
            if "unit" in value:
                units[str(key)] = str(value["unit"])
        else:
            columns[str(key)] = str(value)
    return columns, {str(k): str(v) for k, v in units.items()}, str(data.get("time_unit", "s"))


# ---------------------------------------------------------------- reading

def read_log(path: str | Path, fmt: str | None = None) -> pd.DataFrame:
    """The log as a DataFrame: JSONL (one JSON object a line) or CSV/TSV, by extension unless `fmt` says."""
    path = Path(path)
    if not path.is_file():
        raise LogImportError(f"{path}: no such file")
    suffixes = [s.lower() for s in path.suffixes if s.lower() not in (".gz", ".bz2", ".zst", ".xz")]
    kind = fmt or (suffixes[-1].lstrip(".") if suffixes else "")
    try:
        if kind in ("jsonl", "ndjson", "json"):
            frame = pd.read_json(path, lines=True, dtype=False)
        elif kind in ("csv", "tsv"):
            frame = pd.read_csv(path, sep="\t" if kind == "tsv" else ",")
        else:
            raise LogImportError(f"{path}: cannot tell the format from the name; pass --format jsonl or --format csv")
    except ValueError as exc:
        if isinstance(exc, LogImportError):
            raise
        raise LogImportError(f"{path}: cannot parse it as {kind} ({exc})") from exc
    if frame.empty:
        raise LogImportError(f"{path}: no rows")
    return frame


def resolve_columns(frame: pd.DataFrame, mapping: ColumnMapping, source: str = "the log") -> dict[str, tuple[str, str | None]]:
    """field -> (column, unit) for every field found; errors name what is missing and what the file has."""
    return {name: (column, unit) for name, (column, unit, _) in _resolve(frame, mapping, source).items()}


def column_report(frame: pd.DataFrame, mapping: ColumnMapping, source: str = "the log") -> dict[str, dict[str, Any]]:
    """field -> {column, unit, found_by} for every field read: what run.json's `source.columns` records.

    `unit` is the unit the values were read in (time fields; `iso8601` for a textual arrival), else None.
    """
    report = {}
    for name, (column, unit, how) in _resolve(frame, mapping, source).items():
        if name == "arrival":
            unit = _arrival_unit(frame[column], unit)
        elif name in SECONDS_FIELDS:
            unit = unit or "s"
        elif name in DURATION_FIELDS:
            unit = unit or mapping.time_unit
        else:
            unit = None
        report[name] = {"column": str(column), "unit": unit, "found_by": how}
    return report


def _resolve(frame: pd.DataFrame, mapping: ColumnMapping, source: str) -> dict[str, tuple[str, str | None, str]]:
    """field -> (column, unit or None, "map" | "name")."""
    have = list(frame.columns)
    lowered = {str(c).lower(): c for c in have}
    found: dict[str, tuple[str, str | None, str]] = {}
    for name in FIELDS:
        if name in mapping.columns:
            column = mapping.columns[name]
            if column not in frame.columns:
                raise LogImportError(
                    f"column {column!r} (mapped to {name}) is not in {source}; it has: {', '.join(map(str, have))}"
                )
            found[name] = (column, mapping.units.get(name) or _suffix_unit(column), "map")
            continue
        for alias in ALIASES.get(name, (name,)):
            hit = _find_alias(lowered, alias)
            if hit is not None:
                found[name] = (hit[0], mapping.units.get(name) or hit[1], "name")
                break
    if "http_status" in found and "status" not in found and not _all_numeric(frame[found["http_status"][0]]):
        found["status"] = found.pop("http_status")  # `status_code: OK`: an outcome word, read as the status
    missing = [f for f in REQUIRED_FIELDS if f not in found]
    if missing:
        hints = "; ".join(f"{f} (looked for {', '.join(ALIASES[f])}, with or without a _ms/_s suffix)" for f in missing)
        raise LogImportError(
            f"{source} has no column for {hints}. It has: {', '.join(map(str, have))}. "
            f"Map it with --map {missing[0]}=COLUMN[:ms|s] or a --mapping YAML file."
        )
    return found


def _all_numeric(series: pd.Series) -> bool:
    values = pd.to_numeric(series, errors="coerce")
    return not (values.isna() & series.notna() & (series.astype(str).str.strip() != "")).any()


def _find_alias(lowered: dict[str, Any], alias: str) -> tuple[str, str | None] | None:
    if alias in lowered:
        return lowered[alias], _suffix_unit(str(lowered[alias]))
    for suffix, unit in _SUFFIX_UNITS.items():
        if f"{alias}_{suffix}" in lowered:
            return lowered[f"{alias}_{suffix}"], unit
    return None


def _suffix_unit(column: str) -> str | None:
    match = re.search(r"_([a-z]+)$", column.lower())
    return _SUFFIX_UNITS.get(match.group(1)) if match else None


# ---------------------------------------------------------------- converting

def to_request_rows(frame: pd.DataFrame, mapping: ColumnMapping | None = None, source: str = "the log") -> pd.DataFrame:
    """The log as a DataFrame with the run schema's columns (times in seconds since the first arrival)."""
    from servescope.rundir.schema import REQUEST_COLUMNS

    mapping = mapping or ColumnMapping()
    cols = resolve_columns(frame, mapping, source)
    n = len(frame)
    out = pd.DataFrame(index=range(n), columns=list(REQUEST_COLUMNS), dtype=object)

    arrival = _arrival_seconds(frame[cols["arrival"][0]], cols["arrival"][1], source)
    start = np.nanmin(arrival)
    sent = arrival - start
    durations = {name: _duration_seconds(frame, cols[name], mapping.time_unit, name, source)
                 for name in DURATION_FIELDS if name in cols}
    ints = {name: _numeric(frame[cols[name][0]], name, source) for name in INT_FIELDS if name in cols}
    texts = {name: frame[cols[name][0]].map(_text).astype(object) for name in TEXT_FIELDS if name in cols}

    status, http = _statuses(texts.get("status"), ints.get("http_status"), n)
    ok = status == "ok"
    e2e = durations["e2e"]
    ttft = durations.get("ttft", np.full(n, np.nan))
    out_tokens = ints.get("output_tokens", np.full(n, np.nan))
    tpot = durations.get("tpot")
    if tpot is None:
        with np.errstate(invalid="ignore", divide="ignore"):
            tpot = np.where(out_tokens > 1, (e2e - ttft) / (out_tokens - 1), np.nan)

    ids = texts.get("request_id")
    out["request_id"] = [str(v) for v in ids] if ids is not None else [f"log-{i}" for i in range(n)]
    if ids is not None and out["request_id"].duplicated().any():
        out["request_id"] = [f"{v}#{i}" for i, v in enumerate(out["request_id"])]
    out["worker"] = 0
    out["api"] = texts["api"] if "api" in texts else "completions"
    model = texts.get("model")
    out["phase"] = [f"model={m}" if m is not None else "imported" for m in model] if model is not None else "imported"
    for name in ("tenant", "session_id", "prefix_group", "error_kind", "error_message"):
        if name in texts:
            out[name] = texts[name]
    if "retry_after" in cols:
        column, unit = cols["retry_after"]
        retry = _numeric(frame[column], "retry_after", source) * TIME_UNITS[unit or "s"]
        out["error_message"] = [_with_retry_after(msg, wait) if not is_ok else msg
                                for msg, wait, is_ok in zip(out["error_message"], retry, ok)]
    out["scheduled_at"] = sent
    out["sent_at"] = sent
    out["first_token_at"] = np.where(np.isfinite(ttft), sent + ttft, np.nan)
    out["end_at"] = np.where(np.isfinite(e2e), sent + e2e, np.nan)
    out["ttft_s"] = np.where(ok, ttft, np.nan)
    out["e2e_s"] = np.where(ok, e2e, np.nan)
    out["tpot_s"] = np.where(ok, tpot, np.nan)
    out["itl_s"] = [[] for _ in range(n)]
    out["chunk_tokens"] = [[] for _ in range(n)]
    for name, values in ints.items():
        out[name] = values
    if "output_tokens" in ints:
        out["output_tokens_source"] = "usage"
    if "prompt_tokens" in ints:
        out["usage_prompt_tokens"] = ints["prompt_tokens"]
    out["status"] = status
    out["http_status"] = http
    missing_kind = ~ok & out["error_kind"].isna().to_numpy()
    out.loc[missing_kind, "error_kind"] = [_error_kind(s, c) for s, c in zip(status[missing_kind], http[missing_kind])]
    out["schedule_lag_s"] = 0.0
    out["prompt_bucket"] = texts["prompt_bucket"] if "prompt_bucket" in texts else _buckets(ints.get("prompt_tokens"), _BUCKETS.prompt_label, n)
    out["output_bucket"] = texts["output_bucket"] if "output_bucket" in texts else _buckets(out_tokens if "output_tokens" in ints else None, _BUCKETS.output_label, n)
    return out


def _text(value: Any) -> str | None:
    """A label as text: None for a missing value, whole numbers without `.0` (a CSV column with blanks is float)."""
    if value is None or (isinstance(value, float) and np.isnan(value)) or value is pd.NA or value is pd.NaT:
        return None
    if isinstance(value, (float, np.floating)) and float(value).is_integer():
        return str(int(value))
    return str(value)


def _with_retry_after(message: str | None, wait: float) -> str | None:
    if not np.isfinite(wait):
        return message
    note = f"retry-after {wait:g}s"
    return note if _text(message) in (None, "") else f"{message}; {note}"


def _arrival_unit(series: pd.Series, unit: str | None) -> str:
    """The unit `_arrival_seconds` reads the column in: `unit` if given, else s or epoch ms by size; iso8601 for text."""
    if not pd.api.types.is_numeric_dtype(series):
        return "iso8601"
    if unit is None and np.nanmedian(series.to_numpy(dtype=np.float64)) > 1e11:  # epoch ms (1e11 s is year 5138)
        return "ms"
    return unit or "s"


def _arrival_seconds(series: pd.Series, unit: str | None, source: str) -> np.ndarray:
    """Arrival times as float seconds (epoch or relative: only differences matter)."""
    if pd.api.types.is_numeric_dtype(series):
        return series.to_numpy(dtype=np.float64) * TIME_UNITS[_arrival_unit(series, unit)]
    parsed = pd.to_datetime(series, errors="coerce", utc=True, format="mixed")
    bad = parsed.isna() & series.notna()
    if bad.any():
        example = series[bad].iloc[0]
        raise LogImportError(
            f"arrival column {series.name!r} in {source}: cannot read {example!r} as a time; "
            "use epoch seconds/milliseconds or ISO-8601 (2024-05-01T12:00:00.123Z)"
        )
    return (parsed - parsed.min()).dt.total_seconds().to_numpy(dtype=np.float64)


def _duration_seconds(frame: pd.DataFrame, col: tuple[str, str | None], default_unit: str, name: str, source: str) -> np.ndarray:
    column, unit = col
    return _numeric(frame[column], name, source) * TIME_UNITS[unit or default_unit]


def _numeric(series: pd.Series, name: str, source: str) -> np.ndarray:
    values = pd.to_numeric(series, errors="coerce")
    bad = values.isna() & series.notna() & (series.astype(str).str.strip() != "")
    if bad.any():
        raise LogImportError(
            f"column {series.name!r} ({name}) in {source} must be numeric; row {int(np.argmax(bad.to_numpy()))} has {series[bad].iloc[0]!r}"
        )
    return values.to_numpy(dtype=np.float64)


def _statuses(text: pd.Series | None, http: np.ndarray | None, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Run-schema statuses from free-form status text and/or HTTP codes."""
    status = np.full(n, "ok", dtype=object)
    codes = http.copy() if http is not None else np.full(n, np.nan)
    if text is not None:
        for i, raw in enumerate(text):
            if raw is None:
                continue
            word = str(raw).strip().lower()
            code = _http_code(word)
            if code is not None:
                codes[i] = float(code) if np.isnan(codes[i]) else codes[i]
                status[i] = "ok" if 200 <= code < 300 else "error"
            elif word in _OK_STATUSES:
                status[i] = "ok"
            else:
                status[i] = _KEPT_STATUSES.get(word, "error")
    failed_http = np.isfinite(codes) & (codes >= 300)
    status[failed_http] = "error"
    return status, codes


def _http_code(word: str) -> int | None:
    """`429` or `429.0` (a numeric column with blanks) as an int; None for anything else."""
    try:
        value = float(word)
    except ValueError:
        return None
    return int(value) if np.isfinite(value) and value.is_integer() and 100 <= value < 600 else None


def _error_kind(status: str, http_status: float) -> str:
    """The run schema's error_kind for a failed log row without one."""
    if status in ("timeout", "cancelled"):
        return status
    if np.isfinite(http_status):
        code = int(http_status)
        return "http_429" if code == 429 else "http_5xx" if code >= 500 else "http_4xx" if code >= 400 else "protocol"
    return "unknown"


def _buckets(tokens: np.ndarray | None, label: Callable[[int], str], n: int) -> list[str | None]:
    if tokens is None:
        return [None] * n
    return [None if np.isnan(t) else label(int(t)) for t in tokens]


# ---------------------------------------------------------------- writing

def import_log(path: str | Path, out_dir: str | Path, mapping: ColumnMapping | None = None,
               fmt: str | None = None, slo: str | None = None) -> Path:
    """Write a run directory (run.json with status `imported`, requests.parquet) from a request log.

    `slo` (e.g. "ttft_p99=500ms") is recorded in run.json, where the summary reads a run's SLOs.
    """
    from servescope.rundir.schema import RUN_JSON
    from servescope.rundir.writer import write_run_dir

    path, out = Path(path), Path(out_dir)
    mapping = mapping or ColumnMapping()
    frame = read_log(path, fmt)
    rows = to_request_rows(frame, mapping, source=str(path))
    if (out / RUN_JSON).exists():
        raise LogImportError(f"{out} already holds a run (run.json exists); pass another --out or delete it")
    records = [_clean(r) for r in rows.to_dict("records")]
    sent = rows["sent_at"].to_numpy(dtype=np.float64)
    return write_run_dir(out, {
        "status": "imported",
        "source": {"file": str(path.resolve()), "rows": len(frame),
                   "columns": column_report(frame, mapping, str(path)),
                   "time_unit": mapping.time_unit},
        "duration_s": float(np.nanmax(sent)) if len(sent) else 0.0,
        "target": None,
        "load_model": {"kind": "imported"},
        "slo": slo or None,
    }, records)


def _clean(row: dict[str, Any]) -> dict[str, Any]:
    """numpy scalars and float NaN to plain Python / None, ints where the schema wants ints."""
    out = {}
    for key, value in row.items():
        if isinstance(value, float) and np.isnan(value):
            value = None
        elif isinstance(value, np.generic):
            value = value.item()
        out[key] = value
    for key in INT_FIELDS + ("worker",):
        if out.get(key) is not None:
            out[key] = int(out[key])
    if out.get("usage_prompt_tokens") is not None:
        out["usage_prompt_tokens"] = int(out["usage_prompt_tokens"])
    return out
