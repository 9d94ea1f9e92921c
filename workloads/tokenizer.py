"""The tokenizer that counts prompt tokens the way the target server will.

Loaded from a local Hugging Face tokenizer folder with the `tokenizers` library
(fast, no torch); the chat template from `tokenizer_config.json` (or
`chat_template.jinja`) is rendered with jinja2 the way transformers renders it,
so transformers is not needed at run time.

What is counted (as vLLM counts it in `usage.prompt_tokens`):
- completions: `encode(prompt)` WITH the tokenizer's special tokens, so a
  Llama-style tokenizer's BOS counts;
- chat: the rendered template (with the generation prompt) encoded WITHOUT
  special tokens, because the template already writes the BOS.
"""

from __future__ import annotations

import hashlib
import json
from datetime import datetime
from functools import lru_cache
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer

from servescope.workloads.errors import WorkloadError

# The bundled tokenizer, found by path: importing reference_engine could pull in torch.
BUNDLED_TOKENIZER_DIR = Path(__file__).resolve().parents[1] / "reference_engine" / "tokenizer"


class PromptTokenizer:
    """Encode, count and decode prompts with one target's tokenizer."""

    def __init__(
        self,
        tokenizer: Tokenizer,
        *,
        name: str,
        path: Path,
        chat_template: str | None,
        special_tokens: dict[str, str],
        exact_for_target: bool,
        fingerprint: str,
    ) -> None:
        self._tok = tokenizer
        self.name = name
        self.path = path
        self.chat_template = chat_template
        self.special_tokens = special_tokens
        # False when the bundled tokenizer stands in for an unknown target's own: lengths are then approximate.
        self.exact_for_target = exact_for_target
        self.fingerprint = fingerprint
        self._template = None
        self._template_problem = None if chat_template else "it has no chat_template"
        if chat_template:
            try:
                self._template = _compile_template(chat_template)
            except Exception as exc:  # noqa: BLE001 - jinja2's TemplateSyntaxError and kin: the template is unusable
                self._template_problem = f"its chat_template does not compile ({type(exc).__name__}: {exc})"
        self._added: tuple[int, int] | None = None

    def __repr__(self) -> str:
        return f"PromptTokenizer({self.name!r}, exact_for_target={self.exact_for_target})"

    @property
    def backend(self) -> Tokenizer:
        return self._tok

    def encode(self, text: str) -> list[int]:
        """Token ids as a completions endpoint counts them (with the tokenizer's special tokens)."""
        return self._tok.encode(text, add_special_tokens=True).ids

    def encode_plain(self, text: str) -> list[int]:
        """Token ids without added special tokens (special-token strings in the text still map to their ids)."""
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode_batch_plain(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self._tok.encode_batch(texts, add_special_tokens=False)]

    def token_ends(self, text: str) -> list[int]:
        """Where each token of `encode_plain(text)` ends in `text` (a character offset), to cut text at a token."""
        return [end for _, end in self._tok.encode(text, add_special_tokens=False).offsets]

    @property
    def added_around(self) -> tuple[int, int]:
        """(before, after): the special tokens a completions server adds around any prompt text.

        Llama-style tokenizers add a BOS before (1, 0); BERT-style ones [CLS] before and [SEP]
        after (1, 1); T5-style ones </s> after (0, 1). Only tokens before the text are shared
        by prompts that share a prefix."""
        if self._added is None:
            probe = "Hello world. The cache is warm."
            full, plain = self.encode(probe), self.encode_plain(probe)
            extra = len(full) - len(plain)
            before = next((i for i in range(extra + 1) if full[i:i + len(plain)] == plain), extra)
            self._added = (before, extra - before)
        return self._added

    def count(self, text: str) -> int:
        return len(self._tok.encode(text, add_special_tokens=True).ids)

    def decode(self, ids: list[int]) -> str:
        return self._tok.decode(ids, skip_special_tokens=False)

    @property
    def has_chat_template(self) -> bool:
        return self._template is not None

    @property
    def template_problem(self) -> str | None:
        """Why chat prompts cannot be rendered with this tokenizer (None when they can)."""
        return self._template_problem

    def render_chat(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True) -> str:
        if self._template is None:
            raise WorkloadError(
                f"tokenizer {self.name}: {self._template_problem}, so chat prompts cannot be built or counted: "
                "add a `chat_template` to its tokenizer_config.json (or a chat_template.jinja file beside it), "
                "or use --api completions",
                source=str(self.path),
            )
        try:
            return self._template.render(
                messages=messages, add_generation_prompt=add_generation_prompt, **self.special_tokens
            )
        except WorkloadError:
            raise
        except Exception as exc:  # noqa: BLE001 - any jinja2 failure: the template cannot render these messages
            raise WorkloadError(f"the chat template failed on messages with roles "
                                f"{', '.join(str(m.get('role')) for m in messages)}: {type(exc).__name__}: {exc}",
                                source=str(self.path)) from None

    def encode_chat(self, messages: list[dict[str, Any]]) -> list[int]:
        """Token ids of the chat prompt as the server builds it (template + generation prompt)."""
        return self.encode_plain(self.render_chat(messages, add_generation_prompt=True))

    def count_chat(self, messages: list[dict[str, Any]]) -> int:
        return len(self.encode_chat(messages))


