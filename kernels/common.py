"""Small helpers shared by the kernel launchers: input checks and interpreter quirks.

The launchers validate shapes and dtypes on the host before launching, because a
Triton kernel fed a wrong stride or dtype does not fail: it reads garbage.
"""

from __future__ import annotations

import os

import torch

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def interpreting() -> bool:
    """True when Triton runs kernels in its CPU interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def upcast_dots(dtype: torch.dtype) -> bool:
    """Whether tl.dot operands must be widened to float32 before the product.

    Triton's CPU interpreter computes bfloat16 arithmetic on the raw bits (its
    numpy backend has no bfloat16), so a bf16 tl.dot returns garbage there.
    Conversions are exact, so in the interpreter we convert first; on a GPU the
    tensor cores take bf16 operands directly and nothing changes.
    """
    return interpreting() and dtype == torch.bfloat16


def dot_precision(dtype: torch.dtype) -> str:
    """tl.dot's input_precision: exact float32 products for float32 inputs.

    Triton's default for a float32 dot on a GPU is tf32 (10-bit mantissa, about
    3e-4 relative error): fine for speed, wrong for a float32 engine that is
    expected to match torch. Half-precision inputs ignore the setting.
    """
    return "ieee" if dtype == torch.float32 else "tf32"


def check_dtype(name: str, tensor: torch.Tensor) -> None:
    if tensor.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"{name} has dtype {tensor.dtype}; the kernels take float16, bfloat16 or float32")


def check_last_dim_contiguous(name: str, tensor: torch.Tensor) -> None:
    if tensor.stride(-1) != 1:
        raise ValueError(f"{name} must be contiguous in its last dimension (stride {tensor.stride()}); call .contiguous() first")


def check_shape(name: str, tensor: torch.Tensor, expected: tuple[int | None, ...]) -> None:
    """Compare a shape with an expected one in which None matches any size."""
    ok = tensor.dim() == len(expected) and all(e is None or e == s for s, e in zip(tensor.shape, expected))
    if not ok:
        shown = tuple("*" if e is None else e for e in expected)
        raise ValueError(f"{name} has shape {tuple(tensor.shape)}; expected {shown}")


def check_same_device(**tensors: torch.Tensor) -> None:
    devices = {name: t.device for name, t in tensors.items()}
    if len(set(devices.values())) > 1:
        raise ValueError(f"tensors are on different devices: {devices}")


def gather_context(
    k_cache: torch.Tensor, v_cache: torch.Tensor, block_table: torch.Tensor, length: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The first `length` cached tokens of one sequence as contiguous [length, Hkv, D] K and V.

    Used by the plain-torch references: it follows the block table exactly as
    the kernels do, one page at a time, so a wrong table shows up in both.
    """
    page_size = k_cache.shape[1]
    pages = block_table[: (length + page_size - 1) // page_size].long()
    k = k_cache[pages].reshape(-1, *k_cache.shape[2:])[:length]
    v = v_cache[pages].reshape(-1, *v_cache.shape[2:])[:length]
    return k, v


def check_paged_cache(k_cache: torch.Tensor, v_cache: torch.Tensor, head_dim: int) -> None:
    """Both caches are [num_blocks, block_size, Hkv, D] with the same shape and a unit last stride."""
    check_dtype("k_cache", k_cache)
    check_shape("k_cache", k_cache, (None, None, None, head_dim))
    check_shape("v_cache", v_cache, tuple(k_cache.shape))
    if k_cache.stride() != v_cache.stride():
        raise ValueError(f"k_cache and v_cache must share strides, got {k_cache.stride()} and {v_cache.stride()}")
    check_last_dim_contiguous("k_cache", k_cache)
