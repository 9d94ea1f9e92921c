"""Prompts have exactly the requested tokens, shared prefixes are exact, histories grow as specified."""

from __future__ import annotations

import itertools

import pytest

from servescope.workloads.generator import prompt_builder, session_stream
from servescope.workloads.prompt_builder import PromptBuilder
from servescope.workloads.spec import fixed_workload, spec_from_dict
from servescope.workloads.tokenizer import load_tokenizer

LENGTHS = [*range(2, 40), 63, 64, 65, 127, 256, 511, 1000, 1024, 2047, 4096, 8191, 16384]


@pytest.fixture(scope="module")
def tok(family_tokenizer):
    """Each tokenizer family of conftest.py in turn."""
    return family_tokenizer


def _count(tok, req) -> int:
    return tok.count(req.prompt) if req.api == "completions" else tok.count_chat(req.messages)


@pytest.mark.parametrize("api", ["completions", "chat"])
def test_every_length_is_exact(tok, api):
    b = prompt_builder(tok)
    for i, n in enumerate(LENGTHS):
        if api == "completions":
            n = max(n, b.min_completion_tokens())
            got = tok.count(b.completion(n, i * 37))
        else:
            n = max(n, b.min_chat_tokens(("user",)))
            got = tok.count_chat(b.chat(n, i * 37).messages)
        assert got == n, f"{api} asked {n}, got {got}"


def test_one_token_prompt_without_bos(hf_tokenizer_dir, tmp_path):
    """A tokenizer that adds no BOS can make a 1-token completions prompt."""
    import json

    from tokenizers import Tokenizer

    raw = Tokenizer.from_file(str(hf_tokenizer_dir / "tokenizer.json"))
    raw.post_processor = None
    raw.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>"}))
    tok = load_tokenizer(str(tmp_path))
    b = PromptBuilder(tok)
    assert b.bos == 0
    assert [tok.count(b.completion(n, 3)) for n in (1, 2, 3, 50)] == [1, 2, 3, 50]


def test_verify_mode_is_exact_too(tok):
    b = PromptBuilder(tok, verify=True)
    for n in (5, 77, 1500):
        assert tok.count(b.completion(n, n)) == n


def test_template_matches_transformers(tok):
    """What the server counts: transformers' rendering and encoding, for each family's folder."""
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoTokenizer.from_pretrained(str(tok.path))
    for msgs in ([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Why is the queue long?"}],
                 [{"role": "user", "content": "Why is the queue long?"}, {"role": "assistant", "content": "A burst."},
                  {"role": "user", "content": "And now?"}]):
        rendered = hf.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
        assert tok.render_chat(msgs) == rendered
        assert tok.encode_chat(msgs) == hf(rendered, add_special_tokens=False).input_ids
    assert tok.encode("The cache is warm.") == hf("The cache is warm.").input_ids


def _prefix_spec(api: str, k: int):
    return spec_from_dict({"name": "p", "classes": [{
        "name": "c", "api": api, "prompt_tokens": {"dist": "uniform", "min": k + 20, "max": k + 400},
        "output_tokens": 8, "prefix": {"group": "g", "tokens": k}}]})


@pytest.mark.parametrize("api", ["completions", "chat"])
@pytest.mark.parametrize("k", [40, 700])
def test_shared_prefix_is_exact(tok, api, k):
    reqs = [s.turns[0] for s in itertools.islice(session_stream(_prefix_spec(api, k), tok, 3), 8)]
    ids = [tok.encode(r.prompt) if api == "completions" else tok.encode_chat(r.messages) for r in reqs]
    assert all(len(x) == r.prompt_tokens for x, r in zip(ids, reqs))
    assert all(x[:k] == ids[0][:k] for x in ids), "the first K tokens must be identical across the group"
    assert len({x[k] for x in ids}) == len(ids), "token K+1 must differ across group members"
    assert all(r.prefix_group == "g" and r.prefix_tokens == k for r in reqs)


@pytest.mark.parametrize("api", ["completions", "chat"])
def test_session_history_grows_as_specified(tok, api):
    spec = spec_from_dict({"name": "s", "classes": [{
        "name": "c", "api": api, "prompt_tokens": {"dist": "uniform", "min": 60, "max": 200},
        "output_tokens": {"dist": "uniform", "min": 5, "max": 50},
        "session": {"turns": 4, "think_time_s": {"dist": "uniform", "min": 0.5, "max": 1.0}, "history": True}}]})
    for session in itertools.islice(session_stream(spec, tok, 11), 3):
        turns = session.turns
        assert [r.turn for r in turns] == [0, 1, 2, 3] and {r.session_id for r in turns} == {session.session_id}
        assert turns[0].think_time_s == 0 and all(0.5 <= r.think_time_s <= 1.0 for r in turns[1:])
        for prev, cur in zip(turns, turns[1:]):
            assert _count(tok, cur) == cur.prompt_tokens
            new = cur.prompt_tokens - prev.prompt_tokens - prev.max_tokens
            assert 60 <= new <= 200, "a turn adds history + reply + a fresh prompt_tokens sample"
            if api == "completions":
                assert cur.prompt.startswith(prev.prompt)
            else:
                assert cur.messages[: len(prev.messages)] == prev.messages
                reply = cur.messages[len(prev.messages)]
                assert reply["role"] == "assistant"


def test_forced_output_length(tok):
    s = next(session_stream(fixed_workload(100, 33), tok, 0, force_output_length=True))
    r = s.turns[0]
    assert (r.max_tokens, r.min_tokens, r.ignore_eos, r.prompt_tokens) == (33, 33, True, 100)
    r2 = next(session_stream(fixed_workload(100, 33), tok, 0)).turns[0]
    assert (r2.min_tokens, r2.ignore_eos) == (None, False)


def test_bundled_tokenizer_flags_approximate_lengths(hf_tokenizer_dir):
    assert load_tokenizer(None).exact_for_target is False
    assert load_tokenizer(None, target_is_reference=True).exact_for_target is True
    assert load_tokenizer(str(hf_tokenizer_dir)).exact_for_target is True


def test_prompts_without_shared_prefixes_do_not_share_a_first_block():
    """A fixed-length workload has no shared prefixes, so no two of its prompts may share their first
    16-token block (a server's prefix-cache block): each prompt starts at its own corpus sentence.
    Starts drawn with replacement gave ~25 such pairs in 600 prompts, each almost wholly cached."""
    tok = load_tokenizer(None)
    sessions = session_stream(fixed_workload(512, 16, "completions"), tok, 0)
    firsts = [tuple(tok.encode(s.turns[0].prompt)[:16]) for s in itertools.islice(sessions, 600)]
    assert len(set(firsts)) == len(firsts)
