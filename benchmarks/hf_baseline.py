"""HF transformers' `generate` as the engine benchmarks' baseline: the same model shape and
random weights' dtype, greedy, exactly the requested number of new tokens per row."""

from __future__ import annotations

import time

import torch

from benchmarks.gpu_common import on_cuda, sync
from servescope.reference_engine.config import ModelConfig


def hf_model(mc: ModelConfig, device: str):
    """A LlamaForCausalLM of this shape with random weights (bf16 on a GPU, float32 on the CPU)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    rope = None
    if mc.rope_scaling is not None:
        s = mc.rope_scaling
        rope = {"rope_type": "llama3", "factor": s.factor, "low_freq_factor": s.low_freq_factor,
                "high_freq_factor": s.high_freq_factor,
                "original_max_position_embeddings": s.original_max_position_embeddings,
                "rope_theta": mc.rope_theta}
    cfg = LlamaConfig(vocab_size=mc.vocab_size, hidden_size=mc.hidden_size, intermediate_size=mc.intermediate_size,
                      num_hidden_layers=mc.num_layers, num_attention_heads=mc.num_heads,
                      num_key_value_heads=mc.num_kv_heads, head_dim=mc.head_dim,
                      max_position_embeddings=mc.max_position_embeddings, rms_norm_eps=mc.rms_norm_eps,
                      tie_word_embeddings=mc.tie_word_embeddings, rope_scaling=rope, rope_theta=mc.rope_theta,
                      bos_token_id=None, eos_token_id=None, pad_token_id=0)
    dtype = torch.bfloat16 if on_cuda(device) else torch.float32
    with torch.device(device):
        try:
            model = LlamaForCausalLM._from_config(cfg, dtype=dtype)
        except TypeError:  # transformers 4.x
            model = LlamaForCausalLM._from_config(cfg, torch_dtype=dtype)
    model.eval()
    gen = model.generation_config
    gen.eos_token_id = None
    gen.pad_token_id = 0
    gen.do_sample = False
    gen.temperature = None
    gen.top_p = None
    gen.top_k = None
    return model


def hf_version() -> str | None:
    try:
        import transformers

        return transformers.__version__
    except ImportError:
        return None


def hf_generate_s(model, prompts: list[list[int]], new_tokens: int, device: str, **kwargs) -> float:
    """Seconds for one left-padded batch `generate` producing exactly new_tokens per row."""
    width = max(len(p) for p in prompts)
    ids = torch.zeros(len(prompts), width, dtype=torch.int64)
    mask = torch.zeros(len(prompts), width, dtype=torch.int64)
    for r, p in enumerate(prompts):
        ids[r, width - len(p):] = torch.tensor(p)
        mask[r, width - len(p):] = 1
    ids, mask = ids.to(device), mask.to(device)
    sync(device)
    t = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new_tokens,
                             min_new_tokens=new_tokens, do_sample=False, **kwargs)
    sync(device)
    elapsed = time.perf_counter() - t
    assert out.shape[1] == width + new_tokens, (out.shape, width, new_tokens)
    return elapsed


class HFModel:
    """The baseline model, built on first use and shared by the parts of one run."""

    def __init__(self, mc: ModelConfig, device: str) -> None:
        self.mc, self.device = mc, device
        self._model = None
        self.build_s: float | None = None

    def get(self):
        if self._model is None:
            t = time.perf_counter()
            self._model = hf_model(self.mc, self.device)
            self.build_s = time.perf_counter() - t
        return self._model

    def info(self) -> dict:
        return {"transformers": hf_version(), "build_s": self.build_s}
