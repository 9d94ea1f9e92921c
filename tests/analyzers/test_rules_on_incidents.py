"""Rules on simulated incidents: each fires on its own incident and stays below medium on every other one,
judged on run directories and on production-style logs imported as `servescope slice` does."""

import pytest

from servescope.analyzers.incidents.catalogue import EXPECTED, INCIDENTS, UNSEEN_IN_LOG, expected
from servescope.analyzers.incidents.output import write_log, write_run
from servescope.analyzers.incidents.simulator import simulate
from servescope.analyzers.rules import diagnose
from servescope.harness.orchestration.log_import import import_log
from servescope.rundir.reader import load_run

MEDIUM_OR_ABOVE = ("high", "medium")


def _finding(tmp_path, name, seed, rule, size=2000):
    return _findings(tmp_path, name, seed, size).get(rule)


def _findings(tmp_path, name, seed, size=2000):
    run = load_run(write_run(simulate(INCIDENTS[name](seed, size)), tmp_path / f"{name}-{size}-{seed}", name))
    return {f.rule: f for f in diagnose(run)}


@pytest.mark.parametrize(("seed", "size"), [(0, 2000), (1, 2000), (2, 2000), (3, 8000)])
@pytest.mark.parametrize("name", list(INCIDENTS))
def test_every_rule_names_its_planted_cause_and_nothing_else(tmp_path, name, seed, size):
    """The confusion matrix, one run at a time: planted rules at medium or above, every other rule below."""
    found = _findings(tmp_path, name, seed, size)
    named = {rule for rule, f in found.items() if f.severity in MEDIUM_OR_ABOVE}
    assert named == EXPECTED[name], {rule: (f.severity, f.title) for rule, f in found.items()}


@pytest.mark.parametrize("seed", [0, 1])
def test_stall_fires_with_each_window(tmp_path, seed):
    f = _finding(tmp_path, "stall", seed, "stall")
    assert f is not None and f.severity == "high"
    windows = f.evidence["windows"]
    assert len(windows) >= 3  # a 6 s pause every 100 s from 50 s, over about 330 s
    assert all(5.0 < w["depth_s"] < 7.0 for w in windows)
    assert all(w["short_prompts_in_flight"] and w["long_prompts_in_flight"] for w in windows)


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


@pytest.mark.parametrize("seed", range(5))
def test_queueing_names_each_burst_of_the_noisy_tenant_and_who_drove_it(tmp_path, seed):
    found = _findings(tmp_path, "noisy_tenant", seed)
    f = found["queueing"]
    assert f.severity == "high" and "team-c" in f.title
    # team-c bursts for the last 10 s of every minute; about 333 s of run hold five bursts, from 50 s
    bursts = [50.0 + 60.0 * k for k in range(5)]
    episodes = f.evidence["episodes"]
    assert len(episodes) == f.evidence["episodes_total"] == len(bursts)
    for burst, ep in zip(bursts, episodes):
        assert burst - 6 < ep["start_s"] < burst + 5 and burst < ep["peak_at_s"] <= burst + 12
        assert ep["in_flight_peak"] - ep["in_flight_start"] > 40 and ep["arrival_rate"] > 2 * ep["calm_arrival_rate"]
        assert ep["ttft_p50_s"] > 10 * f.evidence["calm_ttft_p50_s"]
        assert ep["drivers"][0]["tenant"] == "team-c"
    top = f.evidence["drivers"][0]
    assert top["tenant"] == "team-c" and top["share_of_excess"] > 0.8
    # every tenant's requests wait in the bursts: the finding claims them all, far more than team-c sends
    assert f.evidence["delayed_share"] > 0.3
    # both planted causes stand: the tenant's own slowness and the queue its bursts make
    assert found["slice_outlier"].severity in MEDIUM_OR_ABOVE


@pytest.mark.parametrize("name", ["stall", "output_tail"])
def test_queueing_finds_no_burst_where_arrivals_kept_their_rate(tmp_path, name):
    """A stall makes everyone wait with no burst; long outputs fill the slots now and then at the usual rate."""
    for seed in range(3):
        f = _finding(tmp_path, name, seed, "queueing")
        assert f is None or f.severity in ("low", "info")


@pytest.mark.parametrize("seed", range(5))
def test_convoy_decode_stall_is_about_twice_the_short_requests_wait(tmp_path, seed):
    """Decodes wait out a whole long prefill; a short request sent into one, the rest of it."""
    f = _finding(tmp_path, "convoy", seed, "convoy")
    assert f.severity == "high"
    assert 1.5 < f.evidence["stall_share_of_wait"] < 3.0 and f.evidence["itl_gap_ratio"] > 10


def test_stall_leaves_long_prefills_back_to_back_to_convoy(tmp_path):
    """Seed 7 holds a 2.1 s silence that three 16k-token prompts' first tokens end: prefill, not a stop."""
    found = _findings(tmp_path, "convoy", 7)
    assert found["convoy"].severity == "high"
    assert "stall" not in found or found["stall"].severity in ("low", "info")


def _log_findings(tmp_path, name, seed, size=2000):
    """The incident as an on-call engineer has it: a CSV request log (no token gaps, no server metrics), imported."""
    log = write_log(simulate(INCIDENTS[name](seed, size)), tmp_path / f"{name}-{size}-{seed}.csv")
    return {f.rule: f for f in diagnose(load_run(import_log(log, tmp_path / f"{name}-{size}-{seed}-log")))}


@pytest.mark.parametrize(("seed", "size"), [(0, 2000), (5, 8000)])
@pytest.mark.parametrize("name", list(INCIDENTS))
def test_every_rule_on_a_production_log_names_what_the_log_can_show_and_nothing_else(tmp_path, name, seed, size):
    found = _log_findings(tmp_path, name, seed, size)
    named = {rule for rule, f in found.items() if f.severity in MEDIUM_OR_ABOVE}
    assert named == expected(name, "log"), {rule: (f.severity, f.title) for rule, f in found.items()}


def test_what_a_log_cannot_show_is_a_planted_cause_with_a_reason():
    for name, reasons in UNSEEN_IN_LOG.items():
        assert reasons and set(reasons) <= EXPECTED[name], name
        assert all(len(reason) > 40 for reason in reasons.values())
        assert expected(name, "log") == EXPECTED[name] - set(reasons)
    assert all(expected(name, "run") == EXPECTED[name] for name in INCIDENTS)
    with pytest.raises(ValueError, match="use one of run, log"):
        expected("convoy", "jsonl")


@pytest.mark.parametrize("seed", range(3))
def test_convoy_on_a_log_short_first_tokens_follow_the_long_prefill(tmp_path, seed):
    """No gaps to check the decodes: once the long prompt's first token is out, a short request caught behind it
    takes what a short request takes with no long prefill in flight."""
    f = _log_findings(tmp_path, "convoy", seed)["convoy"]
    assert f.severity == "high" and "itl_gap_ratio" not in f.evidence
    after, clear = f.evidence["short_wait_after_long_first_token_p50_s"], f.evidence["short_ttft_p50_clear_s"]
    assert 0.5 * clear < after < 1.5 * clear


@pytest.mark.parametrize("name", ["queueing", "noisy_tenant"])
@pytest.mark.parametrize("seed", range(3))
def test_convoy_on_a_log_leaves_a_queue_alone(tmp_path, name, seed):
    """Short requests behind long prompts wait in a queue too, but their first tokens come seconds after the long
    prompt's, whenever a slot frees: the queue is named, not a convoy."""
    found = _log_findings(tmp_path, name, seed, 8000)
    assert "convoy" not in found
    assert found["queueing"].severity == "high"
