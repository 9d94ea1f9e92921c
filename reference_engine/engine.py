"""The engine and its step: schedule, forward, sample, postprocess, detokenize.

`LLMEngine` is synchronous and single-threaded on purpose; the server drives it
with one step loop (`step_loop.py`), in its own thread (`async_engine.py`) or
its own process (`engine_process.py`), and tests and benchmarks drive it
directly with `add_request()` / `step()` or `generate()`.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import Tensor

from servescope.reference_engine.block_manager import BlockManager
from servescope.reference_engine.config import EngineConfig, ModelConfig, model_config_from_hf, preset
from servescope.reference_engine.errors import ConfigError
from servescope.reference_engine.limits import PromptLimits
from servescope.reference_engine.model_loader import build_model, local_kv_blocks, torch_dtype
from servescope.reference_engine.model_runner import ModelRunner
from servescope.reference_engine.ops import build_ops
from servescope.reference_engine.sampler import DeviceSampler, Sampler, SampleRequest
from servescope.reference_engine.scheduler import Scheduler, SchedulerOutput
from servescope.reference_engine.sequence import SamplingParams, Sequence, SequenceStatus, stop_reason
from servescope.reference_engine.spec_decode import Drafter
from servescope.reference_engine.tokenization import EngineTokenizer, IncrementalDetokenizer, tokenizer_dir_for
from servescope.reference_engine.tensor_parallel import check_divisible
GENERATE_MAX_STEPS = 100_000  # generate() gives up after this many steps rather than spin forever


@dataclass(slots=True)
class StepOutput:
    """What one step produced for one request."""

    seq: Sequence
    token_ids: list[int]
    text: str
    finished: bool
    finish_reason: str | None
    first: bool = False  # these are the request's first output tokens


@dataclass(slots=True)
class _InFlight:
    """A launched step whose sampled ids the host has not read yet (async scheduling)."""

    out: SchedulerOutput
    ids: Tensor  # [R] int64 on the device: what the next step's placeholders gather from
    host_ids: Tensor  # [R] int64, pinned on a GPU: filled by a copy that `event` follows
    event: object | None
    entries: list[tuple[Sequence, int, int]] = field(default_factory=list)  # (seq, token position, row)

    def tokens(self) -> list[int]:
        if self.event is not None:
            self.event.synchronize()  # type: ignore[attr-defined]
        return self.host_ids.tolist()


class EngineObserver(Protocol):
    """Hooks the metrics module implements; called from the thread (or process) that runs the steps."""

    def on_step(self, engine: "LLMEngine", outputs: list[StepOutput], step_s: float) -> None: ...


class LLMEngine:
    def __init__(self, model_config: ModelConfig, config: EngineConfig, tokenizer: EngineTokenizer,
                 checkpoint_dir: str | Path | None = None, observer: EngineObserver | None = None) -> None:
        self.model_config = model_config
        self.config = config
        self.tokenizer = tokenizer
        self.observer = observer
        if tokenizer.vocab_size > model_config.vocab_size:
            raise ConfigError(f"tokenizer has {tokenizer.vocab_size} tokens but the model only "
                              f"{model_config.vocab_size}; use a matching tokenizer")
        self.max_model_len = min(config.max_model_len or model_config.max_position_embeddings,
                                 model_config.max_position_embeddings)
        config.max_model_len = self.max_model_len
        self.device = torch.device(config.device)
        self.dtype = torch_dtype(config.dtype, config.device)
        self.ops = build_ops(config.attention_backend, config.device)

        torch.manual_seed(config.seed)
        # Tensor parallelism: this engine is rank 0; ranks 1..N-1 are processes of their own (tp_workers.py).
        self.tp_workers = None
        tp = None
        if config.tensor_parallel_size > 1:
            tp = self._start_ranks(checkpoint_dir)
        self.model = build_model(model_config, config, self.device, self.dtype, self.max_model_len,
                                 checkpoint_dir, tp)
        self.num_blocks = local_kv_blocks(model_config, config, self.model.num_kv_heads, self.device, self.dtype)
        if self.tp_workers is not None:
            self.num_blocks = self.tp_workers.agree_kv_blocks(self.num_blocks)
        self.runner = ModelRunner(self.model, self.ops, model_config, config, self.num_blocks,
                                  self.device, self.dtype)
        if self.tp_workers is not None:
            from servescope.reference_engine.tp_workers import StepTimer

            self.runner.ranks = self.tp_workers
            self.runner.timer = StepTimer(self.device.type == "cuda")
        self.eos_token_ids = tuple(sorted(set(tokenizer.eos_token_ids) | set(model_config.eos_token_ids)))
        self.block_manager = BlockManager(self.num_blocks, config.block_size, config.enable_prefix_caching)
        self.drafter = Drafter(config.spec) if config.spec else None
        self.scheduler = Scheduler(config, self.block_manager, self.eos_token_ids,
                                   self.drafter.proposer if self.drafter else None)
        # The step now running: (it drafted, its tokens, its prefill tokens, its start), timed up to the
        # next step's start for the drafter; None after a step that left the engine idle.
        self._timing: tuple[bool, int, int, float] | None = None
        self.sampler = Sampler(self.eos_token_ids, seed=config.seed)
        self.detokenizers: dict[int, IncrementalDetokenizer] = {}
        self.num_steps = 0
        self.busy_s = 0.0  # seconds spent inside step() (host time: launch, schedule, wait, postprocess)
        self.scheduled_seqs_total = 0  # sequences over all steps: / num_steps = the mean batch
        self.prompt_tokens_total = 0
        self.generation_tokens_total = 0
        # The GPU path: CUDA graphs for decode steps (Triton kernels only: the torch ops read
        # lengths back to the host) and the overlapped step loop with on-device sampling.
        self.graph_capture_s = 0.0
        if self.device.type == "cuda" and config.cuda_graph and self.ops.name == "triton":
            self.capture_graphs()
        self.async_scheduling = config.use_async_scheduling
        self.device_sampler = DeviceSampler(self.eos_token_ids, self.device, seed=config.seed)
        if self.device.type == "cuda":
            self.device_sampler.warm_up(self.model_config.vocab_size)
        self._inflight: _InFlight | None = None

    def capture_graphs(self) -> float:
        """(Re)capture the decode graphs and the piecewise graphs of steps with prefill, as the config
        says (benchmarks recapture after changing the kernels' policy); returns the seconds it took."""
        cfg = self.config
        args = dict(max_num_seqs=cfg.max_num_seqs, max_len=min(cfg.cuda_graph_max_len, self.max_model_len),
                    piecewise_max_tokens=min(cfg.piecewise_graph_max_tokens, cfg.max_num_batched_tokens),
                    capture=self.runner.on_gpu)  # on the CPU (tests) the graph paths run eagerly
        if self.tp_workers is not None:  # every rank captures the same graphs, collectives included
            self.tp_workers.send(("capture", args))
        self.graph_capture_s = self.runner.capture_graphs(**args)
        return self.graph_capture_s

    def _start_ranks(self, checkpoint_dir: str | Path | None):
        """Spawn ranks 1..N-1 and join their group as rank 0 (on cuda:0); returns rank 0's TPGroup."""
        from servescope.reference_engine.tp_workers import RankWorkers

        size = self.config.tensor_parallel_size
        check_divisible(self.model_config, size)
        if self.device.type == "cuda":
            if self.config.device != "cuda":
                raise ConfigError(f"--tensor-parallel-size {size} places rank r on cuda:r; use --device cuda, "
                                  f"not {self.config.device}")
            if torch.cuda.device_count() < size:
                raise ConfigError(f"--tensor-parallel-size {size} needs {size} GPUs; this machine has "
                                  f"{torch.cuda.device_count()}")
            self.device = torch.device("cuda", 0)
        self.tp_workers, tp = RankWorkers.start(self.model_config, self.config, checkpoint_dir, self.max_model_len,
                                                torch.get_num_threads())
        return tp

    def shutdown(self) -> None:
        """Stop the other tensor-parallel ranks (nothing to do without them); safe to call twice."""
        if self.tp_workers is not None:
            self.tp_workers.stop()

    def rank_step_stats(self) -> dict:
        """Each tensor-parallel rank's step-time histogram (tp_workers.StepStats); {} without TP."""
        if self.tp_workers is None:
            return {}
        return {0: self.runner.timer.stats, **self.tp_workers.rank_stats()}

    @classmethod
    def build(cls, config: EngineConfig, preset_name: str | None = "tiny", model_path: str | Path | None = None,
              tokenizer_dir: str | Path | None = None, observer: EngineObserver | None = None) -> LLMEngine:
        """A preset with random weights (bundled tokenizer), or a local HF checkpoint (its own tokenizer)."""
        tokenizer = EngineTokenizer(tokenizer_dir_for(model_path, tokenizer_dir))
        if model_path is not None:
            model_config = model_config_from_hf(model_path)
        else:
            model_config = preset(preset_name or "tiny", vocab_size=tokenizer.vocab_size)
        return cls(model_config, config, tokenizer, checkpoint_dir=model_path, observer=observer)

    # -- requests -------------------------------------------------------------
    def add_request(self, prompt_token_ids: list[int], params: SamplingParams, tenant: str = "",
                    request_id: str = "", arrival_time: float | None = None) -> Sequence:
        """Queue a request; InvalidRequest when it cannot fit the context or uses unknown tokens."""
        self.limits.check(prompt_token_ids, params)
        seq = Sequence(list(prompt_token_ids), params, tenant=tenant, request_id=request_id,
                       arrival_time=arrival_time if arrival_time is not None else time.perf_counter())
        self.detokenizers[seq.seq_id] = IncrementalDetokenizer(self.tokenizer, seq.prompt_token_ids, params.stop)
        self.scheduler.add(seq)
        return seq

    @property
    def limits(self) -> PromptLimits:
        """What a request may ask for (also checked by the HTTP front end, which may be in another process)."""
        return PromptLimits(self.model_config.vocab_size, self.max_model_len, self.num_blocks, self.config.block_size)

    def snapshot(self) -> dict[str, Any]:
        """Block-pool and scheduler figures for `/internal/engine` (tests and debugging), with this
        process's pid: in process mode that is the engine child, which a test must see exit."""
        bm, sched = self.block_manager, self.scheduler
        return {
            "num_blocks": bm.num_blocks, "free_blocks": bm.num_free_blocks, "kv_usage": bm.usage,
            "running": len(sched.running), "waiting": len(sched.waiting), "preemptions": sched.num_preemptions,
            "steps": self.num_steps, "device": str(self.device), "ops": type(self.ops).__name__,
            "busy_s": self.busy_s, "scheduled_seqs_total": self.scheduled_seqs_total,
            "graph_steps": self.runner.num_graph_steps, "eager_steps": self.runner.num_eager_steps,
            "piecewise_steps": self.runner.num_piecewise_steps,
            "async_scheduling": self.async_scheduling,
            "tensor_parallel_size": self.config.tensor_parallel_size,
            "tp_worker_pids": self.tp_workers.pids if self.tp_workers is not None else [],
            "generation_tokens_total": self.generation_tokens_total, "pid": os.getpid(),
        }

    def abort(self, seq: Sequence) -> None:
        self.scheduler.finish(seq, "abort")
        self.detokenizers.pop(seq.seq_id, None)
        while seq.token_ids and seq.token_ids[-1] < 0:  # tokens still in flight (async scheduling)
            seq.token_ids.pop()

    def has_unfinished(self) -> bool:
        return self.scheduler.has_work() or self._inflight is not None

    def reset_scheduling(self, **changes) -> None:
        """Change scheduling knobs (e.g. chunked_prefill, enable_prefix_caching, max_num_batched_tokens)
        between runs, keeping the model, its KV pool and CUDA graphs; the prefix cache starts empty."""
        if self.has_unfinished():
            raise RuntimeError("reset_scheduling() needs an idle engine")
        for name, value in changes.items():
            if not hasattr(self.config, name):
                raise ConfigError(f"EngineConfig has no field {name!r}")
            setattr(self.config, name, value)
        self.config.__post_init__()
        self.block_manager = BlockManager(self.num_blocks, self.config.block_size, self.config.enable_prefix_caching)
        self.drafter = Drafter(self.config.spec) if self.config.spec else None
        self.scheduler = Scheduler(self.config, self.block_manager, self.eos_token_ids,
                                   self.drafter.proposer if self.drafter else None)
        self._timing = None
        self.async_scheduling = self.config.use_async_scheduling

    # -- the step ---------------------------------------------------------------
    def step(self) -> list[StepOutput]:
        started = time.perf_counter()
        drafter = self.drafter
        plan: dict[int, int] = {}
        if drafter is not None:
            if self._timing is not None:
                drafted, tokens, other, t0 = self._timing
                drafter.step_timed(drafted, tokens, other, started - t0)
            plan = drafter.plan(self.scheduler.running, self.max_model_len)
        if self.async_scheduling and not plan:
            return self._step_async(started)
        # A plain step, or one that drafts: a proposal needs every token on the host, so an overlapped
        # step still in flight is read back first.
        outputs = self._resolve(self._inflight) if self._inflight is not None else []
        self._inflight = None
        out = self.scheduler.schedule(plan)
        if not out.scheduled:
            self._timing = None
            return outputs
        logits, requests = self.runner.run(out)
        sampled = self.sampler.sample(logits, requests) if requests else []
        sampling = [item for item in out.scheduled if item.samples]  # read before postprocess moves them
        appended = self.scheduler.postprocess(out, sampled)
        if drafter is not None:
            for item, tokens in zip(sampling, sampled):
                if item.drafts:
                    drafter.verified(item.seq, len(item.drafts), len(tokens) - 1)
                elif not item.seq.finished:
                    drafter.shadow(item.seq, item.seq.num_tokens)
        for seq, tokens in appended:
            self.generation_tokens_total += len(tokens)
            if seq.num_output_tokens == len(tokens):  # the first tokens of this request
                self.prompt_tokens_total += seq.num_prompt_tokens
            detok = self.detokenizers[seq.seq_id]
            text, stopped = detok.push(tokens)
            if stopped and not seq.finished:  # stop_reason's last rule: no token rule ended it this step
                self.scheduler.finish(seq, "stop")
            if seq.finished:
                text += detok.flush()
                del self.detokenizers[seq.seq_id]
            outputs.append(StepOutput(seq, tokens, text, seq.finished, seq.finish_reason,
                                      seq.num_output_tokens == len(tokens)))
        return self._account_step(out, outputs, started)

    def _account_step(self, out: SchedulerOutput, outputs: list[StepOutput], started: float) -> list[StepOutput]:
        """Step counters and the observer's hook, shared by the plain and the overlapped step."""
        if self.drafter is not None:  # timed up to the next step's start, unless the engine goes idle
            drafted = any(item.drafts for item in out.scheduled)
            other = sum(item.num_new_tokens for item in out.scheduled if not item.drafts and not item.is_decode)
            busy = bool(out.scheduled) and self.has_unfinished()
            self._timing = (drafted, out.num_tokens, other, started) if busy else None
        self.num_steps += 1
        self.scheduled_seqs_total += len(out.scheduled)
        self.busy_s += time.perf_counter() - started
        if self.observer is not None:
            self.observer.on_step(self, outputs, time.perf_counter() - started)
        return outputs

    # -- the overlapped step (async scheduling) ----------------------------------
    def _step_async(self, started: float) -> list[StepOutput]:
        """Schedule and launch step N, then read back and apply step N-1's tokens while N runs.

        Step N is scheduled as if N-1's tokens were known: each sampling sequence got a placeholder
        token -(row + 1) when N-1 was launched, which step N's inputs gather from N-1's sampled ids
        on the device. Stops that depend on the token (EOS, stop strings) are applied one step late:
        a sequence that stopped at N-1 may have been computed once more in N, and that token is
        dropped. Length limits are known ahead and stop a sequence from being scheduled at all.
        """
        out = self.scheduler.schedule()
        launched = None
        if out.scheduled:
            prev = self._inflight
            logits, requests = self.runner.run_device(out, prev.ids if prev is not None else None)
            launched = self._launch_sampling(out, logits, requests)
            self._advance(out, launched)
        outputs = self._resolve(self._inflight) if self._inflight is not None else []
        self._inflight = launched
        return self._account_step(out, outputs, started)

    def _launch_sampling(self, out: SchedulerOutput, logits: Tensor | None,
                         requests: list[SampleRequest]) -> _InFlight:
        on_gpu = self.device.type == "cuda"
        if not requests:
            ids = torch.empty(0, dtype=torch.int64, device=self.device)
        elif self.device_sampler.supports(requests):
            ids = self.device_sampler.sample(logits, requests)
        else:  # a seeded request: the host sampler (this step waits for its logits)
            tokens = [t[0] for t in self.sampler.sample(logits.cpu(), requests)]
            ids = torch.tensor(tokens, dtype=torch.int64).to(self.device)
        if self.tp_workers is not None and requests:
            self.tp_workers.share_ids(ids)  # the other ranks' next inputs gather from them
        if not on_gpu:
            return _InFlight(out, ids, ids, None)
        host = torch.empty(ids.shape, dtype=torch.int64, pin_memory=True)
        host.copy_(ids, non_blocking=True)
        event = torch.cuda.Event()
        event.record()
        return _InFlight(out, ids, host, event)

    def _advance(self, out: SchedulerOutput, flight: _InFlight) -> None:
        """Move the launched step's sequences forward as postprocess would, with placeholder tokens."""
        row = 0
        eos, max_len = self.scheduler.eos_token_ids, self.config.max_model_len
        for item in out.scheduled:
            seq = item.seq
            samples = item.samples  # read before num_computed_tokens moves
            seq.num_computed_tokens += item.num_new_tokens
            if not samples:
                self.block_manager.commit(seq)
                continue
            seq.token_ids.append(-(row + 1))
            flight.entries.append((seq, seq.num_tokens - 1, row))
            row += 1
            # Its filled blocks are registered in the prefix cache once the token is known (_resolve).
            reason = stop_reason(seq, seq.num_tokens, eos, max_len)  # a placeholder: the length rules only
            if reason is not None:
                self.scheduler.finish(seq, reason)  # frees its blocks: later GPU work is stream-ordered

    def _resolve(self, flight: _InFlight) -> list[StepOutput]:
        """Read a launched step's sampled ids and apply them: EOS and stop strings, detokenization."""
        tokens = flight.tokens()
        now = time.perf_counter()
        eos, max_len = self.scheduler.eos_token_ids, self.config.max_model_len
        outputs: list[StepOutput] = []
        for seq, pos, row in flight.entries:
            detok = self.detokenizers.get(seq.seq_id)
            if detok is None or pos >= len(seq.token_ids):
                continue  # aborted, or computed once past a stop: dropped
            token = tokens[row]
            seq.token_ids[pos] = token
            text, stopped = detok.push([token])
            # A length finish of this token was applied ahead (_advance); only a stop is new here.
            if stop_reason(seq, pos + 1, eos, max_len, stop_string=stopped) == "stop":
                if seq.finished:  # finished ahead by a length limit of a later token
                    seq.finish_reason = "stop"
                else:
                    self.scheduler.finish(seq, "stop")
                del seq.token_ids[pos + 1:]  # a token computed past the stop is dropped
            final = seq.finished and pos == len(seq.token_ids) - 1
            if final:
                text += detok.flush()
                del self.detokenizers[seq.seq_id]
            elif seq.status is SequenceStatus.RUNNING:
                self.block_manager.commit(seq)
                if self.drafter is not None:
                    self.drafter.shadow(seq, pos + 1)
            first = pos == seq.num_prompt_tokens
            if first:
                seq.first_token_time = now
                self.prompt_tokens_total += seq.num_prompt_tokens
            else:
                seq.last_token_gap = now - seq.last_token_time
            seq.last_token_time = now
            self.generation_tokens_total += 1
            outputs.append(StepOutput(seq, [token], text, final, seq.finish_reason if final else None, first))
        return outputs

    def generate(self, prompts: list[list[int]], params: SamplingParams | list[SamplingParams],
                 tenants: list[str] | None = None) -> list[Sequence]:
        """Run prompts to completion (tests, benchmarks): returns the finished sequences in order."""
        params_list = params if isinstance(params, list) else [params] * len(prompts)
        seqs = [self.add_request(p, sp, tenant=(tenants[i] if tenants else ""))
                for i, (p, sp) in enumerate(zip(prompts, params_list))]
        for _ in range(GENERATE_MAX_STEPS):
            if not self.has_unfinished():
                break
            self.step()
        else:
            raise RuntimeError(f"generate() did not finish within {GENERATE_MAX_STEPS} steps")
        return seqs
