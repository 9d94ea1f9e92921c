"""Fixtures for the reference engine tests: a tiny real HF checkpoint and small engines built on it."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from servescope.reference_engine.tokenizer import TOKENIZER_DIR
from support.checkpoints import save_widened

# One intra-op thread: the tiny shapes gain nothing from two, and the suite shares 2 cores with
# other test processes, where a spinning thread pool slows every op many times over.
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def hf_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random LlamaForCausalLM (llama3 RoPE scaling, GQA, untied head) saved as sharded safetensors + the bundled tokenizer."""
    from transformers import LlamaConfig, LlamaForCausalLM

    out = tmp_path_factory.mktemp("hf_llama")
    config = LlamaConfig(
        vocab_size=8192, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=512,
        rms_norm_eps=1e-5, tie_word_embeddings=False, bos_token_id=0, eos_token_id=1,
        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                      "original_max_position_embeddings": 128, "rope_theta": 10000.0},
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():  # HF's 0.02 init gives near-constant logits; widen it so the comparison has teeth
        for name, param in model.named_parameters():
            if "norm" in name:
                param.copy_(1.0 + 0.1 * torch.randn_like(param))
            else:
                param.copy_(torch.randn_like(param) * 0.15)
    # Small shards: the loader must follow model.safetensors.index.json across files.
    model.save_pretrained(out, safe_serialization=True, max_shard_size="300KB")
    assert (out / "model.safetensors.index.json").is_file()
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(TOKENIZER_DIR / name, out / name)
    return out


SMALL_ENGINE = {"num_kv_blocks": 256, "max_num_batched_tokens": 256}  # fast on 2 CPU cores


def make_engine(**overrides):
    """The tiny preset (random weights, bundled tokenizer) with engine overrides; fast on 2 CPU cores."""
    from servescope.reference_engine.config import EngineConfig
    from servescope.reference_engine.engine import LLMEngine

    return LLMEngine.build(EngineConfig(**{**SMALL_ENGINE, **overrides}), preset_name="tiny")


def make_launch(**overrides):
    """The same engine as `make_engine`, described for an engine process (process mode)."""
    from servescope.reference_engine.config import EngineConfig
    from servescope.reference_engine.engine_process import EngineLaunch

    return EngineLaunch(EngineConfig(**{**SMALL_ENGINE, **overrides}), preset_name="tiny", model_name="tiny",
                        torch_threads=1)


@pytest.fixture(scope="session")
def engine_factory():
    return make_engine


@pytest.fixture(scope="session")
def launch_factory():
    return make_launch


@pytest.fixture(scope="session")
def hf_qwen2_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random Qwen2ForCausalLM (q/k/v bias, plain RoPE, tied embeddings) in the HF layout."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    out = tmp_path_factory.mktemp("hf_qwen2")
    config = Qwen2Config(vocab_size=8192, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=1, max_position_embeddings=256,
                         tie_word_embeddings=True, rope_theta=1000000.0, eos_token_id=1)
    torch.manual_seed(1)
    return save_widened(Qwen2ForCausalLM(config).eval(), out)

