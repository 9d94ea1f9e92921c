"""Skinny matrix products for decode: y = a @ W^T with few rows (M <= 16), W [N, K] as nn.Linear stores it.

At batch 1-8 a decode projection is a pure weight stream: every byte of W is read
once and the activations are a few KB. cuBLAS picks tiles for such shapes that
leave part of the chip idle (on an H200 the 4096->6144 qkv and 4096->4096 o
projections ran at 73% of copy bandwidth inside the engine's CUDA graph, against
93-97% for the wide MLP ones). This kernel gives each program a [BLOCK_N, K]
slab of W, walked BLOCK_K columns at a time, so the grid is N / BLOCK_N
programs of equal work; the few activation rows stay in L2.

Two inner products, chosen per launch (`GemvConfig.use_dot`):
- FMA: the activation rows times the weight tile in float32 registers
  ([BLOCK_M, BLOCK_N, BLOCK_K] partial sums, reduced once at the end); BLOCK_M
  is M rounded up to a power of two;
- dot: `tl.dot` on a 16-row activation tile (rows past M masked to zero), for
  larger M where per-element FMAs would cost more than the memory stream.

Optional prologues fold the elementwise op that feeds a projection into its
loads (what the engine's decoder layer does between two matmuls):
- `silu_mul`: a is [M, 2K] = gate | up and the product uses silu(gate) * up,
  computed in float32 and rounded once, as kernels/activation.py does;
- `norm`: the product uses RMSNorm(a [+ residual]) with kernels/rmsnorm.py's
  rounding; every program first computes the rows' inverse RMS over the whole
  row (from L2), and program 0 also writes the rounded sum a + residual.

Accumulation is float32; y is rounded to W's dtype. `gemv_ref` defines the result.
The tuned table (`kernels/gemv_tuned.json`, written from `python -m
benchmarks.kernels --gemv`) says, per device and shape, for which M and prologue
this kernel beat cuBLAS F.linear (and the separate elementwise kernel) and with
which launch configuration; `GemvPolicy` reads it.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch
import triton
import triton.language as tl

from servescope.kernels.common import (
    check_dtype,
    check_last_dim_contiguous,
    check_same_device,
    check_shape,
    upcast_dots,
)

MAX_ROWS = 16
PROLOGUES = ("none", "silu_mul", "norm")
_PROLOGUE_ID = {name: i for i, name in enumerate(PROLOGUES)}
TUNED_PATH = Path(__file__).with_name("gemv_tuned.json")


@dataclass(frozen=True)
class GemvConfig:
    block_n: int = 16
    block_k: int = 512
    num_warps: int = 4
    num_stages: int = 3
    use_dot: bool = False

    def key(self) -> str:
        return f"{'dot' if self.use_dot else 'fma'}_n{self.block_n}_k{self.block_k}_w{self.num_warps}_s{self.num_stages}"


DEFAULT_CONFIG = GemvConfig()
DEFAULT_DOT_CONFIG = GemvConfig(block_n=32, block_k=256, num_warps=4, num_stages=3, use_dot=True)


def default_config(rows: int) -> GemvConfig:
    """An untuned choice: float32 FMAs for one row, the 16-row dot beyond (FMA partial sums grow with M)."""
    return DEFAULT_CONFIG if rows <= 1 else DEFAULT_DOT_CONFIG


def gemv_ref(
    a: torch.Tensor, weight: torch.Tensor, prologue: str = "none", norm_weight: torch.Tensor | None = None,
    eps: float = 1e-6, residual: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Plain torch: (y, summed). y = f(a) @ weight^T with f the prologue; summed = a + residual
    (rounded to a's dtype) for the norm prologue with a residual, else None."""
    summed = None
    if prologue == "silu_mul":
        half = a.shape[-1] // 2
        gate, up = a[..., :half].float(), a[..., half:].float()
        act = (torch.nn.functional.silu(gate) * up).to(a.dtype)
    elif prologue == "norm":
        if residual is not None:
            a = a + residual
            summed = a
        af = a.float()
        normed = (af * torch.rsqrt(af.pow(2).mean(-1, keepdim=True) + eps)).to(a.dtype)
        act = norm_weight * normed
    else:
        act = a
    y = act.float() @ weight.float().t()
    return y.to(weight.dtype), summed


