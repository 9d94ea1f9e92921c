"""compare, SLO exit codes and capacity search end to end on the real reference engine.

Two engines run for the whole module: the default one, and the same engine made
slower by `--max-num-seqs 1` (one request in the batch at a time: requests
queue behind each other, the planted regression). Prefix caching is off on
both, so repeated runs with the same seed do not get faster merely by hitting
the cache that an earlier run filled. Each engine serves one short warm-up run
first: a fresh engine's first seconds are slower (allocator, first kernels),
which would otherwise look like a regression of whichever side ran first.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from servescope.analyzers.capacity import CapacitySettings
from servescope.harness.orchestration.capacity import run_capacity
from servescope.analyzers.compare import VERDICT_REGRESSED, compare_runs
from servescope.harness.orchestration.repeat import execute_run
from servescope.harness.config import RunConfig
from servescope.harness.targets.engine import EngineProcess

pytestmark = pytest.mark.slow

ENGINE_ARGS = ("--device", "cpu", "--no-enable-prefix-caching")
REPEATS = 3


def _config(url: str, out: Path, **overrides: object) -> RunConfig:
    options = dict(target=url, prompt_tokens=128, max_tokens=64, concurrency=4, duration_s=3.0, seed=0,
                   report=False, show_progress=False, out=str(out))
    options.update(overrides)
    return RunConfig(**options)


def _engine(extra: tuple[str, ...], warm_dir: Path):
    engine = EngineProcess(extra_args=ENGINE_ARGS + extra).start()
    execute_run(_config(engine.base_url, warm_dir, duration_s=2.0))
    return engine


@pytest.fixture(scope="module")
def engines(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("warm")
    fast = _engine((), root / "fast")
    try:
        slow = _engine(("--max-num-seqs", "1"), root / "slow")
    except BaseException:
        fast.close()
        raise
    yield {"fast": fast.base_url, "slow": slow.base_url}
    fast.close()
    slow.close()


def _repeated(url: str, out: Path) -> Path:
    outcome = execute_run(_config(url, out, repeat=REPEATS))
    assert outcome.status == "complete", outcome
    return out


@pytest.fixture(scope="module")
def baseline(engines: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _repeated(engines["fast"], tmp_path_factory.mktemp("cmp") / "base")


def test_same_build_twice_does_not_flag(engines: dict[str, str], baseline: Path, tmp_path: Path) -> None:
    again = _repeated(engines["fast"], tmp_path / "again")
    result = compare_runs(baseline, again)
    assert result.exit_code == 0, [(m.name, m.change, m.verdict) for m in result.gate_failures]


def test_planted_slowdown_is_flagged(engines: dict[str, str], baseline: Path, tmp_path: Path) -> None:
    slower = _repeated(engines["slow"], tmp_path / "slower")
    result = compare_runs(baseline, slower)
    table = [(m.name, m.base, m.cand, m.change, m.ci_low, m.ci_high, m.p_value, m.verdict) for m in result.overall]
    assert result.exit_code == 1, table
    assert result.metric("ttft_p50").verdict == VERDICT_REGRESSED, table
    assert result.metric("ttft_dist").verdict == VERDICT_REGRESSED, table


def test_run_slo_exit_codes_and_goodput(engines: dict[str, str], tmp_path: Path) -> None:
    """`servescope run --slo`: exit 0 and goodput = throughput when met; exit 1 and goodput 0 when missed."""
    def run(slo: str, out: Path) -> tuple[int, dict]:
        cmd = [sys.executable, "-m", "servescope", "run", "--target", engines["fast"], "--prompt-tokens", "64",
               "--max-tokens", "8", "--concurrency", "2", "--duration", "2s", "--slo", slo, "--out", str(out), "--no-report"]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
        return proc.returncode, json.loads((out / "summary.json").read_text())

    code, summary = run("ttft_p99=60s,e2e_p99=60s", tmp_path / "lax")
    overall = summary["overall"]
    assert code == 0 and summary["slo"]["ok"]
    assert overall["goodput_req_per_s"] == pytest.approx(overall["req_per_s"])
    code, summary = run("ttft_p99=1ms", tmp_path / "strict")
    assert code == 1 and not summary["slo"]["ok"]
    assert summary["overall"]["goodput_req_per_s"] == 0.0
    assert summary["slo"]["objectives"][0]["value"] > 0.001


def test_capacity_search_brackets_the_slo(engines: dict[str, str], tmp_path: Path) -> None:
    """The found rate met the SLO; a rate at most 1.5x higher did not."""
    base = _config(engines["fast"], tmp_path / "unused", max_tokens=16, concurrency=None, rate=1.0)
    settings = CapacitySettings(slo="ttft_p99=500ms", start_rate=4.0, max_rate=128.0, step_duration_s=3.0,
                                tolerance=0.25, max_steps=8)
    result = run_capacity(base, settings, tmp_path / "cap")
    assert result.capacity_rate is not None and result.lowest_failing_rate is not None, result.stop_reason
    assert result.lowest_failing_rate <= 1.5 * result.capacity_rate
    passed = [s for s in result.steps if s.rate == result.capacity_rate]
    failed = [s for s in result.steps if s.rate == result.lowest_failing_rate]
    assert passed[-1].passed and not failed[-1].passed
    assert (tmp_path / "cap" / "capacity.html").read_text().count("plotly") > 0
    saved = json.loads((tmp_path / "cap" / "capacity.json").read_text())
    assert saved["capacity_rate"] == result.capacity_rate
