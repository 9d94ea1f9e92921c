"""SiLU-and-mul: the gated MLP activation `silu(gate) * up` in one pass.

Unfused, torch writes silu(gate) and reads it back; fused, each element of the
[T, 2I] input is read once and the [T, I] output written once. Computed in
float32 and rounded once (torch's bf16 version rounds twice; they differ by at
most one unit in the last place).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from servescope.kernels.common import check_dtype, check_last_dim_contiguous

BLOCK = 1024


def silu_and_mul_ref(x: torch.Tensor) -> torch.Tensor:
    """x [T, 2I] -> silu(x[:, :I]) * x[:, I:]."""
    half = x.shape[-1] // 2
    return torch.nn.functional.silu(x[..., :half]) * x[..., half:]


@triton.jit
def _silu_and_mul_kernel(x_ptr, out_ptr, stride_x, stride_o, inner, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < inner
    gate = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(x_ptr + row * stride_x + inner + cols, mask=mask, other=0.0).to(tl.float32)
    out = gate / (1.0 + tl.exp(-gate)) * up
    tl.store(out_ptr + row * stride_o + cols, out.to(out_ptr.dtype.element_ty), mask=mask)


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """Triton SiLU-and-mul: x [..., 2I] -> [..., I]."""
    check_dtype("x", x)
    check_last_dim_contiguous("x", x)
    if x.shape[-1] % 2:
        raise ValueError(f"x's last dimension must be even (gate and up halves), got {x.shape[-1]}")
    inner = x.shape[-1] // 2
    x2 = x.reshape(-1, x.shape[-1])
    out = torch.empty((x2.shape[0], inner), dtype=x.dtype, device=x.device)
    if x2.shape[0] > 0:
        _silu_and_mul_kernel[(x2.shape[0], triton.cdiv(inner, BLOCK))](
            x2, out, x2.stride(0), out.stride(0), inner, BLOCK=BLOCK, num_warps=4
        )
    return out.view(*x.shape[:-1], inner)
