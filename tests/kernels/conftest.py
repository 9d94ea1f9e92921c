"""Kernel tests run on Triton's CPU interpreter unless a CUDA GPU is present (CI has none).

TRITON_INTERPRET must be set before any @triton.jit function is created, i.e.
before kernels/* is imported, which is why it happens here at import time.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import pytest
import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

# Relative error bounds ||out - ref|| / ||ref|| against float32 references.
TOLERANCE = {torch.float32: 1e-5, torch.float16: 3e-3, torch.bfloat16: 2e-2}


def relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    assert not torch.isnan(out).any(), "output has NaNs"
    return ((out.double() - ref.double()).norm() / ref.double().norm().clamp_min(1e-30)).item()


@dataclass
class PagedBatch:
    """A paged KV cache with shuffled pages and the block tables of a batch of sequences."""

    k_cache: torch.Tensor
    v_cache: torch.Tensor
    block_tables: torch.Tensor
    context_lens: torch.Tensor


def make_paged_batch(
    context_lens: Sequence[int], num_kv_heads: int, head_dim: int, page_size: int, dtype: torch.dtype,
    generator: torch.Generator, spare_blocks: int = 3,
) -> PagedBatch:
    """Random K/V in a cache whose pages are handed out in random order (so indirection matters)."""
    pages_per_seq = [max(1, -(-n // page_size)) for n in context_lens]
    max_pages = max(pages_per_seq) + 1  # a spare column: tables are wider than any sequence needs
    num_blocks = sum(pages_per_seq) + spare_blocks
    shape = (num_blocks, page_size, num_kv_heads, head_dim)
    k_cache = torch.randn(shape, generator=generator).to(dtype)
    v_cache = torch.randn(shape, generator=generator).to(dtype)
    order = torch.randperm(num_blocks, generator=generator)
    tables = torch.zeros(len(context_lens), max_pages, dtype=torch.int32)
    used = 0
    for row, n in enumerate(pages_per_seq):
        tables[row, :n] = order[used : used + n]
        used += n
    return PagedBatch(
        k_cache.to(DEVICE), v_cache.to(DEVICE), tables.to(DEVICE),
        torch.tensor(context_lens, dtype=torch.int32, device=DEVICE),
    )


@pytest.fixture
def generator() -> torch.Generator:
    """A fresh seeded generator per test: reproducible yet different across tests' shapes."""
    return torch.Generator().manual_seed(1234)


@pytest.fixture
def paged_batch() -> Callable[..., PagedBatch]:
    return make_paged_batch


@pytest.fixture
def assert_close() -> Callable[[torch.Tensor, torch.Tensor], None]:
    """Compare an output with its float32 reference within the output dtype's tolerance."""

    def check(out: torch.Tensor, ref: torch.Tensor) -> None:
        err = relative_error(out, ref)
        bound = TOLERANCE[out.dtype]
        assert err <= bound, f"relative error {err:.2e} exceeds {bound:.0e} for {out.dtype}"

    return check


@pytest.fixture
def device() -> str:
    return DEVICE
