"""The bundled corpus, pre-tokenized once per tokenizer, as sampleable sentences.

Why this shape: re-encoding a 16k-token prompt costs ~10 ms, far too slow to
feed a load generator. Tokenizers do not merge across a pre-tokenizer split,
and a sentence boundary (`.` then one space then a capital letter) is such a
split for the common families (byte-level BPE, WordPiece, SentencePiece-style
Metaspace), so a text made of whole sentences has exactly the sum of their
token counts. Each sentence's count is measured once, in context (after an
anchor sentence), and a prompt of N tokens is a run of consecutive sentences
plus one partial sentence whose count is measured when used.
`PromptBuilder` checks at start-up that this sum is exact for the tokenizer at
hand and falls back to re-encoding every prompt when it is not.

Nothing here assumes how a tokenizer spells the space between sentences: some
attach it to the next word (` The`), some drop it (WordPiece), some make it a
token of its own (a byte-level BPE whose merges never saw a space before a
capital letter). `joiner_tokens` is that last case's count: the tokens every
sentence starts with in context, before the sentences differ. Partial
sentences are cut at token boundaries of the original text (encoding offsets),
never by decoding ids, since a decoder need not give back the text it was fed.
"""

from __future__ import annotations

import bisect
import itertools
import re
from functools import lru_cache
from pathlib import Path

from servescope.workloads.errors import WorkloadError
from servescope.workloads.tokenizer import PromptTokenizer

CORPUS_FILE = Path(__file__).resolve().parent / "corpus" / "prose.txt"
ANCHOR = "This is an anchor."  # measured context: a unit's count is taken after it
_SENTENCE_SPLIT = re.compile(r"(?<=[.!?])\s+(?=[A-Z])")
_MAX_TAIL_TRIES = 64  # sentences tried for a partial sentence of one length
_MAX_FILL_TRIES = 256  # sentences tried, whole or cut, to end a piece on an exact count
_MAX_CACHED_CUTS = 1 << 17  # cuts remembered per index (each a sentence prefix; bounds the memory)
_MIN_STARTERS = 3  # chat framing is measured with three probes that must differ in their first token
OPENING_TOKENS = 8  # prompts from distinct openings differ within their first 8 tokens


def corpus_sentences(path: Path = CORPUS_FILE) -> list[str]:
    """Every sentence of the corpus, whitespace collapsed, starting with a capital letter."""
    sentences = []
    with path.open(encoding="utf-8") as fh:
        for line in fh:
            for sentence in _SENTENCE_SPLIT.split(line.strip()):
                sentence = " ".join(sentence.split())
                if sentence[:1].isupper() and sentence[-1:] in ".!?":
                    sentences.append(sentence)
    if not sentences:
        raise WorkloadError("the prompt corpus has no usable sentences", source=str(path))
    return sentences


