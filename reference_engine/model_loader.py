"""Build one rank's model (the whole model, or its tensor-parallel shard) with its weights, and size
its KV pool: the part of start-up that rank 0 (the engine) and every other rank (tp_workers.py)
run alike, so that their shards and caches match."""

from __future__ import annotations

from pathlib import Path

import torch

from servescope.reference_engine.config import EngineConfig, ModelConfig
from servescope.reference_engine.errors import ConfigError
from servescope.reference_engine.model import LlamaModel, _mm_out_dtype_works, rope_cos_sin_cache
from servescope.reference_engine.tensor_parallel import TPGroup
from servescope.reference_engine.weights import DEVICE_INIT_MIN_PARAMS, init_random_weights, load_hf_weights

DEFAULT_CPU_KV_MEMORY = 256 << 20


def torch_dtype(name: str, device: str) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device.startswith("cuda") else torch.float32
    return getattr(torch, name)


def build_model(mc: ModelConfig, config: EngineConfig, device: torch.device, dtype: torch.dtype,
                max_model_len: int, checkpoint_dir: str | Path | None, tp: TPGroup | None = None) -> LlamaModel:
    """This rank's model in eval mode on `device`, filled with the checkpoint's weights or seeded random ones."""
    if device.type == "cuda":
        return _build_on_device(mc, config, device, dtype, max_model_len, checkpoint_dir, tp)
    model = LlamaModel(mc, max_positions=max_model_len, tp=tp)
    if checkpoint_dir is None:
        init_random_weights(model, config.seed)
    else:
        load_hf_weights(model, checkpoint_dir)
    model = model.to(device=device, dtype=dtype).eval()
    model.cos_sin_cache = model.cos_sin_cache.float()  # RoPE angles stay float32
    return model


def _build_on_device(mc: ModelConfig, config: EngineConfig, device: torch.device, dtype: torch.dtype,
                     max_model_len: int, checkpoint_dir: str | Path | None, tp: TPGroup | None) -> LlamaModel:
    """Parameters made on the GPU in the serving dtype (no float32 copy in host memory); random
    weights of big models drawn there too (see weights.DEVICE_INIT_MIN_PARAMS)."""
    previous = torch.get_default_dtype()
    try:
        torch.set_default_dtype(dtype)
        with torch.device(device):
            model = LlamaModel(mc, max_positions=max_model_len, tp=tp)
    finally:
        torch.set_default_dtype(previous)
    if checkpoint_dir is not None:
        load_hf_weights(model, checkpoint_dir)
    elif mc.num_params >= DEVICE_INIT_MIN_PARAMS:
        init_random_weights(model, config.seed, device=device)
    else:
        init_random_weights(model, config.seed)
    # RoPE angles stay float32, computed once where they are used.
    model.cos_sin_cache = rope_cos_sin_cache(mc, max_model_len, device)
    _mm_out_dtype_works()  # probe now, never while a CUDA graph is being captured
    return model.eval()


def local_kv_blocks(mc: ModelConfig, config: EngineConfig, num_kv_heads: int, device: torch.device,
                    dtype: torch.dtype) -> int:
    """KV blocks this rank can hold (its own KV heads only). Under tensor parallelism every rank
    computes this and the pool takes the smallest: the same block ids must be valid on every rank."""
    if config.num_kv_blocks is not None:
        return config.num_kv_blocks
    dtype_bytes = torch.finfo(dtype).bits // 8
    bytes_per_block = 2 * mc.num_layers * num_kv_heads * mc.head_dim * dtype_bytes * config.block_size
    budget = config.kv_cache_memory
    if budget is None:
        if device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(device)
            budget = int(free * 0.8)
        else:
            budget = DEFAULT_CPU_KV_MEMORY
    blocks = budget // bytes_per_block
    if blocks < 2:
        raise ConfigError(f"--kv-cache-memory {budget} bytes holds {blocks} blocks of {bytes_per_block} "
                          "bytes; give it more memory or set --num-kv-blocks")
    return int(blocks)