@triton.jit
def _gemv_kernel(
    a_ptr, r_ptr, nw_ptr, w_ptr, y_ptr, s_ptr,
    M, N, K,
    stride_am, stride_rm, stride_wn, stride_ym, stride_sm,
    eps,
    PROLOGUE: tl.constexpr, HAS_RESIDUAL: tl.constexpr, USE_DOT: tl.constexpr, UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    EVEN_N: tl.constexpr, EVEN_K: tl.constexpr,
):
    pid = tl.program_id(0)
    offs_m = tl.arange(0, BLOCK_M)
    offs_n = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    m_mask = offs_m < M
    n_mask = offs_n < N
    dtype = w_ptr.dtype.element_ty
    a_rows = a_ptr + offs_m[:, None].to(tl.int64) * stride_am
    r_rows = r_ptr + offs_m[:, None].to(tl.int64) * stride_rm
    w_rows = w_ptr + offs_n[:, None].to(tl.int64) * stride_wn

    inv_rms = tl.zeros([BLOCK_M], dtype=tl.float32)
    if PROLOGUE == 2:  # RMSNorm: each row's inverse RMS over the whole (summed) row, from L2
        sq = tl.zeros([BLOCK_M, BLOCK_K], dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            cols = k0 + offs_k
            amask = m_mask[:, None] & (cols[None, :] < K)
            h = tl.load(a_rows + cols[None, :], mask=amask, other=0.0)
            if HAS_RESIDUAL:
                r = tl.load(r_rows + cols[None, :], mask=amask, other=0.0)
                h = (h.to(tl.float32) + r.to(tl.float32)).to(dtype)
            hf = h.to(tl.float32)
            sq += hf * hf
        inv_rms = tl.rsqrt(tl.sum(sq, axis=1) / K + eps)

    if USE_DOT:
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    else:
        acc3 = tl.zeros([BLOCK_M, BLOCK_N, BLOCK_K], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        cols = k0 + offs_k
        if EVEN_N and EVEN_K:
            w = tl.load(w_rows + cols[None, :], eviction_policy="evict_first")
        else:
            w = tl.load(w_rows + cols[None, :], mask=n_mask[:, None] & (cols[None, :] < K), other=0.0,
                        eviction_policy="evict_first")
        amask = m_mask[:, None] & (cols[None, :] < K)
        if PROLOGUE == 1:  # silu(gate) * up; a's rows are gate | up, K columns each
            gate = tl.load(a_rows + cols[None, :], mask=amask, other=0.0).to(tl.float32)
            up = tl.load(a_rows + K + cols[None, :], mask=amask, other=0.0).to(tl.float32)
            act = (gate / (1.0 + tl.exp(-gate)) * up).to(dtype)
        elif PROLOGUE == 2:
            h = tl.load(a_rows + cols[None, :], mask=amask, other=0.0)
            if HAS_RESIDUAL:
                r = tl.load(r_rows + cols[None, :], mask=amask, other=0.0)
                h = (h.to(tl.float32) + r.to(tl.float32)).to(dtype)
                if pid == 0:
                    tl.store(s_ptr + offs_m[:, None].to(tl.int64) * stride_sm + cols[None, :], h, mask=amask)
            nw = tl.load(nw_ptr + cols, mask=cols < K, other=0.0).to(tl.float32)
            normed = (h.to(tl.float32) * inv_rms[:, None]).to(dtype)
            act = (normed.to(tl.float32) * nw[None, :]).to(dtype)
        else:
            act = tl.load(a_rows + cols[None, :], mask=amask, other=0.0)
        if USE_DOT:
            if UPCAST:  # the CPU interpreter cannot multiply bf16 (kernels/common.py)
                acc += tl.dot(act.to(tl.float32), tl.trans(w.to(tl.float32)))
            else:
                acc += tl.dot(act, tl.trans(w))
        else:
            acc3 += act.to(tl.float32)[:, None, :] * w.to(tl.float32)[None, :, :]
    if not USE_DOT:
        acc = tl.sum(acc3, axis=2)
    y_ptrs = y_ptr + offs_m[:, None].to(tl.int64) * stride_ym + offs_n[None, :]
    tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=m_mask[:, None] & n_mask[None, :])


def block_m(rows: int, config: GemvConfig) -> int:
    return 16 if config.use_dot else max(1, triton.next_power_of_2(rows))


def gemv(
    a: torch.Tensor, weight: torch.Tensor, prologue: str = "none", norm_weight: torch.Tensor | None = None,
    eps: float = 1e-6, residual: torch.Tensor | None = None, config: GemvConfig = DEFAULT_CONFIG,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Triton y = f(a) @ weight^T for a [M, K'] with M <= 16 (K' = 2K for silu_mul); see gemv_ref."""
    if prologue not in _PROLOGUE_ID:
        raise ValueError(f"prologue must be one of {PROLOGUES}, got {prologue!r}")
    check_dtype("a", a)
    check_dtype("weight", weight)
    if a.dtype != weight.dtype:
        raise TypeError(f"a is {a.dtype} but weight is {weight.dtype}")
    if a.dim() != 2 or weight.dim() != 2:
        raise ValueError(f"a and weight must be 2-D, got {tuple(a.shape)} and {tuple(weight.shape)}")
    check_last_dim_contiguous("a", a)
    check_last_dim_contiguous("weight", weight)
    rows = a.shape[0]
    if rows > MAX_ROWS:
        raise ValueError(f"gemv takes at most {MAX_ROWS} rows, got {rows}; use F.linear")
    n, k = weight.shape
    check_shape("a", a, (rows, 2 * k if prologue == "silu_mul" else k))
    summed = None
    r, nw = a, weight  # unused pointers unless the norm prologue needs them
    if prologue == "norm":
        if norm_weight is None:
            raise ValueError("the norm prologue needs norm_weight")
        check_shape("norm_weight", norm_weight, (k,))
        nw = norm_weight
        if residual is not None:
            check_shape("residual", residual, (rows, k))
            check_last_dim_contiguous("residual", residual)
            check_same_device(a=a, residual=residual)
            r = residual
            summed = torch.empty_like(a)
    elif residual is not None:
        raise ValueError("residual is only used by the norm prologue")
    check_same_device(a=a, weight=weight)
    y = torch.empty((rows, n), dtype=weight.dtype, device=a.device)
    s = summed if summed is not None else y
    if rows == 0:
        return y, summed
    grid = (triton.cdiv(n, config.block_n),)
    _gemv_kernel[grid](
        a, r, nw, weight, y, s,
        rows, n, k,
        a.stride(0), r.stride(0), weight.stride(0), y.stride(0), s.stride(0),
        eps,
        PROLOGUE=_PROLOGUE_ID[prologue], HAS_RESIDUAL=summed is not None, USE_DOT=config.use_dot,
        UPCAST=upcast_dots(weight.dtype), BLOCK_M=block_m(rows, config), BLOCK_N=config.block_n,
        BLOCK_K=config.block_k, EVEN_N=n % config.block_n == 0, EVEN_K=k % config.block_k == 0,
        num_warps=config.num_warps, num_stages=config.num_stages,
    )
    return y, summed


# -- when to use it ---------------------------------------------------------------------------------
ROW_BUCKETS = (1, 2, 4, 8, 16)


def row_bucket(rows: int) -> int:
    for b in ROW_BUCKETS:
        if rows <= b:
            return b
    raise ValueError(f"{rows} rows is more than gemv takes")


class GemvPolicy:
    """Which (shape, rows, prologue) run through `gemv`, and with which config.

    mode 'tuned' (the default): only what the tuned table lists for this device, i.e. where the
    kernel measured faster than cuBLAS (plus the separate elementwise kernel for a prologue);
    'off': never; 'all': every eligible call with default_config(rows) (tests of the path).
    The environment's KERNELS_GEMV (tuned | off | all) and KERNELS_GEMV_TABLE (a JSON file in the
    tuned table's format) override the defaults."""

    def __init__(self, device_name: str | None, mode: str | None = None, table: dict | None = None) -> None:
        self.mode = mode or os.environ.get("KERNELS_GEMV", "tuned")
        if self.mode not in ("tuned", "off", "all"):
            raise ValueError(f"KERNELS_GEMV must be tuned, off or all, got {self.mode!r}")
        if table is None:
            path = os.environ.get("KERNELS_GEMV_TABLE") or TUNED_PATH
            table = json.loads(Path(path).read_text()) if Path(path).exists() else {}
        self.device_name = device_name
        self.entries: dict = table.get("devices", {}).get(device_name or "", {})
        self._cache: dict[tuple[int, int, int, str], GemvConfig | None] = {}

    def config(self, n: int, k: int, rows: int, prologue: str) -> GemvConfig | None:
        if self.mode == "off" or rows < 1 or rows > MAX_ROWS:
            return None
        key = (n, k, row_bucket(rows), prologue)
        if key not in self._cache:
            if self.mode == "all":
                found: GemvConfig | None = default_config(rows)
            else:
                entry = self.entries.get(f"{n}x{k}", {}).get(prologue, {}).get(str(key[2]))
                found = GemvConfig(**entry) if entry else None
            self._cache[key] = found
        return self._cache[key]
