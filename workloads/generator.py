"""Turn a WorkloadSpec into an endless, deterministic stream of Sessions.

Every random choice (class, lengths, turns, think times, where in the corpus a
prompt starts) comes from one `random.Random(seed)` in a fixed order, so the
same spec, tokenizer and seed give a byte-identical stream (`stream_fingerprint`).

Sessions: the first turn's prompt has `prompt_tokens` tokens; with
`history: true` turn t's prompt is turn t-1's prompt + a synthesized reply of
turn t-1's `max_tokens` tokens + a fresh `prompt_tokens` sample of new tokens
(the chat framing of the reply and of the new user message included), so
`prompt_tokens[t] = prompt_tokens[t-1] + max_tokens[t-1] + new[t]` exactly.
Lengths below a shape's fixed cost (BOS, chat framing, the shared prefix) are
raised to the smallest possible prompt, and a reply carried into the next turn
to the shortest piece that can follow text; `RequestSpec.prompt_tokens` is
always the exact count.

`session_stream` first checks the workload against the tokenizer (`preflight`):
a tokenizer that cannot build its prompts token-exact (no chat template for a
chat class, a template that refuses a system message that a shared prefix
needs, counts that do not come out exact) is refused with one WorkloadError
that lists every class's problem, before any session is built.
"""

from __future__ import annotations

import bisect
import hashlib
import itertools
import json
import random
from collections import defaultdict
from collections.abc import Iterable, Iterator
from dataclasses import asdict
from functools import lru_cache
from typing import Any

from servescope.workloads.errors import WorkloadError
from servescope.workloads.prompt_builder import PromptBuilder
from servescope.workloads.spec import RequestClass, WorkloadSpec
from servescope.workloads.tokenizer import PromptTokenizer
from servescope.workloads.types import RequestSpec, Session


@lru_cache(maxsize=4)
def _builder_for(fingerprint: str, tokenizer: PromptTokenizer) -> PromptBuilder:
    return PromptBuilder(tokenizer)


def prompt_builder(tokenizer: PromptTokenizer) -> PromptBuilder:
    """The shared (cached) builder of a tokenizer: its corpus index and calibration are paid once."""
    return _builder_for(tokenizer.fingerprint, tokenizer)


def apply_output_length(spec: RequestSpec, max_tokens: int, force: bool) -> None:
    """Ask for `max_tokens`; with `force`, also min_tokens = max_tokens and ignore_eos (vLLM's knobs)."""
    spec.max_tokens = max_tokens
    if force:
        spec.min_tokens = max_tokens
        spec.ignore_eos = True


