"""RMSNorm with an optional fused residual add.

Fusing the add saves a full pass over the hidden state: the unfused version
writes `x + residual` and reads it back for the norm. One program normalises one
row, whole in registers (hidden sizes up to 16k fit), so the row is read once.
Rounding follows HF Llama: the residual sum is rounded to the input dtype, the
norm is computed in float32 from that rounded sum, rounded, then scaled by the
weight.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from servescope.kernels.common import check_dtype, check_last_dim_contiguous, check_shape


def rms_norm_ref(
    x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Plain-torch RMSNorm (HF Llama rounding); with `residual`, normalises x + residual."""
    summed = None
    if residual is not None:
        x = x + residual
        summed = x
    xf = x.float()
    normed = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * normed.to(x.dtype), summed


@triton.jit
def _rms_norm_kernel(
    x_ptr, residual_ptr, weight_ptr, out_ptr, summed_ptr,
    stride_x, stride_r, stride_o, stride_s,
    hidden, eps,
    HAS_RESIDUAL: tl.constexpr, BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < hidden
    x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    if HAS_RESIDUAL:
        r = tl.load(residual_ptr + row * stride_r + cols, mask=mask, other=0.0).to(tl.float32)
        rounded = (x + r).to(summed_ptr.dtype.element_ty)
        tl.store(summed_ptr + row * stride_s + cols, rounded, mask=mask)
        x = rounded.to(tl.float32)
    inv_rms = tl.rsqrt(tl.sum(x * x, axis=0) / hidden + eps)
    normed = (x * inv_rms).to(out_ptr.dtype.element_ty).to(tl.float32)
    w = tl.load(weight_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * stride_o + cols, (normed * w).to(out_ptr.dtype.element_ty), mask=mask)


def rms_norm(
    x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Triton RMSNorm over the last dimension of x ([..., H]); see rms_norm_ref."""
    check_dtype("x", x)
    hidden = x.shape[-1]
    check_shape("weight", weight, (hidden,))
    check_last_dim_contiguous("x", x)
    x2 = x.reshape(-1, hidden)
    rows = x2.shape[0]
    out = torch.empty_like(x2)
    summed = None
    if residual is not None:
        check_shape("residual", residual, tuple(x.shape))
        check_last_dim_contiguous("residual", residual)
        r2 = residual.reshape(-1, hidden)
        summed = torch.empty_like(x2)
    else:
        r2 = x2  # unused by the kernel; any valid pointer
    s2 = summed if summed is not None else out
    block = triton.next_power_of_2(hidden)
    num_warps = min(16, max(1, block // 512))
    if rows > 0:
        _rms_norm_kernel[(rows,)](
            x2, r2, weight, out, s2,
            x2.stride(0), r2.stride(0), out.stride(0), s2.stride(0),
            hidden, eps,
            HAS_RESIDUAL=residual is not None, BLOCK=block, num_warps=num_warps,
        )
    return out.view(x.shape), (summed.view(x.shape) if summed is not None else None)
