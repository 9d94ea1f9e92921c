"""Scripted users' flows in the analyzers: summary.json's block, flow SLOs, compare, and the flow_tail rule."""

import json
import shutil

import numpy as np
import pandas as pd
import pytest

from servescope.analyzers.compare import VERDICT_FEW, VERDICT_REGRESSED, CompareSettings, compare_runs
from servescope.analyzers.context import build_context
from servescope.analyzers.flow_parts import BETWEEN_CALLS, flow_parts
from servescope.analyzers.report import build_report
from servescope.analyzers.rules import RULE_IDS, diagnose
from servescope.analyzers.rules.flow_tail import flow_tail
from servescope.analyzers.summary import summarize
from servescope.analyzers.synthetic import SyntheticSpec, write_synthetic_run
from servescope.analyzers.synthetic_flows import SCRIPT_ERROR, ScriptedSpec, scripted_rows, write_scripted_run
from servescope.rundir.reader import load_run
from servescope.slo import parse_slos


@pytest.fixture(scope="module")
def scripted_run(tmp_path_factory):
    """600 flows with call errors, script errors and 20 warm-up flows; nothing planted."""
    spec = ScriptedSpec(flows=600, seed=3, call_error_rate=0.01, script_error_rate=0.05, warmup=20)
    return write_scripted_run(tmp_path_factory.mktemp("flows") / "run", spec)


def test_generated_flows_hold_their_calls():
    calls, flows = scripted_rows(ScriptedSpec(flows=200, seed=0))
    by_flow = pd.DataFrame(calls).groupby("flow_id")
    for flow in flows:
        mine = by_flow.get_group(flow["flow_id"])
        assert len(mine) == flow["calls"]
        assert mine["sent_at"].min() >= flow["start_at"] and mine["end_at"].max() <= flow["end_at"] + 1e-12
        assert flow["duration_s"] == pytest.approx(flow["end_at"] - flow["start_at"])
    fan_out = next(f for f in flows if f["task"] == "fan_out")
    parallel = by_flow.get_group(fan_out["flow_id"]).sort_values("step").iloc[1:4]
    assert parallel["sent_at"].max() < parallel["end_at"].min()  # the fan-out's calls overlap in time


def test_summary_flows_block(scripted_run):
    run = load_run(scripted_run)
    summary = summarize(run)
    block = summary["flows"]
    assert [p["phase"] for p in block["phases"]] == ["warmup", "users=16"]
    overall = block["overall"]
    measured = run.flows[run.flows["phase"] != "warmup"]
    assert overall["flows"] == len(measured) == 580
    assert overall["status"] == {s: int((measured["status"] == s).sum()) for s in ("ok", "error", "script_error", "cancelled")}
    assert overall["status"]["script_error"] > 0 and overall["status"]["error"] > 0
    ok = measured[measured["status"] == "ok"]
    assert overall["duration_s"]["n"] == len(ok)
    assert overall["duration_s"]["p50"] == pytest.approx(np.sort(ok["duration_s"])[int(np.ceil(0.5 * len(ok))) - 1])
    assert overall["error_rate"] == pytest.approx(1 - len(ok) / len(measured))
    assert {(t["user_class"], t["task"]) for t in overall["tasks"]} == {("Agent", "tool_loop"), ("Planner", "fan_out"), ("Chat", "ask")}
    agent = next(t for t in overall["tasks"] if t["task"] == "tool_loop")
    assert agent["calls_per_flow"] <= 3 and agent["script_errors"][0]["error_type"] == SCRIPT_ERROR[0]
    assert agent["script_errors"][0]["error_location"] == SCRIPT_ERROR[2]
    assert next(t for t in overall["tasks"] if t["task"] == "fan_out")["calls_per_flow"] == 5
    json.dumps(summary)  # summary.json must stay plain JSON


def test_a_run_without_flows_has_no_flows_block(tmp_path):
    run = load_run(write_synthetic_run(tmp_path / "run", SyntheticSpec(requests=200)))
    assert summarize(run)["flows"] is None


