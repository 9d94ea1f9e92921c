"""Datasets and traces: streamed from disk, exact counts, arrival offsets, shared block prefixes."""

from __future__ import annotations

import json

import pytest

from servescope.workloads.errors import WorkloadError
from servescope.workloads.importers import import_sessions
from servescope.workloads.tokenizer import load_tokenizer
from servescope.workloads.traces import trace_sessions


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer(None)


def _conv(i):
    return {"id": str(i), "conversations": [
        {"from": "human", "value": f"Question {i}: why is the queue long?"},
        {"from": "gpt", "value": "Because arrivals outrun completions. " * (i + 1)},
        {"from": "human", "value": "And how do I fix it?"},
        {"from": "gpt", "value": "Add capacity."}]}


def test_sharegpt_json_array_to_sessions(tmp_path, tok):
    path = tmp_path / "sg.json"
    path.write_text(json.dumps([_conv(i) for i in range(3)], indent=1))
    sessions = list(import_sessions(path, tok, seed=1))
    assert len(sessions) == 3
    s = sessions[1]
    assert [r.turn for r in s.turns] == [0, 1]
    first, second = s.turns
    assert first.api == "chat" and first.prompt_tokens == tok.count_chat(first.messages)
    assert first.max_tokens == len(tok.encode_plain(_conv(1)["conversations"][1]["value"]))
    assert second.messages[:2] == [{"role": "user", "content": _conv(1)["conversations"][0]["value"]},
                                   {"role": "assistant", "content": _conv(1)["conversations"][1]["value"]}]
    comp = next(import_sessions(path, tok, seed=1, api="completions")).turns[0]
    assert comp.prompt and comp.prompt_tokens == tok.count(comp.prompt)


def test_sharegpt_streams_instead_of_reading_whole_file(tmp_path, tok):
    """The first items import although the file's tail is broken: only the needed part was parsed."""
    path = tmp_path / "big.json"
    with path.open("w") as fh:
        fh.write("[" + ",".join(json.dumps(_conv(i)) for i in range(50)))
        fh.write("," + "{" * 200_000 + " this is not JSON")  # a broken tail, far past the first chunk
    assert len(list(import_sessions(path, tok, seed=0, limit=5))) == 5
    with pytest.raises(WorkloadError, match="malformed JSON in element 50"):
        list(import_sessions(path, tok, seed=0))


def test_jsonl_prompts_with_output_lengths(tmp_path, tok):
    path = tmp_path / "p.jsonl"
    path.write_text('{"prompt": "Summarize the report.", "output_tokens": 40}\n\n{"prompt": "Hi"}\n')
    a, b = (s.turns[0] for s in import_sessions(path, tok, seed=2, default_max_tokens=99))
    assert (a.prompt, a.max_tokens, a.prompt_tokens) == ("Summarize the report.", 40, tok.count("Summarize the report."))
    assert b.max_tokens == 99 and a.request_id != b.request_id
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "x", "max_tokens": -3}\n')
    with pytest.raises(WorkloadError, match=r"bad.jsonl: line 1: output length"):
        list(import_sessions(bad, tok, seed=0))


def test_burstgpt_arrivals_and_speed(tmp_path, tok):
    path = tmp_path / "burst.csv"
    path.write_text("Timestamp,Model,Request tokens,Response tokens,Total tokens,Log Type\n"
                    "5,ChatGPT,300,20,320,Conversation log\n7.5,GPT-4,1200,0,1200,API log\n11,ChatGPT,40,9,49,API log\n")
    sessions = list(trace_sessions(path, tok, seed=0, speed=2.0))
    assert [s.arrival_s for s in sessions] == [0.0, 1.25, 3.0]
    reqs = [s.turns[0] for s in sessions]
    assert [r.prompt_tokens for r in reqs] == [300, 1200, 40] == [tok.count(r.prompt) for r in reqs]
    assert [r.max_tokens for r in reqs] == [20, 1, 9] and reqs[1].labels["model"] == "GPT-4"
    missing = tmp_path / "m.csv"
    missing.write_text("time,tokens\n1,2\n")
    with pytest.raises(WorkloadError, match="missing column"):
        list(trace_sessions(missing, tok, seed=0))


@pytest.mark.parametrize("api", ["completions", "chat"])
def test_mooncake_hash_ids_share_leading_blocks(tmp_path, tok, api):
    path = tmp_path / "mc.jsonl"
    rows = [(0, 1500, [1, 2, 3]), (250, 1300, [1, 2, 7]), (1000, 600, [4, 5])]
    path.write_text("".join(json.dumps({"timestamp": t, "input_length": n, "output_length": 10, "hash_ids": h}) + "\n"
                            for t, n, h in rows))
    sessions = list(trace_sessions(path, tok, seed=0, api=api))
    assert [s.arrival_s for s in sessions] == [0.0, 0.25, 1.0]
    enc = [tok.encode(r.prompt) if api == "completions" else tok.encode_chat(r.messages)
           for r in (s.turns[0] for s in sessions)]
    assert [len(e) for e in enc] == [1500, 1300, 600]
    assert enc[0][:1024] == enc[1][:1024], "two equal leading block ids: 1024 identical leading tokens"
    assert enc[0][:600] != enc[2][:600]
    assert enc[0][1024:1100] != enc[1][1024:1100]
