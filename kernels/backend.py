"""TritonOps: the reference engine's kernel interface, backed by the Triton kernels.

It has the same methods, arguments and results as reference_engine/ops.py's
TorchOps, so the engine swaps one for the other on CUDA without other changes.
Each method is a thin call into the kernel module that owns the work; the
modules' `*_ref` functions are the plain-torch meaning of each method.

Projections (`linear`, `norm_linear`, `silu_mul_linear`) go to kernels/gemv.py's
skinny-matrix kernel, with the RMSNorm or SiLU-mul folded into its loads, only
for few rows (decode at small batch) on a GPU, and only for the shapes, row
counts and prologues that the tuned table lists for this device (measured faster
than cuBLAS plus the separate elementwise kernel); everything else is F.linear
after the elementwise kernel, as in TorchOps.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from servescope.kernels.activation import silu_and_mul
from servescope.kernels.gemv import GemvConfig, GemvPolicy, gemv
from servescope.kernels.kv_write import write_kv
from servescope.kernels.paged_decode_attention import DEFAULT_CONFIG as DECODE_CONFIG
from servescope.kernels.paged_decode_attention import DecodeConfig, decode_attention
from servescope.kernels.paged_prefill_attention import DEFAULT_CONFIG as PREFILL_CONFIG
from servescope.kernels.paged_prefill_attention import PrefillConfig, prefill_attention
from servescope.kernels.rmsnorm import rms_norm
from servescope.kernels.rope import rope, rope_write_kv


class TritonOps:
    """Fused Triton kernels for RMSNorm, RoPE, SiLU-mul, KV write and paged attention."""

    name = "triton"
    # q/k/v may be strided views of the fused QKV output: every kernel here takes row strides.
    strided_qkv = True

    def __init__(self, decode_config: DecodeConfig = DECODE_CONFIG, prefill_config: PrefillConfig = PREFILL_CONFIG,
                 gemv_policy: GemvPolicy | None = None):
        self.decode_config = decode_config
        self.prefill_config = prefill_config
        # Built on the first projection (it needs the device's name); tests may pass their own.
        self.gemv_policy = gemv_policy

    def _gemv_config(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                     prologue: str) -> GemvConfig | None:
        if bias is not None or x.dim() != 2 or x.dtype not in (torch.float16, torch.bfloat16):
            return None
        if weight.dtype != x.dtype or x.stride(-1) != 1 or weight.stride(-1) != 1:
            return None
        if self.gemv_policy is None:
            self.gemv_policy = GemvPolicy(torch.cuda.get_device_name(x.device) if x.is_cuda else None)
        n, k = weight.shape
        return self.gemv_policy.config(n, k, x.shape[0], prologue)

    def linear(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        config = self._gemv_config(x, weight, bias, "none")
        if config is None:
            return F.linear(x, weight, bias)
        return gemv(x, weight, config=config)[0]

    def norm_linear(
        self, x: torch.Tensor, norm_weight: torch.Tensor, eps: float, residual: torch.Tensor | None,
        weight: torch.Tensor, bias: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        config = self._gemv_config(x, weight, bias, "norm")
        if config is None or (residual is not None and residual.stride(-1) != 1):
            normed, residual = self.rms_norm(x, norm_weight, eps, residual)
            return self.linear(normed, weight, bias), residual
        return gemv(x, weight, "norm", norm_weight, eps, residual, config=config)

    def silu_mul_linear(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        config = self._gemv_config(x, weight, None, "silu_mul")
        if config is None:
            return self.linear(self.silu_and_mul(x), weight)
        return gemv(x, weight, "silu_mul", config=config)[0]

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

    def rope_write_kv(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor,
        cos_sin_cache: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, slot_mapping: torch.Tensor,
    ) -> None:
        rope_write_kv(q, k, v, positions, cos_sin_cache, k_cache, v_cache, slot_mapping)

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
