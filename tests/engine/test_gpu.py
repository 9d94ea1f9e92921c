"""The engine on CUDA: torch ops and the Triton kernels (when kernels.backend imports) agree with the CPU path."""

from __future__ import annotations

import pytest
import torch

from reference_engine.config import SpecConfig
from reference_engine.sequence import SamplingParams

pytestmark = pytest.mark.gpu

GREEDY = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True)


def _prompts(engine) -> list[list[int]]:
    words = [3, 20, 60, 9]
    return [engine.tokenizer.encode(" ".join(f"gpu{i}w{j}" for j in range(n))) for i, n in enumerate(words)]


def _outputs(engine_factory, min_preemptions: int = 0, **overrides) -> list[list[int]]:
    engine = engine_factory(dtype="float32", max_num_batched_tokens=128, **overrides)
    seqs = engine.generate(_prompts(engine), GREEDY)
    assert engine.block_manager.num_free_blocks == engine.num_blocks
    assert engine.scheduler.num_preemptions >= min_preemptions
    return [s.output_token_ids for s in seqs]


def test_cuda_torch_ops_match_cpu(engine_factory) -> None:
    assert _outputs(engine_factory, device="cuda", attention_backend="torch") == _outputs(engine_factory)


def test_cuda_triton_ops_match_torch_ops(engine_factory) -> None:
    pytest.importorskip("kernels.backend")
    expected = _outputs(engine_factory, device="cuda", attention_backend="torch")
    assert _outputs(engine_factory, device="cuda", attention_backend="triton") == expected
    # Preemption and speculation through the kernels keep the same greedy output.
    assert _outputs(engine_factory, device="cuda", attention_backend="triton", num_kv_blocks=32,
                    spec=SpecConfig(k=3), min_preemptions=1) == expected


def test_cuda_bfloat16_serves_the_1b_shape(engine_factory) -> None:
    from reference_engine.config import EngineConfig
    from reference_engine.engine import LLMEngine

    engine = LLMEngine.build(EngineConfig(device="cuda", kv_cache_memory=2 << 30), preset_name="llama3-1b")
    assert engine.dtype == torch.bfloat16
    seqs = engine.generate(_prompts(engine), SamplingParams(max_tokens=16, temperature=0.8, seed=3))
    assert all(s.num_output_tokens >= 1 for s in seqs)
