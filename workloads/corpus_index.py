"""The bundled corpus, pre-tokenized once per tokenizer, as sampleable sentences.

Why this shape: re-encoding a 16k-token prompt costs ~10 ms, far too slow to
feed a load generator. BPE never merges across a pre-tokenizer split, and a
sentence boundary (`.` then one space then a capital letter) is such a split for
byte-level BPE tokenizers, so a text made of whole sentences has exactly the sum
of their token counts. Each sentence's count is measured once, in context
(after an anchor sentence), and a prompt of N tokens is a run of consecutive
sentences plus one short partial sentence whose count is measured when used.
`PromptBuilder` checks at start-up that this sum is exact for the tokenizer at
hand and falls back to re-encoding every prompt when it is not.
"""

from __future__ import annotations

import bisect
import itertools
import re
from functools import lru_cache
from pathlib import Path

from workloads.errors import WorkloadError
from workloads.tokenizer import PromptTokenizer

CORPUS_FILE = Path(__file__).resolve().parent / "corpus" / "prose.txt"
ANCHOR = "This is an anchor."  # measured context: a unit's count is taken after it
_SENTENCE_SPLIT = re.compile(r"(?<=[.!?])\s+(?=[A-Z])")
_MAX_TAIL_TRIES = 64
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
            if ctx[: self._anchor_len] != anchor_ids or not lead:
                continue  # this tokenizer merges across the boundary here: not a safe unit
            units.append(" " + sentence)
            unit_ids.append(ctx[self._anchor_len :])
            lead_ids.append(lead)
        if len(units) < 16:
            raise WorkloadError("the prompt corpus tokenizes into too few usable sentences", source=str(tokenizer.path))
        self.units: list[str] = units
        self.unit_ids: list[list[int]] = unit_ids
        self.lead_ids: list[list[int]] = lead_ids  # the sentence without its leading space, encoded alone
        self.cum: list[int] = list(itertools.accumulate((len(ids) for ids in unit_ids), initial=0))
        self.total_tokens = self.cum[-1]
        self.starters = self._distinct_starters()
        self.openings = self._distinct_openings()

    def _distinct_starters(self) -> list[int]:
        """Units whose first token differs from every other starter's, both with and without the leading space."""
        seen_ctx: set[int] = set()
        seen_lead: set[int] = set()
        starters = []
        for i, (ctx, lead) in enumerate(zip(self.unit_ids, self.lead_ids)):
            if ctx[0] not in seen_ctx and lead[0] not in seen_lead:
                seen_ctx.add(ctx[0])
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

    # ---- building pieces of exact length -----------------------------------------------------

    def piece(self, tokens: int, start: int, *, lead: bool) -> str:
        """Text of exactly `tokens` tokens from the corpus, starting at unit `start`.

        lead=True: the text starts a message (no leading space), counted on its own;
        lead=False: the text starts with " " and follows a sentence end or a partial one.
        """
        if tokens < 1:
            raise ValueError(f"a piece needs at least one token, got {tokens}")
        n_units = len(self.units)
        i = start % n_units
        parts: list[str] = []
        left = tokens
        if lead:
            first = len(self.lead_ids[i])
            if first > left:
                return self._tail(i, left, lead=True)
            parts.append(self.units[i][1:])
            left -= first
            i = (i + 1) % n_units
        while left > 0:
            j = bisect.bisect_right(self.cum, self.cum[i] + left) - 1
            if j > i:
                parts.append("".join(self.units[i:j]))
                left -= self.cum[j] - self.cum[i]
            if left == 0:
                break
            if j == n_units:  # ran off the end of the corpus: wrap around
                i = 0
                continue
            parts.append(self._tail(j, left, lead=False))
            break
        return "".join(parts)

    def _tail(self, unit: int, tokens: int, *, lead: bool) -> str:
        """A partial sentence of exactly `tokens` tokens (tried from `unit` onwards)."""
        n_units = len(self.units)
        for k in range(_MAX_TAIL_TRIES):
            idx = (unit + k) % n_units
            ids = self.lead_ids[idx] if lead else self.unit_ids[idx]
            if len(ids) < tokens:
                continue
            text = self.tokenizer.decode(ids[:tokens])
            if not text or text[-1].isspace() or (lead and not text[0].isupper()):
                continue  # a following piece must start a new word; a lead piece starts like a sentence
            got = self.lead_count(text) if lead else self.context_count(text)
            if got == tokens:
                return text
        raise WorkloadError(f"could not cut a {tokens}-token piece from the corpus with tokenizer {self.tokenizer.name}")


@lru_cache(maxsize=4)
def _index_for(fingerprint: str, tokenizer: PromptTokenizer) -> CorpusIndex:
    return CorpusIndex(tokenizer, corpus_sentences())


def corpus_index(tokenizer: PromptTokenizer) -> CorpusIndex:
    """The (cached) corpus index of this tokenizer."""
    return _index_for(tokenizer.fingerprint, tokenizer)