class _SessionFactory:
    def __init__(self, spec: WorkloadSpec, tokenizer: PromptTokenizer, seed: int,
                 api: str | None, force_output_length: bool) -> None:
        self.spec = spec
        self.builder = prompt_builder(tokenizer)
        self.seed = seed
        self.api = api
        self.force = force_output_length
        self.rng = random.Random(seed)
        self.cum_weights = list(itertools.accumulate(c.weight for c in spec.classes))
        self.members: dict[str, int] = defaultdict(int)
        self._starts: list[int] = []

    def draw_start(self) -> int:
        """Where a prompt's own text starts in the corpus: one of the distinct openings, drawn without
        replacement (a new shuffle once all are used). Drawn with replacement from every sentence,
        512 prompts shared a start ~25 times, and two prompts from one start share all their text:
        a server's prefix cache then served ~5% of a "no shared prefix" workload almost whole (a
        reference-engine run on an H200)."""
        if not self._starts:
            self._starts = list(self.builder.index.openings)
            self.rng.shuffle(self._starts)
        return self._starts.pop()

    def pick_class(self) -> RequestClass:
        x = self.rng.random() * self.cum_weights[-1]
        return self.spec.classes[min(bisect.bisect_right(self.cum_weights, x), len(self.cum_weights) - 1)]

    def session(self, index: int) -> Session:
        cls = self.pick_class()
        api = self.api or cls.api
        rng = self.rng
        multi = cls.session.turns.upper_bound > 1
        n_turns = cls.session.turns.sample_int(rng, 1)
        session_id = f"{self.seed}-{index}"
        turns: list[RequestSpec] = []
        state: dict[str, Any] | None = None  # what the next turn's history builds on
        for t in range(n_turns):
            new_tokens = cls.prompt_tokens.sample_int(rng, 1)
            out_tokens = cls.output_tokens.sample_int(rng, 1)
            think = cls.session.think_time_s.sample(rng) if t else 0.0
            start = self.draw_start()
            if state is None or not cls.session.history:
                body, total, state = self._first_prompt(cls, api, new_tokens, start)
            else:
                body, total, state = self._next_prompt(api, state, new_tokens, start, rng)
            if cls.session.history and t + 1 < n_turns:  # the next turn carries this reply as a corpus piece
                out_tokens = max(out_tokens, self.builder.min_piece_tokens(lead=api == "chat"))
            state["out"] = out_tokens
            req = RequestSpec(
                request_id=f"{session_id}-{t}", api=api, prompt_tokens=total,
                tenant=cls.tenant,
                prefix_group=cls.prefix.group if cls.prefix else None,
                prefix_tokens=cls.prefix.tokens if cls.prefix else 0,
                prompt_bucket=self.spec.buckets.prompt_label(total),
                output_bucket=self.spec.buckets.output_label(out_tokens),
                session_id=session_id if multi else None, turn=t if multi else None,
                think_time_s=think, labels={"class": cls.name, **cls.labels},
                **body,
            )
            apply_output_length(req, out_tokens, self.force)
            turns.append(req)
        return Session(session_id=session_id, turns=turns)

    def _first_prompt(self, cls: RequestClass, api: str, tokens: int, start: int):
        b = self.builder
        prefix = cls.prefix
        if api == "completions":
            if prefix is None:
                total = max(tokens, b.min_completion_tokens())
                text = b.completion(total, start)
            else:
                member = b.member_start(prefix.group, self.members[prefix.group])
                self.members[prefix.group] += 1
                head = b.prefix(prefix.group, prefix.tokens, api)
                total = max(tokens, b.min_completion_tokens(head.tokens))
                text = b.completion(total, member, head=head.text, head_tokens=head.tokens)
            return {"prompt": text}, total, {"text": text, "total": total}
        history: list[dict[str, Any]] = []
        history_tokens = 0
        if prefix is not None:
            start = b.member_start(prefix.group, self.members[prefix.group], api)
            self.members[prefix.group] += 1
            head = b.prefix(prefix.group, prefix.tokens, api)
            history = [{"role": "system", "content": head.text}]
            history_tokens = head.tokens
        roles = tuple(m["role"] for m in history) + ("user",)
        total = max(tokens, b.min_chat_tokens(roles, history_tokens))
        chat = b.chat(total, start, history=history, history_tokens=history_tokens)
        return {"messages": chat.messages}, total, {
            "messages": chat.messages, "total": total, "content": history_tokens + chat.content_tokens,
        }

    def _next_prompt(self, api: str, state: dict[str, Any], new_tokens: int, start: int, rng: random.Random):
        b = self.builder
        out = state["out"]
        reply_start = rng.randrange(len(b.index))
        if api == "completions":
            # The previous prompt without the special tokens after its text, then the reply, then new text.
            head = state["text"] + b.piece(out, reply_start, lead=False)
            head_tokens = state["total"] - b.eos + out
            total = max(head_tokens + new_tokens + b.eos, b.min_completion_tokens(head_tokens))
            text = b.completion(total, start, head=head, head_tokens=head_tokens)
            return {"prompt": text}, total, {"text": text, "total": total}
        history = state["messages"] + [{"role": "assistant", "content": b.piece(out, reply_start, lead=True)}]
        history_tokens = state["content"] + out
        roles = tuple(m["role"] for m in history) + ("user",)
        total = max(state["total"] + out + new_tokens, b.min_chat_tokens(roles, history_tokens))
        chat = b.chat(total, start, history=history, history_tokens=history_tokens)
        return {"messages": chat.messages}, total, {
            "messages": chat.messages, "total": total, "content": history_tokens + chat.content_tokens,
        }


def _chat_shapes(cls: RequestClass) -> list[tuple[tuple[str, ...], str]]:
    """The role sequences a chat class sends, each with why (for messages)."""
    system = ("system",) if cls.prefix is not None else ()
    why = "its shared prefix is sent as a system message" if system else "single user messages"
    shapes = [(system + ("user",), why)]
    if cls.session.history and cls.session.turns.upper_bound > 1:
        shapes.append((system + ("user", "assistant", "user"), "multi-turn sessions carry earlier replies"))
    return shapes


def _count(tokenizer: PromptTokenizer, req: RequestSpec) -> int:
    """The prompt's length as the server counts it."""
    return tokenizer.count(req.prompt) if req.api == "completions" else tokenizer.count_chat(req.messages)


