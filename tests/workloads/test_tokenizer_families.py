"""Any Hugging Face tokenizer folder builds every bundled preset token-exact, or is refused before anything is sent.

Exactness is checked the way the server counts: every turn's prompt is re-encoded in
full (completions with the tokenizer's special tokens, chat as the rendered template).
"""

from __future__ import annotations

import itertools
import json
import shutil
from collections import defaultdict

import pytest
from click.testing import CliRunner

from servescope.cli import main
from servescope.workloads.errors import WorkloadError
from servescope.workloads.generator import session_stream
from servescope.workloads.spec import PRESETS_DIR, fixed_workload, load_workload
from servescope.workloads.tokenizer import load_tokenizer

PRESETS = sorted(p.stem for p in PRESETS_DIR.glob("*.yaml"))
SESSIONS = 6
# Each preset as written, plus two api overrides: completions presets sent as chat (a shared
# prefix becomes a system message) and chat sessions sent as completions (history as text).
CASES = [(name, None) for name in PRESETS] + [("smoke", "chat"), ("chat", "completions")]


@pytest.fixture(scope="module")
def tok(family_tokenizer):
    """Each tokenizer family of conftest.py in turn."""
    return family_tokenizer


def _ids(tok, req) -> list[int]:
    return tok.encode(req.prompt) if req.api == "completions" else tok.encode_chat(req.messages)


@pytest.mark.parametrize("preset, api", CASES, ids=[f"{p}-{a}" if a else p for p, a in CASES])
def test_every_preset_is_token_exact(tok, preset, api):
    spec = load_workload(preset)
    sessions = list(itertools.islice(session_stream(spec, tok, 3, api=api), SESSIONS))
    firsts = defaultdict(list)
    for session in sessions:
        for req in session.turns:
            ids = _ids(tok, req)
            assert len(ids) == req.prompt_tokens, f"{req.request_id}: built {req.prompt_tokens} tokens, server sees {len(ids)}"
        first = session.turns[0]
        if first.prefix_group:
            firsts[first.prefix_group].append((first.prefix_tokens, _ids(tok, first)))
        for prev, cur in zip(session.turns, session.turns[1:]):  # history: earlier turns are carried as sent
            if cur.api == "chat":
                assert cur.messages[: len(prev.messages)] == prev.messages
            else:
                assert cur.prompt.startswith(prev.prompt)
    for members in firsts.values():
        k = members[0][0]
        assert all(ids[:k] == members[0][1][:k] for _, ids in members), "a group shares exactly its first K tokens"
        assert len({ids[k] for _, ids in members}) == len(members), "and parts at token K+1"


def test_the_reported_bytelevel_tokenizer_builds_chat_agent_and_fixed_prompts(bytelevel_tokenizer_dir):
    """A byte-level BPE whose space before a capital is a token of its own: every sentence starts with
    that one token in context. The chat and agent presets raised StopIteration from the framing
    probe, and fixed 128- and 100-token completions could not cut a piece of the corpus."""
    tok = load_tokenizer(str(bytelevel_tokenizer_dir))
    assert tok.encode_plain(" The")[0] == tok.encode_plain(" A")[0], "the fixture must isolate the space"
    for spec in (load_workload("chat"), load_workload("agent"), fixed_workload(128, 128), fixed_workload(100, 64)):
        for session in itertools.islice(session_stream(spec, tok, 0), 20):
            assert all(len(_ids(tok, r)) == r.prompt_tokens for r in session.turns)


def _copy_with_config(src, dest, **config):
    dest.mkdir()
    shutil.copy(src / "tokenizer.json", dest / "tokenizer.json")
    base = json.loads((src / "tokenizer_config.json").read_text())
    base.update(config)
    (dest / "tokenizer_config.json").write_text(json.dumps({k: v for k, v in base.items() if v is not None}))
    return dest


@pytest.mark.parametrize("preset", ["chat", "agent", "mixed"])
def test_no_chat_template_is_refused_up_front_for_chat_presets(bytelevel_tokenizer_dir, tmp_path, preset):
    folder = _copy_with_config(bytelevel_tokenizer_dir, tmp_path / "plain", chat_template=None)
    tok = load_tokenizer(str(folder))
    with pytest.raises(WorkloadError) as info:
        session_stream(load_workload(preset), tok, 0)  # refused when the stream is made, before any session
    text = str(info.value)
    assert "no chat_template" in text and "tokenizer_config.json" in text and "--api completions" in text
    chat_classes = [c.name for c in load_workload(preset).classes if c.api == "chat"]
    assert len(info.value.problems) == len(chat_classes)
    assert all(f"class {name!r}" in text for name in chat_classes)
    # The fix it names works: the same workload as completions.
    req = next(session_stream(load_workload(preset), tok, 0, api="completions")).turns[0]
    assert tok.count(req.prompt) == req.prompt_tokens


def test_a_template_that_refuses_system_messages_is_refused_for_prefixed_chat(unigram_tokenizer_dir, tmp_path):
    template = json.loads((unigram_tokenizer_dir / "tokenizer_config.json").read_text())["chat_template"]
    opening = "{%- if messages[0]['role'] == 'system' %}"
    assert opening in template
    strict = template.replace(opening, opening + "{{ raise_exception('System role not supported') }}")
    folder = _copy_with_config(unigram_tokenizer_dir, tmp_path / "strict", chat_template=strict)
    tok = load_tokenizer(str(folder))
    with pytest.raises(WorkloadError) as info:
        session_stream(load_workload("chat"), tok, 0)
    text = str(info.value)
    assert "roles system, user" in text and "System role not supported" in text and "drop `prefix`" in text
    # A chat workload without a shared prefix needs no system message: it still works.
    req = next(session_stream(load_workload("burst"), tok, 0)).turns[0]
    assert tok.count_chat(req.messages) == req.prompt_tokens


def test_the_cli_refuses_before_sending_with_exit_2(bytelevel_tokenizer_dir, tmp_path):
    folder = _copy_with_config(bytelevel_tokenizer_dir, tmp_path / "plain", chat_template=None)
    out = tmp_path / "run"
    result = CliRunner().invoke(main, ["run", "--target", "http://127.0.0.1:9", "--workload", "chat",
                                    "--tokenizer", str(folder), "--requests", "1", "--out", str(out)])
    assert result.exit_code == 2, result.output
    assert "no chat_template" in result.output and "--api completions" in result.output
    assert not out.exists(), "nothing is written (or sent) for a refused tokenizer"
