"""Agent traces: OTel GenAI spans and the JSONL agent graph -> call graphs -> token-exact replay flows."""

from __future__ import annotations

import json

import pytest
from support.otlp import call, span, write_otlp

from servescope.harness.config import TRACE_FORMATS as CLI_TRACE_FORMATS
from servescope.workloads.agent_graph import read_agent_graph
from servescope.workloads.agent_replay import replay_flows
from servescope.workloads.errors import WorkloadError
from servescope.workloads.otel_spans import read_otel_spans
from servescope.workloads.tokenizer import load_tokenizer
from servescope.workloads.trace_formats import TRACE_FORMATS, detect_trace_format, open_trace


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer(None)


def _agent_spans(trace: str = "t1", at_ms: float = 0.0) -> list[dict]:
    """plan -> tool -> (search-a || search-b) -> answer, under one agent span."""
    t = at_ms
    return [
        span(trace, "agent", "", "invoke_agent planner", t, t + 600, gen_ai__operation__name="invoke_agent",
             gen_ai__agent__name="planner"),
        call(trace, "plan", "agent", t + 10, t + 110, inputs=200, outputs=12),
        span(trace, "tool", "agent", "execute_tool search", t + 110, t + 150, gen_ai__operation__name="execute_tool"),
        call(trace, "a", "agent", t + 160, t + 260, inputs=300, outputs=8),
        call(trace, "b", "agent", t + 165, t + 250, inputs=310, outputs=9, model="gpt-4o-mini"),
        call(trace, "answer", "agent", t + 340, t + 400, inputs=500, outputs=20),
    ]


def test_otel_calls_wait_for_what_ended_before_them(tmp_path):
    path = write_otlp(tmp_path / "spans.json", _agent_spans() + _agent_spans("t2", at_ms=1000))
    traces = read_otel_spans(path)
    assert [t.trace_id for t in traces] == ["t1", "t2"] and traces[1].start_s - traces[0].start_s == pytest.approx(1.0)
    t1 = traces[0]
    assert (t1.user_class, t1.task) == ("agent-svc", "planner")
    calls = {c.call_id: c for c in t1.calls}
    assert [c.call_id for c in t1.calls] == ["plan", "a", "b", "answer"]
    assert calls["plan"].parents == () and calls["plan"].delay_s == pytest.approx(0.010)  # from the agent span's start
    assert calls["a"].parents == ("plan",) and calls["a"].delay_s == pytest.approx(0.050)
    assert calls["b"].parents == ("plan",) and calls["b"].delay_s == pytest.approx(0.055)  # overlapped a: no link
    # the join waits for both siblings; plan is reached through them, so it is not a direct parent
    assert set(calls["answer"].parents) == {"a", "b"} and calls["answer"].delay_s == pytest.approx(0.080)
    assert (calls["plan"].input_tokens, calls["plan"].output_tokens, calls["plan"].api) == (200, 12, "chat")
    assert t1.models == {"gpt-4o": 3, "gpt-4o-mini": 1}


def test_otel_wrapper_spans_legacy_counts_and_links(tmp_path):
    spans = [
        # a framework's chat span wrapping the client's own: one request, the inner span is the call
        call("t", "outer", "", 0, 100, inputs=50, outputs=5),
        call("t", "inner", "outer", 5, 95, inputs=None, outputs=None, operation="text_completion",
             gen_ai__usage__prompt_tokens=48, gen_ai__usage__completion_tokens=4),
        # overlaps `inner` in time but names it as a link: it waits for it
        call("t", "linked", "", 50, 160, inputs=70, outputs=3, links=("inner",)),
        span("t", "emb", "", "embeddings", 0, 10, gen_ai__operation__name="embeddings",
             gen_ai__usage__input_tokens=9),
    ]
    (trace,) = read_otel_spans(write_otlp(tmp_path / "x.json", spans, service=None))
    assert trace.user_class == "trace" and [c.call_id for c in trace.calls] == ["inner", "linked"]
    inner, linked = trace.calls
    assert (inner.input_tokens, inner.output_tokens, inner.api) == (48, 4, "completions")
    assert linked.parents == ("inner",) and linked.delay_s == 0.0  # started before its link ended: at once


