"""Scripted users end to end: user scripts run by `servescope run --users` against a real local server."""

from __future__ import annotations

import json
import sys
import textwrap
from pathlib import Path

import pytest
from click.testing import CliRunner
from support.processes import interrupt_after
from support.scripted_server import ScriptedServer

from servescope.cli import main
from servescope.harness.config import RunConfig
from servescope.harness.console import RunConsole
from servescope.harness.orchestration.repeat import execute_run
from servescope.rundir.reader import load_run

pytestmark = pytest.mark.timeout(120)

HEADER = "import asyncio\nfrom servescope import User, task, between, constant, constant_pacing, StopUser\n"


@pytest.fixture(scope="module")
def server():
    with ScriptedServer() as srv:
        yield srv


def _script(tmp_path: Path, body: str, name: str = "users.py") -> Path:
    path = tmp_path / name
    path.write_text(HEADER + textwrap.dedent(body))
    return path


def _run(server: ScriptedServer, script: Path, out: Path, **options) -> tuple[int, object]:
    options.setdefault("duration_s", "3s")
    outcome = execute_run(RunConfig(target=server.base_url, model="scripted", users=str(script), out=str(out),
                                    report=False, show_progress=False, **options))
    return outcome.exit_code, load_run(out)


def test_a_flow_carries_the_first_answer_into_its_second_call(tmp_path, server):
    script = _script(tmp_path, """
        class Asker(User):
            @task
            async def ask_twice(self):
                word = f"w{self.rng.randrange(10**9)}"
                first = await self.client.chat(messages=[{"role": "user", "content": self.prompt(tokens=24)}],
                                               max_tokens=8, script={"text": f"the answer is {word}"})
                await self.client.chat(messages=[{"role": "user", "content": "q"}, first.message,
                                                 {"role": "user", "content": "go on"}], max_tokens=4)
    """)
    code, run = _run(server, script, tmp_path / "run", concurrency=2, requests=6, duration_s=None)
    assert code == 0
    calls = run.requests.sort_values(["flow_id", "step"])
    assert len(run.flows) == 6 and (run.flows["calls"] == 2).all() and (run.flows["status"] == "ok").all()
    for flow_id, pair in calls.groupby("flow_id"):
        first, second = pair.iloc[0], pair.iloc[1]
        assert (first["step"], second["step"]) == (0, 1)
        assert second["sent_at"] >= first["end_at"]
        said = server.bodies(first["response_id"])["script"]["text"]
        sent = server.bodies(second["response_id"])["messages"]
        assert sent[1] == {"role": "assistant", "content": " " + " ".join(said.split())}
    assert set(calls["user_class"]) == {"Asker"} and set(calls["task"]) == {"ask_twice"}
    assert (calls["prompt_tokens"] > 0).all()


def test_class_weights_task_weights_and_think_times_hold(tmp_path, server):
    script = _script(tmp_path, """
        class Heavy(User):
            weight = 3
            wait_time = constant(0.05)

            @task(3)
            async def often(self):
                await self.client.completions(prompt=self.prompt(tokens=8), max_tokens=2)

            @task(1)
            async def rarely(self):
                await self.client.completions(prompt=self.prompt(tokens=8), max_tokens=2)

        class Light(User):
            weight = 1
            wait_time = constant(0.05)

            @task
            async def only(self):
                await self.client.completions(prompt=self.prompt(tokens=8), max_tokens=2)
    """)
    code, run = _run(server, script, tmp_path / "run", concurrency=8, duration_s="3s")
    assert code == 0
    flows = run.flows[run.flows["task"] != "on_start"]
    users = flows.groupby("user_class")["user_id"].nunique()
    assert users.to_dict() == {"Heavy": 6, "Light": 2}  # 8 users at 3:1 exactly
    heavy = flows[flows["user_class"] == "Heavy"]["task"].value_counts()
    share = heavy["often"] / heavy.sum()
    assert 0.65 < share < 0.85, heavy  # 3:1 -> 0.75, hundreds of draws
    # think time: a user's next task is scheduled 50 ms after its previous one ended
    for _, mine in flows.sort_values("start_at").groupby("user_id"):
        gaps = (mine["scheduled_at"].to_numpy()[1:] - mine["end_at"].to_numpy()[:-1])
        assert len(gaps) > 5 and abs(float(gaps.mean()) - 0.05) < 0.01, gaps


