"""`--prompt-tokens N` / `--max-tokens N`, each alone or together, fix that length in the workload (the default one
without --workload), for `servescope run` and `servescope capacity`; run.json records the override."""

from __future__ import annotations

import itertools
import json

import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner
from support.scripted_server import ScriptedServer

from servescope.cli import main
from servescope.harness.config import ConfigError, RunConfig
from servescope.workloads.errors import WorkloadError
from servescope.workloads.generator import session_stream
from servescope.workloads.spec import load_workload, with_lengths
from servescope.workloads.tokenizer import load_tokenizer


def test_with_lengths_fixes_one_dimension_and_keeps_the_rest():
    mixed = load_workload("mixed")
    prompts = with_lengths(mixed, prompt_tokens=300)
    assert [c.prompt_tokens.kind for c in prompts.classes] == ["fixed"] * 4
    assert {c.prompt_tokens.value for c in prompts.classes} == {300}
    assert [c.output_tokens for c in prompts.classes] == [c.output_tokens for c in mixed.classes]
    assert [(c.name, c.api, c.weight, c.tenant, c.prefix) for c in prompts.classes] == [
        (c.name, c.api, c.weight, c.tenant, c.prefix) for c in mixed.classes]
    outputs = with_lengths(mixed, output_tokens=7)
    assert {c.output_tokens.value for c in outputs.classes} == {7}
    assert [c.prompt_tokens for c in outputs.classes] == [c.prompt_tokens for c in mixed.classes]
    both = with_lengths(mixed, prompt_tokens=300, output_tokens=7)
    assert both.name == "mixed" and "prompt_tokens fixed at 300, output_tokens fixed at 7" in both.description
    assert with_lengths(mixed).classes == mixed.classes


def test_with_lengths_refuses_prompts_not_longer_than_a_shared_prefix():
    with pytest.raises(WorkloadError) as info:
        with_lengths(load_workload("mixed"), prompt_tokens=100, output_tokens=0)
    text = str(info.value)
    assert [p.field for p in info.value.problems] == ["--max-tokens", "--prompt-tokens"]
    assert "class 'chat'" in text and "classes[0].prefix.tokens: 128" in text


def test_fixed_prompts_in_sessions_add_n_new_tokens_per_turn():
    tok = load_tokenizer(None)
    spec = with_lengths(load_workload("chat"), prompt_tokens=300)
    for session in itertools.islice(session_stream(spec, tok, 5), 4):
        turns = session.turns
        assert turns[0].prompt_tokens == 300
        for prev, cur in itertools.pairwise(turns):
            assert cur.prompt_tokens == prev.prompt_tokens + prev.max_tokens + 300
        assert all(tok.count_chat(r.messages) == r.prompt_tokens for r in turns)


@pytest.mark.parametrize("kwargs, overrides", [
    ({"max_tokens": 128}, {"output_tokens": 128}),
    ({"prompt_tokens": 512}, {"prompt_tokens": 512}),
    ({"workload": "chat", "prompt_tokens": 512}, {"prompt_tokens": 512}),
    ({"workload": "chat", "max_tokens": 32}, {"output_tokens": 32}),
    ({"workload": "chat", "prompt_tokens": 512, "max_tokens": 32}, {"prompt_tokens": 512, "output_tokens": 32}),
    ({}, {}),
])
def test_run_config_takes_either_length_alone(kwargs, overrides):
    config = RunConfig(target="http://127.0.0.1:9", **kwargs)
    assert config.length_overrides == overrides
    assert config.to_json()["max_tokens"] == kwargs.get("max_tokens")


