"""The report's Flows section: shown for runs of scripted users, absent otherwise, its charts framed in a browser."""

import json
import re

import pytest
from support.browser import needs_chromium, visit
from support.chart_axes import assert_frames

from servescope.analyzers.report import build_report
from servescope.analyzers.synthetic_flows import SCRIPT_ERROR, ScriptedSpec, write_scripted_run
from servescope.slo import parse_slos


@pytest.fixture(scope="module")
def flows_report(tmp_path_factory):
    """A scripted run with a planted slow step, call and script errors, judged on flow SLOs."""
    spec = ScriptedSpec(flows=600, seed=2, slow_step=("tool_loop", 1), call_error_rate=0.01, script_error_rate=0.05, warmup=20)
    run = write_scripted_run(tmp_path_factory.mktemp("flows-report") / "run", spec)
    return build_report(run, parse_slos("flow_p99=3s,flow_error_rate=2%"))


def _section(html: str, anchor: str) -> str:
    start = html.index(f'<section id="{anchor}">')
    return html[start:html.index("</section>", start)]


def test_flows_section_shows_tasks_steps_and_script_errors(flows_report):
    html = flows_report.read_text()
    summary = json.loads((flows_report.parent / "summary.json").read_text())
    assert '<a href="#flows">Flows</a>' in html
    section = _section(html, "flows")
    for task in summary["flows"]["overall"]["tasks"]:
        assert f"<td>{task['user_class']}</td><td>{task['task']}</td>" in section
        assert f"n={task['duration_s']['n']}" in section  # every duration percentile with its sample count
        assert f"<h4>{task['user_class']}.{task['task']}</h4>" in section
    assert "<td>step 0</td>" in section and "<td>step 2</td>" in section and "cached tok p50" in section
    assert f"<code>{SCRIPT_ERROR[2]}</code>" in section and SCRIPT_ERROR[0] in section
    assert section.count('data-chart-for="chart-flows-') == 4
    # flow SLOs in the verdict table: the error rate as a percentage, the duration as a time
    assert re.search(r"<td>flow_error_rate</td>\s*<td class=\"num\">2\.00%</td>", html)
    assert re.search(r"<td>flow_p99</td>\s*<td class=\"num\">3\.00 s</td>", html)
    assert 'id="flow_tail"' in html  # the rule's finding card


def test_a_run_without_flows_has_no_flows_section(hostile_run_dir):
    html = build_report(hostile_run_dir).read_text()
    assert 'id="flows"' not in html and "#flows" not in html and "chart-flows-" not in html


@pytest.mark.browser
@needs_chromium
def test_flows_charts_frame_what_they_draw(flows_report):
    expected = flows_report.read_text().count('data-chart-for="')
    seen = visit(flows_report, screenshot="report-flows.png")
    assert seen.errors == []
    flow_charts = [c for c in seen.charts if c["id"].startswith("chart-flows-") or c["id"] == "chart-flow_tail"]
    assert len(flow_charts) == 5
    assert_frames(seen.charts, expected=expected)


AGENT_SCRIPT = '''
import asyncio
from servescope import User, task, constant


class Agent(User):
    wait_time = constant(0.0)

    @task
    async def tool_loop(self):
        history = [{"role": "user", "content": self.prompt(tokens=32)}]
        slow = self.rng.random() < 0.1  # one flow in ten waits 300 ms for its second call's first token
        for step in range(3):
            delay = 0.3 if slow and step == 1 else 0.005
            reply = await self.client.chat(messages=history, max_tokens=4, script={
                "first_token_delay_s": delay, "itl_s": 0.001, "cached_tokens": 16 * step, "usage": "finish"})
            history += [reply.message, {"role": "user", "content": "tool result"}]
            await asyncio.sleep(0.005)
'''


@pytest.mark.timeout(120)
def test_a_real_scripted_run_reports_its_flows(tmp_path):
    """Scripted users against the scripted server: summary, flow SLOs, Flows section and flow_tail from real records."""
    from support.scripted_server import ScriptedServer

    from servescope.harness.config import RunConfig
    from servescope.harness.orchestration.repeat import execute_run

    script = tmp_path / "agent.py"
    script.write_text(AGENT_SCRIPT)
    with ScriptedServer() as server:
        outcome = execute_run(RunConfig(target=server.base_url, model="scripted", users=str(script), concurrency=8,
                                        requests=200, out=str(tmp_path / "run"), slo="flow_p99=30s,flow_error_rate=1%",
                                        show_progress=False))
    assert outcome.exit_code == 0
    run_dir = tmp_path / "run"
    summary = json.loads((run_dir / "summary.json").read_text())
    overall = summary["flows"]["overall"]
    assert overall["flows"] == 200 and overall["status"]["ok"] == 200 and overall["calls_per_flow"] == 3
    assert {o["name"]: o["ok"] for o in summary["slo"]["objectives"]} == {"flow_p99": True, "flow_error_rate": True}
    tail = next(f for f in json.loads((run_dir / "findings.json").read_text()) if f["rule"] == "flow_tail")
    assert tail["evidence"]["part"] == "step 1" and tail["evidence"]["task"] == "tool_loop"
    section = _section((run_dir / "report.html").read_text(), "flows")
    assert "<td>Agent</td><td>tool_loop</td>" in section and "<td>step 2</td>" in section
