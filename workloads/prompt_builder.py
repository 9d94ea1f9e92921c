"""Token-exact prompts: completions text or chat messages of exactly N tokens.

Counting follows `workloads.tokenizer` (completions with the tokenizer's special
tokens, chat as the rendered template). A prompt is built from corpus pieces
whose counts add up (see `corpus_index`), plus the fixed cost of the special
tokens a completions server adds (`bos` before the text, `eos` after it) or of
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

from servescope.workloads.corpus_index import CorpusIndex, corpus_index
from servescope.workloads.errors import WorkloadError
from servescope.workloads.tokenizer import PromptTokenizer

_FIX_ROUNDS = 8
_FIX_STARTS = 4  # verify mode: other corpus starts tried when one cannot be resized to the exact count
_MIN_PROBES = 4  # verify mode: one-token texts measured for the shortest prompt of a shape
_USER_START_UNITS = 3000  # corpus sentences rendered as a user message to find where the content starts


def stable_int(*parts: object) -> int:
    """A process-independent hash (Python's hash() of str is salted per process)."""
    return int.from_bytes(hashlib.blake2b("\x1f".join(map(str, parts)).encode(), digest_size=8).digest(), "big")


@dataclass(slots=True)
class ChatPrompt:
    messages: list[dict[str, Any]]
    tokens: int  # the whole rendered prompt
    content_tokens: int  # the new user message's text alone


@dataclass(frozen=True, slots=True)
class Prefix:
    """A group's shared prefix: completions text that opens the prompt, or the system message's content.

    `tokens` is what the text takes at the front of a prompt: completions, the BOS and the
    text (the joiner that follows, shared by every member, makes up the group's length);
    chat, the system message's content tokens (the framing around it is the template's)."""

    text: str
    tokens: int


def common_prefix(a: list[int], b: list[int]) -> int:
    """How many leading ids two encodings share."""
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


class PromptBuilder:
    """Builds exact-length prompts for one tokenizer (cheap to share; keeps small caches)."""

    def __init__(self, tokenizer: PromptTokenizer, *, verify: bool | None = None) -> None:
        self.tok = tokenizer
        self.index: CorpusIndex = corpus_index(tokenizer)
        # Special tokens a completions server adds to any prompt: before the text (a BOS, shared by prompts
        # that share a prefix) and after it (BERT's [SEP], T5's </s>).
        self.bos, self.eos = tokenizer.added_around
        self.joiner = self.index.joiner_tokens  # tokens a continuation starts with before it differs from others
        self._framing: dict[tuple[str, ...], int] = {}
        self._pre_user: dict[tuple[str, ...], int] = {}
        self._shortest: dict[tuple[str, ...], int] = {}
        self._user_starts: dict[tuple[str, ...], tuple[int, list[int]]] = {}
        self._prefixes: dict[tuple[str, str, int], Prefix] = {}
        self.verify = False
        if verify is None:
            self.verify = not self.calibrate()
        else:
            self.verify = verify

    # ---- the two prompt shapes ------------------------------------------------------------------

    def min_completion_tokens(self, head_tokens: int = 0) -> int:
        """The shortest completions prompt: after a head of `head_tokens` (BOS included), or alone."""
        if head_tokens:
            return head_tokens + self.index.min_piece_tokens(lead=False) + self.eos
        return self.bos + 1 + self.eos + self._shortest_excess(("completions",))

    def completion(self, tokens: int, start: int, *, head: str = "", head_tokens: int = 0) -> str:
        """Text that counts exactly `tokens` (special tokens included); continues `head` if given.

        `head_tokens` is what `head` takes at the front of a prompt: the BOS and its own tokens."""
        if not head:
            return self._fit(lambda n, s: self.index.piece(n, s, lead=True), start, tokens - self.bos - self.eos,
                             self.tok.count, tokens)
        return head + self._fit(lambda n, s: self.index.piece(n, s, lead=False), start,
                                tokens - head_tokens - self.eos, lambda text: self.tok.count(head + text), tokens)

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

        text = self._fit(lambda n, s: self.index.piece(n, s, lead=True), start, content, render_count, tokens)
        return ChatPrompt(history + [{"role": "user", "content": text}], tokens, content)

    def min_chat_tokens(self, roles: tuple[str, ...], history_tokens: int = 0) -> int:
        return self.framing(roles) + history_tokens + 1 + self._shortest_excess(roles)

    def _shortest_excess(self, shape: tuple[str, ...]) -> int:
        """Verify mode: how many tokens the shortest prompt of a shape (a one-token text) counts beyond its
        fixed cost + 1, where the text merges with what surrounds it. 0 when sums are exact."""
        if not self.verify:
            return 0
        if shape not in self._shortest:
            excess = 0
            for k in range(_MIN_PROBES):
                text = self.index.piece(1, self.index.starters[k % len(self.index.starters)], lead=True)
                if shape == ("completions",):
                    got = self.tok.count(text) - self.bos - self.eos - 1
                else:
                    probes = [self._probe(i) for i in range(len(shape) - 1)] + [(text, 1)]
                    got = len(self._encode_roles(shape, probes)) - self.framing(shape) - sum(n for _, n in probes)
                excess = max(excess, got)
            self._shortest[shape] = excess
        return self._shortest[shape]

    def piece(self, tokens: int, start: int, *, lead: bool) -> str:
        """A bare corpus piece (assistant replies, shared prefixes): exactly `tokens` in context."""
        return self.index.piece(tokens, start, lead=lead)

    def min_piece_tokens(self, *, lead: bool) -> int:
        return self.index.min_piece_tokens(lead=lead)

    def _fit(self, make, start: int, content_tokens: int, full_count, target: int) -> str:
        """`make(n, start)`'s text, sized so that `full_count(text) == target`.

        Additive mode trusts the sum (proven by `calibrate`); verify mode re-encodes and resizes
        the text by the difference, and tries a few other corpus starts when that does not settle."""
        if content_tokens < 1:
            raise WorkloadError(f"{target} tokens is below the fixed cost of this prompt shape; use a longer prompt")
        if not self.verify:
            return make(content_tokens, start)
        for attempt in range(_FIX_STARTS):
            s = start + attempt * 7919
            n, tried = content_tokens, set()
            for _ in range(_FIX_ROUNDS):
                if n < 1 or n in tried:
                    break
                tried.add(n)
                try:
                    text = make(n, s)
                except WorkloadError:
                    break
                got = full_count(text)
                if got == target:
                    return text
                n += target - got
        raise WorkloadError(f"could not reach exactly {target} tokens with tokenizer {self.tok.name}",
                            source=str(self.tok.path))

    # ---- shared prefixes ------------------------------------------------------------------------

    def prefix(self, group: str, tokens: int, api: str) -> Prefix:
        """The shared prefix of a group: the first `tokens` tokens of every member's prompt are the same.

        completions: prompt = prefix + a member's continuation; the continuation opens with the
        joiner (when the tokenizer has one), so the prefix text holds `tokens - bos - joiner` tokens.
        chat: messages = [system: prefix, user: ...] and `tokens` counts everything before the
        user's text (BOS, headers, the system text, its end-of-turn, the user header).
        In verify mode the prefix is sized by where two members' encodings actually part.
        """
        key = (group, api, tokens)
        if key not in self._prefixes:
            start = stable_int("prefix", group) % len(self.index)
            if api == "completions":
                fixed = self.bos + self.joiner
                a, b = (self.index.units[u] for u in self.index.starters[:2])
                shared = lambda t: common_prefix(self.tok.encode(t + a), self.tok.encode(t + b))
            else:
                fixed = self.pre_user(("system", "user"))
                a, b = (self.index.units[u][1:] for u in self.user_starters(("system", "user"))[:2])
                shared = lambda t: common_prefix(
                    self.tok.encode_chat([{"role": "system", "content": t}, {"role": "user", "content": a}]),
                    self.tok.encode_chat([{"role": "system", "content": t}, {"role": "user", "content": b}]))
            content = tokens - fixed
            if content < 1:
                raise WorkloadError(f"prefix group {group!r}: {tokens} tokens is less than this tokenizer's fixed cost "
                                    f"before a prompt's own text ({fixed + 1} tokens at least)")
            text = self._fit(lambda n, s: self.index.piece(n, s, lead=True), start, content, shared, tokens)
            own = len(self.tok.encode_plain(text)) if self.verify else content
            self._prefixes[key] = Prefix(text, self.bos + own if api == "completions" else own)
        return self._prefixes[key]

    def member_start(self, group: str, member: int, api: str = "completions") -> int:
        """Where member `member` of a group starts its own text: starters have distinct first tokens where
        that text goes (after the prefix text for completions, as the user message for chat)."""
        starters = self.index.starters if api == "completions" else self.user_starters(("system", "user"))
        return starters[(stable_int("members", group) + member) % len(starters)]

    # ---- chat framing, measured with probes -----------------------------------------------------

    def _probe(self, k: int) -> tuple[str, int]:
        """A whole sentence as message text: starters give probes with different first tokens."""
        unit = self.index.starters[k % len(self.index.starters)]
        return self.index.units[unit][1:], len(self.index.lead_ids[unit])

    def _encode_roles(self, roles: tuple[str, ...], probes: list[tuple[str, int]]) -> list[int]:
        msgs = [{"role": r, "content": p} for r, (p, _) in zip(roles, probes)]
        try:
            return self.tok.encode_chat(msgs)
        except WorkloadError as err:
            raise WorkloadError(
                f"tokenizer {self.tok.name}: {err.message} (a conversation of roles {', '.join(roles)}); "
                "use a tokenizer whose chat template accepts it, or --api completions", source=str(self.tok.path),
            ) from None

    def framing(self, roles: tuple[str, ...]) -> int:
        """Tokens of the chat template around contents for this role sequence (+ generation prompt)."""
        if roles not in self._framing:
            probes = [self._probe(i) for i in range(len(roles))]
            self._framing[roles] = len(self._encode_roles(roles, probes)) - sum(n for _, n in probes)
        return self._framing[roles]

    def _user_start(self, roles: tuple[str, ...]) -> tuple[int, list[int]]:
        """(position, starters) of the last (user) message's text in a conversation of these roles (a probe for
        each earlier message): the token where differently opening texts part, and the sentences whose first
        token there differs from every other's. Measured on real renders: a template's text before the
        content can change how the content's first word is cut (no pre-tokenizer split after `\n\n`)."""
        if roles not in self._user_starts:
            self._encode_roles(roles, [self._probe(i) for i in range(len(roles))])  # a refusal says so, with roles
            head = [{"role": r, "content": self._probe(i)[0]} for i, r in enumerate(roles[:-1])]
            units = range(min(len(self.index), _USER_START_UNITS))
            encs = self.tok.encode_batch_plain([
                self.tok.render_chat(head + [{"role": "user", "content": self.index.units[u][1:]}]) for u in units])
            at = min(common_prefix(encs[0], e) for e in encs[1:])
            if at >= len(encs[0]):
                raise WorkloadError(
                    f"tokenizer {self.tok.name}: its chat template renders different user messages to the same "
                    "tokens, so it does not show the message content to the model; fix the template's "
                    "`message['content']` or use --api completions", source=str(self.tok.path))
            seen: set[int] = set()
            starters = []
            for u, e in zip(units, encs):
                if len(e) > at and e[at] not in seen:
                    seen.add(e[at])
                    starters.append(u)
            self._user_starts[roles] = (at, starters)
        return self._user_starts[roles]

    def user_starters(self, roles: tuple[str, ...]) -> list[int]:
        """Sentences that open the last user message with distinct first tokens (see `_user_start`)."""
        return self._user_start(roles)[1]

    def pre_user(self, roles: tuple[str, ...]) -> int:
        """Framing tokens before the last (user) message's text: where two different user texts diverge,
        less the earlier messages' own tokens."""
        if roles not in self._pre_user:
            at = self._user_start(roles)[0]
            self._pre_user[roles] = at - sum(self._probe(i)[1] for i in range(len(roles) - 1))
        return self._pre_user[roles]

    def refusal(self, roles: tuple[str, ...]) -> str | None:
        """Why this tokenizer's chat template cannot render a conversation of these roles (None: it can)."""
        try:
            self.tok.encode_chat([{"role": r, "content": p} for r, (p, _) in
                                  zip(roles, [self._probe(i) for i in range(len(roles))])])
        except WorkloadError as err:
            return err.message
        return None

    def renders(self, roles: tuple[str, ...]) -> bool:
        """Whether this tokenizer's chat template accepts a conversation of these roles."""
        return self.refusal(roles) is None

    # ---- calibration ------------------------------------------------------------------------------

    def calibrate(self, samples: int = 48) -> bool:
        """True when piece counts add up exactly for this tokenizer (checked by full re-encoding)."""
        rng = random.Random(1234)
        saved, self.verify = self.verify, False
        single_chat = self.renders(("user",))
        history_chat = self.renders(("system", "user", "assistant", "user"))
        try:
            for i in range(samples):
                n = rng.choice((2, 3, 7, 31, 64, 257, 1000, 3000)) + self.bos + self.eos
                start = rng.randrange(len(self.index))
                text = self.completion(n, start)
                if self.tok.count(text) != n:
                    return False
                head = n - self.eos  # the BOS and the text's own tokens
                suffix = self.completion(n + 50, self.member_start("calib", i), head=text, head_tokens=head)
                ids = self.tok.encode(suffix)
                if len(ids) != n + 50 or ids[:head] != self.tok.encode(text)[:head]:
                    return False
                if single_chat:
                    single = self.chat(self.min_chat_tokens(("user",)) + n, start + 4)
                    if self.tok.count_chat(single.messages) != single.tokens:
                        return False
                if history_chat:
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
