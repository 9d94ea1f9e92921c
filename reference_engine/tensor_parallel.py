"""Tensor parallelism: which slice of every weight a rank holds, and the collectives the model calls.

The split is Megatron's. q/k/v and gate/up are column-parallel: each rank
computes its own attention heads and its own slice of the MLP's intermediate
width, with no communication. o and down are row-parallel: each rank multiplies
its slice and holds a partial sum of the full hidden state, so each needs one
all-reduce. The embedding and the LM head are vocabulary-parallel: a rank holds
the rows of its vocabulary range (padded to an equal share, zero rows at the
end), looks up only the ids in its range (an all-reduce then sums the one
non-zero row of each token), and computes the logits of its range (an
all-gather then gives every rank the whole row before sampling).

KV heads: with N ranks and H_kv KV heads, a rank holds H_kv / N of them when N
divides H_kv, and one (replicated on N / H_kv ranks) when H_kv divides N. Either
way the query heads a rank holds read only KV heads that the same rank holds,
so attention runs unchanged on local heads and needs no communication.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from servescope.reference_engine.errors import ConfigError

if TYPE_CHECKING:
    from torch import Tensor

    from servescope.reference_engine.config import ModelConfig


@dataclass(frozen=True)
class ShardPlan:
    """Which rows and columns of each full weight rank `rank` of `size` holds (ranges are [start, stop))."""

    rank: int
    size: int
    heads: tuple[int, int]  # query heads
    kv_heads: tuple[int, int]
    intermediate: tuple[int, int]  # MLP intermediate columns
    vocab: tuple[int, int]  # real vocabulary rows; the shard pads to vocab_shard rows
    vocab_shard: int
    head_dim: int

    @classmethod
    def of(cls, mc: ModelConfig, rank: int = 0, size: int = 1) -> ShardPlan:
        """The plan of one rank; ConfigError when the model cannot be split `size` ways."""
        check_divisible(mc, size)
        if not 0 <= rank < size:
            raise ConfigError(f"tensor-parallel rank {rank} is outside 0..{size - 1}")
        hq = mc.num_heads // size
        if size <= mc.num_kv_heads:
            hk = mc.num_kv_heads // size
            kv0 = rank * hk
        else:  # each KV head replicated on size / num_kv_heads ranks
            hk = 1
            kv0 = rank // (size // mc.num_kv_heads)
        inter = mc.intermediate_size // size
        shard = -(-mc.vocab_size // size)
        v0 = min(rank * shard, mc.vocab_size)
        return cls(rank, size, (rank * hq, (rank + 1) * hq), (kv0, kv0 + hk), (rank * inter, (rank + 1) * inter),
                   (v0, min(v0 + shard, mc.vocab_size)), shard, mc.head_dim)

    @property
    def num_heads(self) -> int:
        return self.heads[1] - self.heads[0]

    @property
    def num_kv_heads(self) -> int:
        return self.kv_heads[1] - self.kv_heads[0]

    @property
    def intermediate_size(self) -> int:
        return self.intermediate[1] - self.intermediate[0]

    @property
    def q_rows(self) -> slice:
        return slice(self.heads[0] * self.head_dim, self.heads[1] * self.head_dim)

    @property
    def kv_rows(self) -> slice:
        return slice(self.kv_heads[0] * self.head_dim, self.kv_heads[1] * self.head_dim)

    @property
    def inter_rows(self) -> slice:
        return slice(*self.intermediate)

    @property
    def vocab_rows(self) -> slice:
        return slice(*self.vocab)

    # Each method takes full weights, or safetensors slices of them (`get_slice`: indexing one reads
    # only the indexed bytes), and returns this rank's part as a tensor.
    def qkv(self, q: Any, k: Any, v: Any) -> Tensor:
        """Column-parallel fused q|k|v (weight [rows, hidden] or bias [rows]): local heads of each."""
        import torch

        return torch.cat([q[self.q_rows], k[self.kv_rows], v[self.kv_rows]])

    def gate_up(self, gate: Any, up: Any) -> Tensor:
        """Column-parallel fused gate|up: this rank's intermediate rows of each."""
        import torch

        return torch.cat([gate[self.inter_rows], up[self.inter_rows]])

    def o_columns(self, o: Any) -> Tensor:
        """Row-parallel o_proj [hidden, heads * head_dim]: the columns of the local query heads."""
        return o[:, self.q_rows]

    def down_columns(self, down: Any) -> Tensor:
        """Row-parallel down_proj [hidden, intermediate]: the local intermediate columns."""
        return down[:, self.inter_rows]

    def vocab_part(self, weight: Any) -> Tensor:
        """Vocabulary-parallel embedding / LM head [vocab, hidden]: local rows, zero-padded to vocab_shard."""
        import torch.nn.functional as F

        rows = weight[self.vocab_rows]
        return F.pad(rows, (0, 0, 0, self.vocab_shard - rows.shape[0]))


def check_divisible(mc: ModelConfig, size: int) -> None:
    """ConfigError naming the dimension that `size` ranks cannot split, and the sizes that would."""
    if size < 1:
        raise ConfigError(f"--tensor-parallel-size must be >= 1, got {size}")
    fits = [n for n in (1, 2, 4, 8, 16) if mc.num_heads % n == 0 and mc.intermediate_size % n == 0
            and (mc.num_kv_heads % n == 0 or n % mc.num_kv_heads == 0)]
    hint = f"; sizes that split {mc.name!r}: {', '.join(map(str, fits))}"
    if mc.num_heads % size:
        raise ConfigError(f"--tensor-parallel-size {size} does not divide the {mc.num_heads} attention heads{hint}")
    if mc.intermediate_size % size:
        raise ConfigError(f"--tensor-parallel-size {size} does not divide the MLP width "
                          f"{mc.intermediate_size}{hint}")
    if mc.num_kv_heads % size and size % mc.num_kv_heads:
        raise ConfigError(f"--tensor-parallel-size {size} and the {mc.num_kv_heads} KV heads: one must divide "
                          f"the other (KV heads are split, or replicated){hint}")


class TPGroup:
    """This rank's view of the tensor-parallel group: the collectives of the forward pass.

    On CUDA they are NCCL calls on the current stream, so the CUDA graphs capture them like any kernel;
    on the CPU they are gloo calls (blocking)."""

    def __init__(self, plan: ShardPlan, group: Any = None) -> None:
        self.plan = plan
        self.rank = plan.rank
        self.size = plan.size
        self.group = group  # None: the default process group

    def all_reduce(self, x: Tensor) -> Tensor:
        """Sum over ranks, in place (the partial sums of a row-parallel projection)."""
        import torch.distributed as dist

        dist.all_reduce(x, group=self.group)
        return x

    def gather_vocab(self, local: Tensor, vocab_size: int) -> Tensor:
        """[T, vocab_shard] logits of every rank -> [T, vocab_size] on every rank (padding dropped)."""
        import torch
        import torch.distributed as dist

        parts = torch.empty((self.size, *local.shape), dtype=local.dtype, device=local.device)
        if local.is_cuda:
            dist.all_gather_into_tensor(parts, local.contiguous(), group=self.group)
        else:  # gloo has no all_gather_into_tensor
            dist.all_gather(list(parts.unbind(0)), local.contiguous(), group=self.group)
        return parts.permute(1, 0, 2).reshape(local.shape[0], -1)[:, :vocab_size]
