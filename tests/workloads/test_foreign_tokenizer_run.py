"""End to end: `servescope run --tokenizer DIR` against a real server that counts with that tokenizer.

The reference engine serves a local checkpoint whose tokenizer is one servescope did not make
(the byte-level BPE with its own chat template); the prompt lengths the harness built must be the
server's own `usage.prompt_tokens`, for the chat and agent presets (chat template, system prefix,
multi-turn sessions) and for a fixed-length completions workload.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from servescope.cli import main

pytest.importorskip("torch")
pytest.importorskip("transformers")
pytestmark = pytest.mark.timeout(240)


@pytest.fixture(scope="module")
def checkpoint(bytelevel_tokenizer_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    out = tmp_path_factory.mktemp("bpe_llama")
    config = LlamaConfig(vocab_size=2048, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, head_dim=16, max_position_embeddings=4096)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(out, safe_serialization=True)
    for item in bytelevel_tokenizer_dir.iterdir():
        shutil.copy(item, out / item.name)
    return out


@pytest.mark.parametrize("args", [
    ["--workload", "chat"],
    ["--workload", "agent"],
    ["--prompt-tokens", "100"],
], ids=["chat", "agent", "completions-100"])
def test_prompts_are_exact_for_the_server(checkpoint: Path, tmp_path: Path, args: list[str]) -> None:
    out = tmp_path / "run"
    result = CliRunner().invoke(main, [
        "run", "--engine", "reference", "--engine-arg", f"--model={checkpoint}", "--engine-arg", "--device=cpu",
        "--tokenizer", str(checkpoint), *args, "--max-tokens", "4", "--concurrency", "2", "--requests", "6",
        "--out", str(out), "--no-report"])
    assert result.exit_code == 0, result.output
    frame = pq.read_table(out / "requests.parquet").to_pandas()
    ok = frame[frame["status"] == "ok"]
    assert len(ok) >= 6, frame[["status", "error_message"]]
    assert (ok["usage_prompt_tokens"] == ok["prompt_tokens"]).all(), ok[["api", "prompt_tokens", "usage_prompt_tokens"]]