def preflight(spec: WorkloadSpec, tokenizer: PromptTokenizer, *, api: str | None = None, sessions: int = 2) -> None:
    """Refuse, before anything is sent, a tokenizer that cannot build this workload's prompts token-exact.

    Every class is checked with the shapes it sends: a chat class needs a chat template that
    accepts its roles (a system message for a shared prefix, assistant replies for sessions
    with history), and a few of its sessions are built and re-encoded in full. When a count
    differs the builder switches to verify mode and the check runs again; a tokenizer that is
    still not exact is refused. Raises one WorkloadError that lists every problem found."""
    builder = prompt_builder(tokenizer)
    problems: list[WorkloadError] = []
    for i, cls in enumerate(spec.classes):
        cls_api = api or cls.api
        where = f"class {cls.name!r} (classes[{i}])"
        if cls_api == "chat":
            if tokenizer.template_problem is not None:
                problems.append(WorkloadError(
                    f"{where} sends chat requests, but tokenizer {tokenizer.name} cannot render them: "
                    f"{tokenizer.template_problem}; add a `chat_template` to {tokenizer.path}/tokenizer_config.json "
                    "(or a chat_template.jinja file beside it), or use --api completions", source=str(tokenizer.path)))
                continue
            refused = next(((roles, why, reason) for roles, why in _chat_shapes(cls)
                            if (reason := builder.refusal(roles)) is not None), None)
            if refused is not None:
                roles, why, reason = refused
                fix = ("drop `prefix` from the class, " if "system" in roles else "") + (
                    "set `session: {history: false}`, " if "assistant" in roles and "system" not in roles else "")
                problems.append(WorkloadError(
                    f"{where} sends conversations of roles {', '.join(roles)} ({why}), which tokenizer "
                    f"{tokenizer.name} cannot render ({reason}); use a tokenizer whose chat template accepts "
                    f"them, {fix}or use --api completions", source=str(tokenizer.path)))
                continue
        try:
            bad = _inexact_turn(WorkloadSpec(name=spec.name, classes=(cls,)), tokenizer, api, sessions)
            if bad is not None and not builder.verify:
                builder.verify = True  # sums do not add up for this shape: re-encode every prompt from now on
                bad = _inexact_turn(WorkloadSpec(name=spec.name, classes=(cls,)), tokenizer, api, sessions)
        except WorkloadError as err:
            problems.append(WorkloadError(f"{where}: {err.message}", source=err.source or str(tokenizer.path)))
            continue
        if bad is not None:
            asked, got = bad
            problems.append(WorkloadError(
                f"{where}: prompts cannot be made token-exact with tokenizer {tokenizer.name} (asked for {asked} "
                f"tokens, the tokenizer counts {got} even with every prompt re-encoded); pass the target model's own "
                "tokenizer folder",
                source=str(tokenizer.path)))
    if problems:
        raise WorkloadError.collect(problems)


def _inexact_turn(spec: WorkloadSpec, tokenizer: PromptTokenizer, api: str | None, n: int) -> tuple[int, int] | None:
    """(asked, counted) of the first turn of `n` sessions whose prompt is not exactly its length, or None."""
    factory = _SessionFactory(spec, tokenizer, 0, api, False)
    for index in range(n):
        for req in factory.session(index).turns:
            got = _count(tokenizer, req)
            if got != req.prompt_tokens:
                return req.prompt_tokens, got
    return None


def session_stream(spec: WorkloadSpec, tokenizer: PromptTokenizer, seed: int, *,
                   api: str | None = None, force_output_length: bool = False) -> Iterator[Session]:
    """Endless sessions drawn from `spec` (api, if given, overrides every class's api).

    The workload is checked against the tokenizer first (`preflight`), so a tokenizer that
    cannot build its prompts raises WorkloadError here, before any session exists."""
    if api is not None and api not in ("completions", "chat"):
        raise WorkloadError(f"unknown api {api!r}", field="api", allowed=("completions", "chat"))
    preflight(spec, tokenizer, api=api)
    factory = _SessionFactory(spec, tokenizer, seed, api, force_output_length)
    return (factory.session(index) for index in itertools.count())
def stream_fingerprint(sessions: Iterable[Session], n: int) -> str:
    """sha256 of the first `n` sessions (every field): equal streams give equal fingerprints."""
    digest = hashlib.sha256()
    for session in itertools.islice(sessions, n):
        digest.update(json.dumps(asdict(session), sort_keys=True, separators=(",", ":")).encode())
        digest.update(b"\n")
    return digest.hexdigest()
