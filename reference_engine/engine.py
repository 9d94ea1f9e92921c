"""The engine and its step loop: schedule, forward, sample, postprocess, detokenize.

`LLMEngine` is synchronous and single-threaded on purpose; `async_engine.py`
runs it in its own thread for the server, and tests and benchmarks drive it
directly with `add_request()` / `step()` or `generate()`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch

from reference_engine.block_manager import BlockManager
from reference_engine.config import EngineConfig, ModelConfig, preset, model_config_from_hf
from reference_engine.errors import ConfigError, InvalidRequest
from reference_engine.model import LlamaModel
from reference_engine.model_runner import ModelRunner
from reference_engine.ops import build_ops
from reference_engine.sampler import Sampler
from reference_engine.scheduler import Scheduler
from reference_engine.sequence import SamplingParams, Sequence
from reference_engine.spec_decode import NgramProposer
from reference_engine.tokenization import EngineTokenizer, IncrementalDetokenizer
from reference_engine.weights import init_random_weights, load_hf_weights

DEFAULT_CPU_KV_MEMORY = 256 << 20


@dataclass(slots=True)
class StepOutput:
    """What one step produced for one request."""

    seq: Sequence
    token_ids: list[int]
    text: str
    finished: bool
    finish_reason: str | None


class EngineObserver(Protocol):
    """Hooks the metrics module implements; called from the engine thread."""

    def on_step(self, engine: "LLMEngine", outputs: list[StepOutput], step_s: float) -> None: ...


def _torch_dtype(name: str, device: str) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device.startswith("cuda") else torch.float32
    return getattr(torch, name)


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
        self.dtype = _torch_dtype(config.dtype, config.device)
        self.ops = build_ops(config.attention_backend, config.device)

        torch.manual_seed(config.seed)
        model = LlamaModel(model_config, max_positions=self.max_model_len)
        if checkpoint_dir is None:
            init_random_weights(model, config.seed)
        else:
            load_hf_weights(model, checkpoint_dir)
        self.model = model.to(device=self.device, dtype=self.dtype).eval()
        self.model.cos_sin_cache = self.model.cos_sin_cache.float()  # RoPE angles stay float32

        self.num_blocks = self._num_kv_blocks()
        self.runner = ModelRunner(self.model, self.ops, model_config, config, self.num_blocks,
                                  self.device, self.dtype)
        self.block_manager = BlockManager(self.num_blocks, config.block_size, config.enable_prefix_caching)
        eos = tuple(sorted(set(tokenizer.eos_token_ids) | set(model_config.eos_token_ids)))
        proposer = NgramProposer(config.spec) if config.spec else None
        self.scheduler = Scheduler(config, self.block_manager, eos, proposer)
        self.sampler = Sampler(eos, seed=config.seed)
        self.detokenizers: dict[int, IncrementalDetokenizer] = {}
        self.num_steps = 0
        self.prompt_tokens_total = 0
        self.generation_tokens_total = 0

    def _num_kv_blocks(self) -> int:
        cfg, mc = self.config, self.model_config
        if cfg.num_kv_blocks is not None:
            return cfg.num_kv_blocks
        bytes_per_block = mc.kv_bytes_per_token(torch.finfo(self.dtype).bits // 8) * cfg.block_size
        budget = cfg.kv_cache_memory
        if budget is None:
            if self.device.type == "cuda":
                free, _ = torch.cuda.mem_get_info(self.device)
                budget = int(free * 0.8)
            else:
                budget = DEFAULT_CPU_KV_MEMORY
        blocks = budget // bytes_per_block
        if blocks < 2:
            raise ConfigError(f"--kv-cache-memory {budget} bytes holds {blocks} blocks of {bytes_per_block} "
                              "bytes; give it more memory or set --num-kv-blocks")
        return int(blocks)

    @classmethod
    def build(cls, config: EngineConfig, preset_name: str | None = "tiny", model_path: str | Path | None = None,
              tokenizer_dir: str | Path | None = None, observer: EngineObserver | None = None) -> LLMEngine:
        """A preset with random weights (bundled tokenizer), or a local HF checkpoint (its own tokenizer)."""
        if model_path is not None:
            model_config = model_config_from_hf(model_path)
            tokenizer = EngineTokenizer(tokenizer_dir or model_path)
        else:
            if tokenizer_dir is None:
                from reference_engine.tokenizer import TOKENIZER_DIR
                tokenizer_dir = TOKENIZER_DIR
            tokenizer = EngineTokenizer(tokenizer_dir)
            model_config = preset(preset_name or "tiny", vocab_size=tokenizer.vocab_size)
        return cls(model_config, config, tokenizer, checkpoint_dir=model_path, observer=observer)

    # -- requests -------------------------------------------------------------
    def add_request(self, prompt_token_ids: list[int], params: SamplingParams, tenant: str = "",
                    request_id: str = "", arrival_time: float | None = None) -> Sequence:
        """Queue a request; InvalidRequest when it cannot fit the context or uses unknown tokens."""
        self.validate_prompt(prompt_token_ids, params)
        seq = Sequence(list(prompt_token_ids), params, tenant=tenant, request_id=request_id,
                       arrival_time=arrival_time if arrival_time is not None else time.perf_counter())
        self.detokenizers[seq.seq_id] = IncrementalDetokenizer(self.tokenizer, seq.prompt_token_ids, params.stop)
        self.scheduler.add(seq)
        return seq

    def validate_prompt(self, prompt_token_ids: list[int], params: SamplingParams) -> None:
        if not prompt_token_ids:
            raise InvalidRequest("the prompt is empty", "prompt")
        vocab = self.model_config.vocab_size
        if min(prompt_token_ids) < 0 or max(prompt_token_ids) >= vocab:
            raise InvalidRequest(f"prompt token ids must be in [0, {vocab})", "prompt")
        if len(prompt_token_ids) + params.max_tokens > self.max_model_len:
            raise InvalidRequest(
                f"This model's maximum context length is {self.max_model_len} tokens. However, you requested "
                f"{len(prompt_token_ids) + params.max_tokens} tokens ({len(prompt_token_ids)} in the prompt, "
                f"{params.max_tokens} for the completion). Reduce the prompt or max_tokens.",
                "prompt", "context_length_exceeded")
        blocks = self.config.blocks_needed(len(prompt_token_ids) + params.max_tokens)
        if blocks > self.num_blocks:
            raise InvalidRequest(f"the request needs {blocks} KV blocks but the whole cache has "
                                 f"{self.num_blocks}; shorten it or start the engine with more KV memory",
                                 "prompt", "kv_cache_too_small")

    def abort(self, seq: Sequence) -> None:
        self.scheduler.finish(seq, "abort")
        self.detokenizers.pop(seq.seq_id, None)

    def has_unfinished(self) -> bool:
        return self.scheduler.has_work()

    # -- the step ---------------------------------------------------------------
    def step(self) -> list[StepOutput]:
        started = time.perf_counter()
        out = self.scheduler.schedule()
        if not out.scheduled:
            return []
        logits, requests = self.runner.run(out)
        sampled = self.sampler.sample(logits, requests) if requests else []
        appended = self.scheduler.postprocess(out, sampled)
        outputs: list[StepOutput] = []
        for seq, tokens in appended:
            self.generation_tokens_total += len(tokens)
            if seq.num_output_tokens == len(tokens):  # the first tokens of this request
                self.prompt_tokens_total += seq.num_prompt_tokens
            detok = self.detokenizers[seq.seq_id]
            text, stopped = detok.push(tokens)
            if stopped and not seq.finished:
                self.scheduler.finish(seq, "stop")
            if seq.finished:
                text += detok.flush()
                del self.detokenizers[seq.seq_id]
            outputs.append(StepOutput(seq, tokens, text, seq.finished, seq.finish_reason))
        self.num_steps += 1
        if self.observer is not None:
            self.observer.on_step(self, outputs, time.perf_counter() - started)
        return outputs

    def generate(self, prompts: list[list[int]], params: SamplingParams | list[SamplingParams],
                 tenants: list[str] | None = None, max_steps: int = 100_000) -> list[Sequence]:
        """Run prompts to completion (tests, benchmarks): returns the finished sequences in order."""
        params_list = params if isinstance(params, list) else [params] * len(prompts)
        seqs = [self.add_request(p, sp, tenant=(tenants[i] if tenants else ""))
                for i, (p, sp) in enumerate(zip(prompts, params_list))]
        for _ in range(max_steps):
            if not self.has_unfinished():
                break
            self.step()
        else:
            raise RuntimeError(f"generate() did not finish within {max_steps} steps")
        return seqs
