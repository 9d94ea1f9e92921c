"""Two tensor-parallel ranks (gloo) through the GPU step paths: decode-graph buckets and piecewise
steps (on the CPU their forwards run eagerly over the same static buffers, with the Triton kernels
under the interpreter) and overlapped scheduling. Every rank must take the same path on the same
inputs, and rank 1's placeholder inputs gather the ids that rank 0 broadcasts after sampling."""

from __future__ import annotations

import torch

from servescope.reference_engine.config import EngineConfig
from servescope.reference_engine.engine import LLMEngine
from servescope.reference_engine.sequence import SamplingParams

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # as tests/kernels/conftest.py decides
PARAMS = [SamplingParams(max_tokens=m, temperature=0, ignore_eos=True) for m in (6, 9, 2, 5)]


def _outputs(**overrides) -> tuple[list[list[int]], LLMEngine]:
    config = EngineConfig(num_kv_blocks=64, max_num_batched_tokens=40, max_num_seqs=6, device=DEVICE,
                          dtype="float32", cuda_graph=False, cuda_graph_max_len=32, **overrides)
    engine = LLMEngine.build(config, preset_name="tiny")
    try:
        prompts = [engine.tokenizer.encode(" ".join(f"g{i}w{j}" for j in range(n))) for i, n in enumerate([1, 3, 14])]
        prompts.append(prompts[2] + prompts[0])  # shares the long prompt's full blocks: a prefix-cache hit
        if overrides.get("attention_backend") == "triton":
            engine.capture_graphs()  # every rank: decode buckets up to 8, piecewise buckets 16, 32, 48
        return [s.output_token_ids for s in engine.generate(prompts, PARAMS)], engine
    finally:
        engine.shutdown()


def test_two_ranks_on_the_graph_paths_with_overlap_match_one_rank_of_torch() -> None:
    torch.set_num_threads(1)
    expected, _ = _outputs()
    got, engine = _outputs(attention_backend="triton", async_scheduling=True, tensor_parallel_size=2)
    assert got == expected
    runner = engine.runner
    assert runner.num_graph_steps > 0 and runner.num_piecewise_steps > 0
    assert engine.block_manager.prefix_hits > 0