def test_parallel_calls_of_one_flow_overlap_and_get_their_own_steps(tmp_path, server):
    script = _script(tmp_path, """
        class Planner(User):
            @task
            async def fan_out(self):
                await asyncio.gather(*(self.client.completions(prompt=self.prompt(tokens=8), max_tokens=5,
                                                               script={"itl_s": 0.05}) for _ in range(3)))
    """)
    code, run = _run(server, script, tmp_path / "run", concurrency=1, requests=3, duration_s=None)
    assert code == 0
    for _, calls in run.requests.groupby("flow_id"):
        assert sorted(calls["step"]) == [0, 1, 2]
        assert calls["sent_at"].max() < calls["end_at"].min()  # all three in flight together
    flow = run.flows.iloc[0]
    assert flow["calls"] == 3 and flow["duration_s"] < 0.2 + 0.15  # ~0.2 s, not 3 x 0.2


def test_a_raising_task_is_a_script_error_and_the_user_goes_on(tmp_path, server):
    script = _script(tmp_path, """
        class Flaky(User):
            @task
            async def sometimes_fails(self):
                await self.client.completions(prompt="hello", max_tokens=2)
                if self.rng.random() < 0.5:
                    raise KeyError("no such tool")
    """)
    code, run = _run(server, script, tmp_path / "run", concurrency=2, requests=40, duration_s=None)
    assert code == 0
    flows = run.flows
    assert len(flows) == 40 and len(run.requests) == 40  # every task ran and made its call
    errors = flows[flows["status"] == "script_error"]
    assert 5 < len(errors) < 35
    assert set(errors["error_type"]) == {"KeyError"}
    assert errors["error_location"].str.startswith("users.py:").all()
    assert errors["error_location"].iloc[0].endswith("(in sometimes_fails)")


def test_a_failed_call_returns_not_ok_and_the_flow_is_an_error(tmp_path, server):
    script = _script(tmp_path, """
        class Caller(User):
            @task
            async def call(self):
                r = await self.client.completions(prompt="x", max_tokens=2,
                                                  script={"fault": "http_error", "fault_status": 503})
                assert not r.ok and r.status_code == 503 and "scripted failure" in r.error
                try:
                    r.raise_for_status()
                except Exception as exc:
                    assert type(exc).__name__ == "CallError"
    """)
    code, run = _run(server, script, tmp_path / "run", concurrency=1, requests=3, duration_s=None)
    assert code == 1  # not one call succeeded: the run failed (nothing measured), yet it is all recorded
    assert set(run.flows["status"]) == {"error"} and (run.flows["failed_calls"] == 1).all()
    assert set(run.requests["http_status"]) == {503}


