"""Rebuild the bundled tokenizer files from the bundled corpus, reproducibly.

    python -m servescope.reference_engine.tokenizer.build

Byte-level BPE (GPT-2 style pre-tokenization) so every string round-trips and
every byte has a token; 8,192 entries in all (a multiple of 64 keeps the
engine's embedding and LM-head shapes friendly to GPU kernels). Like Llama 3,
encoding with special tokens adds `<|begin_of_text|>` (servers such as vLLM
count it in `usage.prompt_tokens` for completions), and the chat template
writes that BOS itself, so chat prompts are encoded without special tokens.
Needs only the `tokenizers` library (no torch, no transformers).
"""

from __future__ import annotations

import argparse
import hashlib
import json
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

from servescope.reference_engine.tokenizer import (
    BOS_TOKEN,
    EOS_TOKEN,
    EOT_TOKEN,
    PAD_TOKEN,
    SPECIAL_TOKENS,
    TOKENIZER_DIR,
)

VOCAB_SIZE = 8_192
CORPUS = Path(__file__).resolve().parents[2] / "workloads" / "corpus" / "prose.txt"

# Llama-3-like: role header, content, end-of-turn; the generation prompt opens the assistant header.
CHAT_TEMPLATE = (
    "{{- bos_token }}"
    "{%- for message in messages %}"
    "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'] + '<|eot_id|>' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}"
    "{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}"
    "{%- endif %}"
)


def train(corpus: Path, vocab_size: int = VOCAB_SIZE) -> Tokenizer:
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train([str(corpus)], trainer)
    bos_id = tokenizer.token_to_id(BOS_TOKEN)
    tokenizer.post_processor = processors.Sequence([
        processors.ByteLevel(trim_offsets=False),
        processors.TemplateProcessing(
            single=f"{BOS_TOKEN} $A", pair=f"{BOS_TOKEN} $A {BOS_TOKEN} $B", special_tokens=[(BOS_TOKEN, bos_id)]
        ),
    ])
    return tokenizer


def tokenizer_config(tokenizer: Tokenizer) -> dict:
    added = {
        str(tokenizer.token_to_id(tok)): {
            "content": tok, "lstrip": False, "normalized": False, "rstrip": False,
            "single_word": False, "special": True,
        }
        for tok in SPECIAL_TOKENS
    }
    return {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": BOS_TOKEN,
        "eos_token": EOS_TOKEN,
        "pad_token": PAD_TOKEN,
        "eot_token": EOT_TOKEN,
        "add_bos_token": True,
        "clean_up_tokenization_spaces": False,
        "model_max_length": 131072,
        "added_tokens_decoder": added,
        "chat_template": CHAT_TEMPLATE,
    }


def build(out_dir: Path = TOKENIZER_DIR, corpus: Path = CORPUS) -> str:
    """Write tokenizer.json and tokenizer_config.json; return a sha256 of both (for reproducibility checks)."""
    tokenizer = train(corpus)
    tokenizer.save(str(out_dir / "tokenizer.json"), pretty=False)
    config = json.dumps(tokenizer_config(tokenizer), indent=2, sort_keys=True) + "\n"
    (out_dir / "tokenizer_config.json").write_text(config, encoding="utf-8")
    digest = hashlib.sha256()
    for name in ("tokenizer.json", "tokenizer_config.json"):
        digest.update((out_dir / name).read_bytes())
    return digest.hexdigest()


def main() -> None:
    parser = argparse.ArgumentParser(description="Rebuild the bundled tokenizer from the bundled corpus.")
    parser.add_argument("--out", type=Path, default=TOKENIZER_DIR)
    parser.add_argument("--corpus", type=Path, default=CORPUS)
    args = parser.parse_args()
    digest = build(args.out, args.corpus)
    print(f"wrote {args.out}/tokenizer.json and tokenizer_config.json (sha256 {digest[:16]})")


if __name__ == "__main__":
    main()
