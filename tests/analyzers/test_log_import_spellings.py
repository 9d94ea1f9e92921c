"""The importer reads the common spellings of status, tenant, model and Retry-After with no --map,
from CSV and JSONL alike, and records in run.json and the report which column it read for what."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
from click.testing import CliRunner

from servescope.analyzers.report import build_report
from servescope.cli import main
from servescope.harness.orchestration.log_import import LogImportError, import_log, read_log, to_request_rows
from servescope.rundir.reader import load_run

N = 40


def _code(i: int) -> int:
    """Every 5th request throttled, one 404 and one 503; the rest succeed."""
    return 429 if i % 5 == 0 else 404 if i == 3 else 503 if i == 7 else 200


def _rows(extra: dict[str, Any] | None = None, **columns: Any) -> list[dict[str, Any]]:
    rows = []
    for i in range(N):
        row = {"timestamp": 1714564800 + i * 0.25, "ttft_ms": 80 + i, "latency_ms": 900 + i, "output_tokens": 40}
        for name, make in columns.items():
            row[name] = make(i)
        rows.append(row)
    return rows


def _write(path: Path, rows: list[dict[str, Any]]) -> Path:
    if path.suffix == ".csv":
        with path.open("w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
    else:
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


FORMATS = ("csv", "jsonl")


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("spelling", ["status_code", "http_status", "response_code", "status", "HTTP_Status_Code"])
def test_http_codes_under_any_spelling(tmp_path: Path, fmt: str, spelling: str) -> None:
    log = _write(tmp_path / f"prod.{fmt}", _rows(**{spelling: _code}))
    run = load_run(import_log(log, tmp_path / "run"))
    req = run.requests
    codes = [_code(i) for i in range(N)]
    assert list(req["http_status"]) == codes
    for i, code in enumerate(codes):
        if code == 200:
            assert req["status"][i] == "ok" and pd.isna(req["error_kind"][i])
        else:
            assert req["status"][i] == "error"
    assert set(req.loc[req["http_status"] == 429, "error_kind"]) == {"http_429"}
    assert req["error_kind"][3] == "http_4xx" and req["error_kind"][7] == "http_5xx"
    assert req["ttft_s"].isna().tolist() == [c != 200 for c in codes]  # latencies of failures are not latencies
    field = "status" if spelling == "status" else "http_status"
    assert run.run["source"]["columns"][field] == {"column": spelling, "unit": None, "found_by": "name"}


@pytest.mark.parametrize("fmt", FORMATS)
def test_status_code_200_and_429(tmp_path: Path, fmt: str) -> None:
    log = _write(tmp_path / f"prod.{fmt}", _rows(status_code=lambda i: 429 if i % 2 else 200))
    req = to_request_rows(read_log(log))
    throttled = req.index % 2 == 1
    assert set(req.loc[throttled, "error_kind"]) == {"http_429"} and set(req.loc[throttled, "status"]) == {"error"}
    assert set(req.loc[~throttled, "status"]) == {"ok"} and req.loc[~throttled, "error_kind"].isna().all()


@pytest.mark.parametrize("fmt", FORMATS)
def test_textual_status_keeps_working(tmp_path: Path, fmt: str) -> None:
    words = ["ok", "error", "timeout", "success", "cancelled"]
    log = _write(tmp_path / f"prod.{fmt}", _rows(status=lambda i: words[i % 5]))
    req = to_request_rows(read_log(log))
    assert list(req["status"][:5]) == ["ok", "error", "timeout", "ok", "cancelled"]
    assert req["http_status"].isna().all()
    assert list(req["error_kind"][:5].fillna("-")) == ["-", "unknown", "timeout", "-", "cancelled"]


@pytest.mark.parametrize("fmt", FORMATS)
def test_text_and_code_columns_together(tmp_path: Path, fmt: str) -> None:
    log = _write(tmp_path / f"prod.{fmt}", _rows(status=lambda i: "ok" if _code(i) == 200 else "error",
                                                 status_code=_code))
    req = to_request_rows(read_log(log))
    assert list(req["http_status"]) == [_code(i) for i in range(N)]
    assert req["error_kind"][0] == "http_429" and req["error_kind"][7] == "http_5xx" and req["status"][1] == "ok"


@pytest.mark.parametrize("fmt", FORMATS)
def test_status_code_holding_words_is_the_status(tmp_path: Path, fmt: str) -> None:
    log = _write(tmp_path / f"prod.{fmt}", _rows(status_code=lambda i: "ERROR" if i == 2 else "OK"))
    out = import_log(log, tmp_path / "run")
    run = load_run(out)
    assert run.requests["status"][2] == "error" and (run.requests["status"].drop(2) == "ok").all()
    assert run.run["source"]["columns"]["status"]["column"] == "status_code"
    assert "http_status" not in run.run["source"]["columns"]


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("spelling", ["user_id", "tenant_id", "org_id", "api_key_id", "customer", "user", "Tenant"])
def test_tenant_spellings(tmp_path: Path, fmt: str, spelling: str) -> None:
    log = _write(tmp_path / f"prod.{fmt}", _rows(**{spelling: lambda i: f"t{i % 3}"}))
    run = load_run(import_log(log, tmp_path / "run"))
    assert sorted(set(run.requests["tenant"])) == ["t0", "t1", "t2"]
    assert run.run["source"]["columns"]["tenant"] == {"column": spelling, "unit": None, "found_by": "name"}


@pytest.mark.parametrize("fmt", FORMATS)
def test_numeric_user_ids_are_tenant_labels(tmp_path: Path, fmt: str) -> None:
    log = _write(tmp_path / f"prod.{fmt}", _rows(user_id=lambda i: 1000 + i % 2))
    run = load_run(import_log(log, tmp_path / "run"))
    assert sorted(set(run.requests["tenant"])) == ["1000", "1001"]


def test_the_most_specific_tenant_column_wins(tmp_path: Path) -> None:
    log = _write(tmp_path / "prod.csv", _rows(user_id=lambda i: f"u{i}", tenant_id=lambda i: "acme"))
    req = to_request_rows(read_log(log))
    assert set(req["tenant"]) == {"acme"}


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("spelling", ["model_name", "deployment", "model"])
def test_model_spellings_become_the_model_phase(tmp_path: Path, fmt: str, spelling: str) -> None:
    log = _write(tmp_path / f"prod.{fmt}", _rows(**{spelling: lambda i: "llama-8b" if i % 2 else "llama-70b"}))
    run = load_run(import_log(log, tmp_path / "run"))
    assert set(run.requests["phase"]) == {"model=llama-8b", "model=llama-70b"}
    assert run.run["source"]["columns"]["model"]["column"] == spelling


@pytest.mark.parametrize("fmt", FORMATS)
def test_retry_after_goes_with_the_error(tmp_path: Path, fmt: str) -> None:
    log = _write(tmp_path / f"prod.{fmt}", _rows(status_code=lambda i: 429 if i % 2 else 200,
                                                 retry_after=lambda i: 2 if i % 2 else ""))
    run = load_run(import_log(log, tmp_path / "run"))
    req = run.requests
    assert req["error_message"][1] == "retry-after 2s" and pd.isna(req["error_message"][0])
    assert run.run["source"]["columns"]["retry_after"] == {"column": "retry_after", "unit": "s", "found_by": "name"}


def test_retry_after_in_ms_next_to_a_message(tmp_path: Path) -> None:
    log = _write(tmp_path / "prod.jsonl", _rows(status=lambda i: 429, error_message=lambda i: "rate limited",
                                                retry_after_ms=lambda i: 1500))
    req = to_request_rows(read_log(log))
    assert req["error_message"][0] == "rate limited; retry-after 1.5s"


@pytest.mark.parametrize("fmt", FORMATS)
def test_run_json_and_report_name_every_column_read(tmp_path: Path, fmt: str) -> None:
    log = _write(tmp_path / f"prod.{fmt}", _rows(status_code=lambda i: 429 if i % 4 == 0 else 200,
                                                 user_id=lambda i: f"u{i % 2}", model_name=lambda i: "m1"))
    out = import_log(log, tmp_path / "run")
    columns = load_run(out).run["source"]["columns"]
    assert columns == {
        "arrival": {"column": "timestamp", "unit": "s", "found_by": "name"},
        "e2e": {"column": "latency_ms", "unit": "ms", "found_by": "name"},
        "ttft": {"column": "ttft_ms", "unit": "ms", "found_by": "name"},
        "output_tokens": {"column": "output_tokens", "unit": None, "found_by": "name"},
        "http_status": {"column": "status_code", "unit": None, "found_by": "name"},
        "tenant": {"column": "user_id", "unit": None, "found_by": "name"},
        "model": {"column": "model_name", "unit": None, "found_by": "name"},
    }
    html = build_report(out).read_text()
    section = html[html.index('id="log-columns"'):]
    section = section[:section.index("</table>")]
    for field, column in (("http_status", "status_code"), ("tenant", "user_id"), ("model", "model_name"),
                          ("e2e", "latency_ms")):
        assert f"<td>{field}</td><td><code>{column}</code></td>" in section
    assert "<td>ms</td>" in section


def test_mapped_and_found_columns_both_listed(tmp_path: Path) -> None:
    rows = [{"when": f"2024-05-01T12:00:{i:02d}Z", "lat": 1.2, "status_code": 200, "customer": "c"} for i in range(5)]
    log = _write(tmp_path / "prod.csv", rows)
    runner = CliRunner()
    result = runner.invoke(main, ["slice", str(log), "--map", "arrival=when", "--map", "e2e=lat",
                                  "--time-unit", "ms", "--out", str(tmp_path / "run"), "--no-report"])
    assert result.exit_code == 0, result.output
    assert "columns read: arrival <- when (iso8601), e2e <- lat (ms)" in result.output
    assert "http_status <- status_code" in result.output and "tenant <- customer" in result.output
    columns = json.loads((tmp_path / "run" / "run.json").read_text())["source"]["columns"]
    assert columns["arrival"] == {"column": "when", "unit": "iso8601", "found_by": "map"}
    assert columns["e2e"] == {"column": "lat", "unit": "ms", "found_by": "map"}
    assert columns["http_status"]["found_by"] == "name" and columns["tenant"]["column"] == "customer"


@pytest.mark.parametrize("fmt", FORMATS)
def test_missing_latency_names_the_field_and_the_file_columns(tmp_path: Path, fmt: str) -> None:
    rows = [{"timestamp": i, "status_code": 200, "user_id": "u"} for i in range(3)]
    log = _write(tmp_path / f"prod.{fmt}", rows)
    with pytest.raises(LogImportError, match=r"no column for e2e .*It has: timestamp, status_code, user_id"):
        import_log(log, tmp_path / "run")
    result = CliRunner().invoke(main, ["slice", str(log), "--out", str(tmp_path / "run2")])
    assert result.exit_code == 2 and "e2e" in result.output and "status_code" in result.output


def test_non_numeric_code_column_next_to_a_status_is_an_error_naming_it(tmp_path: Path) -> None:
    log = _write(tmp_path / "prod.csv", _rows(status=lambda i: "ok", status_code=lambda i: "OK"))
    with pytest.raises(LogImportError, match=r"'status_code' \(http_status\) .* must be numeric"):
        to_request_rows(read_log(log))