def test_tool_calls_assemble_across_chunks(tmp_path, server):
    script = _script(tmp_path, """
        TOOLS = [{"type": "function", "function": {"name": "search", "parameters": {"type": "object"}}},
                 {"type": "function", "function": {"name": "fetch", "parameters": {"type": "object"}}}]

        class Agent(User):
            @task
            async def loop(self):
                r = await self.client.chat(messages=[{"role": "user", "content": "find the docs"}], tools=TOOLS,
                                           max_tokens=16, script={"tool_calls": 2})
                assert r.finish_reason == "tool_calls", r.finish_reason
                calls = r.tool_calls
                assert [c.name for c in calls] == ["search", "fetch"], calls
                assert [c.parsed_arguments() for c in calls] == [{"query": "find the docs", "n": 0},
                                                                  {"query": "find the docs", "n": 1}]
                assert r.message["tool_calls"][0]["function"]["name"] == "search"
                messages = [{"role": "user", "content": "find the docs"}, r.message]
                messages += [{"role": "tool", "tool_call_id": c.id, "content": "result"} for c in calls]
                final = await self.client.chat(messages=messages, max_tokens=3)
                assert final.ok and final.text == " tok tok tok"
    """)
    code, run = _run(server, script, tmp_path / "run", concurrency=1, requests=2, duration_s=None)
    assert code == 0
    assert set(run.flows["status"]) == {"ok"}, run.flows[["status", "error_message", "error_location"]]
    first = run.requests[run.requests["step"] == 0]
    # two calls x three argument fragments: six content chunks, five gaps
    assert (first["itl_s"].map(len) == 5).all()


def test_on_start_failure_retires_the_user_and_is_counted(tmp_path, server):
    script = _script(tmp_path, """
        class Picky(User):
            async def on_start(self):
                if self.user_id.endswith("u0"):
                    raise RuntimeError("login refused")

            @task
            async def work(self):
                await self.client.completions(prompt="x", max_tokens=1)
    """)
    code, run = _run(server, script, tmp_path / "run", concurrency=2, requests=10, duration_s=None)
    assert code == 0
    assert run.run["users"]["retired"] == 1
    starts = run.flows[run.flows["task"] == "on_start"]
    assert len(starts) == 1 and starts.iloc[0]["status"] == "script_error"
    assert starts.iloc[0]["error_message"] == "login refused"
    assert (run.flows["task"] == "work").sum() == 10  # the other user ran every task


def test_open_loop_users_arrive_at_the_rate_and_run_their_session(tmp_path, server):
    script = _script(tmp_path, """
        class Visitor(User):
            session_tasks = 3
            wait_time = constant(0.02)

            @task
            async def browse(self):
                await self.client.completions(prompt=self.prompt(tokens=8), max_tokens=2)
    """)
    code, run = _run(server, script, tmp_path / "run", rate=10, arrival="constant", requests=6, duration_s=None)
    assert code == 0
    per_user = run.flows.groupby("user_id").size()
    assert len(per_user) == 6 and (per_user == 3).all()
    firsts = run.flows.sort_values("scheduled_at").groupby("user_id")["scheduled_at"].min().sort_values()
    assert abs(float(firsts.diff().dropna().mean()) - 0.1) < 0.01  # 10 users/s, constant spacing


def test_spawn_rate_starts_users_gradually(tmp_path, server):
    script = _script(tmp_path, """
        class Steady(User):
            wait_time = constant(0.05)

            @task
            async def work(self):
                await self.client.completions(prompt="x", max_tokens=1)
    """)
    code, run = _run(server, script, tmp_path / "run", concurrency=4, spawn_rate=4, duration_s="2s")
    assert code == 0
    starts = run.flows.groupby("user_id")["start_at"].min().sort_values().to_numpy()
    assert len(starts) == 4 and abs(float((starts[1:] - starts[:-1]).mean()) - 0.25) < 0.03


@pytest.mark.parametrize("body, message", [
    ("class Broken(User)\n    pass\n", "syntax error"),
    ("x = 1\n", "defines no User subclass"),
    ("class Sync(User):\n    @task\n    def work(self):\n        pass\n", "not a coroutine"),
    ("class Empty(User):\n    pass\n", "has no tasks"),
    ("import no_such_module_xyz\n", "ModuleNotFoundError"),
])
def test_a_script_that_cannot_run_is_exit_2_with_its_line(tmp_path, body, message):
    script = tmp_path / "bad.py"
    script.write_text(HEADER + body)
    result = CliRunner().invoke(main, ["run", "--target", "http://127.0.0.1:9", "--model", "m", "--users", str(script),
                                       "--concurrency", "1", "--out", str(tmp_path / "never")])
    assert result.exit_code == 2, result.output
    assert message in result.output
    if message == "syntax error":
        assert "bad.py:3" in result.output
    assert not (tmp_path / "never").exists()


