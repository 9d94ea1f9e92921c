"""requests.jsonl rows: plain rows go straight through the C encoder; rows it refuses are still written as JSON."""

from __future__ import annotations

import json
import math

import numpy as np

from servescope.rundir.writer import RunDirWriter


def test_rows_with_nan_and_numpy_values_are_written_as_plain_json(tmp_path):
    writer = RunDirWriter(tmp_path / "run")
    writer.start({"command_line": "test"})
    rows = [
        {"request_id": "a", "ttft_s": 0.25, "itl_s": [0.01, 0.02], "status": "ok"},
        {"request_id": "b", "ttft_s": math.nan, "itl_s": [math.inf], "status": "error"},
        {"request_id": "c", "ttft_s": np.float64(0.5), "output_tokens": np.int64(3), "itl_s": np.array([0.1])},
    ]
    writer.add_records(rows)
    writer.requests.close()
    lines = [json.loads(line) for line in (tmp_path / "run" / "requests.jsonl").read_text().splitlines()]
    assert lines[0] == rows[0]
    assert lines[1]["ttft_s"] is None and lines[1]["itl_s"] == [None]  # NaN and inf are not JSON: null
    assert lines[2] == {"request_id": "c", "ttft_s": 0.5, "output_tokens": 3, "itl_s": [0.1]}