def test_otel_export_as_json_lines_and_detection(tmp_path):
    from support.otlp import export

    path = tmp_path / "collector.jsonl"
    spans = _agent_spans()
    path.write_text(json.dumps(export(spans[:3])) + "\n" + json.dumps(export(spans[3:])) + "\n")
    assert detect_trace_format(path) == "otel"
    (trace,) = read_otel_spans(path)
    assert len(trace.calls) == 4


@pytest.mark.parametrize("broken, message", [
    (call("t", "c", "", 0, 10, inputs=None, outputs=3), "span c ('chat gpt-4o') of trace t has no gen_ai.usage.input_tokens"),
    (call("t", "c", "", 0, 10, inputs=5, outputs=None), "has no gen_ai.usage.output_tokens"),
    (call("t", "c", "", 20, 10, inputs=5, outputs=3), "ends before it starts"),
    (span("t", "x", "", "invoke_agent", 0, 10, gen_ai__operation__name="invoke_agent"), "no model-call spans"),
])
def test_otel_files_that_cannot_be_replayed_say_why(tmp_path, broken, message):
    path = write_otlp(tmp_path / "bad.json", [broken])
    with pytest.raises(WorkloadError, match="bad.json") as err:
        read_otel_spans(path)
    assert message in str(err.value)


def _graph(tmp_path, nodes, name="graph.jsonl"):
    path = tmp_path / name
    path.write_text("".join(json.dumps(n) + "\n" for n in nodes))
    return path


GRAPH = [
    {"trace": "g2", "id": 1, "input_tokens": 100, "output_tokens": 5, "trace_start_s": 2.5, "task": "triage"},
    {"trace": "g1", "id": "join", "parents": ["left", "right"], "delay_s": 0.2, "input_tokens": 400, "output_tokens": 30},
    {"trace": "g1", "id": "root", "input_tokens": 250, "output_tokens": 12, "model": "m-large", "api": "completions",
     "trace_start_s": 1.0, "user_class": "support-bot"},
    {"trace": "g1", "id": "left", "parents": ["root"], "delay_s": 0.05, "input_tokens": 300, "output_tokens": 7},
    {"trace": "g1", "id": "right", "parents": ["root"], "delay_s": 0.05, "input_tokens": 300, "output_tokens": 7},
]


def test_agent_graph_jsonl(tmp_path):
    path = _graph(tmp_path, GRAPH)
    assert detect_trace_format(path) == "agent-graph"
    g1, g2 = read_agent_graph(path)
    assert (g1.trace_id, g1.start_s, g1.user_class, g1.task) == ("g1", 1.0, "support-bot", "graph")
    assert (g2.trace_id, g2.start_s, g2.user_class, g2.task) == ("g2", 2.5, "trace", "triage")
    assert [c.call_id for c in g1.calls] == ["root", "left", "right", "join"]  # parents first, else file order
    assert g1.calls[3].parents == ("left", "right") and g1.calls[3].delay_s == 0.2
    assert g1.calls[0].api == "completions" and g1.models == {"m-large": 1}


