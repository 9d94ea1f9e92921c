"""The one small interface between the model and its kernels, and its plain-torch implementation.

The model calls only these operations: six for everything that is not a
matmul (and `rope_write_kv`, RoPE then the KV write, which a backend may fuse),
and three projection entry points (`linear`, and `norm_linear` /
`silu_mul_linear`, which a backend may fuse with the elementwise op feeding
them; by default they are F.linear after the op), so a faster backend (kernels/backend.py: TritonOps) swaps in by
subclassing `Ops`. `TorchOps` is the CPU path and the correctness reference.

Paged KV cache layout, shared by every backend: per layer, K and V caches shaped
`[num_blocks, block_size, num_kv_heads, head_dim]`; a token's slot is
`block_id * block_size + offset`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


class Ops:
    """Kernel interface. Shapes: T tokens, B sequences, Hq/Hkv heads, D head dim."""

    name = "abstract"

    def rms_norm(self, x: Tensor, weight: Tensor, eps: float,
                 residual: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
        """Fused residual add + RMSNorm: returns (normed, new_residual); new_residual is None without residual."""
        raise NotImplementedError

    def rope(self, q: Tensor, k: Tensor, positions: Tensor, cos_sin_cache: Tensor) -> None:
        """Rotate q [T, Hq, D] and k [T, Hkv, D] in place; cos_sin_cache [max_pos, D] = cos half | sin half."""
        raise NotImplementedError

    def silu_and_mul(self, x: Tensor) -> Tensor:
        """x [T, 2I] -> silu(x[:, :I]) * x[:, I:]."""
        raise NotImplementedError

    def write_kv(self, k: Tensor, v: Tensor, k_cache: Tensor, v_cache: Tensor, slot_mapping: Tensor) -> None:
        """Scatter k/v [T, Hkv, D] into the paged caches at slot_mapping [T] (int64)."""
        raise NotImplementedError

    def rope_write_kv(self, q: Tensor, k: Tensor, v: Tensor, positions: Tensor, cos_sin_cache: Tensor,
                      k_cache: Tensor, v_cache: Tensor, slot_mapping: Tensor) -> None:
        """rope() then write_kv() (a backend may do both in one kernel)."""
        self.rope(q, k, positions, cos_sin_cache)
        self.write_kv(k, v, k_cache, v_cache, slot_mapping)

    def linear(self, x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
        """x [T, K] @ weight [N, K]^T (+ bias): a projection. The default is F.linear (cuBLAS on a GPU)."""
        return F.linear(x, weight, bias)

    def norm_linear(self, x: Tensor, norm_weight: Tensor, eps: float, residual: Tensor | None,
                    weight: Tensor, bias: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
        """rms_norm (with the residual add) feeding a projection: (linear(normed), new_residual).
        A backend may fuse the two; the default runs them one after the other."""
        normed, residual = self.rms_norm(x, norm_weight, eps, residual)
        return self.linear(normed, weight, bias), residual

    def silu_mul_linear(self, x: Tensor, weight: Tensor) -> Tensor:
        """silu_and_mul feeding a projection (the MLP's down projection); fused or not, as linear()."""
        return self.linear(self.silu_and_mul(x), weight)

    def decode_attention(self, q: Tensor, k_cache: Tensor, v_cache: Tensor, block_tables: Tensor,
                         context_lens: Tensor, scale: float) -> Tensor:
        """One query per sequence: q [B, Hq, D] over its first context_lens[b] cached tokens -> [B, Hq, D]."""
        raise NotImplementedError

    def prefill_attention(self, q: Tensor, k_cache: Tensor, v_cache: Tensor, block_tables: Tensor,
                          cu_seqlens_q: Tensor, context_lens: Tensor, scale: float,
                          max_seqlen_q: int | None = None) -> Tensor:
        """Ragged queries q [T, Hq, D]: sequence b's new tokens are the last (cu[b+1]-cu[b]) of its
        context_lens[b] positions; they attend to the cached prefix and causally to each other.
        max_seqlen_q, when given, is the largest cu[b+1]-cu[b] (a hint; backends may ignore it)."""
        raise NotImplementedError


class TorchOps(Ops):
    """Plain torch: the CPU path and the reference the Triton kernels are tested against."""

    name = "torch"

    # Above this many padded (sequence x position) cells, decode attention runs
    # per sequence instead of padding the batch to its longest context: one 16k
    # prompt beside 31 short ones must not multiply memory by 32.
    PADDED_DECODE_LIMIT = 1 << 17

    def __init__(self) -> None:
        # Decode metadata (gather indices, mask) is the same for every layer of a
        # step; it is rebuilt only when the step's block_tables tensor changes.
        self._decode_key: tuple[Tensor, Tensor] | None = None
        self._decode_meta: tuple[Tensor, Tensor] | None = None

    def rms_norm(self, x, weight, eps, residual=None):
        if residual is not None:
            x = x + residual
            residual = x
        var = x.float().pow(2).mean(-1, keepdim=True)
        normed = (x.float() * torch.rsqrt(var + eps)).to(x.dtype) * weight
        return normed, residual

    def rope(self, q, k, positions, cos_sin_cache):
        cos_sin = cos_sin_cache.index_select(0, positions)
        half = cos_sin.shape[-1] // 2
        # Half precision rotates in float32 and rounds once (as the Triton kernel and HF's
        # float32 angles do); float32 is unchanged.
        compute = torch.float32 if q.dtype in (torch.float16, torch.bfloat16) else q.dtype
        cos = cos_sin[:, None, :half].to(compute)
        sin = cos_sin[:, None, half:].to(compute)
        for x in (q, k):
            x1 = x[..., :half].to(compute)
            x2 = x[..., half:].to(compute)
            r1 = x1 * cos - x2 * sin
            r2 = x2 * cos + x1 * sin
            x[..., :half] = r1
            x[..., half:] = r2

    def silu_and_mul(self, x):
        gate, up = x.chunk(2, dim=-1)
        if x.dtype in (torch.float16, torch.bfloat16):  # one rounding, as the Triton kernel
            return (F.silu(gate.float()) * up.float()).to(x.dtype)
        return F.silu(gate) * up

    def write_kv(self, k, v, k_cache, v_cache, slot_mapping):
        k_cache.view(-1, *k_cache.shape[2:]).index_copy_(0, slot_mapping, k)
        v_cache.view(-1, *v_cache.shape[2:]).index_copy_(0, slot_mapping, v)

    def _decode_metadata(self, block_tables: Tensor, context_lens: Tensor, block_size: int) -> tuple[Tensor, Tensor]:
        key = self._decode_key
        if key is not None and key[0] is block_tables and key[1] is context_lens:
            return self._decode_meta  # type: ignore[return-value]
        max_len = int(context_lens.max())
        pos = torch.arange(max_len, device=block_tables.device)
        blocks = block_tables.long().index_select(1, pos // block_size)
        slots = blocks * block_size + pos % block_size  # [B, L]
        valid = pos[None, :] < context_lens[:, None].long()  # [B, L]
        self._decode_key = (block_tables, context_lens)
        self._decode_meta = (slots, valid)
        return slots, valid

    def decode_attention(self, q, k_cache, v_cache, block_tables, context_lens, scale):
        batch = q.shape[0]
        block_size = k_cache.shape[1]
        max_len = int(context_lens.max())
        if batch > 1 and batch * max_len > self.PADDED_DECODE_LIMIT:
            return torch.cat([
                self.decode_attention(q[b:b + 1], k_cache, v_cache, block_tables[b:b + 1],
                                      context_lens[b:b + 1], scale) for b in range(batch)])
        slots, valid = self._decode_metadata(block_tables, context_lens, block_size)
        flat_k = k_cache.view(-1, *k_cache.shape[2:])
        flat_v = v_cache.view(-1, *v_cache.shape[2:])
        k = flat_k[slots].transpose(1, 2)  # [B, Hkv, L, D]
        v = flat_v[slots].transpose(1, 2)
        mask = valid[:, None, None, :]  # [B, 1, 1, L]
        out = F.scaled_dot_product_attention(q.unsqueeze(2), k, v, attn_mask=mask, scale=scale,
                                             enable_gqa=q.shape[1] != k.shape[1])
        return out.squeeze(2)

    def prefill_attention(self, q, k_cache, v_cache, block_tables, cu_seqlens_q, context_lens, scale,
                          max_seqlen_q=None):
        block_size = k_cache.shape[1]
        flat_k = k_cache.view(-1, *k_cache.shape[2:])
        flat_v = v_cache.view(-1, *v_cache.shape[2:])
        out = torch.empty_like(q)
        cu = cu_seqlens_q.tolist()
        lens = context_lens.tolist()
        gqa = q.shape[1] != k_cache.shape[2]
        for b in range(len(lens)):
            start, end, ctx = cu[b], cu[b + 1], lens[b]
            n_new = end - start
            if n_new == 0:
                continue
            pos = torch.arange(ctx, device=q.device)
            slots = block_tables[b].long().index_select(0, pos // block_size) * block_size + pos % block_size
            k = flat_k[slots].transpose(0, 1).unsqueeze(0)  # [1, Hkv, ctx, D]
            v = flat_v[slots].transpose(0, 1).unsqueeze(0)
            qb = q[start:end].transpose(0, 1).unsqueeze(0)  # [1, Hq, n, D]
            if n_new == ctx:
                ob = F.scaled_dot_product_attention(qb, k, v, is_causal=True, scale=scale, enable_gqa=gqa)
            else:
                q_pos = torch.arange(ctx - n_new, ctx, device=q.device)
                mask = pos[None, :] <= q_pos[:, None]  # [n, ctx]
                ob = F.scaled_dot_product_attention(qb, k, v, attn_mask=mask, scale=scale, enable_gqa=gqa)
            out[start:end] = ob[0].transpose(0, 1)
        return out


def build_ops(backend: str, device: str) -> Ops:
    """'torch' | 'triton' | 'auto' (triton on CUDA when kernels.backend imports, else torch)."""
    if backend == "torch" or (backend == "auto" and not device.startswith("cuda")):
        return TorchOps()
    try:
        from servescope.kernels.backend import TritonOps  # type: ignore[import-not-found]
    except ImportError as exc:
        if backend == "triton":
            from servescope.reference_engine.errors import ConfigError
            raise ConfigError(f"--attention-backend triton: kernels.backend does not import ({exc}); "
                              "use --attention-backend torch") from exc
        return TorchOps()
    return TritonOps()
