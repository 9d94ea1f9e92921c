"""Rules on simulated incidents: each fires on its own incident and stays below medium on every other one."""

import pytest

from servescope.analyzers.incidents.catalogue import INCIDENTS
from servescope.analyzers.incidents.output import write_run
from servescope.analyzers.incidents.simulator import simulate
from servescope.analyzers.rules import diagnose
from servescope.rundir.reader import load_run


def _finding(tmp_path, name, seed, rule):
    run = load_run(write_run(simulate(INCIDENTS[name](seed, 2000)), tmp_path / f"{name}-{seed}", name))
    return next((f for f in diagnose(run) if f.rule == rule), None)


@pytest.mark.parametrize("seed", [0, 1])
def test_stall_fires_with_each_window(tmp_path, seed):
    f = _finding(tmp_path, "stall", seed, "stall")
    assert f is not None and f.severity == "high"
    windows = f.evidence["windows"]
    assert len(windows) >= 3  # a 6 s pause every 100 s from 50 s, over about 330 s
    assert all(5.0 < w["depth_s"] < 7.0 for w in windows)
    assert all(w["short_prompts_in_flight"] and w["long_prompts_in_flight"] for w in windows)


@pytest.mark.parametrize("name", [n for n in INCIDENTS if n != "stall"])
def test_stall_below_medium_elsewhere(tmp_path, name):
    f = _finding(tmp_path, name, 0, "stall")
    assert f is None or f.severity in ("low", "info")


@pytest.mark.parametrize("name", ["healthy", "output_tail"])
def test_tail_does_not_blame_long_outputs_for_a_long_e2e(tmp_path, name):
    f = _finding(tmp_path, name, 0, "tail")
    assert f is None or all(s["dimension"] != "output_bucket" for s in f.evidence["over_represented"])