def test_flow_slos_judge_the_flows(scripted_run):
    run = load_run(scripted_run)
    summary = summarize(run, parse_slos("flow_p99=1m,flow_p50=10ms,flow_error_rate=50%,ttft_p99=10s"))
    objectives = {o["name"]: o for o in summary["slo"]["objectives"]}
    block = summary["flows"]["overall"]
    assert objectives["flow_p99"]["ok"] and objectives["flow_p99"]["value"] == block["duration_s"]["p99"]
    assert objectives["flow_p99"]["n"] == block["duration_s"]["n"]
    assert not objectives["flow_p50"]["ok"]
    assert objectives["flow_error_rate"]["value"] == pytest.approx(block["error_rate"]) and objectives["flow_error_rate"]["ok"]
    assert objectives["flow_error_rate"]["n"] == block["flows"]
    assert summary["slo"]["ok"] is False
    # Flow objectives judge flows, not requests: a request's goodput is unaffected by them.
    plain = summarize(run, parse_slos("ttft_p99=10s"))["overall"]["goodput_req_per_s"]
    assert summary["overall"]["goodput_req_per_s"] == pytest.approx(plain)
    per_phase = {p["phase"]: p["slo"] for p in summary["phases"]}
    assert per_phase["warmup"]["objectives"][0]["n"] == summary["flows"]["phases"][0]["duration_s"]["n"]


def test_flow_slo_on_a_run_without_flows_fails(tmp_path):
    run = load_run(write_synthetic_run(tmp_path / "run", SyntheticSpec(requests=200)))
    slo = summarize(run, parse_slos("flow_p99=1h,flow_error_rate=100%"))["slo"]
    assert slo["ok"] is False
    assert all(o["value"] is None and not o["ok"] for o in slo["objectives"])


def test_flow_parts_add_up_to_the_duration():
    flows = pd.DataFrame([{"flow_id": "f", "start_at": 0.0, "end_at": 3.0, "duration_s": 3.0}])
    calls = pd.DataFrame([
        {"flow_id": "f", "step": 1, "sent_at": 0.1, "end_at": 1.0},
        {"flow_id": "f", "step": 2, "sent_at": 1.5, "end_at": 2.0},  # 2 and 3 in parallel: 3 keeps the flow waiting
        {"flow_id": "f", "step": 3, "sent_at": 1.5, "end_at": 2.6},
    ])
    parts = flow_parts(flows, calls).loc["f"]
    assert parts["step 1"] == pytest.approx(0.9)
    assert parts["step 2"] == pytest.approx(0.5)
    assert parts["step 3"] == pytest.approx(0.6)
    assert parts[BETWEEN_CALLS] == pytest.approx(1.0)
    assert parts.sum() == pytest.approx(3.0)


def test_flow_parts_of_generated_runs_add_up():
    calls, flows = scripted_rows(ScriptedSpec(flows=300, seed=4))
    flows, calls = pd.DataFrame(flows), pd.DataFrame(calls)
    parts = flow_parts(flows, calls)
    assert np.allclose(parts.sum(axis=1).to_numpy(), flows["duration_s"].to_numpy())


@pytest.mark.parametrize("task, step", [("tool_loop", 1), ("fan_out", 3), ("ask", 0)])
def test_flow_tail_names_a_planted_slow_step(tmp_path, task, step):
    run = write_scripted_run(tmp_path / "run", ScriptedSpec(flows=600, seed=step + 1, slow_step=(task, step)))
    finding = flow_tail(build_context(load_run(run)))
    assert finding is not None and finding.rule == "flow_tail"
    ev = finding.evidence
    assert ev["task"] == task and ev["part"] == f"step {step}"
    assert ev["share"] > 0.6 and ev["n"] == ev["slow_flows"] >= 5 and ev["p_value"] < 1e-3
    assert ev["duration_p50_slow_s"] > ev["duration_p50_typical_s"]
    assert ev["calls"]["slow"]["ttft_p50_s"] > ev["calls"]["typical"]["ttft_p50_s"]
    assert f"step {step}" in finding.title and finding.confidence is not None
    assert {t["name"] for t in finding.chart["data"]} >= {f"step {step}", BETWEEN_CALLS}


