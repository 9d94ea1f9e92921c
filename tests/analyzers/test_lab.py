"""The labs on the real reference engine: the expected finding fires for the experiment, not for the control.

Each lab starts the tiny engine twice (about 20 s per lab on 2 CPU cores).
"""

import json

import pytest

from servescope.harness.orchestration.lab import LABS, run_lab
from servescope.analyzers.rules.queueing import MIN_REQUESTS as QUEUEING_MIN_REQUESTS

pytest.importorskip("torch")  # the reference engine needs it (the harness does not)


@pytest.mark.parametrize("name", list(LABS))
def test_lab_separates_experiment_from_control(name, tmp_path):
    result = run_lab(name, tmp_path / name)
    rule = LABS[name].rule
    exp_rules = [f.rule for f in result.experiment.findings]
    ctl_rules = [f.rule for f in result.control.findings]
    assert result.fired_in_experiment, f"{rule} did not fire for the experiment; findings: {exp_rules}"
    assert result.silent_in_control, f"{rule} fired for the control; findings: {ctl_rules}"
    # The lab's own claims (pd: the stall after the first token; TTFT steadier). On a 2-core host the
    # steadier-TTFT claim depends on what else the cores run, so the suite holds the others only.
    held = [c for c in result.checks if not c.claim.startswith("TTFT is steadier")]
    assert all(check.passed for check in held), result.checks
    # A control with too few requests would be silent for the wrong reason.
    assert result.control.summary["overall"]["ok"] >= (QUEUEING_MIN_REQUESTS if rule == "queueing" else 15)
    for side in ("experiment", "control"):
        run_dir = tmp_path / name / side
        assert (run_dir / "requests.parquet").exists() and (run_dir / "report.html").exists()
        assert json.loads((run_dir / "run.json").read_text())["status"] == "complete"
    html = result.report.read_text()
    assert f'id="experiment-{rule}"' in html and "as expected" in html
