"""The compare verdict line: the gate verdict first, then the largest significant changes, gated or not."""

from __future__ import annotations

from pathlib import Path

import pytest
from support.synthetic_runs import write_run

from servescope.analyzers.compare import CompareSettings, compare_runs
from servescope.analyzers.regression_report import headline, largest_changes, to_markdown


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("headline")
    return {
        "base": write_run(root / "base", seed=1),
        "same": write_run(root / "same", seed=2),
        "slow": write_run(root / "slow", seed=2, slowdown=1.2),
        "failing": write_run(root / "failing", seed=2, error_rate=0.08),
    }


def test_ungated_latency_regressions_are_named_after_the_gate_verdict(runs) -> None:
    """Only throughput is gated: it holds, so the verdict is OK, and the +20% TTFT/ITL shifts still head the line."""
    c = compare_runs(runs["base"], runs["slow"], CompareSettings(gates=("output_tok_per_s",)))
    line = headline(c)
    assert c.exit_code == 0
    assert line.startswith("OK: no gated metric regressed (output_tok_per_s); largest significant changes: ")
    changes = line.split("largest significant changes: ", 1)[1]
    named = [part.split(" ")[0] for part in changes.split(", ")]
    assert {n.split("_")[0] for n in named} >= {"ttft", "itl"}
    assert "output_tok_per_s" not in changes  # unchanged: not a significant change
    assert "regressed +" in changes and "(gate)" not in changes


def test_gate_failures_lead_and_changes_rank_by_relative_size(runs) -> None:
    c = compare_runs(runs["base"], runs["slow"])
    line = headline(c)
    assert c.exit_code == 1
    verdict, changes = line.split("; largest significant changes: ")
    assert verdict.startswith("REGRESSION: ") and "ttft_p99 (by more than 5%)" in verdict and verdict.endswith("regressed")
    ranked = largest_changes(c)
    assert [abs(m.change) for m in ranked] == sorted((abs(m.change) for m in ranked), reverse=True)
    families = [m.name.split("_")[0] for m in ranked]
    assert len(families) == len(set(families))  # each family once, by its largest change
    assert changes.split(", ")[0].startswith(f"{ranked[0].name} regressed +")
    assert "(gate)" in changes
    assert f"servescope compare: ❌ {line}" in to_markdown(c)


def test_an_error_rate_from_zero_ranks_first(runs) -> None:
    c = compare_runs(runs["base"], runs["failing"], CompareSettings(gates=("error_rate",)))
    line = headline(c)
    verdict, changes = line.split("; largest significant changes: ")
    assert verdict == "REGRESSION: error_rate (by more than 1.0 points) regressed"  # judged in points, not 5%
    assert changes.startswith("error_rate regressed +")
    assert " pt (gate)" in line


def test_no_significant_change_says_so(runs) -> None:
    line = headline(compare_runs(runs["base"], runs["same"]))
    assert line == "OK: no gated metric regressed (ttft_p99, tpot_p99, e2e_p99, output_tok_per_s); no significant change"


def test_improvements_are_named_with_their_direction(runs) -> None:
    line = headline(compare_runs(runs["slow"], runs["base"]))
    assert line.startswith("OK: ") and "improved -" in line and "regressed" not in line.split(";", 1)[1]
