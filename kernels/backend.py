"""TritonOps: the reference engine's kernel interface, backed by the Triton kernels.

It has the same methods, arguments and results as reference_engine/ops.py's
TorchOps, so the engine swaps one for the other on CUDA without other changes.
Each method is a thin call into the kernel module that owns the work; the
modules' `*_ref` functions are the plain-torch meaning of each method.
"""

from __future__ import annotations

import torch

from kernels.activation import silu_and_mul
from kernels.kv_write import write_kv
from kernels.paged_decode_attention import DEFAULT_CONFIG as DECODE_CONFIG
from kernels.paged_decode_attention import DecodeConfig, decode_attention
from kernels.paged_prefill_attention import DEFAULT_CONFIG as PREFILL_CONFIG
from kernels.paged_prefill_attention import PrefillConfig, prefill_attention
from kernels.rmsnorm import rms_norm
from kernels.rope import rope


class TritonOps:
    """Fused Triton kernels for RMSNorm, RoPE, SiLU-mul, KV write and paged attention."""

    name = "triton"
    # q/k/v may be strided views of the fused QKV output: every kernel here takes row strides.
    strided_qkv = True

    def __init__(self, decode_config: DecodeConfig = DECODE_CONFIG, prefill_config: PrefillConfig = PREFILL_CONFIG):
        self.decode_config = decode_config
        self.prefill_config = prefill_config

    def rms_norm(
        self, x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        return rms_norm(x, weight, eps, residual)

    def rope(self, q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, cos_sin_cache: torch.Tensor) -> None:
        rope(q, k, positions, cos_sin_cache)

    def silu_and_mul(self, x: torch.Tensor) -> torch.Tensor:
        return silu_and_mul(x)

    def write_kv(
        self, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, slot_mapping: torch.Tensor
    ) -> None:
        write_kv(k, v, k_cache, v_cache, slot_mapping)

    def decode_attention(
        self,
        q: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        block_tables: torch.Tensor,
        context_lens: torch.Tensor,
        scale: float,
    ) -> torch.Tensor:
        return decode_attention(q, k_cache, v_cache, block_tables, context_lens, scale, self.decode_config)

    def prefill_attention(
        self,
        q: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        block_tables: torch.Tensor,
        cu_seqlens_q: torch.Tensor,
        context_lens: torch.Tensor,
        scale: float,
        max_seqlen_q: int | None = None,
    ) -> torch.Tensor:
        return prefill_attention(
            q, k_cache, v_cache, block_tables, cu_seqlens_q, context_lens, scale,
            max_seqlen_q=max_seqlen_q, config=self.prefill_config,
        )
