"""Fill a `LlamaModel` with seeded random weights or a local Hugging Face safetensors checkpoint.

Random weights are scaled (1/sqrt(fan_in) for projections, residual outputs
shrunk by depth, an embedding wide enough for peaked logits) so a random model
produces varied, non-degenerate text: a benchmark of a model that only ever
emits one token would measure nothing real. Checkpoints are read with
`safetensors` (single file or a sharded `model.safetensors.index.json`), and
HF's separate q/k/v and gate/up projections are fused on load. A
tensor-parallel shard gets, and reads, only its slice of every weight.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
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
    on any device and dtype either way.

    Every full weight is drawn in the same order whatever the tensor-parallel size, and a shard
    keeps its slice (`model.plan`): TP=N holds exactly the weights of TP=1, so their outputs agree."""
    config, plan = model.config, model.plan
    device = torch.device(device) if device is not None else torch.device("cpu")
    gen = torch.Generator(device=device).manual_seed(seed)

    def draw(rows: int, cols: int | None, std: float) -> torch.Tensor:
        shape = (rows,) if cols is None else (rows, cols)
        if device.type == "cpu":
            return torch.randn(shape, generator=gen) * std
        # Rounded through bfloat16, so a float32 engine and a bf16 one of the same preset and seed
        # hold the very same weights (the GPU correctness test compares them).
        return torch.randn(shape, generator=gen, device=device).mul_(std).to(torch.bfloat16)

    hidden, head_dim = config.hidden_size, config.head_dim
    q_full, kv_full = config.num_heads * head_dim, config.num_kv_heads * head_dim
    inter = config.intermediate_size

    def qkv(full: torch.Tensor) -> torch.Tensor:
        return plan.qkv(*full.split([q_full, kv_full, kv_full]))

    # Logit std ~4 with a unit-RMS final hidden state: peaked but not one-hot.
    model.embed_tokens.data.copy_(plan.vocab_part(draw(config.vocab_size, hidden, 4.0 / math.sqrt(hidden))))
    if model.lm_head is not None:
        model.lm_head.data.copy_(plan.vocab_part(draw(config.vocab_size, hidden, 4.0 / math.sqrt(hidden))))
    residual_scale = 1.0
    for layer in model.layers:
        layer.qkv_proj.data.copy_(qkv(draw(q_full + 2 * kv_full, hidden, 1.0 / math.sqrt(hidden))))
        if layer.qkv_bias is not None:
            layer.qkv_bias.data.copy_(qkv(draw(q_full + 2 * kv_full, None, 0.02)))
        layer.o_proj.data.copy_(plan.o_columns(draw(hidden, q_full, residual_scale / math.sqrt(q_full))))
        layer.gate_up_proj.data.copy_(plan.gate_up(*draw(2 * inter, hidden, 1.0 / math.sqrt(hidden)).chunk(2)))
        layer.down_proj.data.copy_(plan.down_columns(draw(hidden, inter, residual_scale / math.sqrt(inter))))


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


@dataclass
class LoadReport:
    """What loading read from the checkpoint: each tensor name with the shape of every slice taken."""

    reads: dict[str, list[tuple[int, ...]]] = field(default_factory=dict)
    bytes_read: int = 0


def load_hf_weights(model: LlamaModel, checkpoint_dir: str | Path) -> LoadReport:
    """Copy HF Llama/Qwen2 tensors into the model, fusing q/k/v and gate/up; every parameter must be found.

    Tensors are opened as safetensors slices (`get_slice`): a tensor-parallel shard reads only its
    rows or columns of each, never the whole tensor (the plan's ranges, tensor_parallel.py)."""
    checkpoint_dir = Path(checkpoint_dir)
    files = _tensor_files(checkpoint_dir)
    handles: dict[Path, object] = {}
    report = LoadReport()
    plan = model.plan

    class _Counted:
        """A safetensors slice that records the shape and bytes of what is read through it."""

        def __init__(self, name: str, lazy: object) -> None:
            self.name, self.lazy = name, lazy

        def __getitem__(self, index: object) -> torch.Tensor:
            tensor = self.lazy[index]  # type: ignore[index]
            report.reads.setdefault(self.name, []).append(tuple(tensor.shape))
            report.bytes_read += tensor.numel() * tensor.element_size()
            return tensor

    def get(name: str) -> _Counted:
        for candidate in (name, name.removeprefix("model.")):
            if candidate in files:
                path = files[candidate]
                if path not in handles:
                    handles[path] = safe_open(str(path), framework="pt")
                return _Counted(candidate, handles[path].get_slice(candidate))  # type: ignore[attr-defined]
        raise ConfigError(f"{checkpoint_dir}: tensor {name!r} is missing from the checkpoint")

    def has(name: str) -> bool:
        return name in files or name.removeprefix("model.") in files

    whole = slice(None)
    with torch.no_grad():
        model.embed_tokens.copy_(plan.vocab_part(get("model.embed_tokens.weight")))
        model.norm.copy_(get("model.norm.weight")[whole])
        if model.lm_head is not None:
            head = "lm_head.weight" if has("lm_head.weight") else "model.embed_tokens.weight"
            model.lm_head.copy_(plan.vocab_part(get(head)))
        for i, layer in enumerate(model.layers):
            p = f"model.layers.{i}."
            layer.input_norm.copy_(get(p + "input_layernorm.weight")[whole])
            layer.post_attention_norm.copy_(get(p + "post_attention_layernorm.weight")[whole])
            layer.qkv_proj.copy_(plan.qkv(*(get(p + f"self_attn.{x}_proj.weight") for x in "qkv")))
            if layer.qkv_bias is not None:
                layer.qkv_bias.copy_(plan.qkv(*(get(p + f"self_attn.{x}_proj.bias") for x in "qkv")))
            layer.o_proj.copy_(plan.o_columns(get(p + "self_attn.o_proj.weight")))
            layer.gate_up_proj.copy_(plan.gate_up(get(p + "mlp.gate_proj.weight"), get(p + "mlp.up_proj.weight")))
            layer.down_proj.copy_(plan.down_columns(get(p + "mlp.down_proj.weight")))
    return report
