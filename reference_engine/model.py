"""The Llama-family decoder over a flat batch of tokens and a paged KV cache.

A step's tokens arrive concatenated: decode rows first (one token per running
sequence), then prefill chunks and speculative verifications (several tokens per
sequence). Every non-matmul operation, and every decoder projection, goes through
`Ops`, so the same model runs on the torch CPU path and on the Triton kernels
(which may fuse an RMSNorm or SiLU-mul into the projection it feeds). q/k/v and gate/up projections
are stored fused (one matmul each): fewer kernel launches per layer is what
makes a tiny model fast on a CPU.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from servescope.reference_engine.config import ModelConfig
from servescope.reference_engine.ops import Ops
from servescope.reference_engine.tensor_parallel import ShardPlan, TPGroup


@dataclass
class AttentionMetadata:
    """Where each token of a step reads and writes the paged cache.

    Rows [0, num_decode_tokens) are single-token decodes; the remaining rows are
    ragged prefill segments described by cu_seqlens_q / context_lens.
    """

    slot_mapping: Tensor  # [T] int64
    num_decode_tokens: int
    decode_block_tables: Tensor | None  # [B_dec, max_blocks] int32
    decode_context_lens: Tensor | None  # [B_dec] int32
    prefill_block_tables: Tensor | None  # [B_pre, max_blocks] int32
    prefill_cu_seqlens_q: Tensor | None  # [B_pre + 1] int32
    prefill_context_lens: Tensor | None  # [B_pre] int32
    # Most new tokens of any prefill segment, known on the host: sizes the prefill kernel's grid
    # without a device-to-host read (None: the backend reads it from cu_seqlens_q).
    prefill_max_seqlen_q: int | None = None


def rope_cos_sin_cache(config: ModelConfig, max_positions: int, device: torch.device | str) -> Tensor:
    """[max_positions, head_dim]: cos half | sin half, with Llama-3 frequency scaling when configured."""
    dim = config.head_dim
    inv_freq = 1.0 / (config.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim))
    scaling = config.rope_scaling
    if scaling is not None:
        low_wavelen = scaling.original_max_position_embeddings / scaling.low_freq_factor
        high_wavelen = scaling.original_max_position_embeddings / scaling.high_freq_factor
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > low_wavelen, inv_freq / scaling.factor, inv_freq)
        smooth = (scaling.original_max_position_embeddings / wavelen - scaling.low_freq_factor) / (
            scaling.high_freq_factor - scaling.low_freq_factor)
        smoothed = (1 - smooth) * scaled / scaling.factor + smooth * scaled
        medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
        inv_freq = torch.where(medium, smoothed, scaled)
    inv_freq = inv_freq.float()
    freqs = torch.outer(torch.arange(max_positions, dtype=torch.float32), inv_freq)  # [P, D/2]
    # HF rotates halves (rotate_half), so each frequency serves both halves.
    emb = torch.cat([freqs, freqs], dim=-1)
    half = dim // 2
    cache = torch.cat([emb.cos()[:, :half], emb.sin()[:, :half]], dim=-1)
    return cache.to(device)


class DecoderLayer(nn.Module):
    """One decoder layer; under tensor parallelism (`tp`), this rank's heads and MLP slice, and the
    all-reduce after each row-parallel projection (o, down)."""

    def __init__(self, config: ModelConfig, plan: ShardPlan, tp: TPGroup | None = None) -> None:
        super().__init__()
        hidden, head_dim = config.hidden_size, config.head_dim
        self.num_heads, self.num_kv_heads, self.head_dim = plan.num_heads, plan.num_kv_heads, head_dim
        self.q_size, self.kv_size = plan.num_heads * head_dim, plan.num_kv_heads * head_dim
        self.scale = head_dim ** -0.5
        self.eps = config.rms_norm_eps
        self.tp = tp
        self.input_norm = nn.Parameter(torch.ones(hidden))
        self.post_attention_norm = nn.Parameter(torch.ones(hidden))
        self.qkv_proj = nn.Parameter(torch.empty(self.q_size + 2 * self.kv_size, hidden))
        self.qkv_bias = nn.Parameter(torch.zeros(self.q_size + 2 * self.kv_size)) if config.attention_bias else None
        self.o_proj = nn.Parameter(torch.empty(hidden, self.q_size))
        self.gate_up_proj = nn.Parameter(torch.empty(2 * plan.intermediate_size, hidden))
        self.down_proj = nn.Parameter(torch.empty(hidden, plan.intermediate_size))

    def forward(self, ops: Ops, hidden: Tensor, residual: Tensor | None, positions: Tensor,
                cos_sin: Tensor, kv_cache: tuple[Tensor, Tensor], meta: AttentionMetadata) -> tuple[Tensor, Tensor]:
        q, residual = self.pre_attention(ops, hidden, residual, positions, cos_sin, kv_cache, meta.slot_mapping)
        return self.post_attention(ops, self.attend(ops, q, kv_cache, meta), residual)

    # The layer in three pieces: the piecewise CUDA graphs of mixed steps (model_runner.py) capture
    # post_attention + the next layer's pre_attention as one graph and run `attend`, whose shapes
    # follow the step's ragged batch, eagerly between them.
    def pre_attention(self, ops: Ops, hidden: Tensor, residual: Tensor | None, positions: Tensor,
                      cos_sin: Tensor, kv_cache: tuple[Tensor, Tensor], slot_mapping: Tensor) -> tuple[Tensor, Tensor]:
        """Input RMSNorm (+ residual add), the fused q|k|v projection, RoPE and the KV write:
        (q [T, Hq, D], residual)."""
        # Each RMSNorm feeds a projection and SiLU-mul feeds the down projection: the ops may fuse them.
        if residual is None:
            qkv, _ = ops.norm_linear(hidden, self.input_norm, self.eps, None, self.qkv_proj, self.qkv_bias)
            residual = hidden
        else:
            qkv, residual = ops.norm_linear(hidden, self.input_norm, self.eps, residual, self.qkv_proj,
                                            self.qkv_bias)
        tokens = qkv.shape[0]
        parts = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        if getattr(ops, "strided_qkv", False):
            q, k, v = parts  # views of the fused output: three copy kernels per layer fewer (GPU decode)
        else:
            # Contiguous q/k/v: kernels may assume dense [T, H, D] rows (the copies are tiny next to the matmuls).
            q, k, v = (x.contiguous() for x in parts)
        q = q.view(tokens, self.num_heads, self.head_dim)
        k = k.view(tokens, self.num_kv_heads, self.head_dim)
        v = v.view(tokens, self.num_kv_heads, self.head_dim)
        k_cache, v_cache = kv_cache
        ops.rope_write_kv(q, k, v, positions, cos_sin, k_cache, v_cache, slot_mapping)
        return q, residual

    def attend(self, ops: Ops, q: Tensor, kv_cache: tuple[Tensor, Tensor], meta: AttentionMetadata) -> Tensor:
        """Paged attention of the step's queries [T, Hq, D] (decode rows first) -> [T, Hq * D]."""
        tokens = q.shape[0]
        k_cache, v_cache = kv_cache
        nd = meta.num_decode_tokens
        if nd == tokens:
            out = ops.decode_attention(q, k_cache, v_cache, meta.decode_block_tables,
                                       meta.decode_context_lens, self.scale)
        elif nd == 0:
            out = ops.prefill_attention(q, k_cache, v_cache, meta.prefill_block_tables,
                                        meta.prefill_cu_seqlens_q, meta.prefill_context_lens, self.scale,
                                        max_seqlen_q=meta.prefill_max_seqlen_q)
        else:
            out = torch.cat([
                ops.decode_attention(q[:nd], k_cache, v_cache, meta.decode_block_tables,
                                     meta.decode_context_lens, self.scale),
                ops.prefill_attention(q[nd:], k_cache, v_cache, meta.prefill_block_tables,
                                      meta.prefill_cu_seqlens_q, meta.prefill_context_lens, self.scale,
                                      max_seqlen_q=meta.prefill_max_seqlen_q),
            ])
        return out.reshape(tokens, self.q_size)

    def post_attention(self, ops: Ops, attn_out: Tensor, residual: Tensor) -> tuple[Tensor, Tensor]:
        """Output projection, post-attention RMSNorm (+ residual add) and the MLP: (hidden, residual)."""
        hidden = ops.linear(attn_out, self.o_proj)
        if self.tp is not None:
            self.tp.all_reduce(hidden)
        gate_up, residual = ops.norm_linear(hidden, self.post_attention_norm, self.eps, residual,
                                            self.gate_up_proj)
        out = ops.silu_mul_linear(gate_up, self.down_proj)
        if self.tp is not None:
            self.tp.all_reduce(out)
        return out, residual


