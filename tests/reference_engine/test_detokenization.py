"""Streamed text: every sampled token carries text, even ids past the tokenizer's vocabulary."""

from __future__ import annotations

import shutil
from pathlib import Path

import torch

from servescope.reference_engine.sequence import SamplingParams
from servescope.reference_engine.tokenization import EngineTokenizer, IncrementalDetokenizer
from servescope.reference_engine.tokenizer import TOKENIZER_DIR


def test_ids_past_the_vocabulary_stream_the_text_of_id_mod_vocabulary() -> None:
    tok = EngineTokenizer(TOKENIZER_DIR)
    vocab = tok.vocab_size
    words = tok.encode(" paged attention keeps blocks", add_special_tokens=False)
    # The same words, once as themselves and once as ids 1 and 3 vocabularies further on.
    plain = IncrementalDetokenizer(tok, [], ())
    folded = IncrementalDetokenizer(tok, [], ())
    expected = "".join(plain.push([t])[0] for t in words)
    pieces = [folded.push([t + vocab * (1 + 2 * (i % 2))])[0] for i, t in enumerate(words)]
    assert "".join(pieces) == expected == tok.decode(words)
    assert all(pieces), pieces  # one piece of text per token, none held back
    assert tok.text_id(vocab - 1) == vocab - 1 and tok.text_id(vocab + 5) == 5


def test_a_model_wider_than_its_tokenizer_streams_text_every_step(tmp_path: Path) -> None:
    """A checkpoint with 3x the tokenizer's rows whose head favours the extra rows (as random llama3
    presets do by chance, 15 ids in 16): every step's output still has text."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from servescope.reference_engine.config import EngineConfig
    from servescope.reference_engine.engine import LLMEngine

    vocab = EngineTokenizer(TOKENIZER_DIR).vocab_size
    config = LlamaConfig(vocab_size=3 * vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=256,
                         tie_word_embeddings=False, bos_token_id=0, eos_token_id=1)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for param in model.parameters():
            param.normal_(0.0, 0.2)
        model.lm_head.weight[:vocab] = 0.0  # the tokenizer's own ids score 0; the rest win every step
    model.save_pretrained(tmp_path, safe_serialization=True)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(TOKENIZER_DIR / name, tmp_path / name)

    engine = LLMEngine.build(EngineConfig(num_kv_blocks=64, max_num_batched_tokens=128), model_path=str(tmp_path))
    prompt = engine.tokenizer.encode("wide heads still stream")
    seq = engine.add_request(prompt, SamplingParams(max_tokens=12, temperature=0, ignore_eos=True))
    texts = []
    while engine.has_unfinished():
        texts += [out.text for out in engine.step() if out.seq is seq]
    assert len(seq.output_token_ids) == 12
    assert all(t >= vocab for t in seq.output_token_ids), seq.output_token_ids
    assert len(texts) == 12 and all(texts), texts
