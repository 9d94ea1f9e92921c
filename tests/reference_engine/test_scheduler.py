"""Continuous batching end to end on the tiny engine: preemption, chunking, convoy mode, prefix cache, spec decode."""

from __future__ import annotations

from servescope.reference_engine.config import SpecConfig
from servescope.reference_engine.sequence import SamplingParams


def _prompts(engine, count: int, words: int = 12) -> list[list[int]]:
    return [engine.tokenizer.encode(" ".join(f"item{i}x{j}" for j in range(words))) for i in range(count)]


GREEDY = SamplingParams(max_tokens=40, temperature=0, ignore_eos=True)


def test_tiny_kv_budget_preempts_yet_every_request_finishes_with_the_same_output(engine_factory) -> None:
    roomy = engine_factory()
    prompts = _prompts(roomy, 8)
    expected = [s.output_token_ids for s in roomy.generate(prompts, GREEDY)]
    assert roomy.scheduler.num_preemptions == 0

    tight = engine_factory(num_kv_blocks=14, block_size=16)  # 8 requests x ~5 blocks each do not fit
    seqs = tight.generate(prompts, GREEDY)
    assert tight.scheduler.num_preemptions > 0
    assert sum(s.num_preemptions for s in seqs) == tight.scheduler.num_preemptions
    assert [s.output_token_ids for s in seqs] == expected
    assert all(s.finish_reason == "length" for s in seqs)
    assert tight.block_manager.num_free_blocks == tight.num_blocks


def test_chunked_prefill_splits_long_prompts_and_keeps_decoding(engine_factory) -> None:
    engine = engine_factory(max_num_batched_tokens=64)
    short = engine.add_request(_prompts(engine, 1, 3)[0], SamplingParams(max_tokens=30, temperature=0, ignore_eos=True))
    engine.step()  # short prefilled, now decoding
    long = engine.add_request(_prompts(engine, 1, 120)[0], SamplingParams(max_tokens=2, temperature=0))
    steps_with_both = 0
    while not long.finished:
        before = short.num_output_tokens
        out = engine.scheduler.schedule()
        assert out.num_tokens <= 64
        logits, requests = engine.runner.run(out)
        engine.scheduler.postprocess(out, engine.sampler.sample(logits, requests) if requests else [])
        if any(s.seq is long and not s.is_decode for s in out.scheduled) and not short.finished:
            steps_with_both += 1
            assert short.num_output_tokens == before + 1  # the decode ran in the same step as the chunk
    assert steps_with_both >= 3


def test_without_chunked_prefill_a_prompt_runs_whole_and_alone(engine_factory) -> None:
    engine = engine_factory(max_num_batched_tokens=64, chunked_prefill=False)
    short = engine.add_request(_prompts(engine, 1, 3)[0], SamplingParams(max_tokens=30, temperature=0, ignore_eos=True))
    engine.step()
    long_prompt = _prompts(engine, 1, 120)[0]
    assert len(long_prompt) > 64
    engine.add_request(long_prompt, SamplingParams(max_tokens=2, temperature=0))
    out = engine.scheduler.schedule()
    assert [s.num_new_tokens for s in out.scheduled] == [len(long_prompt)]  # whole prompt, no decode beside it
    assert short not in [s.seq for s in out.scheduled]


def test_prefix_cache_reports_cached_tokens_per_tenant(engine_factory) -> None:
    engine = engine_factory()
    shared = engine.tokenizer.encode(" ".join(f"shared{j}" for j in range(40)))
    params = SamplingParams(max_tokens=4, temperature=0)
    first = engine.generate([shared + [100, 101]], params, tenants=["t1"])[0]
    again = engine.generate([shared + [200, 201, 202]], params, tenants=["t1"])[0]
    other = engine.generate([shared + [200, 201, 202]], params, tenants=["t2"])[0]
    assert first.num_cached_tokens == 0
    assert again.num_cached_tokens == (len(shared) + 2) // 16 * 16 > 0
    assert other.num_cached_tokens == 0
    # Cached or not, the output is the same computation.
    assert again.output_token_ids == other.output_token_ids


def test_ngram_speculation_keeps_greedy_output_and_counts_acceptance(engine_factory) -> None:
    plain = engine_factory()
    prompts = [plain.tokenizer.encode("one two three four five " * 6 + "one two"), _prompts(plain, 1)[0]]
    params = SamplingParams(max_tokens=48, temperature=0, ignore_eos=True)
    expected = [s.output_token_ids for s in plain.generate(prompts, params)]
    spec = engine_factory(spec=SpecConfig(k=4, n=3))
    seqs = spec.generate(prompts, params)
    assert [s.output_token_ids for s in seqs] == expected
    assert spec.scheduler.spec_draft_tokens == sum(s.spec_draft_tokens for s in seqs) > 0
    assert 0 < spec.scheduler.spec_accepted_tokens <= spec.scheduler.spec_draft_tokens
    assert spec.num_steps < plain.num_steps  # accepted drafts save steps
    assert spec.block_manager.num_free_blocks == spec.num_blocks


def test_sampling_is_seeded_and_honours_stop_min_tokens_and_eos(engine_factory) -> None:
    engine = engine_factory()
    prompt = _prompts(engine, 1)[0]
    sampled = SamplingParams(max_tokens=24, temperature=0.9, top_p=0.9, top_k=50, seed=1234, ignore_eos=True)
    a = engine.generate([prompt], sampled)[0].output_token_ids
    b = engine.generate([prompt, _prompts(engine, 2)[1]], sampled)[0].output_token_ids  # batch-independent
    assert a == b
    greedy_text = engine.tokenizer.decode(engine.generate([prompt], GREEDY)[0].output_token_ids)
    stop = greedy_text[10:14]
    seq = engine.add_request(prompt, SamplingParams(max_tokens=40, temperature=0, stop=(stop,), ignore_eos=True))
    texts = []
    while not seq.finished:
        texts.extend(o.text for o in engine.step() if o.seq is seq)
    assert seq.finish_reason == "stop"
    assert "".join(texts) == greedy_text[:greedy_text.index(stop)]
    nucleus_of_one = SamplingParams(max_tokens=24, temperature=1.0, top_p=1e-6, ignore_eos=True)
    assert engine.generate([prompt], nucleus_of_one)[0].output_token_ids == \
        engine.generate([prompt], SamplingParams(max_tokens=24, temperature=0, ignore_eos=True))[0].output_token_ids
    eos = engine.tokenizer.eos_token_ids[0]
    forced = engine.generate([prompt], SamplingParams(max_tokens=5, min_tokens=5, temperature=0))[0]
    assert eos not in forced.output_token_ids and forced.num_output_tokens == 5