class LlamaModel(nn.Module):
    """Embedding, decoder layers, final norm and LM head (tied to the embedding or not).

    With a `TPGroup` the model is one rank's shard (tensor_parallel.py): its heads, MLP slice and
    vocabulary rows; its logits are gathered whole on every rank."""

    def __init__(self, config: ModelConfig, max_positions: int | None = None, tp: TPGroup | None = None) -> None:
        super().__init__()
        self.config = config
        self.tp = tp
        self.plan = tp.plan if tp is not None else ShardPlan.of(config)
        vocab_rows = self.plan.vocab_shard
        self.embed_tokens = nn.Parameter(torch.empty(vocab_rows, config.hidden_size))
        self.layers = nn.ModuleList(DecoderLayer(config, self.plan, tp) for _ in range(config.num_layers))
        self.norm = nn.Parameter(torch.ones(config.hidden_size))
        self.lm_head = None if config.tie_word_embeddings else nn.Parameter(
            torch.empty(vocab_rows, config.hidden_size))
        positions = max_positions or config.max_position_embeddings
        self.register_buffer("cos_sin_cache", rope_cos_sin_cache(config, positions, "cpu"), persistent=False)

    def forward(self, ops: Ops, input_ids: Tensor, positions: Tensor,
                kv_caches: list[tuple[Tensor, Tensor]], meta: AttentionMetadata) -> Tensor:
        """Hidden states [T, hidden] after the final norm."""
        hidden = self.embed(input_ids)
        residual = None
        for layer, kv_cache in zip(self.layers, kv_caches):
            hidden, residual = layer(ops, hidden, residual, positions, self.cos_sin_cache, kv_cache, meta)
        hidden, _ = ops.rms_norm(hidden, self.norm, self.config.rms_norm_eps, residual)
        return hidden

    def embed(self, input_ids: Tensor) -> Tensor:
        """[T] ids -> [T, hidden]. A shard looks up the ids of its vocabulary range, zeros the rest,
        and the all-reduce sums each token's one looked-up row (no host sync: CUDA graphs capture it)."""
        if self.tp is None:
            return F.embedding(input_ids, self.embed_tokens)
        start, stop = self.plan.vocab
        local = input_ids - start
        outside = (local < 0) | (local >= stop - start)
        hidden = F.embedding(local.masked_fill(outside, 0), self.embed_tokens)
        hidden.masked_fill_(outside.unsqueeze(-1), 0)
        return self.tp.all_reduce(hidden)

    @property
    def num_kv_heads(self) -> int:
        """KV heads this model (shard) holds: the KV cache's head count."""
        return self.plan.num_kv_heads

    def compute_logits(self, hidden: Tensor) -> Tensor:
        """float32 logits [T, V]. On a GPU in half precision the LM head writes float32 directly
        (fp32 accumulators, never rounded to bf16): fewer exact ties between top logits, so greedy
        decoding does not hinge on how two backends break them."""
        head = self.embed_tokens if self.lm_head is None else self.lm_head
        if hidden.is_cuda and hidden.dtype in (torch.bfloat16, torch.float16) and _mm_out_dtype_works():
            logits = torch.mm(hidden, head.t(), out_dtype=torch.float32)
        else:
            logits = F.linear(hidden, head).float()
        if self.tp is not None:
            logits = self.tp.gather_vocab(logits, self.config.vocab_size)
        return logits


_MM_OUT_DTYPE: bool | None = None


def _mm_out_dtype_works() -> bool:
    """Whether torch.mm takes out_dtype (half inputs, float32 output) here; probed once."""
    global _MM_OUT_DTYPE
    if _MM_OUT_DTYPE is None:
        try:
            a = torch.ones(2, 16, dtype=torch.bfloat16, device="cuda")
            _MM_OUT_DTYPE = torch.mm(a, a.t(), out_dtype=torch.float32).dtype == torch.float32
        except (RuntimeError, TypeError):
            _MM_OUT_DTYPE = False
    return _MM_OUT_DTYPE