def test_flow_tail_names_the_time_between_calls(tmp_path):
    run = write_scripted_run(tmp_path / "run", ScriptedSpec(flows=600, seed=1, slow_between="tool_loop"))
    finding = flow_tail(build_context(load_run(run)))
    assert finding is not None and finding.evidence["part"] == BETWEEN_CALLS
    assert "calls" not in finding.evidence and "script" in finding.suggestion


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_flow_tail_is_silent_when_no_step_dominates(tmp_path, seed):
    run = load_run(write_scripted_run(tmp_path / "run", ScriptedSpec(flows=600, seed=seed)))
    assert flow_tail(build_context(run)) is None
    assert "flow_tail" in RULE_IDS and all(f.rule != "flow_tail" for f in diagnose(run))


def test_flow_tail_is_silent_without_flows(tmp_path):
    run = load_run(write_synthetic_run(tmp_path / "run", SyntheticSpec(requests=300)))
    assert flow_tail(build_context(run)) is None


def test_findings_json_carries_flow_tail(tmp_path):
    run = write_scripted_run(tmp_path / "run", ScriptedSpec(flows=600, seed=2, slow_step=("tool_loop", 2)))
    build_report(run)
    findings = json.loads((run / "findings.json").read_text())
    entry = next(f for f in findings if f["rule"] == "flow_tail")
    assert entry["evidence"]["part"] == "step 2" and entry["confidence_level"] in ("low", "medium", "high")


def test_compare_flow_durations(tmp_path):
    base = write_scripted_run(tmp_path / "base", ScriptedSpec(flows=800, seed=0))
    same = write_scripted_run(tmp_path / "same", ScriptedSpec(flows=800, seed=1))
    slower = write_scripted_run(tmp_path / "slower", ScriptedSpec(flows=800, seed=2, slow_step=("tool_loop", 0),
                                                                   slow_share=1.0, slow_factor=2.0))
    settings = CompareSettings(gates=("flow_p99",))
    quiet = compare_runs(base, same, settings)
    assert quiet.metric("flow_p99").verdict != VERDICT_REGRESSED and quiet.exit_code == 0
    moved = compare_runs(base, slower, settings)
    assert moved.metric("flow_p50").verdict == VERDICT_REGRESSED and moved.metric("flow_p50").change > 0.05
    assert moved.metric("flow_p99").failed_gate and moved.exit_code == 1
    assert moved.metric("flow_dist").n_base == int((load_run(base).flows["status"] == "ok").sum())
    by_task = {s.value: {m.name: m.verdict for m in s.metrics} for s in moved.slices if s.dimension == "task"}
    assert by_task["tool_loop"]["ttft_p50"] == VERDICT_REGRESSED  # the calls of the slowed task, sliced by task
    assert by_task["fan_out"]["ttft_p50"] != VERDICT_REGRESSED


def test_compare_without_flows_on_one_side(tmp_path):
    plain = write_synthetic_run(tmp_path / "plain", SyntheticSpec(requests=600, rate=10.0))
    none = compare_runs(plain, plain)
    assert not any(m.name.startswith("flow_") for m in none.overall)
    scripted = write_scripted_run(tmp_path / "scripted", ScriptedSpec(flows=300, seed=0))
    mixed_base = tmp_path / "mixed"
    shutil.copytree(scripted, mixed_base)
    (mixed_base / "flows.parquet").unlink()
    mixed = compare_runs(mixed_base, scripted)
    assert mixed.metric("flow_p99").verdict == VERDICT_FEW
    assert any("flows" in note for note in mixed.notes)
