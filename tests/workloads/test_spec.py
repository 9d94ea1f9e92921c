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
    (GOOD + "    colour: red\n", "classes[0].colour", "unknown key 'colour' at classes[0]; allowed: name, weight"),
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
    assert err.source == str(path) and err.field == field and len(err.problems) == 1
    assert str(path) in str(err) and says in str(err)
    assert field in str(err) or err.key is not None  # an unknown key is named with the path it sits at


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


MANY_MISTAKES = """
name: broken
arrival: bursty
colour: blue
buckets: {prompt: [1k, 256]}
classes:
  - name: chat
    api: chat
    prompt_tokens: {distribution: uniform, min: 32, max: 64}
    output_tokens: {dist: normal, mean: 5}
    session: {turns: 3, history: yes please}
  - name: rag
    weight: -2
    api: grpc
    prompt_tokens: {dist: triangle, min: 10, max: 20}
    output_tokens: {dist: uniform, min: 8, max: lots}
    prefix: {group: g, tokns: 100}
  - name: chat
    prompt_tokens: {dist: lognormal, mean: 100, sigma: 0.5, mode: 3}
    output_tokens: 16
"""


def test_every_mistake_of_a_file_is_listed_at_once_with_its_path(tmp_path):
    path = _write(tmp_path, MANY_MISTAKES)
    with pytest.raises(WorkloadError) as info:
        load_workload(str(path))
    err = info.value
    fields = [p.field for p in err.problems]
    assert fields == [
        "colour",
        "classes[0].prompt_tokens.distribution",
        "classes[0].output_tokens.std",
        "classes[0].session.history",
        "classes[1].prompt_tokens.dist",
        "classes[1].output_tokens.max",
        "classes[1].prefix.tokns",
        "classes[1].prefix.tokens",
        "classes[1].weight",
        "classes[1].api",
        "classes[2].prompt_tokens.mode",
        "arrival",
        "buckets.prompt",
        "classes[2].name",
    ]
    assert all(p.source == str(path) for p in err.problems)
    text = str(err)
    assert text.startswith(f"{path}: 14 problems:\n")
    assert "unknown key 'distribution' at classes[0].prompt_tokens; allowed: dist, value, min, max" in text
    assert "(did you mean 'dist'?)" in text
    assert "unknown key 'colour' at the top level; allowed: name, description, seed, arrival, buckets, classes" in text
    assert "unknown key 'tokns' at classes[1].prefix; allowed: group, tokens (did you mean 'tokens'?)" in text
    assert "unknown key 'mode' at classes[2].prompt_tokens; allowed: dist, mean, median, sigma, min, max" in text
    assert "classes[1].api: unknown api 'grpc'; allowed: completions, chat" in text
    assert "classes[2].name: class name 'chat' is used by classes[0] too" in text
    assert len(text.splitlines()) == 15, "one line per problem"


def test_a_misspelt_dist_is_one_problem_not_two():
    from servescope.workloads.spec import spec_from_dict

    with pytest.raises(WorkloadError) as info:
        spec_from_dict({"classes": [{"name": "a", "prompt_tokens": {"distribution": "uniform", "min": 1, "max": 9},
                                     "output_tokens": 4}]})
    err = info.value
    assert [p.field for p in err.problems] == ["classes[0].prompt_tokens.distribution"]
    assert str(err) == ("unknown key 'distribution' at classes[0].prompt_tokens; allowed: dist, value, min, max, "
                        "mean, std, median, sigma, table (did you mean 'dist'?)")
    with pytest.raises(WorkloadError, match=r"classes\[0\].prompt_tokens.dist: missing `dist`"):
        spec_from_dict({"classes": [{"name": "a", "prompt_tokens": {"min": 1, "max": 9}, "output_tokens": 4}]})


def test_presets_still_validate():
    """The collecting parser accepts every bundled preset, and a good file is unchanged by it."""
    for info in list_presets():
        assert load_workload(info.name).classes
