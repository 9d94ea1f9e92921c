"""`servescope capacity` from the command line, against a real scripted SSE server.

The search itself is tested on the reference engine (test_real_engine.py); this
checks the command's contract: exit codes, --require as a pre-launch gate, the
files it writes, and that its report draws in a browser.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from support.browser import needs_chromium, visit
from support.scripted_server import ScriptedServer


def capacity(target: str, out: Path, *extra: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "servescope", "capacity", "--target", target, "--model", "m",
           "--prompt-tokens", "16", "--max-tokens", "4", "--start-rate", "4", "--max-rate", "16",
           "--step-duration", "1s", "--max-steps", "4", "--out", str(out), *extra]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120)


@pytest.fixture(scope="module")
def server():
    with ScriptedServer() as srv:
        yield srv


def test_require_gates_the_exit_code_and_the_report_draws(server: ScriptedServer, tmp_path: Path) -> None:
    met = capacity(server.base_url, tmp_path / "met", "--slo", "ttft_p99=5s,error_rate=1%", "--require", "8")
    assert met.returncode == 0, met.stdout + met.stderr
    saved = json.loads((tmp_path / "met" / "capacity.json").read_text())
    assert saved["capacity_rate"] >= 8
    assert all(step["passed"] for step in saved["steps"])

    short = capacity(server.base_url, tmp_path / "short", "--slo", "ttft_p99=5s", "--require", "100")
    assert short.returncode == 1
    assert "below --require 100" in short.stderr

    if needs_chromium.args[0]:  # skipif condition: no Chromium here
        return
    seen = visit(tmp_path / "met" / "capacity.html", screenshot="capacity.png",
                 selectors={"passing_steps": "#steps .badge.pass"})
    assert seen.errors == [] and seen.plots == 2
    assert seen.counts["passing_steps"] == len(saved["steps"])


def test_bad_slo_is_a_usage_error(server: ScriptedServer, tmp_path: Path) -> None:
    bad = capacity(server.base_url, tmp_path / "bad", "--slo", "ttft_p99=soon")
    assert bad.returncode == 2
    assert "ttft_p99" in bad.stderr and "duration" in bad.stderr
