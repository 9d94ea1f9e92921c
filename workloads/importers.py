"""Import real prompts: ShareGPT conversations and JSONL prompt lists -> Sessions.

The text is the dataset's own, so prompt lengths are whatever it has (counted
exactly with the tokenizer); output lengths come from the recorded replies
(ShareGPT) or the record's `output_tokens` / `max_tokens` field, else a default.

- ShareGPT (`.json` array, or `.jsonl` of conversations): `{"conversations":
  [{"from": "human"|"gpt", "value": ...}, ...]}` (`messages` with
  `role`/`content` works too). One session per conversation, one turn per
  human message; the real earlier turns are carried as history.
- Prompts (`.jsonl`): `{"prompt": "..."}` or `{"messages": [...]}`, optional
  `output_tokens` / `max_tokens` / `output_len`. One single-turn session per line.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

from servescope.workloads.errors import WorkloadError
from servescope.workloads.generator import apply_output_length
from servescope.workloads.jsonstream import first_record, iter_json_array, iter_jsonl
from servescope.workloads.spec import Buckets
from servescope.workloads.tokenizer import PromptTokenizer
from servescope.workloads.types import RequestSpec, Session

FORMATS = ("auto", "sharegpt", "prompts")
_ROLE = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
         "chatgpt": "assistant", "bing": "assistant", "bard": "assistant", "system": "system"}
_OUTPUT_KEYS = ("output_tokens", "max_tokens", "output_len", "output_length")


def detect_format(path: Path) -> str:
    if path.suffix == ".json":
        return "sharegpt"
    if path.suffix == ".jsonl":
        first = first_record(path)
        if isinstance(first, dict) and ("conversations" in first or ("messages" in first and not _has_output(first))):
            return "sharegpt" if "conversations" in first else "prompts"
        return "prompts"
    raise WorkloadError("cannot tell the dataset format from the file name", source=str(path),
                        allowed=("*.json (ShareGPT array)", "*.jsonl (ShareGPT or prompts)"))


def _has_output(obj: dict[str, Any]) -> bool:
    return any(k in obj for k in _OUTPUT_KEYS)


def _records(path: Path, fmt: str) -> Iterator[tuple[str, Any]]:
    """(where, record) pairs, streamed."""
    if path.suffix == ".json":
        with path.open(encoding="utf-8") as fh:
            for i, item in enumerate(iter_json_array(fh, str(path))):
                yield f"element {i}", item
    else:
        for lineno, obj in iter_jsonl(path):
            yield f"line {lineno}", obj


def _conversation(record: Any, where: str, source: str) -> list[dict[str, str]]:
    turns = record.get("conversations") if isinstance(record, dict) else None
    if turns is None and isinstance(record, dict):
        turns = record.get("messages")
    if not isinstance(turns, list):
        raise WorkloadError(f"{where}: expected `conversations` (or `messages`) to be a list", source=source)
    messages = []
    for turn in turns:
        if not isinstance(turn, dict):
            continue
        role = _ROLE.get(str(turn.get("from", turn.get("role", ""))).lower())
        text = turn.get("value", turn.get("content"))
        if role and isinstance(text, str) and text:
            messages.append({"role": role, "content": text})
    return messages


def import_sessions(path: str | Path, tokenizer: PromptTokenizer, seed: int, fmt: str = "auto", *,
                    api: str | None = None, force_output_length: bool = False, limit: int | None = None,
                    default_max_tokens: int = 256, buckets: Buckets | None = None) -> Iterator[Session]:
    """Sessions from a ShareGPT or prompts dataset, streamed from disk (bounded; `limit` stops early)."""
    path = Path(path)
    if fmt not in FORMATS:
        raise WorkloadError(f"unknown dataset format {fmt!r}", source=str(path), allowed=FORMATS)
    if not path.is_file():
        raise WorkloadError("dataset file not found", source=str(path))
    fmt = detect_format(path) if fmt == "auto" else fmt
    buckets = buckets or Buckets()
    api = api or ("chat" if fmt == "sharegpt" else "completions")
    made = 0
    for where, record in _records(path, fmt):
        if limit is not None and made >= limit:
            return
        if fmt == "sharegpt":
            turns = _sharegpt_turns(_conversation(record, where, str(path)), tokenizer, api, default_max_tokens)
        else:
            turns = [_prompt_turn(record, where, str(path), tokenizer, api, default_max_tokens)]
        if not turns:
            continue  # a conversation without a user message has nothing to send
        session_id = f"{seed}-{made}"
        for t, (body, tokens, out) in enumerate(turns):
            multi = len(turns) > 1
            req = RequestSpec(
                request_id=f"{session_id}-{t}", api=api, prompt_tokens=tokens,
                prompt_bucket=buckets.prompt_label(tokens), output_bucket=buckets.output_label(out),
                session_id=session_id if multi else None, turn=t if multi else None,
                labels={"source": path.name}, **body,
            )
            apply_output_length(req, out, force_output_length)
            turns[t] = req
        yield Session(session_id=session_id, turns=turns)
        made += 1


def _plain_count(tokenizer: PromptTokenizer, text: str) -> int:
    return len(tokenizer.encode_plain(text))


def _body(history: list[dict[str, str]], tokenizer: PromptTokenizer, api: str) -> tuple[dict[str, Any], int]:
    if api == "chat":
        return {"messages": list(history)}, tokenizer.count_chat(history)
    text = "\n\n".join(m["content"] for m in history)
    return {"prompt": text}, tokenizer.count(text)


def _sharegpt_turns(messages, tokenizer, api, default_max_tokens):
    turns = []
    for i, msg in enumerate(messages):
        if msg["role"] != "user":
            continue
        reply = messages[i + 1] if i + 1 < len(messages) and messages[i + 1]["role"] == "assistant" else None
        out = _plain_count(tokenizer, reply["content"]) if reply else default_max_tokens
        body, tokens = _body(messages[: i + 1], tokenizer, api)
        turns.append((body, tokens, max(1, out)))
    return turns


def _prompt_turn(record, where, source, tokenizer, api, default_max_tokens):
    if not isinstance(record, dict) or not ({"prompt", "messages"} & set(record)):
        raise WorkloadError(f"{where}: expected an object with `prompt` (or `messages`)", source=source)
    out = next((record[k] for k in _OUTPUT_KEYS if k in record), default_max_tokens)
    if isinstance(out, bool) or not isinstance(out, int) or out < 1:
        raise WorkloadError(f"{where}: output length must be an integer >= 1, got {out!r}", source=source)
    if "messages" in record:
        history = _conversation(record, where, source)
    else:
        if not isinstance(record["prompt"], str):
            raise WorkloadError(f"{where}: `prompt` must be a string", source=source)
        history = [{"role": "user", "content": record["prompt"]}]
    if api == "completions" and "prompt" in record:
        return {"prompt": record["prompt"]}, tokenizer.count(record["prompt"]), out
    body, tokens = _body(history, tokenizer, api)
    return body, tokens, out
