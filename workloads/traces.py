"""Replay timestamped traces: BurstGPT CSV and Mooncake JSONL -> Sessions with `arrival_s`.

- BurstGPT (`.csv`): columns `Timestamp` (s), `Request tokens`, `Response tokens`
  (optional `Model`, `Log Type` become labels).
- Mooncake (`.jsonl`): `timestamp` (ms), `input_length`, `output_length`,
  `hash_ids`: one id per block of `block_tokens` (512) prompt tokens; equal ids
  mean equal block content, so requests whose leading ids match share
  identical leading prompt blocks (prefix-cache behaviour is replayed).

Prompts are synthesized token-exact from the corpus. `arrival_s` is the offset
from the first record, divided by `speed` (2.0 replays twice as fast).
"""

from __future__ import annotations

import csv
import math
from collections import OrderedDict
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from servescope.workloads.errors import WorkloadError
from servescope.workloads.generator import apply_output_length, prompt_builder
from servescope.workloads.jsonstream import iter_jsonl
from servescope.workloads.prompt_builder import PromptBuilder, stable_int
from servescope.workloads.spec import Buckets
from servescope.workloads.tokenizer import PromptTokenizer
from servescope.workloads.types import RequestSpec, Session

FORMATS = ("auto", "burstgpt", "mooncake")
BURSTGPT_COLUMNS = ("Timestamp", "Request tokens", "Response tokens")
MOONCAKE_FIELDS = ("timestamp", "input_length", "output_length")


def trace_sessions(path: str | Path, tokenizer: PromptTokenizer, seed: int, speed: float = 1.0, *,
                   fmt: str = "auto", api: str = "completions", force_output_length: bool = False,
                   block_tokens: int = 512, limit: int | None = None,
                   buckets: Buckets | None = None) -> Iterator[Session]:
    """One single-turn session per trace record, streamed, with `arrival_s` set (bounded)."""
    path = Path(path)
    if not (speed > 0 and math.isfinite(speed)):
        raise WorkloadError(f"speed must be a number > 0, got {speed}", field="speed")
    if fmt not in FORMATS:
        raise WorkloadError(f"unknown trace format {fmt!r}", source=str(path), allowed=FORMATS)
    if not path.is_file():
        raise WorkloadError("trace file not found", source=str(path))
    if fmt == "auto":
        fmt = {".csv": "burstgpt", ".jsonl": "mooncake"}.get(path.suffix, "")
        if not fmt:
            raise WorkloadError("cannot tell the trace format from the file name", source=str(path),
                                allowed=("*.csv (BurstGPT)", "*.jsonl (Mooncake)"))
    records = _burstgpt(path) if fmt == "burstgpt" else _mooncake(path)
    synth = Synthesizer(prompt_builder(tokenizer), api, block_tokens)
    buckets = buckets or Buckets()
    t0 = None
    for i, (ts, n_in, n_out, hash_ids, labels) in enumerate(records):
        if limit is not None and i >= limit:
            return
        t0 = ts if t0 is None else t0
        body, tokens = synth.prompt(n_in, hash_ids, stable_int(seed, i))
        out = max(1, n_out)
        req = RequestSpec(
            request_id=f"{seed}-{i}-0", api=api, prompt_tokens=tokens,
            prefix_group=f"block-{hash_ids[0]}" if hash_ids else None,
            prompt_bucket=buckets.prompt_label(tokens), output_bucket=buckets.output_label(out),
            labels=labels, **body,
        )
        apply_output_length(req, out, force_output_length)
        yield Session(session_id=f"{seed}-{i}", turns=[req], arrival_s=(ts - t0) / speed)


def _number(value: Any, where: str, source: str, name: str) -> float:
    try:
        x = float(value)
    except (TypeError, ValueError):
        x = math.nan
    if not math.isfinite(x) or x < 0:
        raise WorkloadError(f"{where}: `{name}` must be a number >= 0, got {value!r}", source=source)
    return x


