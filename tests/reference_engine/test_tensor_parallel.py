"""Tensor parallelism on the CPU (gloo, 2 ranks): the same tokens and logits as one rank, loading by
slices, and the served path with its faults.

Every engine here is rank 0 of a real group: rank 1 is a spawned process that runs each step on its
shard, and every projection's all-reduce and the LM head's all-gather go through gloo.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
import torch

from servescope.harness.targets.engine import free_port
from servescope.reference_engine.config import EngineConfig, model_config_from_hf, preset
from servescope.reference_engine.engine import LLMEngine
from servescope.reference_engine.errors import ConfigError
from servescope.reference_engine.model import LlamaModel
from servescope.reference_engine.sequence import SamplingParams
from servescope.reference_engine.tensor_parallel import ShardPlan, TPGroup
from servescope.reference_engine.tokenization import EngineTokenizer
from servescope.reference_engine.weights import load_hf_weights
from support.checkpoints import save_widened
from support.processes import process_gone, wait_until

SERVER_START_S = 90.0


@pytest.fixture(scope="module")
def odd_vocab_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random Llama whose vocabulary (8195) does not split evenly in two: the last shard is padded."""
    from transformers import LlamaConfig, LlamaForCausalLM

    out = tmp_path_factory.mktemp("hf_llama_odd_vocab")
    config = LlamaConfig(vocab_size=8195, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=512,
                         tie_word_embeddings=False, bos_token_id=0, eos_token_id=1)
    torch.manual_seed(3)
    return save_widened(LlamaForCausalLM(config).eval(), out, max_shard_size="300KB")


def _engine(checkpoint: Path, tp: int) -> LLMEngine:
    # A small step budget: the long prompt is prefilled in chunks beside the others' decodes.
    config = EngineConfig(block_size=4, num_kv_blocks=128, max_num_batched_tokens=12, dtype="float32",
                          tensor_parallel_size=tp, enable_prefix_caching=True, chunked_prefill=True)
    return LLMEngine(model_config_from_hf(checkpoint), config, EngineTokenizer(checkpoint), checkpoint_dir=checkpoint)


def _step_keeping_logits(engine: LLMEngine) -> torch.Tensor | None:
    """One plain engine step through the runner (which sends it to the other ranks), keeping the logits."""
    out = engine.scheduler.schedule()
    logits, requests = engine.runner.run(out)
    sampled = engine.sampler.sample(logits.clone(), requests) if requests else []
    engine.scheduler.postprocess(out, sampled)
    return logits


def _serve_mixed(engine: LLMEngine) -> tuple[list[list[int]], list[torch.Tensor], int]:
    """Prompts of 31, 5 and 23 tokens arriving at steps 0, 2 and 4 (continuous batching); the third
    shares the first one's 20-token prefix (a prefix-cache hit). Returns outputs, each step's logits,
    and the prefix-cache hits."""
    base = [(7 * i + 3) % 8000 + 10 for i in range(31)]
    arrivals = {0: base, 2: [11, 12, 13, 14, 15], 4: base[:20] + [901, 902, 903]}
    params = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
    seqs, logits = [], []
    for step in range(200):
        if step in arrivals:
            seqs.append(engine.add_request(arrivals[step], params))
        if not engine.has_unfinished() and step > max(arrivals):
            break
        step_logits = _step_keeping_logits(engine)
        if step_logits is not None:
            logits.append(step_logits)
    assert all(s.finished for s in seqs)
    return [s.output_token_ids for s in seqs], logits, engine.block_manager.prefix_hits


@pytest.fixture(scope="module")
def one_rank_runs(hf_checkpoint, hf_qwen2_checkpoint, odd_vocab_checkpoint):
    """Each checkpoint served by one rank: the reference the split runs must reproduce."""
    runs = {}
    for name, path in (("llama", hf_checkpoint), ("qwen2", hf_qwen2_checkpoint), ("odd", odd_vocab_checkpoint)):
        runs[name] = _serve_mixed(_engine(path, 1))
    return runs


