"""Owns the model, its paged KV cache and the step's input tensors: scheduler output in, logits out.

Inputs are built as Python lists and turned into tensors once per step (a
handful of `torch.tensor` calls), and only the rows that sample go through the
LM head: on a CPU, per-step Python and allocation overhead is most of a tiny
model's decode time.
"""

from __future__ import annotations

import torch
from torch import Tensor

from reference_engine.config import EngineConfig, ModelConfig
from reference_engine.model import AttentionMetadata, LlamaModel
from reference_engine.ops import Ops
from reference_engine.sampler import SampleRequest
from reference_engine.scheduler import SchedulerOutput


class ModelRunner:
    def __init__(self, model: LlamaModel, ops: Ops, model_config: ModelConfig, engine_config: EngineConfig,
                 num_blocks: int, device: torch.device, dtype: torch.dtype) -> None:
        self.model = model
        self.ops = ops
        self.device = device
        self.block_size = engine_config.block_size
        shape = (num_blocks, engine_config.block_size, model_config.num_kv_heads, model_config.head_dim)
        self.kv_caches: list[tuple[Tensor, Tensor]] = [
            (torch.zeros(shape, dtype=dtype, device=device), torch.zeros(shape, dtype=dtype, device=device))
            for _ in range(model_config.num_layers)
        ]

    def _tensor(self, data: list, dtype: torch.dtype) -> Tensor:
        return torch.tensor(data, dtype=dtype, device=self.device)

    def _block_tables(self, tables: list[list[int]]) -> Tensor:
        width = max(len(t) for t in tables)
        return self._tensor([t + [0] * (width - len(t)) for t in tables], torch.int32)

    def prepare(self, out: SchedulerOutput) -> tuple[Tensor, Tensor, AttentionMetadata, list[int], list[SampleRequest]]:
        bs = self.block_size
        input_ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        dec_tables: list[list[int]] = []
        dec_lens: list[int] = []
        pre_tables: list[list[int]] = []
        pre_cu: list[int] = [0]
        pre_lens: list[int] = []
        logit_rows: list[int] = []
        requests: list[SampleRequest] = []
        num_decode = 0
        for item in out.scheduled:
            seq = item.seq
            start = seq.num_computed_tokens
            end = start + item.num_new_tokens
            table = seq.block_table
            if item.drafts:
                input_ids.extend(seq.token_ids[start:])
                input_ids.extend(item.drafts)
            else:
                input_ids.extend(seq.token_ids[start:end])
            positions.extend(range(start, end))
            slots.extend(table[p // bs] * bs + p % bs for p in range(start, end))
            row_end = len(input_ids)
            if item.is_decode:
                num_decode += 1
                dec_tables.append(table)
                dec_lens.append(end)
            else:
                pre_tables.append(table)
                pre_cu.append(pre_cu[-1] + item.num_new_tokens)
                pre_lens.append(end)
            if item.samples:
                n_rows = len(item.drafts) + 1
                requests.append(SampleRequest(seq, len(logit_rows), item.drafts))
                logit_rows.extend(range(row_end - n_rows, row_end))
        meta = AttentionMetadata(
            slot_mapping=self._tensor(slots, torch.int64),
            num_decode_tokens=num_decode,
            decode_block_tables=self._block_tables(dec_tables) if dec_tables else None,
            decode_context_lens=self._tensor(dec_lens, torch.int32) if dec_lens else None,
            prefill_block_tables=self._block_tables(pre_tables) if pre_tables else None,
            prefill_cu_seqlens_q=self._tensor(pre_cu, torch.int32) if pre_tables else None,
            prefill_context_lens=self._tensor(pre_lens, torch.int32) if pre_tables else None,
        )
        return (self._tensor(input_ids, torch.int64), self._tensor(positions, torch.int64), meta,
                logit_rows, requests)

    @torch.inference_mode()
    def run(self, out: SchedulerOutput) -> tuple[Tensor | None, list[SampleRequest]]:
        """Forward the step; returns logits of the sampling rows (float32, on CPU) and who owns them."""
        input_ids, positions, meta, rows, requests = self.prepare(out)
        hidden = self.model(self.ops, input_ids, positions, self.kv_caches, meta)
        if not rows:
            return None, requests
        if len(rows) != hidden.shape[0]:
            hidden = hidden.index_select(0, self._tensor(rows, torch.int64))
        return self.model.compute_logits(hidden).cpu(), requests