def _burstgpt(path: Path) -> Iterator[tuple[float, int, int, list[int], dict[str, str]]]:
    with path.open(newline="", encoding="utf-8") as fh:
        reader = csv.DictReader(fh)
        header = {name.strip().lower(): name for name in reader.fieldnames or []}
        missing = [c for c in BURSTGPT_COLUMNS if c.lower() not in header]
        if missing:
            raise WorkloadError(f"missing column(s) {missing}", source=str(path), allowed=BURSTGPT_COLUMNS)
        ts_col, in_col, out_col = (header[c.lower()] for c in BURSTGPT_COLUMNS)
        extra = [(label, header[col]) for label, col in (("model", "model"), ("log_type", "log type")) if col in header]
        for row_no, row in enumerate(reader, 2):
            where = f"row {row_no}"
            labels = {label: row[col] for label, col in extra if row.get(col)}
            yield (_number(row[ts_col], where, str(path), ts_col),
                   int(_number(row[in_col], where, str(path), in_col)),
                   int(_number(row[out_col], where, str(path), out_col)), [], labels)


def _mooncake(path: Path) -> Iterator[tuple[float, int, int, list[int], dict[str, str]]]:
    for lineno, obj in iter_jsonl(path):
        where = f"line {lineno}"
        if not isinstance(obj, dict) or any(k not in obj for k in MOONCAKE_FIELDS):
            raise WorkloadError(f"{where}: missing field(s)", source=str(path), allowed=MOONCAKE_FIELDS + ("hash_ids",))
        hash_ids = obj.get("hash_ids") or []
        if not isinstance(hash_ids, list) or not all(isinstance(h, int) for h in hash_ids):
            raise WorkloadError(f"{where}: `hash_ids` must be a list of integers", source=str(path))
        yield (_number(obj["timestamp"], where, str(path), "timestamp") / 1000.0,
               int(_number(obj["input_length"], where, str(path), "input_length")),
               int(_number(obj["output_length"], where, str(path), "output_length")), hash_ids, {})


class Synthesizer:
    """Prompts of exact length; with hash_ids, built block by block so equal ids give equal text."""

    def __init__(self, builder: PromptBuilder, api: str, block_tokens: int) -> None:
        if api not in ("completions", "chat"):
            raise WorkloadError(f"unknown api {api!r}", field="api", allowed=("completions", "chat"))
        if block_tokens < 16:
            raise WorkloadError(f"block_tokens must be >= 16, got {block_tokens}", field="block_tokens")
        self.b = builder
        self.api = api
        self.block = block_tokens
        self._blocks: OrderedDict[tuple[int, int], str] = OrderedDict()  # LRU: traces reuse hot blocks

    def _block_text(self, position: int, hash_id: int, tokens: int) -> str:
        key = (hash_id, tokens if position == 0 else -tokens)
        text = self._blocks.get(key)
        if text is None:
            start = stable_int("block", hash_id) % len(self.b.index)
            text = self.b.piece(tokens, start, lead=position == 0)
            self._blocks[key] = text
            if len(self._blocks) > 20_000:
                self._blocks.popitem(last=False)
        else:
            self._blocks.move_to_end(key)
        return text

    def prompt(self, tokens: int, hash_ids: list[int], start: int) -> tuple[dict[str, Any], int]:
        b = self.b
        # Fixed cost before the text: BOS (completions) or the framing before the user text (chat);
        # in all, with what a completions server adds after the text or the framing after it.
        head_cost = b.bos if self.api == "completions" else b.pre_user(("user",))
        total_cost = b.bos + b.eos if self.api == "completions" else b.framing(("user",))
        tokens = max(tokens, total_cost + 1)
        text, used, full = "", 0, 0  # text so far, its tokens, whole blocks in it
        content = tokens - total_cost
        for position, hash_id in enumerate(hash_ids):
            size = self.block - (head_cost if position == 0 else 0)
            if size < 1 or used + size > content:
                break
            text += self._block_text(position, hash_id, size)
            used, full = used + size, full + 1
        rest = content - used
        if rest > 0:
            # A partial block starts where its full block starts, so its text is a prefix of that block's;
            # tokens beyond the listed blocks are this request's own.
            own = full >= len(hash_ids)
            piece_start = start if own else stable_int("block", hash_ids[full])
            text += b.piece(rest, piece_start % len(b.index), lead=not text)
        if self.api == "completions":
            return {"prompt": text}, tokens
        return {"messages": [{"role": "user", "content": text}]}, tokens

