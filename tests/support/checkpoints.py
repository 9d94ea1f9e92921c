"""Small random Hugging Face checkpoints that tests write to disk and load back."""

from __future__ import annotations

import shutil
from pathlib import Path

import torch

from servescope.reference_engine.tokenizer import TOKENIZER_DIR


def save_widened(model, out: Path, **save_kwargs) -> Path:
    """Norms near 1 and every other weight N(0, 0.15) (HF's 0.02 init gives near-constant logits, a
    comparison without teeth), saved as safetensors beside the bundled tokenizer's files."""
    with torch.no_grad():
        for name, param in model.named_parameters():
            param.copy_(1.0 + 0.1 * torch.randn_like(param) if "norm" in name else torch.randn_like(param) * 0.15)
    model.save_pretrained(out, safe_serialization=True, **save_kwargs)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(TOKENIZER_DIR / name, out / name)
    return out
