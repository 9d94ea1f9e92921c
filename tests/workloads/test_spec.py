"""Workload specs: presets load, malformed files say file + field + allowed values, streams are deterministic."""

from __future__ import annotations

import itertools

import pytest
from click.testing import CliRunner

from servescope.harness.commands.workloads import workloads as workloads_cmd
from servescope.workloads.errors import WorkloadError
from servescope.workloads.generator import session_stream, stream_fingerprint
from servescope.workloads.spec import Buckets, fixed_workload, list_presets, load_workload
from servescope.workloads.tokenizer import load_tokenizer

GOOD = """
name: mine
classes:
  - name: a
    prompt_tokens: {dist: uniform, min: 32, max: 64}
    output_tokens: 16
"""


def _write(tmp_path, text):
    path = tmp_path / "w.yaml"
    path.write_text(text)
    return path


@pytest.mark.parametrize("bad, field, says", [
    (GOOD.replace("{dist: uniform,", "{dist: triangle,"), "classes[0].prompt_tokens.dist", "allowed: fixed, uniform"),
    (GOOD + "    api: grpc\n", "classes[0].api", "allowed: completions, chat"),
    (GOOD + "    colour: red\n", "classes[0].colour", "allowed: name, weight"),
    (GOOD + "arrival: bursty\n", "arrival", "allowed: poisson, constant, gamma:CV"),
    (GOOD.replace("output_tokens: 16", "output_tokens: {dist: normal, mean: 5}"), "classes[0].output_tokens.std", "needs `std`"),
    (GOOD + "    prefix: {group: g, tokens: 100}\n", "classes[0].prompt_tokens", "longer than the shared prefix"),
    (GOOD + "buckets: {prompt: [1k, 256]}\n", "buckets.prompt", "strictly increasing"),
    ("classes: []\n", "classes", "non-empty list"),
    (GOOD.replace("max: 64", "max: lots"), "classes[0].prompt_tokens.max", "such as 512 or 4k"),
])
def test_malformed_specs_name_file_field_and_allowed(tmp_path, bad, field, says):
    path = _write(tmp_path, bad)
    with pytest.raises(WorkloadError) as info:
        load_workload(str(path))
    err = info.value
    assert err.source == str(path) and err.field == field
    assert str(path) in str(err) and field in str(err) and says in str(err)


def test_unknown_preset_lists_presets():
    with pytest.raises(WorkloadError, match="allowed: agent, burst, chat"):
        load_workload("nonexistent")


def test_presets_load_and_describe_themselves():
    infos = {p.name: p for p in list_presets()}
    assert {"chat", "rag", "agent", "code", "convoy", "burst", "mixed", "smoke"} <= set(infos)
    assert load_workload("burst").arrival == "gamma:3"
    agent = load_workload("agent").classes[0]
    assert agent.prefix.tokens == 2048 and agent.session.history
    smoke = load_workload("smoke")
    assert all(32 <= c.prompt_tokens.min and c.prompt_tokens.max <= 512 for c in smoke.classes)
    assert load_workload(str(infos["rag"].path)).to_dict()["classes"][0]["prompt_tokens"]["min"] == 4096


def test_bucket_labels():
    b = Buckets()
    assert [b.prompt_label(n) for n in (0, 255, 256, 1023, 1024, 5000, 16384, 99999)] == [
        "0-256", "0-256", "256-1k", "256-1k", "1k-4k", "4k-16k", "16k+", "16k+"]
    assert [b.output_label(n) for n in (1, 64, 300, 1024)] == ["0-64", "64-256", "256-1k", "1k+"]


def test_same_seed_same_stream_other_seed_other_stream(tmp_path):
    tok = load_tokenizer(None)
    spec = load_workload("mixed")
    first = stream_fingerprint(session_stream(spec, tok, 7), 30)
    assert first == stream_fingerprint(session_stream(load_workload("mixed"), tok, 7), 30)
    assert first != stream_fingerprint(session_stream(spec, tok, 8), 30)


def test_request_ids_unique_and_weights_respected():
    tok = load_tokenizer(None)
    sessions = list(itertools.islice(session_stream(load_workload("convoy"), tok, 1), 400))
    ids = [r.request_id for s in sessions for r in s.turns]
    assert len(ids) == len(set(ids))
    giants = sum(s.turns[0].labels["class"] == "giant" for s in sessions)
    assert 5 <= giants <= 40, f"weight 1/20 should give ~20 giants in 400, got {giants}"


def test_api_override_and_fixed_workload():
    tok = load_tokenizer(None)
    r = next(session_stream(fixed_workload(300, 20, "completions"), tok, 0, api="chat")).turns[0]
    assert r.api == "chat" and r.messages and tok.count_chat(r.messages) == 300
    with pytest.raises(WorkloadError):
        fixed_workload(0, 10)


def test_cli_list_and_show():
    runner = CliRunner()
    listed = runner.invoke(workloads_cmd, ["list"])
    assert listed.exit_code == 0 and "smoke" in listed.output and "giant" in listed.output
    shown = runner.invoke(workloads_cmd, ["show", "burst"])
    assert shown.exit_code == 0 and "arrival: gamma:3" in shown.output
    missing = runner.invoke(workloads_cmd, ["show", "nope"])
    assert missing.exit_code == 2 and "presets:" in missing.output
