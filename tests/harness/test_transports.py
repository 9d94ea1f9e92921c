"""`servescope run --transport`: every HTTP client the harness ships drives a whole run."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from support.scripted_server import ScriptedServer


def test_the_fallback_transports_drive_a_whole_run(tmp_path: Path) -> None:
    """`--transport httpx|aiohttp` reach the workers and measure the same stream."""
    with ScriptedServer() as srv:
        for transport in ("httpx", "aiohttp"):
            out = tmp_path / transport
            run = subprocess.run([sys.executable, "-m", "servescope", "run", "--target", srv.base_url, "--prompt-tokens", "16",
                                  "--max-tokens", "4", "--concurrency", "2", "--requests", "6", "--transport", transport,
                                  "--no-report", "--out", str(out)], capture_output=True, text=True, timeout=120)
            assert run.returncode == 0, run.stderr[-2000:]
            meta = json.loads((out / "run.json").read_text())
            assert meta["config"]["transport"] == transport
            assert {w["transport"] for w in meta["prewarm"]} == {transport}  # what the workers really used
            assert json.loads((out / "summary.json").read_text())["overall"]["ok"] == 6