@pytest.mark.parametrize("name", ["llama", "qwen2", "odd"])
def test_two_ranks_give_one_rank_tokens_and_logits(name, one_rank_runs, hf_checkpoint, hf_qwen2_checkpoint,
                                                   odd_vocab_checkpoint) -> None:
    """llama: its 2 KV heads split one per rank; qwen2: 1 KV head for 2 ranks (replicated), q/k/v bias,
    tied embeddings; odd: a vocabulary that leaves the last shard padded."""
    path = {"llama": hf_checkpoint, "qwen2": hf_qwen2_checkpoint, "odd": odd_vocab_checkpoint}[name]
    engine = _engine(path, 2)
    try:
        assert engine.tp_workers is not None and len(engine.tp_workers.pids) == 1
        outputs, logits, hits = _serve_mixed(engine)
        stats = engine.rank_step_stats()
    finally:
        engine.shutdown()
    ref_outputs, ref_logits, ref_hits = one_rank_runs[name]
    assert hits == ref_hits and hits >= 16  # the shared prefix came from the cache on both
    assert outputs == ref_outputs
    assert len(logits) == len(ref_logits)
    for got, want in zip(logits, ref_logits):
        torch.testing.assert_close(got, want, atol=2e-4, rtol=1e-4)
    assert stats[0].count >= len(logits) > 0  # rank 0 timed every step (steps that sample, and the rest)
    assert not any(p.is_alive() for p in (r.process for r in engine.tp_workers.ranks))


def _shard_shapes(mc, plan: ShardPlan) -> dict[str, tuple[int, ...]]:
    """Expected shape of each slice a rank reads, by HF tensor name (layer 0 and the vocabulary)."""
    h, d = mc.hidden_size, mc.head_dim
    return {
        "model.layers.0.self_attn.q_proj.weight": (plan.num_heads * d, h),
        "model.layers.0.self_attn.k_proj.weight": (plan.num_kv_heads * d, h),
        "model.layers.0.self_attn.o_proj.weight": (h, plan.num_heads * d),
        "model.layers.0.mlp.gate_proj.weight": (plan.intermediate_size, h),
        "model.layers.0.mlp.down_proj.weight": (h, plan.intermediate_size),
        "model.layers.0.input_layernorm.weight": (h,),
        "model.embed_tokens.weight": (plan.vocab[1] - plan.vocab[0], h),
    }


@pytest.mark.parametrize("which", ["odd", "qwen2"])
def test_each_rank_reads_only_its_slices_once(which, odd_vocab_checkpoint, hf_qwen2_checkpoint) -> None:
    path = odd_vocab_checkpoint if which == "odd" else hf_qwen2_checkpoint
    mc = model_config_from_hf(path)
    whole = LlamaModel(mc)
    full_report = load_hf_weights(whole, path)
    bytes_by_rank = []
    for rank in range(2):
        plan = ShardPlan.of(mc, rank, 2)
        shard = LlamaModel(mc, tp=TPGroup(plan))
        report = load_hf_weights(shard, path)
        assert all(len(reads) == 1 for reads in report.reads.values()), "a tensor was read more than once"
        assert set(report.reads) == set(full_report.reads)
        for name, shape in _shard_shapes(mc, plan).items():
            assert report.reads[name] == [shape], name
        # The shard holds exactly the whole model's weights at its ranges.
        torch.testing.assert_close(shard.layers[1].o_proj, whole.layers[1].o_proj[:, plan.q_rows], rtol=0, atol=0)
        torch.testing.assert_close(shard.layers[1].down_proj, whole.layers[1].down_proj[:, plan.inter_rows],
                                   rtol=0, atol=0)
        rows = plan.vocab[1] - plan.vocab[0]
        torch.testing.assert_close(shard.embed_tokens[:rows], whole.embed_tokens[plan.vocab_rows], rtol=0, atol=0)
        assert not shard.embed_tokens[rows:].any()  # the padding rows
        bytes_by_rank.append(report.bytes_read)
    replicated = sum(reads[0][0] * 4 for name, reads in full_report.reads.items() if "norm" in name)
    if mc.num_kv_heads >= 2:  # every split tensor read once over both ranks, the norms once per rank
        assert sum(bytes_by_rank) == full_report.bytes_read + replicated
    else:  # one KV head: both ranks read the whole k and v (and their biases)
        kv = sum(reads[0][0] * (reads[0][1] if len(reads[0]) > 1 else 1) * 4
                 for name, reads in full_report.reads.items() if ".k_proj." in name or ".v_proj." in name)
        assert sum(bytes_by_rank) == full_report.bytes_read + replicated + kv


