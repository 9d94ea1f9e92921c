"""Agent-trace replay end to end: `servescope run --trace` of OTel spans and agent graphs against a real local server."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner
from support.otlp import call, span, write_otlp
from support.scripted_server import ScriptedServer

from servescope.cli import main
from servescope.harness.config import RunConfig
from servescope.harness.orchestration.repeat import execute_run
from servescope.rundir.reader import load_run
from servescope.workloads.tokenizer import load_tokenizer

pytestmark = pytest.mark.timeout(180)

ITL_S = 0.004  # the server's gap between tokens: a call of n tokens takes about (n - 1) * ITL_S
TOLERANCE_S = 0.008  # "within a few ms" on a shared two-core test machine

# An agent: plan, a tool (not a call), two searches in parallel, a join; a second trace starts 300 ms later.
# Gaps (ms): plan -> a 120, plan -> b 130 (b starts while a runs), max(a, b) -> answer 200; plan starts 20 after the agent span.
RECORDED_GAPS = {"a": 0.120, "b": 0.130, "answer": 0.200}


def _agent(trace: str, t: float) -> list[dict]:
    return [
        span(trace, f"{trace}-agent", "", "invoke_agent researcher", t, t + 900,
             gen_ai__operation__name="invoke_agent", gen_ai__agent__name="researcher"),
        call(trace, f"{trace}-plan", f"{trace}-agent", t + 20, t + 120, inputs=180, outputs=6),
        span(trace, f"{trace}-tool", f"{trace}-agent", "execute_tool search", t + 120, t + 200,
             gen_ai__operation__name="execute_tool"),
        call(trace, f"{trace}-a", f"{trace}-agent", t + 240, t + 400, inputs=260, outputs=10),
        call(trace, f"{trace}-b", f"{trace}-agent", t + 250, t + 380, inputs=240, outputs=4, model="gpt-4o-mini"),
        call(trace, f"{trace}-answer", f"{trace}-agent", t + 600, t + 700, inputs=420, outputs=8),
    ]


@pytest.fixture(scope="module")
def server():
    with ScriptedServer(default_script={"itl_s": ITL_S}) as srv:
        yield srv


def _replay(server: ScriptedServer, trace: Path, out: Path, **options) -> tuple[int, object]:
    outcome = execute_run(RunConfig(target=server.base_url, model="scripted", trace=str(trace), out=str(out),
                                    report=False, show_progress=False, **options))
    return outcome.exit_code, load_run(out)


@pytest.mark.parametrize("speed", [1.0, 2.0])
def test_otel_spans_replay_their_order_gaps_and_parallel_siblings(tmp_path, server, speed):
    path = write_otlp(tmp_path / "agent.json", _agent("t1", 0) + _agent("t2", 300))
    code, run = _replay(server, path, tmp_path / "run", trace_speed=speed)
    assert code == 0
    flows = run.flows.set_index("flow_id")
    assert sorted(flows.index) == ["t1", "t2"]
    assert (flows["user_class"] == "agent-svc").all() and (flows["task"] == "researcher").all()
    assert (flows["calls"] == 4).all() and (flows["status"] == "ok").all()
    assert abs(flows.loc["t2", "start_at"] - flows.loc["t1", "start_at"] - 0.300 / speed) < TOLERANCE_S
    tok = load_tokenizer(None)
    for flow_id, calls in run.requests.groupby("flow_id"):
        calls = calls.sort_values("step").set_index(calls.sort_values("step")["step"])
        assert list(calls.index) == [0, 1, 2, 3] and (calls["user_class"] == "agent-svc").all()
        plan, a, b, answer = (calls.loc[i] for i in range(4))
        # the first call keeps its offset from the trace's start; each child its gap after its parents
        assert abs(plan["sent_at"] - flows.loc[flow_id, "scheduled_at"] - 0.020 / speed) < TOLERANCE_S
        for child, parents, gap in ((a, [plan], RECORDED_GAPS["a"]), (b, [plan], RECORDED_GAPS["b"]),
                                    (answer, [a, b], RECORDED_GAPS["answer"])):
            last_end = max(p["end_at"] for p in parents)
            assert child["sent_at"] >= last_end
            assert abs(child["sent_at"] - last_end - gap / speed) < TOLERANCE_S, (flow_id, child["step"])
        # the server saw the same gap between the parent's last chunk and the child's first
        plan_done = server.write_log(plan["response_id"])[-1]
        a_first = server.write_log(a["response_id"])[0]
        assert abs(a_first - plan_done - RECORDED_GAPS["a"] / speed) < 2 * TOLERANCE_S
        assert max(a["sent_at"], b["sent_at"]) < min(a["end_at"], b["end_at"]), "the siblings overlap"
        # token-exact prompts and forced output lengths, as recorded
        for row, (inputs, outputs) in zip((plan, a, b, answer), ((180, 6), (260, 10), (240, 4), (420, 8))):
            body = server.bodies(row["response_id"])
            assert tok.count_chat(body["messages"]) == inputs == row["prompt_tokens"]
            assert body["max_tokens"] == body["min_tokens"] == outputs == row["output_tokens"]
    meta = json.loads((tmp_path / "run" / "run.json").read_text())
    assert meta["workload"]["trace_format"] == "otel" and meta["workload"]["calls"] == 8
    assert meta["workload"]["recorded_models"] == {"gpt-4o": 6, "gpt-4o-mini": 2}
    assert meta["users"]["flows"] == 2


def test_agent_graph_jsonl_replays_through_the_cli(tmp_path, server):
    path = tmp_path / "graph.jsonl"
    nodes = [{"trace": "g", "id": "root", "input_tokens": 90, "output_tokens": 3, "api": "completions",
              "user_class": "bot", "task": "triage", "model": "small"},
             {"trace": "g", "id": "x", "parents": ["root"], "delay_s": 0.05, "input_tokens": 120, "output_tokens": 3},
             {"trace": "g", "id": "y", "parents": ["root"], "delay_s": 0.05, "input_tokens": 130, "output_tokens": 3},
             {"trace": "h", "id": 1, "input_tokens": 60, "output_tokens": 2, "trace_start_s": 0.1}]
    path.write_text("".join(json.dumps(n) + "\n" for n in nodes))
    result = CliRunner().invoke(main, ["run", "--target", server.base_url, "--model", "scripted", "--trace", str(path),
                                       "--out", str(tmp_path / "run"), "--no-report"])
    assert result.exit_code == 0, result.output
    run = load_run(tmp_path / "run")
    assert sorted(run.flows["flow_id"]) == ["g", "h"] and (run.flows["status"] == "ok").all()
    g = run.requests[run.requests["flow_id"] == "g"].sort_values("step")
    assert list(g["api"]) == ["completions", "chat", "chat"] and set(g["task"]) == {"triage"}
    assert (g["sent_at"].iloc[1:] >= g["end_at"].iloc[0] + 0.05).all()


@pytest.mark.parametrize("content, name, args, message", [
    ('{"prompt": "hello"}\n', "p.jsonl", [], "cannot tell what kind of trace this is"),
    (None, "nocount.json", [], "has no gen_ai.usage.output_tokens"),
    ('{"trace": 1, "id": "a", "parents": ["b"], "input_tokens": 5, "output_tokens": 1}\n'
     '{"trace": 1, "id": "b", "parents": ["a"], "input_tokens": 5, "output_tokens": 1}\n', "cycle.jsonl", [],
     "the parent links form a cycle"),
    ('{"trace": 1, "id": "a", "input_tokens": 5, "output_tokens": 1}\n', "g.jsonl", ["--trace-format", "otel"],
     "not an OTLP traces export"),
])
def test_bad_trace_files_are_exit_2_naming_the_problem(tmp_path, content, name, args, message):
    path = tmp_path / name
    if content is None:
        write_otlp(path, [call("t", "s1", "", 0, 10, inputs=10, outputs=None)])
    else:
        path.write_text(content)
    result = CliRunner().invoke(main, ["run", "--target", "http://127.0.0.1:9", "--model", "m", "--trace", str(path),
                                       *args, "--out", str(tmp_path / "never")])
    assert result.exit_code == 2, result.output
    assert message in result.output and name in result.output
    assert not (tmp_path / "never").exists()


def test_trace_format_needs_a_trace(tmp_path):
    result = CliRunner().invoke(main, ["run", "--target", "http://127.0.0.1:9", "--model", "m", "--trace-format", "otel",
                                       "--out", str(tmp_path / "never")])
    assert result.exit_code == 2 and "--trace-format says what the --trace FILE is" in result.output
