"""The bundled tokenizer: the reference engine's vocabulary, shipped as plain files.

A byte-level BPE (so any text round-trips) trained on `workloads/corpus/prose.txt`
by `build.py`, saved in the Hugging Face layout (`tokenizer.json`,
`tokenizer_config.json` with a Llama-3-like chat template). Importing this module
only computes a path: it never imports torch, so the harness can use it too.
"""

from __future__ import annotations

from pathlib import Path

TOKENIZER_DIR: Path = Path(__file__).resolve().parent

BOS_TOKEN = "<|begin_of_text|>"
EOS_TOKEN = "<|end_of_text|>"
EOT_TOKEN = "<|eot_id|>"  # ends a chat turn: the engine stops on it as well as on EOS
START_HEADER_TOKEN = "<|start_header_id|>"
END_HEADER_TOKEN = "<|end_header_id|>"
PAD_TOKEN = "<|pad|>"
SPECIAL_TOKENS = (BOS_TOKEN, EOS_TOKEN, START_HEADER_TOKEN, END_HEADER_TOKEN, EOT_TOKEN, PAD_TOKEN)

__all__ = ["TOKENIZER_DIR", "BOS_TOKEN", "EOS_TOKEN", "EOT_TOKEN", "PAD_TOKEN", "SPECIAL_TOKENS"]
