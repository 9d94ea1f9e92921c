"""The harness installs and runs without the `engine` extra (torch, triton, aiohttp; DESIGN.md).

A real `servescope run` + `servescope report` against the scripted SSE server, in
processes where importing them raises, worker processes included; and `serve` names
what it lacks.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from support.scripted_server import ScriptedServer

# The `engine` extra: torch, triton and aiohttp (the engine's HTTP server); the base install has none.
BLOCKING_ENTRY = '''
import importlib.abc
import sys


class NoTorch(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ImportError(f"{name} is blocked: the harness must not need it")


BLOCKED = {blocked!r}
sys.meta_path.insert(0, NoTorch())  # module level: spawned worker processes re-import this file

if __name__ == "__main__":
    sys.argv = ["servescope"] + sys.argv[1:]
    from servescope.cli import main

    main()
'''


def test_run_and_report_need_no_torch(tmp_path: Path) -> None:
    entry = tmp_path / "servescope_without_torch.py"
    entry.write_text(BLOCKING_ENTRY.replace("{blocked!r}", repr(("torch", "triton", "aiohttp"))))
    out = tmp_path / "run"
    with ScriptedServer() as srv:
        run = subprocess.run([sys.executable, str(entry), "run", "--target", srv.base_url, "--prompt-tokens", "32",
                              "--max-tokens", "8", "--concurrency", "4", "--requests", "20", "--out", str(out)],
                             capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["overall"]["ok"] == 20
    assert (out / "report.html").stat().st_size > 100_000
    report = subprocess.run([sys.executable, str(entry), "report", str(out)], capture_output=True, text=True, timeout=120)
    assert report.returncode == 0, report.stderr[-2000:]


@pytest.mark.parametrize("missing", ["torch", "aiohttp"])
def test_the_engine_says_what_it_needs(tmp_path: Path, missing: str) -> None:
    entry = tmp_path / "servescope_without_torch.py"
    entry.write_text(BLOCKING_ENTRY.replace("{blocked!r}", repr((missing,))))
    serve = subprocess.run([sys.executable, str(entry), "serve", "--port", "0"], capture_output=True, text=True, timeout=60)
    assert serve.returncode == 1
    assert f"needs {missing}" in serve.stderr and "pip install torch==2.13.0" in serve.stderr

