"""Text in and out of the engine: encode prompts, render chat templates, detokenize incrementally.

Reads the Hugging Face tokenizer layout (`tokenizer.json` + `tokenizer_config.json`)
with the `tokenizers` library and renders `chat_template` with jinja2 directly,
so serving never needs `transformers`. Completions prompts are encoded with
special tokens (BOS), chat prompts without (the template writes BOS), as vLLM does.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import jinja2
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer

from servescope.reference_engine.errors import ConfigError, InvalidRequest


def _token_text(value: Any) -> str | None:
    """tokenizer_config stores special tokens as strings or as {"content": ...} dicts."""
    if isinstance(value, dict):
        return value.get("content")
    return value if isinstance(value, str) else None


class EngineTokenizer:
    def __init__(self, directory: str | Path) -> None:
        directory = Path(directory)
        path = directory / "tokenizer.json"
        if not path.is_file():
            raise ConfigError(f"{directory} has no tokenizer.json (a Hugging Face fast tokenizer file is needed)")
        self.tokenizer = Tokenizer.from_file(str(path))
        config_path = directory / "tokenizer_config.json"
        self.config: dict[str, Any] = json.loads(config_path.read_text()) if config_path.is_file() else {}
        self.bos_token = _token_text(self.config.get("bos_token"))
        self.eos_token = _token_text(self.config.get("eos_token"))
        stop_tokens = {self.eos_token, _token_text(self.config.get("eot_token"))}
        self.eos_token_ids: tuple[int, ...] = tuple(sorted(
            tid for tid in (self.tokenizer.token_to_id(t) for t in stop_tokens if t) if tid is not None))
        self.vocab_size = self.tokenizer.get_vocab_size(with_added_tokens=True)
        template = self.config.get("chat_template")
        self._chat_template = None
        if isinstance(template, str):
            env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
            env.globals["raise_exception"] = self._raise_template_error
            self._chat_template = env.from_string(template)

    @staticmethod
    def _raise_template_error(message: str) -> None:
        raise InvalidRequest(f"chat template rejected the messages: {message}", "messages")

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=add_special_tokens).ids

    def encode_batch(self, texts: list[str], add_special_tokens: bool = True) -> list[list[int]]:
        """Many prompts in one call: the Rust tokenizer releases the GIL and spreads them over the cores."""
        return [e.ids for e in self.tokenizer.encode_batch(texts, add_special_tokens=add_special_tokens)]

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def text_id(self, token_id: int) -> int:
        """The id whose text stands for `token_id`: itself, or for an id past this tokenizer's
        vocabulary, id mod vocabulary size.

        A model can have more rows than its tokenizer has tokens: the presets keep llama3's 128,256
        (the real cost of the LM head) beside the 8,192-token bundled tokenizer, and checkpoints pad
        their embeddings. The tokenizer has no text for those ids, and a token without text streams
        nothing: with random weights 15 of 16 sampled ids were such, so a client saw its first text
        ~16 tokens after the engine's first token (TTFT inflated by 16 x TPOT) and text in bursts.
        A stand-in text makes every token stream as a real model's would; usage still counts the
        real ids.
        """
        return token_id if token_id < self.vocab_size else token_id % self.vocab_size

    def render_chat(self, messages: list[dict[str, Any]]) -> str:
        """The chat template's text for these messages, with the generation prompt (encode it
        without adding special tokens: the template writes them)."""
        if self._chat_template is None:
            raise InvalidRequest("this model's tokenizer has no chat_template; use /v1/completions", "messages")
        try:
            text = self._chat_template.render(messages=messages, add_generation_prompt=True,
                                              bos_token=self.bos_token or "", eos_token=self.eos_token or "")
        except jinja2.TemplateError as exc:
            raise InvalidRequest(f"cannot render messages with the chat template: {exc}", "messages") from exc
        return text


class IncrementalDetokenizer:
    """Streams text as tokens arrive, never splitting a multi-byte character, and applies stop strings.

    Decodes a short window of recent tokens (prefix/read offsets) rather than the
    whole output each step. Text that could be the start of a stop string is held
    back until it is known not to be one, so a client never sees part of a stop.
    """

    def __init__(self, tokenizer: EngineTokenizer, prompt_ids: list[int], stop: tuple[str, ...]) -> None:
        self.tokenizer = tokenizer
        self.text_id = tokenizer.text_id
        self.ids: list[int] = [self.text_id(t) for t in prompt_ids[-6:]]
        self.prefix_offset = max(len(self.ids) - 5, 0)
        self.read_offset = len(self.ids)
        self.stop = stop
        self.holdback = max((len(s) for s in stop), default=1) - 1
        self.text = ""  # output text so far (stop string removed)
        self.emitted = 0

    def push(self, token_ids: list[int]) -> tuple[str, bool]:
        """Add tokens; returns (text now safe to send, whether a stop string ended the output)."""
        for token in token_ids:
            self.ids.append(self.text_id(token))
            prefix = self.tokenizer.decode(self.ids[self.prefix_offset:self.read_offset])
            full = self.tokenizer.decode(self.ids[self.prefix_offset:])
            if len(full) > len(prefix) and not full.endswith("\ufffd"):
                self.text += full[len(prefix):]
                self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
        if self.stop:
            search_from = max(0, self.emitted - self.holdback)
            hits = [i for i in (self.text.find(s, search_from) for s in self.stop) if i >= 0]
            if hits:
                self.text = self.text[:min(hits)]
                return self.flush(), True
            safe = len(self.text) - self.holdback
        else:
            safe = len(self.text)
        if safe <= self.emitted:
            return "", False
        delta = self.text[self.emitted:safe]
        self.emitted = safe
        return delta, False

    def flush(self) -> str:
        """Everything not yet sent (at the end of the output)."""
        delta = self.text[self.emitted:]
        self.emitted = len(self.text)
        return delta


def tokenizer_dir_for(model_path: str | Path | None, tokenizer_dir: str | Path | None) -> Path:
    """The tokenizer an engine uses: the one given, else the checkpoint's own, else the bundled one
    (presets). One rule for the engine and for a front end that tokenizes in another process."""
    if tokenizer_dir is not None:
        return Path(tokenizer_dir)
    if model_path is not None:
        return Path(model_path)
    from servescope.reference_engine.tokenizer import TOKENIZER_DIR

    return TOKENIZER_DIR
