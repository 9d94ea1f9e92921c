"""Token-exact prompts: completions text or chat messages of exactly N tokens.

Counting follows `workloads.tokenizer` (completions with the tokenizer's special
tokens, chat as the rendered template). A prompt is built from corpus pieces
whose counts add up (see `corpus_index`), plus the fixed cost of the BOS or of
the chat framing, measured once per shape with probe texts.

At start-up the builder proves that adding up is exact for this tokenizer by
fully re-encoding a sample of prompts of every shape (`calibrate`). If any
differs, it switches to `verify` mode: every prompt is re-encoded and its last
piece resized until the count is exact (slower, still exact).
"""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass
from typing import Any

from workloads.corpus_index import CorpusIndex, corpus_index
from workloads.errors import WorkloadError
from workloads.tokenizer import PromptTokenizer

_FIX_ROUNDS = 8


def stable_int(*parts: object) -> int:
    """A process-independent hash (Python's hash() of str is salted per process)."""
    return int.from_bytes(hashlib.blake2b("\x1f".join(map(str, parts)).encode(), digest_size=8).digest(), "big")


@dataclass(slots=True)
class ChatPrompt:
    messages: list[dict[str, Any]]
    tokens: int  # the whole rendered prompt
    content_tokens: int  # the new user message's text alone


