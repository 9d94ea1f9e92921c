"""`servescope compare` on run directories written from known distributions."""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
from click.testing import CliRunner
from support.synthetic_runs import write_run

from servescope.analyzers.compare import (
    VERDICT_IMPROVED,
    VERDICT_REGRESSED,
    VERDICT_SAME,
    CompareInputError,
    CompareSettings,
    compare_runs,
)
from servescope.analyzers.regression_report import to_junit, to_markdown
from servescope.cli import main


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("runs")
    return {
        "base": write_run(root / "base", seed=1),
        "same": write_run(root / "same", seed=2),
        "slow": write_run(root / "slow", seed=3, slowdown=1.4),
        "fast": write_run(root / "fast", seed=4, slowdown=0.7),
        "errors": write_run(root / "errors", seed=5, error_rate=0.2),
    }


def test_same_distribution_is_not_flagged(runs: dict[str, Path]) -> None:
    c = compare_runs(runs["base"], runs["same"])
    assert c.exit_code == 0
    assert not c.gate_failures
    assert c.metric("ttft_p99").verdict == VERDICT_SAME


def test_planted_slowdown_regresses_every_latency_gate(runs: dict[str, Path]) -> None:
    c = compare_runs(runs["base"], runs["slow"])
    assert c.exit_code == 1
    assert {m.name for m in c.gate_failures} >= {"ttft_p99", "tpot_p99", "e2e_p99"}
    tpot = c.metric("tpot_p50")
    assert tpot.ci_low <= 0.4 <= tpot.ci_high  # the interval covers the planted +40%
    dist = c.metric("e2e_dist")
    assert dist.verdict == VERDICT_REGRESSED and dist.p_value < 1e-6
    # Slices see it too (short and long prompts, both tenants).
    moved = {(s.dimension, s.value) for s in c.slices if any(m.verdict == VERDICT_REGRESSED for m in s.metrics)}
    assert {("prompt_bucket", "short"), ("prompt_bucket", "long"), ("tenant", "a"), ("tenant", "b")} <= moved


def test_speedup_is_an_improvement_not_a_failure(runs: dict[str, Path]) -> None:
    c = compare_runs(runs["base"], runs["fast"])
    assert c.exit_code == 0
    assert c.metric("ttft_p50").verdict == VERDICT_IMPROVED


def test_error_rate_regression_gates_only_when_asked(runs: dict[str, Path]) -> None:
    default = compare_runs(runs["base"], runs["errors"])
    assert default.metric("error_rate").verdict == VERDICT_REGRESSED
    assert "error_rate" not in {m.name for m in default.gate_failures}
    gated = compare_runs(runs["base"], runs["errors"], CompareSettings(gates=("error_rate",)))
    assert gated.exit_code == 1


def test_repeated_run_folders_are_compared(tmp_path: Path) -> None:
    for i in range(3):
        write_run(tmp_path / "base" / f"run-{i + 1}", seed=10 + i)
        write_run(tmp_path / "cand" / f"run-{i + 1}", seed=20 + i)
        write_run(tmp_path / "slow" / f"run-{i + 1}", seed=30 + i, slowdown=1.5)
    same = compare_runs(tmp_path / "base", tmp_path / "cand")
    assert len(same.base_runs) == 3 and same.exit_code == 0
    slow = compare_runs(tmp_path / "base", tmp_path / "slow")
    assert slow.metric("e2e_p99").verdict == VERDICT_REGRESSED


def test_different_workloads_are_refused_naming_the_difference(runs: dict[str, Path], tmp_path: Path) -> None:
    other = write_run(tmp_path / "other", workload={"name": "synthetic", "classes": [{"prompt_tokens": 999, "max_tokens": 32}]})
    with pytest.raises(CompareInputError, match=r"workload\.classes\[0\]\.prompt_tokens: 256 != 999"):
        compare_runs(runs["base"], other)


def test_empty_and_missing_runs_are_refused(runs: dict[str, Path], tmp_path: Path) -> None:
    empty = write_run(tmp_path / "empty", n=20, error_rate=1.0)
    with pytest.raises(CompareInputError, match="no successful request"):
        compare_runs(runs["base"], empty)
    (tmp_path / "nothing").mkdir()
    with pytest.raises(CompareInputError, match="neither a run directory"):
        compare_runs(tmp_path / "nothing", runs["base"])


def test_cli_exit_codes_and_outputs_parse(runs: dict[str, Path], tmp_path: Path) -> None:
    cli = CliRunner()
    md, junit, html = tmp_path / "summary.md", tmp_path / "junit.xml", tmp_path / "cmp.html"
    result = cli.invoke(main, ["compare", str(runs["base"]), str(runs["slow"]), "--markdown", str(md),
                               "--junit", str(junit), "--out", str(html), "--threshold", "10%"])
    assert result.exit_code == 1, result.output
    suite = ET.parse(junit).getroot()
    cases = {c.get("name"): c for c in suite.iter("testcase")}
    assert set(cases) == {"ttft_p99", "tpot_p99", "e2e_p99", "output_tok_per_s"}
    assert cases["tpot_p99"].find("failure") is not None
    assert cases["output_tok_per_s"].find("failure") is None
    assert int(suite.get("failures")) == 3
    text = md.read_text()
    assert "REGRESSION" in text and "| TTFT p99 | gate |" in text
    page = html.read_text()
    assert page.startswith("<!doctype html>") and "plotly" in page.lower()
    data = json.loads(page.split('id="comparison-data">')[1].split("</script>")[0])
    assert data["exit_code"] == 1 and data["settings"]["threshold"] == pytest.approx(0.10)

    ok = cli.invoke(main, ["compare", str(runs["base"]), str(runs["same"]), "--gate", "ttft_p99,e2e_p99", "--out", str(html)])
    assert ok.exit_code == 0, ok.output
    bad = cli.invoke(main, ["compare", str(runs["base"]), str(tmp_path / "absent")])
    assert bad.exit_code == 2 and "no such directory" in bad.output
    usage = cli.invoke(main, ["compare", str(runs["base"]), str(runs["same"]), "--gate", "ttft_p42"])
    assert usage.exit_code == 2 and "unknown gate" in usage.output


def test_markdown_and_junit_render_without_regressions(runs: dict[str, Path]) -> None:
    c = compare_runs(runs["base"], runs["same"])
    assert to_markdown(c).startswith("## servescope compare: ✅")
    suite = ET.fromstring(to_junit(c).split("?>", 1)[1])
    assert suite.get("failures") == "0" and len(list(suite.iter("testcase"))) == 4


def test_a_percentile_needs_samples_beyond_it(tmp_path: Path) -> None:
    """120 requests a side: p99 is their second-slowest, so it gets no verdict; p50 still does."""
    base = write_run(tmp_path / "base", n=120, seed=1)
    slow = write_run(tmp_path / "slow", n=120, seed=3, slowdown=1.4)
    c = compare_runs(base, slow)
    assert c.metric("ttft_p99").verdict == "too few samples" and "500 samples a side" in c.metric("ttft_p99").note
    assert c.metric("ttft_p90").verdict == VERDICT_REGRESSED  # 50 a side suffice for p90
    assert c.metric("ttft_p50").verdict == VERDICT_REGRESSED
