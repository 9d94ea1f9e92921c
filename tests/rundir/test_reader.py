import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from servescope.rundir.reader import load_run
from servescope.rundir.schema import RunDirError
from servescope.rundir.schema import REQUEST_COLUMNS, RequestRecord, request_arrow_schema


def _records(n=5):
    return [RequestRecord(request_id=f"r{i}", phase="concurrency=1", sent_at=float(i), first_token_at=i + 0.1,
                          end_at=i + 0.5, ttft_s=0.1, e2e_s=0.5, itl_s=[0.1] * 4, chunk_tokens=[1] * 4,
                          output_tokens=5, status="ok", prompt_tokens=32).to_dict() for i in range(n)]


def test_parquet_and_jsonl_load_identically(tmp_path):
    rows = _records()
    a, b = tmp_path / "a", tmp_path / "b"
    for d in (a, b):
        d.mkdir()
        (d / "run.json").write_text(json.dumps({"status": "complete"}))
    pq.write_table(pa.Table.from_pylist(rows, schema=request_arrow_schema()), a / "requests.parquet")
    (b / "requests.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    ra, rb = load_run(a), load_run(b)
    assert list(ra.requests.columns) == list(REQUEST_COLUMNS)
    assert ra.requests.drop(columns=["itl_s", "chunk_tokens"]).equals(rb.requests.drop(columns=["itl_s", "chunk_tokens"]))
    assert np.array_equal(ra.itl_values, rb.itl_values) and ra.itl_lengths.tolist() == [4] * 5
    assert ra.server_metrics.empty and list(ra.server_metrics.columns) == ["t", "name", "labels", "value", "source"]


def test_a_run_that_died_mid_write_keeps_every_complete_line(tmp_path):
    rows = _records(3)
    text = "".join(json.dumps(r) + "\n" for r in rows) + '{"request_id": "r3", "sent_'
    (tmp_path / "requests.jsonl").write_text(text)
    (tmp_path / "run.json").write_text(json.dumps({"status": "running"}))
    run = load_run(tmp_path)
    assert run.requests["request_id"].tolist() == ["r0", "r1", "r2"]


def test_corruption_in_the_middle_is_an_error(tmp_path):
    (tmp_path / "requests.jsonl").write_text('{"request_id": "a"}\nnot json\n{"request_id": "b"}\n')
    with pytest.raises(RunDirError, match="requests.jsonl:2"):
        load_run(tmp_path)


def test_not_a_run_directory(tmp_path):
    with pytest.raises(RunDirError, match="not a run directory"):
        load_run(tmp_path)
    with pytest.raises(RunDirError, match="no such directory"):
        load_run(tmp_path / "missing")


def test_server_metrics_jsonl_with_dict_labels(tmp_path):
    (tmp_path / "run.json").write_text("{}")
    (tmp_path / "server_metrics.jsonl").write_text(
        json.dumps({"t": 1.0, "name": "vllm:num_requests_waiting", "labels": {"engine": "0"}, "value": 3}) + "\n")
    run = load_run(tmp_path)
    assert run.server_metrics.iloc[0]["labels"] == '{"engine": "0"}'
    assert run.requests.empty


def test_server_metrics_written_before_sources_existed_still_read(tmp_path):
    """A server_metrics.parquet of four columns (no `source`) loads, and the analyzers read its samples."""
    from servescope.analyzers.server_metrics import ServerMetrics

    (tmp_path / "run.json").write_text(json.dumps({"status": "complete"}))
    old = pa.table({"t": [0.0, 1.0], "name": ["vllm:num_requests_waiting"] * 2, "labels": ["{}", "{}"],
                    "value": [2.0, 5.0]})
    pq.write_table(old, tmp_path / "server_metrics.parquet")
    run = load_run(tmp_path)
    assert run.server_metrics["source"].isna().all()
    assert ServerMetrics.from_frame(run.server_metrics).gauge("waiting").tolist() == [2.0, 5.0]
