"""Fill a `LlamaModel` with seeded random weights or a local Hugging Face safetensors checkpoint.

Random weights are scaled (1/sqrt(fan_in) for projections, residual outputs
shrunk by depth, an embedding wide enough for peaked logits) so a random model
produces varied, non-degenerate text: a benchmark of a model that only ever
emits one token would measure nothing real. Checkpoints are read with
`safetensors` (single file or a sharded `model.safetensors.index.json`), and
HF's separate q/k/v and gate/up projections are fused on load.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from safetensors import safe_open

from servescope.reference_engine.errors import ConfigError
from servescope.reference_engine.model import LlamaModel

# Above this many parameters a model on a GPU draws its random weights there: a CPU generator
# needs about a minute for an 8B model, a CUDA one well under a second. Smaller models draw
# them on the CPU, so that the same preset and seed give the same weights on every device.
DEVICE_INIT_MIN_PARAMS = 500_000_000


def init_random_weights(model: LlamaModel, seed: int, device: torch.device | str | None = None) -> None:
    """Seeded random weights. With a CUDA `device` they are drawn by a generator on that device
    (different values from the CPU stream, same distribution); the model's parameters may live
    on any device and dtype either way."""
    config = model.config
    device = torch.device(device) if device is not None else torch.device("cpu")
    gen = torch.Generator(device=device).manual_seed(seed)

    def normal_(param: torch.Tensor, std: float) -> None:
        if device.type == "cpu":
            param.data.copy_(torch.randn(param.shape, generator=gen) * std)
        else:
            # Rounded through bfloat16, so a float32 engine and a bf16 one of the same preset and seed
            # hold the very same weights (the GPU correctness test compares them).
            param.data.copy_(torch.randn(param.shape, generator=gen, device=device).mul_(std).to(torch.bfloat16))

    # Logit std ~4 with a unit-RMS final hidden state: peaked but not one-hot.
    normal_(model.embed_tokens, 4.0 / math.sqrt(config.hidden_size))
    if model.lm_head is not None:
        normal_(model.lm_head, 4.0 / math.sqrt(config.hidden_size))
    residual_scale = 1.0
    for layer in model.layers:
        normal_(layer.qkv_proj, 1.0 / math.sqrt(config.hidden_size))
        if layer.qkv_bias is not None:
            normal_(layer.qkv_bias, 0.02)
        normal_(layer.o_proj, residual_scale / math.sqrt(layer.q_size))
        normal_(layer.gate_up_proj, 1.0 / math.sqrt(config.hidden_size))
        normal_(layer.down_proj, residual_scale / math.sqrt(config.intermediate_size))


def _tensor_files(checkpoint_dir: Path) -> dict[str, Path]:
    """Map each tensor name to the safetensors file holding it."""
    index = checkpoint_dir / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        return {name: checkpoint_dir / fname for name, fname in weight_map.items()}
    files = sorted(checkpoint_dir.glob("*.safetensors"))
    if not files:
        raise ConfigError(f"{checkpoint_dir} holds no *.safetensors; save the model with "
                          "save_pretrained(..., safe_serialization=True)")
    names: dict[str, Path] = {}
    for path in files:
        with safe_open(str(path), framework="pt") as handle:
            for name in handle.keys():
                names[name] = path
    return names


def load_hf_weights(model: LlamaModel, checkpoint_dir: str | Path) -> None:
    """Copy HF Llama/Qwen2 tensors into the model, fusing q/k/v and gate/up; every parameter must be found."""
    checkpoint_dir = Path(checkpoint_dir)
    files = _tensor_files(checkpoint_dir)
    handles: dict[Path, object] = {}

    def get(name: str) -> torch.Tensor:
        for candidate in (name, name.removeprefix("model.")):
            if candidate in files:
                path = files[candidate]
                if path not in handles:
                    handles[path] = safe_open(str(path), framework="pt")
                return handles[path].get_tensor(candidate)  # type: ignore[attr-defined]
        raise ConfigError(f"{checkpoint_dir}: tensor {name!r} is missing from the checkpoint")

    def has(name: str) -> bool:
        return name in files or name.removeprefix("model.") in files

    with torch.no_grad():
        model.embed_tokens.copy_(get("model.embed_tokens.weight"))
        model.norm.copy_(get("model.norm.weight"))
        if model.lm_head is not None:
            model.lm_head.copy_(get("lm_head.weight") if has("lm_head.weight") else get("model.embed_tokens.weight"))
        for i, layer in enumerate(model.layers):
            p = f"model.layers.{i}."
            layer.input_norm.copy_(get(p + "input_layernorm.weight"))
            layer.post_attention_norm.copy_(get(p + "post_attention_layernorm.weight"))
            layer.qkv_proj.copy_(torch.cat([get(p + f"self_attn.{x}_proj.weight") for x in "qkv"]))
            if layer.qkv_bias is not None:
                layer.qkv_bias.copy_(torch.cat([get(p + f"self_attn.{x}_proj.bias") for x in "qkv"]))
            layer.o_proj.copy_(get(p + "self_attn.o_proj.weight"))
            layer.gate_up_proj.copy_(torch.cat([get(p + "mlp.gate_proj.weight"), get(p + "mlp.up_proj.weight")]))
            layer.down_proj.copy_(get(p + "mlp.down_proj.weight"))
