import numpy as np
import pytest

from servescope.analyzers.summary import summarize
from servescope.slo import SLOError, evaluate, parse_slos, slos_from_run


def test_parse_the_documented_example():
    slos = parse_slos("ttft_p99=500ms,tpot_p99=50ms,e2e_p99=2s,error_rate=0.1%")
    assert [(s.metric, s.stat, s.threshold) for s in slos] == [
        ("ttft_s", "p99", 0.5), ("tpot_s", "p99", 0.05), ("e2e_s", "p99", 2.0), ("error_rate", "rate", pytest.approx(0.001)),
    ]
    assert parse_slos("itl_p99.9=1m, ttft_mean=250us")[0].threshold == 60.0
    assert parse_slos("ttft_p999=0.5")[0].stat == "p99.9"  # bare number: seconds, like every CLI duration
    assert parse_slos("") == [] and parse_slos(None) == []


@pytest.mark.parametrize("text, fragment", [
    ("ttft=500ms", "unknown objective"),
    ("ttft_p98=500ms", "unknown objective"),
    ("ttft_p99", "expected KEY=VALUE"),
    ("ttft_p99=fast", "not a duration"),
    ("error_rate=lots", "fraction"),
    ("error_rate=150%", r"fraction in \[0, 1\]"),
    ("ttft_p99=1s,ttft_p99=2s", "more than once"),
    ("ttft_p99=0ms", "positive"),
])
def test_bad_slos_say_what_is_wrong(text, fragment):
    with pytest.raises(SLOError, match=fragment):
        parse_slos(text)


def test_no_data_fails_an_objective():
    verdict = evaluate(parse_slos("ttft_p99=1s"), {"ttft_s": {"n": 0, "p99": None}}, 0.0)
    assert verdict["ok"] is False and verdict["objectives"][0]["value"] is None


def test_slos_recorded_in_run_json_are_used(sim):
    sim.steady(n=100, ttft=0.02)
    run = sim.run(slo="ttft_p99=10ms")
    assert [s.name for s in slos_from_run(run.run)] == ["ttft_p99"]
    summary = summarize(run)
    assert summary["slo"]["ok"] is False
    assert summary["overall"]["goodput_req_per_s"] == 0.0
    assert summarize(run, parse_slos("ttft_p99=1s"))["slo"]["ok"] is True


def test_goodput_counts_only_requests_meeting_every_slo(sim):
    t = 0.0
    for i in range(200):
        t += 0.1
        sim.add(t, ttft=0.5 if i % 4 == 0 else 0.05)  # a quarter are too slow
    s = summarize(sim.run(), parse_slos("ttft_p99=100ms"))["overall"]
    assert s["goodput_req_per_s"] == pytest.approx(0.75 * s["req_per_s"], rel=0.05)
    assert s["slo"]["ok"] is False and s["slo"]["objectives"][0]["n"] == 200


def test_itl_slo_judges_each_requests_largest_gap(sim):
    for i in range(50):
        gaps = [0.01] * 9 if i % 2 else [0.01] * 8 + [0.3]
        sim.add(i * 0.2, ttft=0.02, out=10, gaps=gaps)
    s = summarize(sim.run(), parse_slos("itl_p99=100ms"))["overall"]
    ok_inside = s["goodput_req_per_s"] / s["req_per_s"]
    assert 0.4 < ok_inside < 0.6
    assert np.isclose(s["metrics"]["itl_s"]["n"], 50 * 9)


def test_flow_objectives_parse():
    slos = parse_slos("flow_p99=30s,flow_p50=5s,flow_error_rate=2%")
    assert [(s.name, s.metric, s.stat, s.threshold) for s in slos] == [
        ("flow_p99", "flow_duration_s", "p99", 30.0), ("flow_p50", "flow_duration_s", "p50", 5.0),
        ("flow_error_rate", "flow_error_rate", "rate", pytest.approx(0.02)),
    ]
    with pytest.raises(SLOError, match="flow_error_rate"):
        parse_slos("flow_error_rate=soon")
    with pytest.raises(SLOError, match=r"fraction in \[0, 1\]"):
        parse_slos("flow_error_rate=120%")
    with pytest.raises(SLOError, match="flow"):
        parse_slos("flow_p98=1s")  # the message lists flow among the metrics


def test_flow_objectives_round_trip_through_run_json():
    recorded = [s.to_dict() for s in parse_slos("flow_p90=2s,flow_error_rate=1%")]
    assert slos_from_run({"slo": {"objectives": recorded}}) == parse_slos("flow_p90=2s,flow_error_rate=1%")


def test_from_scheduled_objectives_judge_what_users_saw(sim):
    slos = parse_slos("ttft_sched_p99=100ms,e2e_sched_p999=1s")
    assert [(s.metric, s.stat) for s in slos] == [("ttft_from_scheduled_s", "p99"), ("e2e_from_scheduled_s", "p99.9")]
    t = 0.0
    for i in range(200):
        t += 0.1
        late = 0.2 if i % 4 == 0 else 0.0  # a quarter left 200 ms after their scheduled time
        sim.add(t + late, ttft=0.05, scheduled_at=t)  # no from-scheduled columns: derived from scheduled_at
    s = summarize(sim.run(), parse_slos("ttft_sched_p99=100ms"))["overall"]
    assert s["metrics"]["ttft_s"]["p99"] == pytest.approx(0.05)  # from the send, every request looks fine
    assert s["slo"]["ok"] is False and s["slo"]["objectives"][0]["value"] == pytest.approx(0.25)
    assert s["goodput_req_per_s"] == pytest.approx(0.75 * s["req_per_s"], rel=0.05)
    with pytest.raises(SLOError, match="ttft_sched"):
        parse_slos("ttft_late_p99=1s")  # the message lists the metrics, the scheduled ones among them
