"""The engine's model gives the same logits as transformers' LlamaForCausalLM for the same weights,
through the engine's own loader, paged cache, chunked prefill and step-by-step decode."""

from __future__ import annotations

import torch

from servescope.reference_engine.config import EngineConfig, model_config_from_hf
from servescope.reference_engine.engine import LLMEngine
from servescope.reference_engine.sequence import SamplingParams
from servescope.reference_engine.tokenization import EngineTokenizer


def _engine(checkpoint, **overrides) -> LLMEngine:
    config = EngineConfig(block_size=4, num_kv_blocks=64, dtype="float32", **overrides)
    return LLMEngine(model_config_from_hf(checkpoint), config, EngineTokenizer(checkpoint), checkpoint_dir=checkpoint)


def _step_with_all_logits(engine: LLMEngine):
    """engine.step(), but keeping the logits of every row of the step (not just the sampled ones)."""
    out = engine.scheduler.schedule()
    input_ids, positions, meta, rows, requests = engine.runner.prepare(out)
    with torch.inference_mode():
        hidden = engine.model(engine.ops, input_ids, positions, engine.runner.kv_caches, meta)
        logits = engine.model.compute_logits(hidden)
    sampled = engine.sampler.sample(logits[rows].clone(), requests) if requests else []
    engine.scheduler.postprocess(out, sampled)
    return out, logits


def _hf_logits(checkpoint, token_ids: list[int]) -> torch.Tensor:
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(checkpoint, torch_dtype=torch.float32).eval()
    with torch.no_grad():
        return model(torch.tensor([token_ids])).logits[0]


def test_chunked_prefill_and_decode_match_transformers(hf_checkpoint) -> None:
    engine = _engine(hf_checkpoint, max_num_batched_tokens=8)  # 19-token prompt -> chunks of 8, 8, 3
    prompt = engine.tokenizer.encode("Paged attention keeps the KV cache in fixed-size blocks, nothing more.")[:19]
    assert len(prompt) == 19
    seq = engine.add_request(prompt, SamplingParams(max_tokens=6, temperature=0, ignore_eos=True))
    prefill_logits = []
    decode_logits = []
    while not seq.finished:
        out, logits = _step_with_all_logits(engine)
        if out.scheduled[0].is_decode:
            decode_logits.append(logits[0])
        else:
            prefill_logits.append(logits)
    full = seq.token_ids
    reference = _hf_logits(hf_checkpoint, full)
    torch.testing.assert_close(torch.cat(prefill_logits), reference[:19], atol=2e-4, rtol=1e-4)
    torch.testing.assert_close(torch.stack(decode_logits), reference[19:len(full) - 1], atol=2e-4, rtol=1e-4)
    # Greedy output is the argmax chain of the reference model.
    assert seq.output_token_ids == reference[18:len(full) - 1].argmax(-1).tolist()
    assert engine.block_manager.num_free_blocks == engine.num_blocks


def test_batched_decode_of_unequal_sequences_matches_transformers(hf_checkpoint) -> None:
    engine = _engine(hf_checkpoint)
    tok = engine.tokenizer
    prompts = [tok.encode("short one"), tok.encode("a noticeably longer prompt that spans several blocks of four")]
    seqs = engine.generate(prompts, SamplingParams(max_tokens=5, temperature=0, ignore_eos=True))
    for seq in seqs:
        reference = _hf_logits(hf_checkpoint, seq.token_ids)
        expected = reference[seq.num_prompt_tokens - 1:-1].argmax(-1).tolist()
        assert seq.output_token_ids == expected


def test_qwen2_bias_and_tied_head_match_transformers(hf_qwen2_checkpoint) -> None:
    from transformers import Qwen2ForCausalLM

    engine = _engine(hf_qwen2_checkpoint)
    assert engine.model_config.attention_bias and engine.model_config.tie_word_embeddings
    prompt = engine.tokenizer.encode("bias terms on q, k and v")
    seq = engine.generate([prompt], SamplingParams(max_tokens=6, temperature=0, ignore_eos=True))[0]
    model = Qwen2ForCausalLM.from_pretrained(hf_qwen2_checkpoint, torch_dtype=torch.float32).eval()
    with torch.no_grad():
        reference = model(torch.tensor([seq.token_ids])).logits[0]
    assert seq.output_token_ids == reference[len(prompt) - 1:-1].argmax(-1).tolist()
