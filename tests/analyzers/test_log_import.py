"""`servescope slice` on log files the test writes: mapping, units, errors, and the run directory."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from servescope.harness.orchestration.log_import import ColumnMapping, LogImportError, import_log, read_log, to_request_rows
from servescope.cli import main
from servescope.rundir.reader import load_run


def _write_csv(path: Path, n: int = 60) -> Path:
    rng = np.random.default_rng(0)
    lines = ["ts,first_token_ms,total_latency_ms,input_tokens,completion_tokens,customer,model,status"]
    for i in range(n):
        slow = i % 4 == 0  # every 4th request is a long prompt, 5x slower to first token
        ttft = (500 if slow else 100) + rng.integers(0, 20)
        status = "503" if i == 7 else "200"
        lines.append(f"{1714564800 + i * 0.5},{ttft},{ttft + 400},{4000 if slow else 200},50,"
                     f"{'acme' if i % 2 else 'beta'},m1,{status}")
    path.write_text("\n".join(lines) + "\n")
    return path


def test_csv_with_flag_mapping_and_units(tmp_path: Path) -> None:
    log = _write_csv(tmp_path / "prod.csv")
    mapping = ColumnMapping.parse(["arrival=ts", "ttft=first_token_ms", "e2e=total_latency_ms"])
    rows = to_request_rows(read_log(log), mapping)
    assert rows["sent_at"].iloc[1] == pytest.approx(0.5)
    assert rows["ttft_s"].iloc[1] == pytest.approx(0.1, abs=0.02)  # ms -> s from the suffix
    assert rows["e2e_s"].iloc[1] - rows["ttft_s"].iloc[1] == pytest.approx(0.4)
    assert rows["tpot_s"].iloc[1] == pytest.approx(0.4 / 49)
    assert rows.loc[7, "status"] == "error" and rows.loc[7, "error_kind"] == "http_5xx"
    assert set(rows["tenant"]) == {"acme", "beta"}  # `customer` found as the tenant
    assert set(rows["prompt_bucket"]) == {"0-256", "1k-4k"}


def test_missing_column_names_it_and_lists_the_file(tmp_path: Path) -> None:
    log = _write_csv(tmp_path / "prod.csv")
    with pytest.raises(LogImportError) as err:
        to_request_rows(read_log(log), ColumnMapping.parse(["ttft=ttft_wrong"]))
    assert "ttft_wrong" in str(err.value) and "first_token_ms" in str(err.value)
    with pytest.raises(LogImportError, match=r"no column for arrival.*It has: ts"):
        to_request_rows(read_log(log))
    with pytest.raises(LogImportError, match="unknown field"):
        ColumnMapping.parse(["latency=total_latency_ms"])


def test_jsonl_yaml_mapping_and_seconds(tmp_path: Path) -> None:
    log = tmp_path / "prod.jsonl"
    log.write_text("".join(json.dumps({"time": f"2024-05-01T12:00:0{i}Z", "ttfb": 0.2 + i / 100, "latency": 1.5,
                                       "status": "success" if i else "timeout"}) + "\n" for i in range(5)))
    mapping_file = tmp_path / "map.yaml"
    mapping_file.write_text("columns:\n  ttft: ttfb\n  e2e: {column: latency, unit: s}\n")
    out = import_log(log, tmp_path / "run", ColumnMapping.parse(yaml_file=mapping_file))
    run = load_run(out)
    assert run.run["status"] == "imported"
    assert list(run.requests["sent_at"]) == [0.0, 1.0, 2.0, 3.0, 4.0]
    assert list(run.requests["status"]) == ["timeout", "ok", "ok", "ok", "ok"]
    assert run.requests["ttft_s"].iloc[1] == pytest.approx(0.21)


def test_slice_command_imports_and_builds_the_report(tmp_path: Path) -> None:
    log = _write_csv(tmp_path / "prod.csv")
    runner = CliRunner()
    result = runner.invoke(main, ["slice", str(log), "--map", "arrival=ts", "--map", "ttft=first_token_ms",
                                  "--map", "e2e=total_latency_ms", "--out", str(tmp_path / "sliced")])
    assert result.exit_code == 0, result.output
    assert "Prompt bucket" in result.output and "1k-4k" in result.output
    assert (tmp_path / "sliced" / "requests.parquet").exists()
    assert (tmp_path / "sliced" / "report.html").exists()
    again = runner.invoke(main, ["slice", str(tmp_path / "sliced"), "--no-report"])
    assert again.exit_code == 0, again.output
    bad = runner.invoke(main, ["slice", str(log), "--map", "ttft=nope", "--out", str(tmp_path / "x")])
    assert bad.exit_code == 2 and "'nope'" in bad.output and "first_token_ms" in bad.output