@pytest.mark.parametrize("args, message", [
    (["--users", "agent", "--workload", "chat"], "drop --workload"),
    (["--users", "no-such-example", "--concurrency", "1"], "bundled"),
    (["--users", "agent", "--rate", "2", "--spawn-rate", "3"], "--spawn-rate"),
])
def test_bad_user_flags_are_exit_2(tmp_path, args, message):
    result = CliRunner().invoke(main, ["run", "--target", "http://127.0.0.1:9", "--model", "m", *args,
                                       "--out", str(tmp_path / "never")])
    assert result.exit_code == 2, result.output
    assert message in result.output


def test_ctrl_c_keeps_every_finished_call_and_flow(tmp_path, server):
    script = _script(tmp_path, """
        class Slow(User):
            @task
            async def two_calls(self):
                await self.client.completions(prompt="x", max_tokens=2, script={"itl_s": 0.02})
                await self.client.completions(prompt="y", max_tokens=3, script={"first_token_delay_s": 5})
    """)
    out = tmp_path / "run"
    server.reset()
    cmd = [sys.executable, "-m", "servescope", "run", "--target", server.base_url, "--model", "scripted",
           "--users", str(script), "--concurrency", "3", "--duration", "60s", "--out", str(out), "--no-report",
           "--grace", "0.3s"]
    code, output = interrupt_after(cmd, lambda: server.stats()["requests"], 6)
    assert code == 130, output
    assert json.loads((out / "run.json").read_text())["status"] == "interrupted"
    run = load_run(out)
    assert len(run.requests[run.requests["sent_at"].notna()]) == server.stats()["requests"]
    assert (run.requests[run.requests["step"] == 0]["status"] == "ok").all()
    assert set(run.requests[run.requests["step"] == 1]["status"]) == {"cancelled"}
    assert set(run.flows["status"]) == {"error"} or set(run.flows["status"]) <= {"error", "cancelled"}
    assert len(run.flows) == 3 and set(run.flows["flow_id"]) == set(run.requests["flow_id"])
    assert (out / "flows.parquet").exists() and not (out / "flows.jsonl").exists()


@pytest.mark.parametrize("example", ["agent_loop", "rag_flow", "chat_history", "planner"])
def test_bundled_examples_run_their_flows(tmp_path, server, example):
    outcome = execute_run(RunConfig(target=server.base_url, model="scripted", users=example, concurrency=2,
                                    requests=2, out=str(tmp_path / "run"), report=False, show_progress=False))
    assert outcome.exit_code == 0
    run = load_run(tmp_path / "run")
    work = run.flows[~run.flows["task"].isin(["on_start", "on_stop"])]
    assert len(work) == 2 and set(work["status"]) == {"ok"}, work[["status", "error_message", "error_location"]]
    assert (work["calls"] >= 1).all() and set(run.requests["status"]) == {"ok"}
    if example == "agent_loop":  # the server calls tools: the loop runs until its last step, context growing
        steps = run.requests.groupby("flow_id")["prompt_tokens"].apply(list)
        assert all(len(s) == 6 and s == sorted(s) for s in steps), steps
    if example == "planner":  # three workers between the plan and the join
        assert (work["calls"] == 5).all()


def test_workloads_list_and_show_include_the_user_scripts():
    listed = CliRunner().invoke(main, ["workloads", "list"])
    assert listed.exit_code == 0
    for name in ("agent_loop", "rag_flow", "chat_history", "planner"):
        assert name in listed.output
    shown = CliRunner().invoke(main, ["workloads", "show", "agent_loop"])
    assert shown.exit_code == 0 and "class ToolAgent(User)" in shown.output
