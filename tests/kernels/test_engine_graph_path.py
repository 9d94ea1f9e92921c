"""The engine's GPU decode path on the CPU: Triton kernels (interpreted) behind the static, padded
buffers that CUDA graphs replay, with and without the overlapped step loop.

On a GPU the buffers are captured into real CUDA graphs; on the CPU (CI) the same code runs
eagerly over the same static buffers (`capture_graphs(..., capture=False)`), so padding rows, the
fixed-width block table and the placeholder gather are checked there too. The reference is the
plain-torch engine on the same device.
"""

from __future__ import annotations

import pytest
import torch

from servescope.reference_engine.config import EngineConfig
from servescope.reference_engine.engine import LLMEngine
from servescope.reference_engine.model_runner import graph_buckets
from servescope.reference_engine.sequence import SamplingParams

GREEDY = [SamplingParams(max_tokens=m, temperature=0, ignore_eos=True) for m in (6, 9, 2)]


DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # as tests/kernels/conftest.py decides


def _engine(**overrides) -> LLMEngine:
    fields = {"num_kv_blocks": 64, "max_num_batched_tokens": 64, "max_num_seqs": 6, "device": DEVICE,
              "dtype": "float32", "cuda_graph": False, **overrides}
    return LLMEngine.build(EngineConfig(**fields), preset_name="tiny")


def _prompts(engine) -> list[list[int]]:
    return [engine.tokenizer.encode(" ".join(f"g{i}w{j}" for j in range(n))) for i, n in enumerate([1, 3, 14])]


def test_graph_buckets_cover_the_batch_limit() -> None:
    assert graph_buckets(1) == [1]
    assert graph_buckets(6) == [1, 2, 4, 8]
    assert graph_buckets(128)[-1] == 128
    assert graph_buckets(1000)[-1] == 1000


@pytest.mark.parametrize("async_scheduling", [False, True])
def test_static_decode_path_matches_torch(async_scheduling: bool) -> None:
    torch.set_num_threads(1)
    reference = _engine(async_scheduling=False)
    expected = [s.output_token_ids for s in reference.generate(_prompts(reference), GREEDY)]
    engine = _engine(attention_backend="triton", async_scheduling=async_scheduling)
    assert engine.ops.name == "triton"
    # 32 tokens of table (2 blocks of 16): the short prompts decode through the static buffers (batch 2
    # pads to bucket 2, batch 1 to 1 after the shortest finishes); the 59-token one runs eagerly.
    engine.runner.capture_graphs(max_num_seqs=6, max_len=32, capture=DEVICE == "cuda")
    got = [s.output_token_ids for s in engine.generate(_prompts(engine), GREEDY)]
    assert got == expected
    assert engine.runner.num_graph_steps > 0 and engine.runner.num_eager_steps > 0
    assert engine.block_manager.num_free_blocks == engine.num_blocks


@pytest.mark.parametrize("async_scheduling", [False, True])
def test_piecewise_path_of_mixed_steps_matches_torch(async_scheduling: bool) -> None:
    """Prefill chunks beside decodes through the piecewise pieces (padded to a token bucket, slot -1
    rows writing no KV, attention run between the pieces), plus a prefix-cache hit, against torch."""
    torch.set_num_threads(1)
    prompts_params = GREEDY + [SamplingParams(max_tokens=5, temperature=0, ignore_eos=True)]
    reference = _engine(async_scheduling=False, max_num_batched_tokens=40)
    prompts = _prompts(reference)
    prompts.append(prompts[2] + prompts[0])  # shares the 59-token prompt's full blocks: a cache hit
    expected = [s.output_token_ids for s in reference.generate(prompts, prompts_params)]
    engine = _engine(attention_backend="triton", async_scheduling=async_scheduling, max_num_batched_tokens=40)
    engine.runner.capture_graphs(max_num_seqs=6, max_len=32, capture=DEVICE == "cuda", piecewise_max_tokens=40)
    assert engine.runner._piece_buckets == [16, 32, 48]
    got = [s.output_token_ids for s in engine.generate(prompts, prompts_params)]
    assert got == expected
    runner = engine.runner
    assert runner.num_piecewise_steps > 0 and runner.num_graph_steps > 0
    assert engine.block_manager.prefix_hits > 0
    assert engine.block_manager.num_free_blocks == engine.num_blocks


def test_piecewise_setting_is_validated_and_reaches_the_cli() -> None:
    from click.testing import CliRunner

    from servescope.reference_engine.cli import serve
    from servescope.reference_engine.errors import ConfigError

    with pytest.raises(ConfigError, match="piecewise-graph-max-tokens"):
        EngineConfig(piecewise_graph_max_tokens=-1)
    result = CliRunner().invoke(serve, ["--piecewise-graph-max-tokens", "-5"])
    assert result.exit_code == 2 and "--piecewise-graph-max-tokens" in result.output