class PromptBuilder:
    """Builds exact-length prompts for one tokenizer (cheap to share; keeps small caches)."""

    def __init__(self, tokenizer: PromptTokenizer, *, verify: bool | None = None) -> None:
        self.tok = tokenizer
        self.index: CorpusIndex = corpus_index(tokenizer)
        self.bos = tokenizer.count("")  # tokens a completions server adds to any prompt (BOS)
        self._framing: dict[tuple[str, ...], int] = {}
        self._pre_user: dict[tuple[str, ...], int] = {}
        self._prefixes: dict[tuple[str, str, int], str] = {}
        self.verify = False
        if verify is None:
            self.verify = not self.calibrate()
        else:
            self.verify = verify

    # ---- the two prompt shapes ------------------------------------------------------------------

    def min_completion_tokens(self, head_tokens: int = 0) -> int:
        return max(head_tokens, self.bos) + 1

    def completion(self, tokens: int, start: int, *, head: str = "", head_tokens: int = 0) -> str:
        """Text that counts exactly `tokens` (BOS included); continues `head` (of `head_tokens`) if given."""
        if not head:
            return self._fit(lambda n: self.index.piece(n, start, lead=True), tokens - self.bos,
                             lambda text: self.tok.count(text), tokens)
        return head + self._fit(lambda n: self.index.piece(n, start, lead=False), tokens - head_tokens,
                                lambda text: self.tok.count(head + text), tokens)

    def chat(self, tokens: int, start: int, *, history: list[dict[str, Any]] | None = None,
             history_tokens: int = 0) -> ChatPrompt:
        """Messages = history + one user message, rendered to exactly `tokens` tokens.

        `history_tokens` is the content tokens of the history's messages (known to the caller,
        who built them from pieces); the framing of the whole conversation is added here.
        """
        history = list(history or [])
        roles = tuple(m["role"] for m in history) + ("user",)
        content = tokens - self.framing(roles) - history_tokens

        def render_count(text: str) -> int:
            return self.tok.count_chat(history + [{"role": "user", "content": text}])

        text = self._fit(lambda n: self.index.piece(n, start, lead=True), content, render_count, tokens)
        return ChatPrompt(history + [{"role": "user", "content": text}], tokens, content)

    def min_chat_tokens(self, roles: tuple[str, ...], history_tokens: int = 0) -> int:
        return self.framing(roles) + history_tokens + 1

    def piece(self, tokens: int, start: int, *, lead: bool) -> str:
        """A bare corpus piece (assistant replies, shared prefixes): exactly `tokens` in context."""
        return self.index.piece(tokens, start, lead=lead)

    def _fit(self, make, content_tokens: int, full_count, target: int) -> str:
        if content_tokens < 1:
            raise WorkloadError(f"{target} tokens is below the fixed cost of this prompt shape; use a longer prompt")
        text = make(content_tokens)
        if not self.verify:
            return text
        n = content_tokens
        for _ in range(_FIX_ROUNDS):  # verify mode: re-encode, resize the last piece by the difference
            got = full_count(text)
            if got == target:
                return text
            n += target - got
            if n < 1:
                break
            text = make(n)
        raise WorkloadError(f"could not reach exactly {target} tokens with tokenizer {self.tok.name}")

    # ---- shared prefixes ------------------------------------------------------------------------

    def prefix(self, group: str, tokens: int, api: str) -> str:
        """The shared prefix of a group: completions text, or the system message's content for chat.

        completions: prompt = prefix + suffix, and the prefix's `tokens` include the BOS;
        chat: messages = [system: prefix, user: ...] and `tokens` counts everything before the
        user's text (BOS, headers, the system text, its end-of-turn, the user header).
        """
        key = (group, api, tokens)
        if key not in self._prefixes:
            start = stable_int("prefix", group) % len(self.index)
            if api == "completions":
                self._prefixes[key] = self.completion(tokens, start)
            else:
                content = tokens - self.pre_user(("system", "user"))
                if content < 1:
                    raise WorkloadError(
                        f"prefix group {group!r}: {tokens} tokens is less than this tokenizer's chat framing "
                        f"before the user text ({self.pre_user(('system', 'user')) + 1} tokens at least)"
                    )
                self._prefixes[key] = self.index.piece(content, start, lead=True)
        return self._prefixes[key]

    def member_start(self, group: str, member: int) -> int:
        """Where member `member` of a group starts its own text: starters have distinct first tokens."""
        starters = self.index.starters
        return starters[(stable_int("members", group) + member) % len(starters)]

    # ---- chat framing, measured with probes -----------------------------------------------------

    def _probe(self, k: int) -> tuple[str, int]:
        """A whole sentence as message text: starters give probes with different first tokens."""
        unit = self.index.starters[k % len(self.index.starters)]
        return self.index.units[unit][1:], len(self.index.lead_ids[unit])

    def framing(self, roles: tuple[str, ...]) -> int:
        """Tokens of the chat template around contents for this role sequence (+ generation prompt)."""
        if roles not in self._framing:
            probes = [self._probe(i) for i in range(len(roles))]
            msgs = [{"role": r, "content": p} for r, (p, _) in zip(roles, probes)]
            self._framing[roles] = self.tok.count_chat(msgs) - sum(n for _, n in probes)
        return self._framing[roles]

    def pre_user(self, roles: tuple[str, ...]) -> int:
        """Framing tokens before the last (user) message's text: where two different user texts diverge."""
        if roles not in self._pre_user:
            probes = [self._probe(i) for i in range(len(roles) + 1)]
            head = [{"role": r, "content": p} for r, (p, _) in zip(roles[:-1], probes)]
            a = self.tok.encode_chat(head + [{"role": "user", "content": probes[-2][0]}])
            b = self.tok.encode_chat(head + [{"role": "user", "content": probes[-1][0]}])
            diverge = next(i for i, (x, y) in enumerate(zip(a, b)) if x != y)
            self._pre_user[roles] = diverge - sum(n for _, n in probes[: len(roles) - 1])
        return self._pre_user[roles]

    # ---- calibration ------------------------------------------------------------------------------

    def calibrate(self, samples: int = 48) -> bool:
        """True when piece counts add up exactly for this tokenizer (checked by full re-encoding)."""
        rng = random.Random(1234)
        saved, self.verify = self.verify, False
        try:
            for i in range(samples):
                n = rng.choice((2, 3, 7, 31, 64, 257, 1000, 3000)) + self.bos
                start = rng.randrange(len(self.index))
                text = self.completion(n, start)
                if self.tok.count(text) != n:
                    return False
                suffix = self.completion(n + 50, self.member_start("calib", i), head=text, head_tokens=n)
                ids = self.tok.encode(suffix)
                if len(ids) != n + 50 or ids[:n] != self.tok.encode(text):
                    return False
                if self.tok.has_chat_template:
                    reply = self.index.piece(20, start + 1, lead=True)
                    hist = [{"role": "system", "content": self.index.piece(9, start, lead=True)},
                            {"role": "user", "content": self.index.piece(11, start + 2, lead=True)},
                            {"role": "assistant", "content": reply}]
                    total = self.min_chat_tokens(("system", "user", "assistant", "user"), 40) + n
                    prompt = self.chat(total, start + 3, history=hist, history_tokens=40)
                    if self.tok.count_chat(prompt.messages) != total:
                        return False
            return True
        except WorkloadError:
            return False
        finally:
            self.verify = saved
