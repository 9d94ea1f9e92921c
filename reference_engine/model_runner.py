"""Owns the model, its paged KV cache and the step's input tensors: scheduler output in, logits out.

Inputs are built as Python lists and turned into tensors once per step (a
handful of `torch.tensor` calls), and only the rows that sample go through the
LM head: on a CPU, per-step Python and allocation overhead is most of a tiny
model's decode time.

On a GPU the same lists travel in two pinned host buffers (one int64, one
int32) copied without blocking, so building a step never waits for the GPU, and
decode-only steps replay CUDA graphs: one per bucketed batch size, captured at
start over static input buffers. A step of B decodes pads to the next bucket
(padding rows write no KV: slot -1; they attend to one token of block 0) and
its block tables are copied into a fixed-width static table. Steps with
prefill segments run eagerly as one ragged forward (decode rows first, then the
prefill segments). Input tokens that the previous step is still sampling are
written as placeholders -(row + 1) and gathered on the device from that step's
sampled ids (`run_device(..., prev_ids=...)`), which is what lets the engine
schedule step N+1 while step N runs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from servescope.reference_engine.config import EngineConfig, ModelConfig
from servescope.reference_engine.model import AttentionMetadata, LlamaModel
from servescope.reference_engine.ops import Ops
from servescope.reference_engine.sampler import SampleRequest
from servescope.reference_engine.scheduler import SchedulerOutput

if TYPE_CHECKING:
    from servescope.reference_engine.tp_workers import RankWorkers, StepTimer

# Decode batch sizes that get a CUDA graph; a batch runs in the smallest bucket that holds it.
GRAPH_BATCH_SIZES = (1, 2, 4, 8, 16, 24, 32, 48, 64, 80, 96, 112, 128, 160, 192, 224, 256, 320, 384, 448, 512)
# Token counts of steps that replay piecewise graphs (prefill chunks beside decodes). Finer where a
# padded row costs most relative to the step; past a few thousand tokens the step is compute-bound
# and launches hide behind it anyway.
PIECEWISE_TOKEN_SIZES = (16, 32, 48, 64, 96, 128, 160, 192, 256, 320, 384, 448, 512, 640, 768, 896, 1024,
                         1280, 1536, 1792, 2048, 2560, 3072, 3584, 4096, 5120, 6144, 7168, 8192)


def graph_buckets(max_size: int, sizes: tuple[int, ...] = GRAPH_BATCH_SIZES) -> list[int]:
    """Buckets up to the first one that holds max_size (max_size itself beyond the table)."""
    out: list[int] = []
    for size in sizes:
        out.append(size)
        if size >= max_size:
            return out
    return out + [max_size]


def _smallest_holding(buckets: list[int], size: int) -> int | None:
    for bucket in buckets:  # ascending
        if bucket >= size:
            return bucket
    return None


@dataclass
class StepInputs:
    """One step's inputs as host lists (the scheduler's view), before they become tensors."""

    input_ids: list[int]  # negative: -(row + 1), a token the previous step is still sampling
    positions: list[int]
    slots: list[int]
    dec_tables: list[list[int]]
    dec_lens: list[int]
    pre_tables: list[list[int]]
    pre_cu: list[int]
    pre_lens: list[int]
    logit_rows: list[int]
    requests: list[SampleRequest]
    num_decode: int
    max_new: int  # most new tokens of one prefill segment (0 without prefill)
    pending: bool  # some input token is a placeholder

    @property
    def max_context(self) -> int:
        return max(self.dec_lens, default=0)


def _flat_tables(tables: list[list[int]], width: int) -> list[int]:
    flat: list[int] = []
    for table in tables:
        flat.extend(table)
        flat.extend([0] * (width - len(table)))
    return flat


class ModelRunner:
    def __init__(self, model: LlamaModel, ops: Ops, model_config: ModelConfig, engine_config: EngineConfig,
                 num_blocks: int, device: torch.device, dtype: torch.dtype) -> None:
        self.model = model
        self.ops = ops
        self.device = device
        self.block_size = engine_config.block_size
        self.vocab_size = model_config.vocab_size
        shape = (num_blocks, engine_config.block_size, model.num_kv_heads, model_config.head_dim)
        self.kv_caches: list[tuple[Tensor, Tensor]] = [
            (torch.zeros(shape, dtype=dtype, device=device), torch.zeros(shape, dtype=dtype, device=device))
            for _ in range(model_config.num_layers)
        ]
        self.on_gpu = device.type == "cuda"
        # CUDA graphs of decode steps: {bucket: (graph or None, logits [bucket, V])}. A None graph
        # (CPU tests of this path) runs the same static-buffer forward eagerly.
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph | None, Tensor]] = {}
        self.graph_max_blocks = 0
        self._buckets: list[int] = []
        # Piecewise graphs of steps with prefill: {token bucket: [graph or None per piece]} (L + 1 pieces).
        self.piecewise: dict[int, list[torch.cuda.CUDAGraph | None]] = {}
        self._piece_buckets: list[int] = []
        self.piecewise_enabled = True  # benchmarks switch it off to measure the eager mixed step
        self.num_graph_steps = 0
        self.num_piecewise_steps = 0
        self.num_eager_steps = 0
        # Tensor parallelism, on rank 0: each collected step goes to the other ranks before this rank
        # runs it (tp_workers.py). Every rank may time its steps (`timer`, per-rank metrics).
        self.ranks: RankWorkers | None = None
        self.timer: StepTimer | None = None

    # -- inputs -----------------------------------------------------------------
    def _tensor(self, data: list, dtype: torch.dtype) -> Tensor:
        return torch.tensor(data, dtype=dtype, device=self.device)

    def _block_tables(self, tables: list[list[int]]) -> Tensor:
        width = max(len(t) for t in tables)
        return self._tensor([t + [0] * (width - len(t)) for t in tables], torch.int32)

    def collect(self, out: SchedulerOutput) -> StepInputs:
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
        max_new = 0
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
            slots.extend([table[p // bs] * bs + p % bs for p in range(start, end)])
            row_end = len(input_ids)
            if item.is_decode:
                num_decode += 1
                dec_tables.append(table)
                dec_lens.append(end)
            else:
                pre_tables.append(table)
                pre_cu.append(pre_cu[-1] + item.num_new_tokens)
                pre_lens.append(end)
                max_new = max(max_new, item.num_new_tokens)
            if item.samples:
                n_rows = len(item.drafts) + 1
                requests.append(SampleRequest(seq, len(logit_rows), item.drafts))
                logit_rows.extend(range(row_end - n_rows, row_end))
        pending = bool(input_ids) and min(input_ids) < 0
        return StepInputs(input_ids, positions, slots, dec_tables, dec_lens, pre_tables, pre_cu, pre_lens,
                          logit_rows, requests, num_decode, max_new, pending)

    def _host_tensors(self, s: StepInputs) -> tuple[Tensor, Tensor, AttentionMetadata]:
        """The CPU path: one small tensor per input (what the tiny model is tuned for)."""
        meta = AttentionMetadata(
            slot_mapping=self._tensor(s.slots, torch.int64),
            num_decode_tokens=s.num_decode,
            decode_block_tables=self._block_tables(s.dec_tables) if s.dec_tables else None,
            decode_context_lens=self._tensor(s.dec_lens, torch.int32) if s.dec_lens else None,
            prefill_block_tables=self._block_tables(s.pre_tables) if s.pre_tables else None,
            prefill_cu_seqlens_q=self._tensor(s.pre_cu, torch.int32) if s.pre_tables else None,
            prefill_context_lens=self._tensor(s.pre_lens, torch.int32) if s.pre_tables else None,
            prefill_max_seqlen_q=s.max_new if s.pre_tables else None,
        )
        return self._tensor(s.input_ids, torch.int64), self._tensor(s.positions, torch.int64), meta

    def _upload(self, values: list[int], dtype: torch.dtype) -> Tensor:
        """One host list -> a device tensor, through pinned memory without blocking on a GPU.

        The caching host allocator keeps the pinned buffer alive until its copy has run."""
        if not self.on_gpu:
            return torch.tensor(values, dtype=dtype)
        host = torch.empty(len(values), dtype=dtype, pin_memory=True)
        host.numpy()[:] = values
        return host.to(self.device, non_blocking=True)

    def _packed_tensors(self, s: StepInputs, pad: int = 0) -> tuple[Tensor, Tensor, AttentionMetadata, Tensor | None]:
        """The GPU eager path: every input in two packed uploads, sliced on the device.

        With pad > 0 (piecewise graphs) input_ids, positions and the slot mapping get `pad` padding
        rows (token 0 at position 0, slot -1: no KV write); the attention metadata covers the real rows."""
        tokens = len(s.input_ids)
        rows_needed = len(s.logit_rows) != tokens
        i64 = (s.input_ids + [0] * pad + s.positions + [0] * pad + s.slots + [-1] * pad
               + (s.logit_rows if rows_needed else []))
        dev64 = self._upload(i64, torch.int64)
        tokens += pad
        i32: list[int] = []
        nd, npre = len(s.dec_lens), len(s.pre_lens)
        dec_w = max((len(t) for t in s.dec_tables), default=0)
        pre_w = max((len(t) for t in s.pre_tables), default=0)
        i32 += s.dec_lens
        i32 += _flat_tables(s.dec_tables, dec_w)
        if npre:
            i32 += s.pre_cu
            i32 += s.pre_lens
            i32 += _flat_tables(s.pre_tables, pre_w)
        dev32 = self._upload(i32, torch.int32) if i32 else None
        off = 0

        def take32(n: int) -> Tensor:
            nonlocal off
            view = dev32[off:off + n]  # type: ignore[index]
            off += n
            return view

        dec_lens = take32(nd) if nd else None
        dec_tables = take32(nd * dec_w).view(nd, dec_w) if nd else None
        pre_cu = take32(npre + 1) if npre else None
        pre_lens = take32(npre) if npre else None
        pre_tables = take32(npre * pre_w).view(npre, pre_w) if npre else None
        meta = AttentionMetadata(
            slot_mapping=dev64[2 * tokens:3 * tokens], num_decode_tokens=nd,
            decode_block_tables=dec_tables, decode_context_lens=dec_lens,
            prefill_block_tables=pre_tables, prefill_cu_seqlens_q=pre_cu, prefill_context_lens=pre_lens,
            prefill_max_seqlen_q=s.max_new if npre else None,
        )
        rows = dev64[3 * tokens:] if rows_needed else None
        return dev64[:tokens], dev64[tokens:2 * tokens], meta, rows

    def prepare(self, out: SchedulerOutput) -> tuple[Tensor, Tensor, AttentionMetadata, list[int], list[SampleRequest]]:
        """Eager inputs of a step (no placeholders): (input_ids, positions, meta, logit rows, requests)."""
        s = self.collect(out)
        input_ids, positions, meta = self._host_tensors(s)
        return input_ids, positions, meta, s.logit_rows, s.requests

    @staticmethod
    def _resolve_pending(input_ids: Tensor, prev_ids: Tensor | None) -> Tensor:
        """Replace placeholders -(row + 1) with the previous step's sampled ids (on the device)."""
        if prev_ids is None:
            raise RuntimeError("a step input is a placeholder but no previous sampled ids were given")
        src = (-input_ids - 1).clamp_(min=0)
        return torch.where(input_ids < 0, prev_ids.index_select(0, src), input_ids)

    # -- CUDA graphs ------------------------------------------------------------
    def _graph_forward(self, bucket: int) -> Tensor:
        meta = AttentionMetadata(
            slot_mapping=self._g_slots[:bucket], num_decode_tokens=bucket,
            decode_block_tables=self._g_tables[:bucket], decode_context_lens=self._g_lens[:bucket],
            prefill_block_tables=None, prefill_cu_seqlens_q=None, prefill_context_lens=None)
        hidden = self.model(self.ops, self._g_ids[:bucket], self._g_pos[:bucket], self.kv_caches, meta)
        return self.model.compute_logits(hidden)

    @torch.inference_mode()
    def capture_graphs(self, max_num_seqs: int, max_len: int, capture: bool = True,
                       piecewise_max_tokens: int = 0) -> float:
        """Static buffers and one CUDA graph per decode bucket (largest first, one shared memory pool),
        then the piecewise graphs of steps with prefill up to piecewise_max_tokens tokens (0: none).

        Decode steps of contexts up to max_len tokens replay them. With capture=False (CPU tests)
        the buckets run eagerly over the same static buffers. Returns the seconds it took."""
        import time

        started = time.perf_counter()
        buckets = graph_buckets(max_num_seqs)
        largest = buckets[-1]
        self.graph_max_blocks = -(-max_len // self.block_size)
        dev = self.device
        self._g_ids = torch.zeros(largest, dtype=torch.int64, device=dev)
        self._g_pos = torch.zeros(largest, dtype=torch.int64, device=dev)
        self._g_slots = torch.full((largest,), -1, dtype=torch.int64, device=dev)
        self._g_lens = torch.ones(largest, dtype=torch.int32, device=dev)
        self._g_tables = torch.zeros(largest, self.graph_max_blocks, dtype=torch.int32, device=dev)
        self.graphs.clear()
        self._buckets = buckets
        self._piece_buckets = graph_buckets(piecewise_max_tokens, PIECEWISE_TOKEN_SIZES) if piecewise_max_tokens else []
        self.piecewise.clear()
        if self._piece_buckets:
            self._piecewise_buffers(self._piece_buckets[-1])
        if not capture:
            for bucket in buckets:
                self.graphs[bucket] = (None, torch.empty(0))
            for bucket in self._piece_buckets:
                self.piecewise[bucket] = [None] * (len(self.model.layers) + 1)
            return time.perf_counter() - started
        pool = torch.cuda.graph_pool_handle()
        side = torch.cuda.Stream(device=dev)

        def warm_up(run) -> None:  # Triton compiles, cuBLAS picks its kernels, outside any capture
            side.wait_stream(torch.cuda.current_stream(dev))
            with torch.cuda.stream(side):
                for _ in range(2):
                    run()
            torch.cuda.current_stream(dev).wait_stream(side)
            torch.cuda.synchronize(dev)

        for bucket in reversed(buckets):
            warm_up(lambda: self._graph_forward(bucket))
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                logits = self._graph_forward(bucket)
            self.graphs[bucket] = (graph, logits)
        for bucket in reversed(self._piece_buckets):
            pieces: list[torch.cuda.CUDAGraph | None] = []
            for index in range(len(self.model.layers) + 1):
                warm_up(lambda: self._piece(bucket, index))
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=pool):
                    self._piece(bucket, index)
                pieces.append(graph)
            self.piecewise[bucket] = pieces
        torch.cuda.synchronize(dev)
        return time.perf_counter() - started

    # -- piecewise CUDA graphs (steps with prefill) -------------------------------
    def _piecewise_buffers(self, tokens: int) -> None:
        """Static inputs and the tensors handed between pieces and the eager attention."""
        cfg, dev = self.model.config, self.device
        dtype = self.model.embed_tokens.dtype
        layer = self.model.layers[0]  # this rank's heads
        self._p_ids = torch.zeros(tokens, dtype=torch.int64, device=dev)
        self._p_pos = torch.zeros(tokens, dtype=torch.int64, device=dev)
        self._p_slots = torch.full((tokens,), -1, dtype=torch.int64, device=dev)
        self._p_q = torch.zeros(tokens, layer.num_heads, cfg.head_dim, dtype=dtype, device=dev)
        self._p_attn = torch.zeros(tokens, layer.q_size, dtype=dtype, device=dev)
        self._p_res = torch.zeros(tokens, cfg.hidden_size, dtype=dtype, device=dev)
        self._p_hidden = torch.zeros(tokens, cfg.hidden_size, dtype=dtype, device=dev)

    def _piece(self, bucket: int, index: int) -> None:
        """Piece `index` of a step of `bucket` tokens: the end of layer index-1 (output projection,
        MLP; the embedding for index 0) and the start of layer `index` (norm, q|k|v, RoPE, KV write),
        or the final norm after the last layer. Reads and writes only the static buffers."""
        model, ops, t = self.model, self.ops, bucket
        if index == 0:
            hidden, residual = model.embed(self._p_ids[:t]), None
        else:
            hidden, residual = model.layers[index - 1].post_attention(ops, self._p_attn[:t], self._p_res[:t])
        if index < len(model.layers):
            q, residual = model.layers[index].pre_attention(ops, hidden, residual, self._p_pos[:t],
                                                            model.cos_sin_cache, self.kv_caches[index],
                                                            self._p_slots[:t])
            self._p_q[:t].copy_(q)
            self._p_res[:t].copy_(residual)
        else:
            normed, _ = ops.rms_norm(hidden, model.norm, model.config.rms_norm_eps, residual)
            self._p_hidden[:t].copy_(normed)

    def _run_piecewise(self, s: StepInputs, bucket: int, prev_ids: Tensor | None) -> Tensor | None:
        """Logits of the sampling rows of a step through its token bucket's pieces, attention eager."""
        n = len(s.input_ids)
        if self.on_gpu:
            input_ids, positions, meta, rows = self._packed_tensors(s, pad=bucket - n)
        else:  # CPU tests of this path: the same padding, plain tensors
            pad = bucket - n
            input_ids = self._tensor(s.input_ids + [0] * pad, torch.int64)
            positions = self._tensor(s.positions + [0] * pad, torch.int64)
            _, _, meta = self._host_tensors(s)
            meta.slot_mapping = self._tensor(s.slots + [-1] * pad, torch.int64)
            rows = self._tensor(s.logit_rows, torch.int64) if len(s.logit_rows) != n else None
        if s.pending:
            input_ids = self._resolve_pending(input_ids, prev_ids)
        self._p_ids[:bucket].copy_(input_ids)
        self._p_pos[:bucket].copy_(positions)
        self._p_slots[:bucket].copy_(meta.slot_mapping)
        pieces = self.piecewise[bucket]
        layers = self.model.layers
        for index, graph in enumerate(pieces):
            if graph is None:
                self._piece(bucket, index)
            else:
                graph.replay()
            if index < len(layers):
                self._p_attn[:n].copy_(layers[index].attend(self.ops, self._p_q[:n], self.kv_caches[index], meta))
        self.num_piecewise_steps += 1
        if not s.logit_rows:
            return None
        hidden = self._p_hidden[:n]
        if rows is not None:
            hidden = hidden.index_select(0, rows)
        return self.model.compute_logits(hidden)

    def _graph_bucket(self, s: StepInputs) -> int | None:
        if not self.graphs or s.pre_tables or s.num_decode == 0:
            return None
        if s.max_context > self.graph_max_blocks * self.block_size:
            return None
        if max(len(t) for t in s.dec_tables) > self.graph_max_blocks:
            return None
        return _smallest_holding(self._buckets, s.num_decode)

    def _run_graph(self, s: StepInputs, bucket: int, prev_ids: Tensor | None) -> Tensor:
        """Logits [len(logit_rows), V] of a decode-only step through its bucket's graph."""
        n = s.num_decode
        pad = bucket - n
        width = max(len(t) for t in s.dec_tables)
        dev64 = self._upload(s.input_ids + [0] * pad + s.positions + [0] * pad + s.slots + [-1] * pad,
                             torch.int64)
        dev32 = self._upload(s.dec_lens + [1] * pad + _flat_tables(s.dec_tables, width) + [0] * (pad * width),
                             torch.int32)
        ids = dev64[:bucket]
        if s.pending:
            ids = self._resolve_pending(ids, prev_ids)
        self._g_ids[:bucket].copy_(ids)
        self._g_pos[:bucket].copy_(dev64[bucket:2 * bucket])
        self._g_slots[:bucket].copy_(dev64[2 * bucket:])
        self._g_lens[:bucket].copy_(dev32[:bucket])
        self._g_tables[:bucket, :width].copy_(dev32[bucket:].view(bucket, width))
        graph, logits = self.graphs[bucket]
        if graph is None:
            logits = self._graph_forward(bucket)
        else:
            graph.replay()
        self.num_graph_steps += 1
        rows = s.logit_rows
        if len(rows) == n and (n == 0 or rows[-1] == n - 1):
            return logits[:n]
        return logits.index_select(0, self._upload(rows, torch.int64))

    # -- running a step -----------------------------------------------------------
    def _forward_eager(self, s: StepInputs, prev_ids: Tensor | None) -> Tensor | None:
        if self.on_gpu:
            input_ids, positions, meta, rows = self._packed_tensors(s)
        else:
            input_ids, positions, meta = self._host_tensors(s)
            rows = None
            if s.logit_rows and len(s.logit_rows) != len(s.input_ids):
                rows = self._tensor(s.logit_rows, torch.int64)
        if s.pending:
            input_ids = self._resolve_pending(input_ids, prev_ids)
        hidden = self.model(self.ops, input_ids, positions, self.kv_caches, meta)
        self.num_eager_steps += 1
        if not s.logit_rows:
            return None
        if rows is not None:
            hidden = hidden.index_select(0, rows)
        return self.model.compute_logits(hidden)

    @torch.inference_mode()
    def execute(self, s: StepInputs, prev_ids: Tensor | None = None) -> Tensor | None:
        """Run one collected step on this rank: logits of its sampling rows (float32, on the device),
        or None when nothing samples. Never waits on the GPU. Every tensor-parallel rank calls this
        with the same inputs, so each takes the same path and their collectives meet."""
        if self.timer is not None:
            self.timer.begin()
        bucket = self._graph_bucket(s)
        if bucket is not None:
            logits = self._run_graph(s, bucket, prev_ids)
        elif self.piecewise and self.piecewise_enabled and (
                bucket := _smallest_holding(self._piece_buckets, len(s.input_ids))) is not None:
            logits = self._run_piecewise(s, bucket, prev_ids)
        else:
            logits = self._forward_eager(s, prev_ids)
        if self.timer is not None:
            self.timer.end()
        return logits

    def run_device(self, out: SchedulerOutput, prev_ids: Tensor | None = None,
                   overlapped: bool = True) -> tuple[Tensor | None, list[SampleRequest]]:
        """Launch the step; logits of the sampling rows stay on the device (float32). Never waits on
        the GPU. `prev_ids`: the previous step's sampled ids, for placeholder inputs. `overlapped`:
        the engine will share this step's sampled ids with the other tensor-parallel ranks."""
        s = self.collect(out)
        if self.ranks is None:
            return self.execute(s, prev_ids), s.requests
        self.ranks.publish(s, overlapped)
        try:
            return self.execute(s, prev_ids), s.requests
        except Exception:
            self.ranks.check()  # a rank died: that is the error to report, not the broken collective
            raise

    def run(self, out: SchedulerOutput) -> tuple[Tensor | None, list[SampleRequest]]:
        """Forward the step; returns logits of the sampling rows (float32, on the model's device) and
        who owns them. On a GPU they stay there: the host sampler draws on the device and reads back
        only the chosen ids (copying [batch, vocab] logits to sample on the CPU cost ~140 ms a step at
        batch 32 with llama3's vocabulary)."""
        return self.run_device(out, overlapped=False)