def _compile_template(source: str):
    # The same environment settings transformers uses, so templates render identically.
    from jinja2.ext import loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message: str) -> None:
        raise WorkloadError(f"the chat template refused the messages: {message}")

    def tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None,
               separators: Any = None, sort_keys: bool = False) -> str:
        return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env.from_string(source)


def _token_text(value: Any) -> str | None:
    if isinstance(value, dict):
        return value.get("content")
    return value if isinstance(value, str) else None


def _read_chat_template(folder: Path, config: dict[str, Any]) -> str | None:
    jinja_file = folder / "chat_template.jinja"
    if jinja_file.is_file():
        return jinja_file.read_text(encoding="utf-8")
    template = config.get("chat_template")
    if isinstance(template, list):  # named templates: use "default"
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default") or next(iter(named.values()), None)
    if template is None and (folder / "chat_template.json").is_file():
        template = json.loads((folder / "chat_template.json").read_text(encoding="utf-8")).get("chat_template")
    return template if isinstance(template, str) else None


def _load_backend(folder: Path) -> Tokenizer:
    tok_file = folder / "tokenizer.json"
    if tok_file.is_file():
        return Tokenizer.from_file(str(tok_file))
    try:  # a slow (sentencepiece-only) folder: let transformers convert it, when it is installed
        from transformers import AutoTokenizer
    except ImportError:
        AutoTokenizer = None
    if AutoTokenizer is not None:
        try:
            hf = AutoTokenizer.from_pretrained(str(folder))
            backend = getattr(hf, "backend_tokenizer", None)
            if backend is not None:
                return backend
        except Exception as exc:  # noqa: BLE001 - any failure means "cannot load": say so below
            raise WorkloadError(f"cannot load a tokenizer from this folder: {exc}", source=str(folder)) from None
    raise WorkloadError(
        "no tokenizer.json in this folder: pass a Hugging Face tokenizer folder with tokenizer.json "
        "(AutoTokenizer.from_pretrained(...).save_pretrained(DIR) writes one)",
        source=str(folder),
    )


@lru_cache(maxsize=8)
def _load(folder: str, exact_for_target: bool) -> PromptTokenizer:
    path = Path(folder)
    if path.is_file() and path.name == "tokenizer.json":
        path = path.parent
    if not path.is_dir():
        raise WorkloadError("tokenizer folder not found (pass a local Hugging Face tokenizer folder)", source=str(path))
    config_file = path / "tokenizer_config.json"
    try:
        config = json.loads(config_file.read_text(encoding="utf-8")) if config_file.is_file() else {}
    except json.JSONDecodeError as exc:
        raise WorkloadError(f"tokenizer_config.json is not valid JSON: {exc}", source=str(config_file)) from None
    backend = _load_backend(path)
    special = {
        key: text
        for key in ("bos_token", "eos_token", "pad_token", "unk_token")
        if (text := _token_text(config.get(key))) is not None
    }
    special.setdefault("bos_token", "")
    special.setdefault("eos_token", "")
    digest = hashlib.sha256(backend.to_str().encode()).hexdigest()[:16]
    return PromptTokenizer(
        backend,
        name=path.name if path != BUNDLED_TOKENIZER_DIR else "servescope-bundled",
        path=path,
        chat_template=_read_chat_template(path, config),
        special_tokens=special,
        exact_for_target=exact_for_target,
        fingerprint=digest,
    )


def load_tokenizer(path: str | Path | None, *, target_is_reference: bool = False) -> PromptTokenizer:
    """The target's tokenizer from a local folder, or (None) the bundled one.

    With None the bundled tokenizer is used: exact for the reference engine
    (`target_is_reference=True`), approximate for any other target, which
    `exact_for_target` records so run.json and the report can say so.
    """
    if path is None:
        return _load(str(BUNDLED_TOKENIZER_DIR), target_is_reference)
    return _load(str(Path(path).expanduser().resolve()), True)