def test_sizes_that_cannot_split_the_model_are_refused() -> None:
    mc = preset("llama3-8b")
    with pytest.raises(ConfigError, match="does not divide the 32 attention heads.*sizes that split"):
        ShardPlan.of(mc, 0, 3)
    plan = ShardPlan.of(mc, 15, 16)  # 8 KV heads over 16 ranks: each replicated on two
    assert plan.num_kv_heads == 1 and plan.kv_heads == (7, 8) and plan.heads == (30, 32)
    with pytest.raises(ConfigError, match="tensor-parallel-size must be >= 1"):
        EngineConfig(tensor_parallel_size=0)


# -- served: `servescope serve -tp 2` ----------------------------------------------------------------

def _start_server(*extra: str) -> tuple[subprocess.Popen, str]:
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "servescope", "serve", "-tp", "2", "--device", "cpu", "--port", str(port),
         "--num-kv-blocks", "512", *extra],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + SERVER_START_S
    while time.monotonic() < deadline:
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                return proc, url
        except httpx.TransportError:
            time.sleep(0.2)
        if proc.poll() is not None:
            pytest.fail(proc.stdout.read().decode())
    proc.kill()
    pytest.fail(f"`servescope serve -tp 2` did not answer /health within {SERVER_START_S:.0f} s")


def test_served_two_ranks_answer_and_stop_together_on_ctrl_c() -> None:
    proc, url = _start_server()
    try:
        state = httpx.get(url + "/internal/engine").json()
        assert state["tensor_parallel_size"] == 2 and len(state["tp_worker_pids"]) == 1
        body = {"prompt": "the quick brown fox", "max_tokens": 16, "temperature": 0, "ignore_eos": True}
        answer = httpx.post(url + "/v1/completions", json=body, timeout=60).json()
        assert answer["usage"]["completion_tokens"] == 16 and answer["choices"][0]["text"]
        metrics = httpx.get(url + "/metrics").text
        assert 'servescope:rank_step_seconds_count{engine="servescope-reference",model_name="tiny",rank="0"}' in metrics
        # the other ranks' step times reach rank 0 in batches, a little after the steps
        wait_until(lambda: 'rank="1"' in httpx.get(url + "/metrics").text, 10, "rank 1's step times in /metrics")
        pids = [state["pid"], *state["tp_worker_pids"]]
        proc.send_signal(signal.SIGINT)
        assert proc.wait(30) == 0
        wait_until(lambda: all(process_gone(pid) for pid in pids), 15, "every rank to exit")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)


def test_a_dying_rank_gives_503_and_exit_1_with_its_error() -> None:
    proc, url = _start_server()
    try:
        rank1 = httpx.get(url + "/internal/engine").json()["tp_worker_pids"][0]
        result: dict = {}

        def long_request() -> None:
            body = {"prompt": "a long answer", "max_tokens": 4000, "temperature": 0, "ignore_eos": True}
            result["response"] = httpx.post(url + "/v1/completions", json=body, timeout=120)

        client = threading.Thread(target=long_request)
        client.start()
        wait_until(lambda: httpx.get(url + "/internal/engine").json()["running"] == 1, 30, "the request to run")
        os.kill(rank1, signal.SIGKILL)
        client.join(60)
        response = result["response"]
        assert response.status_code == 503, response.text
        assert "tensor-parallel rank 1" in response.json()["error"]["message"]
        assert proc.wait(30) == 1
        output = proc.stdout.read().decode()
        assert "tensor-parallel rank 1" in output and "SIGKILL" in output
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)



def test_rank_exit_is_seen_without_pidfds(monkeypatch) -> None:
    """Where the kernel has no pidfd_open (gVisor), a rank's exit still wakes the watchdog's select."""
    import select

    from servescope.reference_engine.tp_workers import _Process

    def no_pidfds(pid: int) -> int:
        raise OSError("pidfd_open is not implemented here")

    monkeypatch.setattr(os, "pidfd_open", no_pidfds)
    process = _Process(subprocess.Popen([sys.executable, "-c", "import time; time.sleep(0.3)"]))
    assert select.select([process.sentinel], [], [], 0.0)[0] == []
    assert select.select([process.sentinel], [], [], 10.0)[0] == [process.sentinel]
    assert process.exitcode == 0