class CorpusIndex:
    """Sentences (`units`, each " Sentence.") with their in-context token ids and running sums."""

    def __init__(self, tokenizer: PromptTokenizer, sentences: list[str]) -> None:
        self.tokenizer = tokenizer
        anchor_ids = tokenizer.encode_plain(ANCHOR)
        self._anchor_len = len(anchor_ids)
        self._anchor_ids = anchor_ids
        in_context = tokenizer.encode_batch_plain([ANCHOR + " " + s for s in sentences])
        leading = tokenizer.encode_batch_plain(sentences)
        units, unit_ids, lead_ids = [], [], []
        for sentence, ctx, lead in zip(sentences, in_context, leading):
            if ctx[: self._anchor_len] != anchor_ids or len(ctx) == self._anchor_len or not lead:
                continue  # this tokenizer merges across the boundary here (or drops the text): not a safe unit
            units.append(" " + sentence)
            unit_ids.append(ctx[self._anchor_len :])
            lead_ids.append(lead)
        if len(units) < 16:
            raise WorkloadError(
                f"tokenizer {tokenizer.name}: only {len(units)} sentences of the prompt corpus keep their own tokens "
                "after a sentence end (its merges run across the space between sentences, as when a tokenizer has "
                "no pre-tokenizer that splits there); token-exact prompts need a tokenizer that splits there, as "
                "byte-level BPE, WordPiece and SentencePiece (Metaspace) tokenizers do: pass the target model's own "
                "tokenizer folder", source=str(tokenizer.path))
        self.units: list[str] = units
        self.unit_ids: list[list[int]] = unit_ids
        self.lead_ids: list[list[int]] = lead_ids  # the sentence without its leading space, encoded alone
        self.cum: list[int] = list(itertools.accumulate((len(ids) for ids in unit_ids), initial=0))
        self.total_tokens = self.cum[-1]
        self.joiner_tokens = self._common_start()
        self.starters = self._distinct_starters()
        self.openings = self._distinct_openings()
        # _cut is a pure function of its arguments and costs two tokenizer calls; prompts of
        # one length cut the same sentences at the same places over and over, and at a
        # thousand sessions a second those calls were most of the driver's CPU.
        self._cuts: dict[tuple[int, int, bool], str | None] = {}
        if len(self.starters) < _MIN_STARTERS:
            raise WorkloadError(
                f"tokenizer {tokenizer.name}: only {len(self.starters)} sentences of the prompt corpus start with "
                f"distinct tokens (at least {_MIN_STARTERS} are needed to tell prompts apart at their first token)",
                source=str(tokenizer.path))

    def _common_start(self) -> int:
        """Tokens that every sentence starts with in context: 0 when the space before a sentence joins its first
        word, 1 when this tokenizer makes that space a token of its own."""
        first = self.unit_ids[0]
        n = 0
        while n < 4 and all(len(ids) > n + 1 and ids[n] == first[n] for ids in self.unit_ids):
            n += 1
        return n

    def _distinct_starters(self) -> list[int]:
        """Units whose first own token (after the joiner) differs from every other starter's, both in context
        and without the leading space: two texts from two starters differ at their first own token."""
        seen_ctx: set[int] = set()
        seen_lead: set[int] = set()
        starters = []
        d = self.joiner_tokens
        for i, (ctx, lead) in enumerate(zip(self.unit_ids, self.lead_ids)):
            if ctx[d] not in seen_ctx and lead[0] not in seen_lead:
                seen_ctx.add(ctx[d])
                seen_lead.add(lead[0])
                starters.append(i)
        return starters

    def _distinct_openings(self, tokens: int = OPENING_TOKENS) -> list[int]:
        """Units whose text opens, over its first `tokens` tokens (running into the next units), unlike
        every earlier one: the starts of prompts that must not share a first prefix-cache block. The
        corpus repeats some sentences and some openings ("If the logger has no handlers, ...")."""
        seen: set[tuple[int, ...]] = set()
        openings = []
        n = len(self.units)
        for i in range(n):
            ids, j = list(self.lead_ids[i]), i + 1
            while len(ids) < tokens:
                ids += self.unit_ids[j % n]
                j += 1
            key = tuple(ids[:tokens])
            if key not in seen:
                seen.add(key)
                openings.append(i)
        return openings

    def __len__(self) -> int:
        return len(self.units)

    # ---- counting small texts the way they count inside a prompt ---------------------------

    def context_count(self, text: str) -> int | None:
        """Tokens `text` adds after a sentence end; None if it would merge with what precedes it."""
        ids = self.tokenizer.encode_plain(ANCHOR + text)
        if ids[: self._anchor_len] != self._anchor_ids:
            return None
        return len(ids) - self._anchor_len

    def lead_count(self, text: str) -> int:
        return len(self.tokenizer.encode_plain(text))

    def min_piece_tokens(self, *, lead: bool) -> int:
        """The shortest piece `piece` can make: a continuation (lead=False) carries the joiner first."""
        return 1 if lead else self.joiner_tokens + 1

    # ---- building pieces of exact length -----------------------------------------------------

    def piece(self, tokens: int, start: int, *, lead: bool) -> str:
        """Text of exactly `tokens` tokens from the corpus, starting at unit `start`.

        lead=True: the text starts a message (no leading space), counted on its own;
        lead=False: the text starts with " " and follows a sentence end or a partial one.
        Whole sentences from `start` on, then one partial sentence; when none of the next
        sentences can be cut at the length left, further whole sentences that fit shorten it
        until one can (`_fill`).
        """
        if tokens < 1:
            raise ValueError(f"a piece needs at least one token, got {tokens}")
        n_units = len(self.units)
        i = start % n_units
        head = ""
        left = tokens
        if lead:
            first = len(self.lead_ids[i])
            if first == left:
                return self.units[i][1:]
            if first > left:
                return self._lead_tail(i, left)
            head = self.units[i][1:]
            left -= first
            i = (i + 1) % n_units
        runs: list[tuple[int, int]] = []  # ranges of whole units, in order
        while True:
            j = bisect.bisect_right(self.cum, self.cum[i] + left) - 1
            if j > i:
                runs.append((i, j))
                left -= self.cum[j] - self.cum[i]
            if left == 0:
                return head + "".join("".join(self.units[a:b]) for a, b in runs)
            if j == n_units:  # ran off the end of the corpus: wrap around
                i = 0
                continue
            break
        if left < self.min_piece_tokens(lead=False) and runs:  # too short to follow a sentence: give one back
            a, b = runs.pop()
            left += self.cum[b] - self.cum[b - 1]
            if b - 1 > a:
                runs.append((a, b - 1))
            j = b - 1
        tail = self._fill(j, left) if left >= self.min_piece_tokens(lead=False) else None
        if tail is not None:
            return head + "".join("".join(self.units[a:b]) for a, b in runs) + tail
        if lead and not runs:  # the first sentence leaves too little to follow it: open with a cut sentence
            return self._lead_tail(start % n_units, tokens)
        raise WorkloadError(
            f"could not cut a {tokens}-token piece from the corpus with tokenizer {self.tokenizer.name}: no sentence "
            f"from sentence {j} on can be cut after exactly {left} tokens", source=str(self.tokenizer.path))

    def _fill(self, unit: int, tokens: int) -> str | None:
        """A continuation of exactly `tokens` tokens from sentence `unit` on: a partial sentence, after as many
        whole sentences as it takes to reach a length that some sentence can be cut at (a cut that would end
        on a space or re-tokenize differently is skipped)."""
        n_units = len(self.units)
        shortest = self.min_piece_tokens(lead=False)
        parts: list[str] = []
        left = tokens
        for k in range(min(_MAX_FILL_TRIES, n_units)):
            idx = (unit + k) % n_units
            count = len(self.unit_ids[idx])
            if count > left:
                text = self._cut(idx, left, lead=False)
                if text is not None:
                    return "".join(parts) + text
            elif count == left or left - count >= shortest:
                parts.append(self.units[idx])
                left -= count
                if left == 0:
                    return "".join(parts)
        return None

    def _lead_tail(self, unit: int, tokens: int) -> str:
        """A message opening of `tokens` tokens, shorter than sentence `unit`: that sentence cut short, or a nearby
        sentence cut short, or else a normal piece from the next sentence short enough to start one."""
        tail = self._find_tail(unit, tokens, lead=True)
        if tail is not None:
            return tail
        n_units = len(self.units)
        room = tokens - self.min_piece_tokens(lead=False)  # what a first sentence may take and leave a continuation
        for k in range(1, n_units):
            i = (unit + k) % n_units
            if len(self.lead_ids[i]) == tokens or len(self.lead_ids[i]) <= room:
                return self.piece(tokens, i, lead=True)
        raise WorkloadError(f"could not cut a {tokens}-token opening from the corpus with tokenizer "
                            f"{self.tokenizer.name}", source=str(self.tokenizer.path))

    def _find_tail(self, unit: int, tokens: int, *, lead: bool) -> str | None:
        """A partial sentence of exactly `tokens` tokens, from the first of the sentences from `unit` on that has one."""
        n_units = len(self.units)
        for k in range(min(_MAX_TAIL_TRIES, n_units)):
            text = self._cut((unit + k) % n_units, tokens, lead=lead)
            if text is not None:
                return text
        return None

    def _cut(self, idx: int, tokens: int, *, lead: bool) -> str | None:
        """The first `tokens` tokens of sentence `idx` as text, if that text counts `tokens` where it goes.

        The cut is made at the end offset of token `tokens` in the original text and then
        re-counted: a cut inside a word can tokenize differently from the word's first tokens."""
        key = (idx, tokens, lead)
        if key in self._cuts:
            return self._cuts[key]
        text = self._cut_uncached(idx, tokens, lead=lead)
        if len(self._cuts) < _MAX_CACHED_CUTS:
            self._cuts[key] = text
        return text

    def _cut_uncached(self, idx: int, tokens: int, *, lead: bool) -> str | None:
        ids = self.lead_ids[idx] if lead else self.unit_ids[idx]
        if len(ids) < tokens:
            return None
        sentence = self.units[idx][1:] if lead else self.units[idx]
        if len(ids) == tokens:
            return sentence
        if lead:
            ends = self.tokenizer.token_ends(sentence)
            if len(ends) != len(ids):
                return None
            text = sentence[: ends[tokens - 1]]
        else:
            ends = self.tokenizer.token_ends(ANCHOR + sentence)[self._anchor_len :]
            if len(ends) != len(ids):
                return None
            text = (ANCHOR + sentence)[len(ANCHOR) : ends[tokens - 1]]
        if not text.strip() or text[-1].isspace() or (lead and not text[0].isupper()):
            return None  # a following piece must start a new word; a lead piece starts like a sentence
        got = self.lead_count(text) if lead else self.context_count(text)
        return text if got == tokens else None


@lru_cache(maxsize=4)
def _index_for(fingerprint: str, tokenizer: PromptTokenizer) -> CorpusIndex:
    return CorpusIndex(tokenizer, corpus_sentences())


def corpus_index(tokenizer: PromptTokenizer) -> CorpusIndex:
    """The (cached) corpus index of this tokenizer."""
    return _index_for(tokenizer.fingerprint, tokenizer)
