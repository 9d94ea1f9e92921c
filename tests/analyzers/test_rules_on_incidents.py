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


@pytest.mark.parametrize("seed", range(5))
def test_rate_limit_names_the_refused_tenant_when_and_retry_after(tmp_path, seed):
    run = load_run(write_run(simulate(INCIDENTS["rate_limit"](seed, 2000)), tmp_path / f"rl-{seed}", "rate_limit"))
    found = {f.rule: f for f in diagnose(run)}
    f = found["rate_limit"]
    assert f.severity in ("high", "medium")
    top = f.evidence["by_tenant"][0]
    assert top["tenant"] == "team-c" and top["share_of_refused"] == 1.0 and top["share_of_tenant"] > 0.3
    assert f.evidence["retry_after"]["median_s"] == 1.0
    # team-c bursts for 15 s a minute: the largest windows are about that long
    largest = max(f.evidence["windows"], key=lambda w: w["refused"])
    assert largest["refused"] > 50 and 10 < largest["end_s"] - largest["start_s"] < 30
    # the 429s are the whole story: `errors` leaves them to this rule
    assert "errors" not in found or found["errors"].severity in ("low", "info")


@pytest.mark.parametrize("name", [n for n in INCIDENTS if n != "rate_limit"])
def test_rate_limit_below_medium_elsewhere(tmp_path, name):
    f = _finding(tmp_path, name, 0, "rate_limit")
    assert f is None or f.severity in ("low", "info")


@pytest.mark.parametrize("seed", range(5))
def test_slice_outlier_names_the_slow_model_by_per_token_latency(tmp_path, seed):
    f = _finding(tmp_path, "slow_model", seed, "slice_outlier")
    assert f is not None and f.severity in ("high", "medium")
    top = f.evidence["outliers"][0]
    assert (top["dimension"], top["value"], top["metric"]) == ("model", "llama-8b-ft", "tpot_s")
    assert 1.9 < top["ratio"] < 2.5
    # the tenants share the models alike: none of them is blamed for the model's decode
    assert all(e["dimension"] == "model" for e in f.evidence["outliers"])


@pytest.mark.parametrize("seed", range(5))
def test_slice_outlier_names_the_noisy_tenant_by_ttft(tmp_path, seed):
    f = _finding(tmp_path, "noisy_tenant", seed, "slice_outlier")
    assert f is not None and f.severity in ("high", "medium")
    top = f.evidence["outliers"][0]
    assert (top["dimension"], top["value"], top["metric"]) == ("tenant", "team-c", "ttft_s")


@pytest.mark.parametrize("name", [n for n in INCIDENTS if n not in ("slow_model", "noisy_tenant")])
def test_slice_outlier_below_medium_elsewhere(tmp_path, name):
    f = _finding(tmp_path, name, 0, "slice_outlier")
    assert f is None or f.severity in ("low", "info")


@pytest.mark.parametrize("seed", [0, 3])
def test_preemption_on_a_saturated_run_is_lowered_below_queueing(tmp_path, seed):
    run = load_run(write_run(simulate(INCIDENTS["queueing"](seed, 8000)), tmp_path / f"queueing-{seed}", "queueing"))
    found = {f.rule: f for f in diagnose(run)}
    assert found["queueing"].severity == "high"
    # It fires high alone; the backlog explains the slow requests, and preemption a small fraction of them.
    assert found["preemption"].severity == "low"
    assert "`queueing` explains more of the slow requests" in found["preemption"].summary
    shares = found["preemption"].evidence["explained_by"]
    assert shares["rule"] == "queueing" and shares["own_explained_share"] < 0.1 * shares["explained_share"]
    assert "_affected" not in found["preemption"].to_dict() and 0 < found["preemption"].to_dict()["confidence"] <= 1