@pytest.mark.parametrize("change, message", [
    ({1: {"parents": ["join"]}, 2: {"parents": ["join"]}}, "cycle through node(s)"),
    ({1: {"parents": ["nowhere"]}}, "names parent 'nowhere', which is not a node of this trace"),
    ({3: {"id": "root"}}, "node id 'root' appears twice"),
    ({1: {"inputs_tokens": 3}}, "unknown key 'inputs_tokens' at line 2"),
    ({1: {"output_tokens": "7"}}, "`output_tokens` must be a whole number of tokens"),
    ({1: {"output_tokens": None}}, "missing field(s) output_tokens"),
    ({1: {"delay_s": -1}}, "`delay_s` must be a number of seconds >= 0"),
    ({1: {"api": "responses"}}, "unknown api 'responses'"),
    ({3: {"trace_start_s": 9.0}}, "trace 'g1' has trace_start_s 1.0 on an earlier line and 9.0 here"),
])
def test_agent_graph_mistakes_are_named(tmp_path, change, message):
    nodes = [dict(n) for n in GRAPH]
    for line, fields in change.items():
        nodes[line].update(fields)
        nodes[line] = {k: v for k, v in nodes[line].items() if v is not None}
    path = _graph(tmp_path, nodes)
    with pytest.raises(WorkloadError, match="graph.jsonl") as err:
        read_agent_graph(path)
    assert message in str(err.value)
    if "unknown key" in message:
        assert "did you mean 'input_tokens'" in str(err.value)


def test_detection_of_every_trace_format(tmp_path):
    assert TRACE_FORMATS == CLI_TRACE_FORMATS
    (tmp_path / "b.csv").write_text("Timestamp,Request tokens,Response tokens\n0,10,2\n")
    mooncake = _graph(tmp_path, [{"timestamp": 0, "input_length": 10, "output_length": 2}], "m.jsonl")
    assert detect_trace_format(tmp_path / "b.csv") == "burstgpt" and detect_trace_format(mooncake) == "mooncake"
    neither = _graph(tmp_path, [{"prompt": "hello"}], "p.jsonl")
    (tmp_path / "n.json").write_text('{"data": []}')
    (tmp_path / "t.txt").write_text("hello")
    for path in (neither, tmp_path / "n.json", tmp_path / "t.txt"):
        with pytest.raises(WorkloadError, match="cannot tell what kind of trace this is") as err:
            detect_trace_format(path)
        assert "--trace-format" in str(err.value) and "agent graph" in str(err.value)


@pytest.mark.parametrize("api", ["chat", "completions"])
def test_replay_prompts_are_token_exact_and_continue_their_parent(tmp_path, tok, api):
    path = write_otlp(tmp_path / "spans.json", _agent_spans() + _agent_spans("t2", at_ms=1000))
    replay = open_trace(path, tok, seed=3, speed=2.0, api=api)
    assert replay.flows and replay.meta["traces"] == 2 and replay.meta["calls"] == 8
    assert replay.meta["recorded_models"] == {"gpt-4o": 6, "gpt-4o-mini": 2}
    flows = list(replay.jobs)
    assert [f.arrival_s for f in flows] == [0.0, pytest.approx(0.5)]  # 1 s apart, twice as fast
    plan, a, b, answer = flows[0].calls
    assert [c.parents for c in (plan, a, b, answer)] == [(), (0,), (0,), (1, 2)]
    assert answer.delay_s == pytest.approx(0.040) and a.delay_s == pytest.approx(0.025)
    encode = (lambda s: tok.encode(s.prompt)) if api == "completions" else (lambda s: tok.encode_chat(s.messages))
    tokens = [encode(c.spec) for c in flows[0].calls]
    assert [len(t) for t in tokens] == [200, 300, 310, 500] == [c.spec.prompt_tokens for c in flows[0].calls]
    for c, out in zip(flows[0].calls, (12, 8, 9, 20)):
        assert (c.spec.max_tokens, c.spec.min_tokens, c.spec.ignore_eos, c.spec.api) == (out, out, True, api)
    assert tokens[1][:128] == tokens[0][:128] == tokens[2][:128], "children start with their parent's blocks"
    # the join continues its first parent (a, the later to end) past the blocks all three share
    assert tokens[3][258:280] == tokens[1][258:280] != tokens[2][258:280]
    other = [encode(c.spec) for c in flows[1].calls]
    assert other[0][:64] != tokens[0][:64], "another trace has its own text"