@pytest.mark.parametrize("kwargs, message", [
    ({"max_tokens": 0}, "--max-tokens: must be at least 1, got 0"),
    ({"prompt_tokens": -5}, "--prompt-tokens: must be at least 1, got -5"),
])
def test_run_config_refuses_lengths_below_one(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        RunConfig(target="http://127.0.0.1:9", **kwargs)


def test_run_config_refuses_a_length_with_a_trace(tmp_path):
    trace = tmp_path / "t.jsonl"
    trace.write_text('{"timestamp": 0, "input_length": 10, "output_length": 5}\n')
    with pytest.raises(ConfigError, match="--trace brings its own requests"):
        RunConfig(target="http://127.0.0.1:9", trace=str(trace), max_tokens=7)


def _run(args: list[str]):
    return CliRunner().invoke(main, ["run", *args])


@pytest.mark.timeout(120)
def test_max_tokens_alone_fixes_the_outputs_of_the_default_workload(tmp_path):
    with ScriptedServer() as srv:
        out = tmp_path / "run"
        result = _run(["--target", srv.base_url, "--max-tokens", "7", "--concurrency", "2", "--requests", "6",
                       "--workers", "1", "--out", str(out), "--no-report"])
        assert result.exit_code == 0, result.output
        other = tmp_path / "smoke"
        result = _run(["--target", srv.base_url, "--workload", "smoke", "--prompt-tokens", "200", "--concurrency", "2",
                       "--requests", "12", "--workers", "1", "--out", str(other), "--no-report"])
        assert result.exit_code == 0, result.output
        refused = _run(["--target", srv.base_url, "--workload", "smoke", "--prompt-tokens", "100", "--requests", "1",
                        "--out", str(tmp_path / "refused"), "--no-report"])
    frame = pq.read_table(out / "requests.parquet").to_pandas()
    assert len(frame) == 6 and (frame["status"] == "ok").all()
    assert (frame["max_tokens"] == 7).all() and (frame["output_tokens"] == 7).all()  # the server generated max_tokens
    assert (frame["prompt_tokens"] == 128).all()  # the default workload's prompt length is kept
    meta = json.loads((out / "run.json").read_text())
    assert meta["length_overrides"] == {"output_tokens": 7}
    assert meta["workload"]["name"] == "fixed-128x7"
    assert meta["workload"]["classes"][0]["output_tokens"] == {"dist": "fixed", "value": 7}

    frame = pq.read_table(other / "requests.parquet").to_pandas()
    assert (frame["prompt_tokens"] == 200).all() and frame["max_tokens"].nunique() > 1  # outputs stay the preset's
    meta = json.loads((other / "run.json").read_text())
    assert meta["length_overrides"] == {"prompt_tokens": 200}
    assert meta["workload"]["name"] == "smoke"
    assert {c["prompt_tokens"]["value"] for c in meta["workload"]["classes"]} == {200}
    # smoke's shared-prefix class has a 128-token prefix: 100-token prompts cannot hold it.
    assert refused.exit_code == 2 and "shared prefix of class 'shared-prefix'" in refused.output


@pytest.mark.timeout(120)
def test_capacity_takes_max_tokens_alone(tmp_path):
    """Every step of the search runs the default workload with its outputs fixed; a bad length is exit 2."""
    out = tmp_path / "cap"
    with ScriptedServer() as srv:
        result = CliRunner().invoke(main, [
            "capacity", "--target", srv.base_url, "--model", "m", "--max-tokens", "4", "--start-rate", "4",
            "--max-rate", "8", "--step-duration", "1s", "--max-steps", "2", "--slo", "ttft_p99=5s", "--out", str(out)])
        bad = CliRunner().invoke(main, ["capacity", "--target", srv.base_url, "--slo", "ttft_p99=1s",
                                        "--max-tokens", "0", "--out", str(tmp_path / "bad")])
    assert result.exit_code == 0, result.output
    steps = sorted(out.glob("step-*"))
    assert steps
    for step in steps:
        assert json.loads((step / "run.json").read_text())["length_overrides"] == {"output_tokens": 4}
        assert (pq.read_table(step / "requests.parquet").to_pandas()["max_tokens"] == 4).all()
    assert bad.exit_code == 2 and "--max-tokens: must be at least 1" in bad.output
