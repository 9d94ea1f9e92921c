"""Model shapes (presets or a checkpoint's config.json) and engine knobs, validated on construction.

Two dataclasses, one job each: `ModelConfig` says what the network looks like,
`EngineConfig` says how the engine serves it (KV pool, batching, speculation).
Both fail at construction with a message that names the bad field and what is
allowed, so a typo on the command line never surfaces as a shape error deep in
a forward pass.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from servescope.reference_engine.errors import ConfigError


@dataclass(frozen=True)
class RopeScaling:
    """Llama-3 style frequency scaling ("rope_type": "llama3"); absent means plain RoPE."""

    factor: float
    low_freq_factor: float
    high_freq_factor: float
    original_max_position_embeddings: int

    def __post_init__(self) -> None:
        if self.factor <= 0 or self.low_freq_factor <= 0 or self.high_freq_factor <= self.low_freq_factor:
            raise ConfigError(
                f"rope scaling needs factor > 0 and high_freq_factor > low_freq_factor > 0, got {self}"
            )


@dataclass(frozen=True)
class ModelConfig:
    """The shape of a Llama-family decoder (Llama 2/3, Qwen2 with q/k/v bias)."""

    name: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    max_position_embeddings: int
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling | None = None
    rms_norm_eps: float = 1e-5
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    eos_token_ids: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads",
                     "num_kv_heads", "head_dim", "max_position_embeddings"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"model config {self.name!r}: {name} must be > 0, got {getattr(self, name)}")
        if self.num_heads % self.num_kv_heads:
            raise ConfigError(
                f"model config {self.name!r}: num_heads ({self.num_heads}) must be a multiple of "
                f"num_kv_heads ({self.num_kv_heads}) for grouped-query attention"
            )
        if self.head_dim % 2:
            raise ConfigError(f"model config {self.name!r}: head_dim must be even for RoPE, got {self.head_dim}")

    @property
    def num_params(self) -> int:
        """Parameter count (embedding counted once when tied)."""
        attn = self.hidden_size * self.head_dim * (2 * self.num_heads + 2 * self.num_kv_heads)
        mlp = 3 * self.hidden_size * self.intermediate_size
        per_layer = attn + mlp + 2 * self.hidden_size
        head = 0 if self.tie_word_embeddings else self.vocab_size * self.hidden_size
        return self.vocab_size * self.hidden_size + self.num_layers * per_layer + self.hidden_size + head

    def kv_bytes_per_token(self, dtype_bytes: int) -> int:
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * dtype_bytes


_LLAMA3_ROPE = RopeScaling(factor=32.0, low_freq_factor=1.0, high_freq_factor=4.0,
                           original_max_position_embeddings=8192)


def preset(name: str, vocab_size: int | None = None) -> ModelConfig:
    """A named model shape. `tiny` takes the bundled tokenizer's vocabulary size.

    The big presets keep the real vocabulary size (the bundled tokenizer's ids all
    fit below it), so memory and speed match the real model.
    """
    if name == "tiny":
        if vocab_size is None:
            raise ConfigError("preset 'tiny' needs the tokenizer's vocab_size")
        # Small enough to stream in real time on 2 CPU cores, long enough
        # context (32k) for the convoy workload's 16k-token prompts.
        return ModelConfig(name="tiny", vocab_size=vocab_size, hidden_size=256, intermediate_size=768,
                           num_layers=4, num_heads=4, num_kv_heads=2, head_dim=64,
                           max_position_embeddings=32768, rope_theta=500000.0,
                           rope_scaling=RopeScaling(8.0, 1.0, 4.0, 8192), tie_word_embeddings=False)
    if name == "llama3-1b":  # Llama 3.2 1B
        return ModelConfig(name=name, vocab_size=128256, hidden_size=2048, intermediate_size=8192,
                           num_layers=16, num_heads=32, num_kv_heads=8, head_dim=64,
                           max_position_embeddings=131072, rope_theta=500000.0, rope_scaling=_LLAMA3_ROPE,
                           tie_word_embeddings=True)
    if name == "llama3-8b":  # Llama 3.1 8B
        return ModelConfig(name=name, vocab_size=128256, hidden_size=4096, intermediate_size=14336,
                           num_layers=32, num_heads=32, num_kv_heads=8, head_dim=128,
                           max_position_embeddings=131072, rope_theta=500000.0,
                           rope_scaling=replace(_LLAMA3_ROPE, factor=8.0))
    if name == "llama3-70b":  # Llama 3.1 70B: 141 GB of bf16 weights, more than one GPU holds
        return ModelConfig(name=name, vocab_size=128256, hidden_size=8192, intermediate_size=28672,
                           num_layers=80, num_heads=64, num_kv_heads=8, head_dim=128,
                           max_position_embeddings=131072, rope_theta=500000.0,
                           rope_scaling=replace(_LLAMA3_ROPE, factor=8.0))
    if name == "qwen2.5-7b":
        return ModelConfig(name=name, vocab_size=152064, hidden_size=3584, intermediate_size=18944,
                           num_layers=28, num_heads=28, num_kv_heads=4, head_dim=128,
                           max_position_embeddings=32768, rope_theta=1000000.0, rms_norm_eps=1e-6,
                           attention_bias=True)
    raise ConfigError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")


PRESETS = ("tiny", "llama3-1b", "llama3-8b", "llama3-70b", "qwen2.5-7b")


def model_config_from_hf(checkpoint_dir: str | Path) -> ModelConfig:
    """Read a Hugging Face `config.json` (transformers 4.x `rope_scaling` or 5.x `rope_parameters`)."""
    path = Path(checkpoint_dir) / "config.json"
    if not path.is_file():
        raise ConfigError(f"{checkpoint_dir} has no config.json; pass a Hugging Face checkpoint directory")
    raw: dict[str, Any] = json.loads(path.read_text())
    model_type = raw.get("model_type", "llama")
    if model_type not in ("llama", "qwen2", "mistral"):
        raise ConfigError(f"{path}: model_type {model_type!r} is not a Llama-family decoder "
                          "(supported: llama, qwen2, mistral)")
    rope = raw.get("rope_parameters") or raw.get("rope_scaling") or {}
    theta = float(rope.get("rope_theta", raw.get("rope_theta", 10000.0)))
    scaling = None
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type == "llama3":
        scaling = RopeScaling(float(rope["factor"]), float(rope["low_freq_factor"]),
                              float(rope["high_freq_factor"]), int(rope["original_max_position_embeddings"]))
    elif rope_type not in ("default", None):
        raise ConfigError(f"{path}: rope_type {rope_type!r} is not supported (use default or llama3)")
    heads = int(raw["num_attention_heads"])
    eos = raw.get("eos_token_id")
    eos_ids = tuple(eos) if isinstance(eos, list) else ((eos,) if isinstance(eos, int) else ())
    return ModelConfig(
        name=Path(checkpoint_dir).resolve().name,
        vocab_size=int(raw["vocab_size"]),
        hidden_size=int(raw["hidden_size"]),
        intermediate_size=int(raw["intermediate_size"]),
        num_layers=int(raw["num_hidden_layers"]),
        num_heads=heads,
        num_kv_heads=int(raw.get("num_key_value_heads") or heads),
        head_dim=int(raw.get("head_dim") or raw["hidden_size"] // heads),
        max_position_embeddings=int(raw.get("max_position_embeddings", 4096)),
        rope_theta=theta,
        rope_scaling=scaling,
        rms_norm_eps=float(raw.get("rms_norm_eps", 1e-5)),
        tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
        attention_bias=bool(raw.get("attention_bias", model_type == "qwen2")),
        eos_token_ids=eos_ids,
    )


_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]?i?B?)\s*$", re.IGNORECASE)
_SIZE_UNITS = {"": 1, "B": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def parse_size(text: str) -> int:
    """'256MB', '1.5GiB', '4096' -> bytes (binary units: KV pools are sized in powers of two)."""
    match = _SIZE_RE.match(str(text))
    if not match:
        raise ConfigError(f"cannot read memory size {text!r}; write e.g. 256MB, 2GB or 1048576")
    unit = match.group(2).upper().replace("I", "").rstrip("B") or ""
    return int(float(match.group(1)) * _SIZE_UNITS[unit])


@dataclass(frozen=True)
class SpecConfig:
    """N-gram (prompt lookup) speculation: propose up to `k` tokens that followed the last `n` tokens.

    adaptive (the default): each step drafts only for requests, and only as far, as their acceptance
    so far and the engine's measured step times say pays (draft_policy.py); off: every decoding
    request drafts up to k tokens every step."""

    k: int = 4
    n: int = 3
    adaptive: bool = True

    def __post_init__(self) -> None:
        if not 1 <= self.k <= 16 or not 1 <= self.n <= 8:
            raise ConfigError(f"--spec ngram needs 1 <= k <= 16 and 1 <= n <= 8, got k={self.k}, n={self.n}")

    @classmethod
    def parse(cls, text: str | None) -> SpecConfig | None:
        """'ngram:k=4,n=3[,adaptive=0]' -> SpecConfig; None/'' /'off' -> None."""
        if not text or text == "off":
            return None
        method, _, args = text.partition(":")
        if method != "ngram":
            raise ConfigError(f"--spec {text!r}: only 'ngram' is supported, e.g. --spec ngram:k=4,n=3")
        values: dict[str, int] = {}
        for part in filter(None, args.split(",")):
            key, eq, value = part.partition("=")
            if not eq or key not in ("k", "n", "adaptive") or not value.isdigit() \
                    or (key == "adaptive" and value not in ("0", "1")):
                raise ConfigError(f"--spec {text!r}: bad option {part!r}; allowed: k=INT, n=INT, adaptive=0|1")
            values[key] = int(value)
        adaptive = bool(values.pop("adaptive", 1))
        return cls(**values, adaptive=adaptive)


@dataclass
class EngineConfig:
    """How the engine serves: KV pool, batching limits, speculation, device."""

    block_size: int = 16
    num_kv_blocks: int | None = None  # wins over kv_cache_memory when given
    kv_cache_memory: int | None = None  # bytes; None: 256 MiB on CPU, 80% of free memory on CUDA
    max_num_batched_tokens: int = 2048
    max_num_seqs: int = 64
    chunked_prefill: bool = True
    max_waiting: int | None = None  # None: unbounded
    max_model_len: int | None = None  # None: the model's max_position_embeddings
    spec: SpecConfig | None = None
    enable_prefix_caching: bool = True
    device: str = "cpu"
    dtype: str = "auto"
    attention_backend: str = "auto"
    seed: int = 0
    served_model_name: str = "tiny"
    # GPU path (ignored on the CPU): decode-only steps replay CUDA graphs captured at bucketed batch
    # sizes (Triton backend only); contexts longer than cuda_graph_max_len run eagerly.
    cuda_graph: bool = True
    cuda_graph_max_len: int = 8192
    # Steps with prefill tokens (and decode steps beyond cuda_graph_max_len) of up to this many
    # tokens replay piecewise CUDA graphs: everything but attention captured per layer at bucketed
    # token counts, attention run eagerly between the pieces. 0: such steps run eagerly.
    piecewise_graph_max_tokens: int = 2048
    # Schedule step N+1 while step N runs on the GPU (sampling on the GPU, sampled ids synced one step
    # late). None: on for CUDA, off on the CPU (where nothing would overlap). With speculation a step
    # that drafts first takes the overlapped step's tokens (a proposal needs them) and runs alone.
    async_scheduling: bool | None = None
    # Ranks of one model split by tensor parallelism (tensor_parallel.py), one process each; rank 0 is
    # the engine. On CUDA rank r runs on cuda:r.
    tensor_parallel_size: int = 1
    # A fault to diagnose on purpose (`servescope lab stall`): (every_s, for_s) makes the step loop
    # stand still for for_s seconds every every_s seconds of serving. None: never.
    debug_pause: tuple[float, float] | None = None

    def __post_init__(self) -> None:
        if self.block_size <= 0 or self.block_size & (self.block_size - 1):
            raise ConfigError(f"--block-size must be a power of two, got {self.block_size}")
        if self.num_kv_blocks is not None and self.num_kv_blocks < 2:
            raise ConfigError(f"--num-kv-blocks must be >= 2, got {self.num_kv_blocks}")
        if self.max_num_batched_tokens < 1 or self.max_num_seqs < 1:
            raise ConfigError("--max-num-batched-tokens and --max-num-seqs must be >= 1")
        if self.max_waiting is not None and self.max_waiting < 0:
            raise ConfigError(f"--max-waiting must be >= 0, got {self.max_waiting}")
        if self.device not in ("cpu", "cuda") and not self.device.startswith("cuda:"):
            raise ConfigError(f"--device must be cpu, cuda or auto, got {self.device!r}")
        if self.dtype not in ("auto", "float32", "bfloat16", "float16"):
            raise ConfigError(f"--dtype must be auto, float32, bfloat16 or float16, got {self.dtype!r}")
        if self.attention_backend not in ("auto", "torch", "triton"):
            raise ConfigError(f"--attention-backend must be auto, torch or triton, got {self.attention_backend!r}")
        if self.cuda_graph_max_len < self.block_size:
            raise ConfigError(f"--cuda-graph-max-len must be >= the block size, got {self.cuda_graph_max_len}")
        if self.piecewise_graph_max_tokens < 0:
            raise ConfigError(f"--piecewise-graph-max-tokens must be >= 0 (0: off), got {self.piecewise_graph_max_tokens}")
        if self.tensor_parallel_size < 1:
            raise ConfigError(f"--tensor-parallel-size must be >= 1, got {self.tensor_parallel_size}")
        if self.debug_pause is not None:
            every, length = self.debug_pause
            if not (every > 0 and 0 < length < every):
                raise ConfigError(f"--debug-pause EVERY:FOR needs 0 < FOR < EVERY, got {every:g}s:{length:g}s")

    @staticmethod
    def parse_debug_pause(text: str | None) -> tuple[float, float] | None:
        """`EVERY:FOR` (e.g. `4s:1.5s`) as seconds; None for None."""
        if text is None:
            return None
        from servescope.units import DurationError, parse_seconds

        every, sep, length = text.partition(":")
        try:
            if not sep:
                raise DurationError("expected EVERY:FOR")
            return parse_seconds(every), parse_seconds(length)
        except DurationError as exc:
            raise ConfigError(f"--debug-pause {text!r}: {exc}; write EVERY:FOR, e.g. 4s:1.5s") from None

    @property
    def use_async_scheduling(self) -> bool:
        if self.async_scheduling is None:
            return self.device.startswith("cuda")
        return self.async_scheduling
