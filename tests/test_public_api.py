"""The public API at `servescope`: a run from Python, its run directory as frames, the contract's checks."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from support.slow_server import SlowServer

import servescope
from servescope.rundir.jsonio import write_json_atomic


@pytest.fixture(scope="module")
def server():
    with SlowServer("--first-token-delay", "0.02", "--itl", "0.002") as srv:
        yield srv


def test_importing_servescope_is_cheap() -> None:
    """Worker processes import the package root: it must not pull pandas, pyarrow or the harness in."""
    code = ("import sys, servescope; heavy = [m for m in ('pandas', 'pyarrow', 'numpy', 'servescope.harness.api') "
            "if m in sys.modules]; print(heavy)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert out.stdout.strip() == "[]"


def test_public_names_resolve() -> None:
    for name in servescope.__all__:
        assert getattr(servescope, name) is not None, name
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        servescope.nope  # noqa: B018


def test_run_from_python_and_read_it_back(server: SlowServer, tmp_path: Path) -> None:
    outcome = servescope.run(target=server.base_url, model="m", prompt_tokens=16, max_tokens=4, rate=20,
                             requests=12, out=str(tmp_path / "run"), report=False)
    assert outcome.status == "complete" and outcome.exit_code == 0
    run = servescope.load_run(outcome.run_dir)
    assert run.run["format_version"] == servescope.FORMAT_VERSION
    assert tuple(run.requests.columns) == servescope.REQUEST_COLUMNS
    assert len(run.requests) == 12 and (run.requests["status"] == "ok").all()
    ok = run.requests
    # open loop: latency from the scheduled send time includes the generator's own lateness
    assert (ok["ttft_from_scheduled_s"] >= ok["ttft_s"] - 1e-9).all()
    assert (ok["e2e_from_scheduled_s"] - ok["e2e_s"] - ok["schedule_lag_s"]).abs().max() < 1e-6
    assert set(run.server_metrics.columns) == {"t", "name", "labels", "value", "source"}


def test_bad_options_raise_a_usage_error_before_anything_is_written(tmp_path: Path) -> None:
    with pytest.raises(servescope.UsageError, match="--rate"):
        servescope.run(target="http://127.0.0.1:9", model="m", rate=-1, out=str(tmp_path / "never"))
    assert not (tmp_path / "never").exists()


def _run_dir(tmp_path: Path, **run_json: object) -> Path:
    from servescope.analyzers.synthetic import SyntheticSpec, write_synthetic_run

    out = write_synthetic_run(tmp_path / "r", SyntheticSpec(requests=20))
    meta = json.loads((out / "run.json").read_text())
    meta.update(run_json)
    write_json_atomic(out / "run.json", {k: v for k, v in meta.items() if v is not None})
    return out


def test_a_newer_format_is_refused_with_a_clear_message(tmp_path: Path) -> None:
    out = _run_dir(tmp_path, format_version=servescope.FORMAT_VERSION + 1)
    with pytest.raises(servescope.RunDirError, match="upgrade servescope"):
        servescope.load_run(out)


def test_a_run_from_before_format_version_reads_as_version_1(tmp_path: Path) -> None:
    out = _run_dir(tmp_path, format_version=None)
    assert "format_version" not in json.loads((out / "run.json").read_text())
    assert len(servescope.load_run(out).requests) == 20


@pytest.mark.parametrize("bad", ["2", 0, True])
def test_a_malformed_format_version_is_refused(tmp_path: Path, bad: object) -> None:
    with pytest.raises(servescope.RunDirError, match="format_version"):
        servescope.load_run(_run_dir(tmp_path, format_version=bad))


def test_json_files_are_nan_safe_and_atomic(tmp_path: Path) -> None:
    import numpy as np

    path = write_json_atomic(tmp_path / "x.json", {"a": float("nan"), "b": np.float32(1.5), "c": [np.inf, 2]})
    assert json.loads(path.read_text()) == {"a": None, "b": 1.5, "c": [None, 2]}
    assert not list(tmp_path.glob("*.tmp"))
