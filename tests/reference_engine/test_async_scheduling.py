"""The overlapped step loop (async scheduling, the GPU default) gives the host loop's results on the CPU.

Step N+1 is scheduled before step N's tokens reach the host: inputs are placeholders gathered from
the previous step's sampled ids, stops are applied one step late and the extra token is dropped.
Every case here compares it with the plain synchronous loop on the same tiny model.
"""

from __future__ import annotations

import pytest
import torch

from servescope.reference_engine.config import EngineConfig, SpecConfig
from servescope.reference_engine.sampler import DeviceSampler, SampleRequest
from servescope.reference_engine.sequence import SamplingParams, Sequence

LENGTHS = [3, 20, 60, 9, 33]
MAX_TOKENS = [24, 5, 17, 1, 30]


def _prompts(engine) -> list[list[int]]:
    return [engine.tokenizer.encode(" ".join(f"p{i}w{j}" for j in range(n))) for i, n in enumerate(LENGTHS)]


def _greedy(**extra) -> list[SamplingParams]:
    return [SamplingParams(max_tokens=m, temperature=0, **extra) for m in MAX_TOKENS]


def _run(engine_factory, params, eos: int | None = None, **overrides):
    engine = engine_factory(**overrides)
    if eos is not None:  # make a token the model emits mid-way act as EOS
        engine.eos_token_ids = (eos,)
        engine.scheduler.eos_token_ids = frozenset({eos})
    seqs = engine.generate(_prompts(engine), params)
    assert engine.block_manager.num_free_blocks == engine.num_blocks
    assert not engine.has_unfinished()
    return engine, seqs


def _summary(seqs):
    return [(s.output_token_ids, s.finish_reason) for s in seqs]


@pytest.mark.parametrize("overrides", [
    {},
    {"num_kv_blocks": 24},  # preemption (recompute) while tokens are in flight
    {"max_num_batched_tokens": 16},  # chunked prefill beside decodes
    {"chunked_prefill": False},
    {"enable_prefix_caching": False},
])
def test_greedy_matches_the_host_loop(engine_factory, overrides) -> None:
    sync, expected = _run(engine_factory, _greedy(ignore_eos=True), **overrides)
    engine, seqs = _run(engine_factory, _greedy(ignore_eos=True), async_scheduling=True, **overrides)
    assert _summary(seqs) == _summary(expected)
    assert engine.scheduler.num_preemptions == sync.scheduler.num_preemptions
    assert engine.generation_tokens_total == sync.generation_tokens_total == sum(len(s.output_token_ids) for s in seqs)
    assert engine.prompt_tokens_total == sync.prompt_tokens_total


def test_eos_min_tokens_and_stop_strings_match(engine_factory) -> None:
    _, free_run = _run(engine_factory, _greedy(ignore_eos=True))
    eos = free_run[0].output_token_ids[6]  # emitted mid-way by the first request
    for params in (_greedy(), _greedy(min_tokens=1), [SamplingParams(max_tokens=m, temperature=0, min_tokens=min(m, 8))
                                                      for m in MAX_TOKENS]):
        _, expected = _run(engine_factory, params, eos=eos)
        _, seqs = _run(engine_factory, params, eos=eos, async_scheduling=True)
        assert _summary(seqs) == _summary(expected)
    assert any(s.finish_reason == "stop" for s in expected)
    engine = engine_factory()
    stop_text = engine.tokenizer.decode(free_run[2].output_token_ids[4:6])
    params = [SamplingParams(max_tokens=m, temperature=0, ignore_eos=True, stop=(stop_text,)) for m in MAX_TOKENS]
    _, expected = _run(engine_factory, params)
    _, seqs = _run(engine_factory, params, async_scheduling=True)
    assert _summary(seqs) == _summary(expected)
    assert expected[2].finish_reason == "stop"


def test_streamed_outputs_match(engine_factory) -> None:
    """Per-request token streams, texts, first flags and the finished flag arrive as in the host loop."""

    def stream(engine):
        seqs = [engine.add_request(p, sp) for p, sp in zip(_prompts(engine), _greedy(ignore_eos=True))]
        got = {s.seq_id: [] for s in seqs}
        while engine.has_unfinished():
            for out in engine.step():
                got[out.seq.seq_id].append((out.token_ids, out.text, out.finished, out.finish_reason, out.first))
        return [got[s.seq_id] for s in seqs]

    expected = stream(engine_factory())
    got = stream(engine_factory(async_scheduling=True))
    assert [[(t, x, f, r, first) for t, x, f, r, first in s] for s in got] == expected


def test_seeded_and_sampled_requests(engine_factory) -> None:
    """Seeded requests use the host sampler (same tokens as the host loop); unseeded ones sample on the device."""
    seeded = [SamplingParams(max_tokens=m, temperature=0.9, top_p=0.9, seed=7 + i, ignore_eos=True)
              for i, m in enumerate(MAX_TOKENS)]
    _, expected = _run(engine_factory, seeded)
    _, seqs = _run(engine_factory, seeded, async_scheduling=True)
    assert _summary(seqs) == _summary(expected)
    free = [SamplingParams(max_tokens=m, temperature=1.0, top_k=50, ignore_eos=True) for m in MAX_TOKENS]
    engine, seqs = _run(engine_factory, free, async_scheduling=True)
    assert [len(s.output_token_ids) for s in seqs] == MAX_TOKENS
    assert all(0 <= t < engine.model_config.vocab_size for s in seqs for t in s.output_token_ids)


def test_abort_with_a_token_in_flight(engine_factory) -> None:
    engine = engine_factory(async_scheduling=True)
    prompts = _prompts(engine)
    seqs = [engine.add_request(p, SamplingParams(max_tokens=20, temperature=0, ignore_eos=True)) for p in prompts]
    for _ in range(4):
        engine.step()
    engine.abort(seqs[1])
    delivered = []
    while engine.has_unfinished():
        delivered += [out.seq for out in engine.step()]
    assert seqs[1] not in delivered and seqs[1].finish_reason == "abort"
    assert all(min(s.token_ids) >= 0 for s in seqs)
    assert engine.block_manager.num_free_blocks == engine.num_blocks


@pytest.mark.parametrize("adaptive", [True, False])
def test_speculation_beside_overlapped_steps_keeps_greedy_output(engine_factory, adaptive) -> None:
    """A step that drafts reads the overlapped step back first; plain steps overlap as without --spec."""
    _, expected = _run(engine_factory, _greedy(ignore_eos=True))
    engine, seqs = _run(engine_factory, _greedy(ignore_eos=True), async_scheduling=True,
                        spec=SpecConfig(k=3, adaptive=adaptive))
    assert _summary(seqs) == _summary(expected)
    assert engine.generation_tokens_total == sum(len(s.output_token_ids) for s in seqs)
    assert engine.scheduler.spec_draft_tokens > 0
    assert all(min(s.token_ids) >= 0 for s in seqs)
    assert EngineConfig(device="cuda", spec=SpecConfig(k=2)).use_async_scheduling
    assert EngineConfig(device="cuda").use_async_scheduling and not EngineConfig().use_async_scheduling


def test_device_sampler_limits() -> None:
    """top_k=1 and a tiny top_p are greedy; min_tokens masks EOS; draws follow softmax(logits / T)."""
    torch.manual_seed(0)
    logits = torch.randn(6, 50) * 3
    sampler = DeviceSampler((3,), torch.device("cpu"), seed=1)

    def requests(**params):
        out = []
        for i in range(logits.shape[0]):
            seq = Sequence([1, 2], SamplingParams(max_tokens=4, **params))
            out.append(SampleRequest(seq, i, []))
        return out

    greedy = logits.argmax(-1)
    assert torch.equal(sampler.sample(logits.clone(), requests(temperature=0.0)), greedy)
    assert torch.equal(sampler.sample(logits.clone(), requests(temperature=1.5, top_k=1)), greedy)
    assert torch.equal(sampler.sample(logits.clone(), requests(temperature=1.0, top_p=1e-6)), greedy)
    forced = logits.clone()
    forced[:, 3] = 100.0
    assert (sampler.sample(forced.clone(), requests(temperature=0.0, min_tokens=2)) != 3).all()
    assert (sampler.sample(forced.clone(), requests(temperature=0.0)) == 3).all()
    # Frequencies of many draws from one row match softmax(row / T).
    row = torch.tensor([[2.0, 1.0, 0.0, -1.0]]).repeat(20000, 1)
    seq = Sequence([1], SamplingParams(max_tokens=4, temperature=0.7))
    draws = DeviceSampler((), torch.device("cpu"), seed=2).sample(row.clone(), [SampleRequest(seq, i, []) for i in range(len(row))])
    freq = torch.bincount(draws, minlength=4).float() / len(row)
    assert torch.allclose(freq, torch.softmax(row[0] / 0.7, -1), atol=0.015)
    # top_k=2 never draws outside the two best.
    seq = Sequence([1], SamplingParams(max_tokens=4, temperature=1.0, top_k=2))
    draws = DeviceSampler((), torch.device("cpu"), seed=3).sample(row[:2000].clone(), [SampleRequest(seq, i, []) for i in range(2000)])
    assert set(draws.tolist()) == {0, 1}


def _top_k_top_p_probs(row: torch.Tensor, temperature: float, top_k: int, top_p: float) -> torch.Tensor:
    """The reference distribution, the plain way: sort, keep the k best, then the smallest prefix
    of those whose mass reaches top_p, renormalize."""
    order = row.argsort(descending=True)
    kept = torch.softmax(row[order][:top_k] / temperature, -1)
    kept = kept.masked_fill((kept.cumsum(-1) - kept) > top_p, 0.0)
    probs = torch.zeros_like(row)
    probs[order[:top_k]] = kept / kept.sum()
    return probs


@pytest.mark.parametrize("top_k,top_p", [(3, 1.0), (4, 0.7), (6, 0.5)])
def test_device_sampler_top_k_selection_draws_the_reference_distribution(top_k, top_p) -> None:
    """Rows that all have top_k go through torch.topk instead of a full sort: the draws still follow
    softmax(row / T) cut to the k best, then to top_p; a batch that mixes top-k and top-p-only
    rows takes the sorting path and keeps each row inside its own set."""
    row = torch.tensor([1.5, -0.5, 2.0, 0.3, 1.0, -2.0, 0.8, 0.0])
    n = 20000
    ks = [top_k, 7]  # rows of one batch with different k: each keeps its own
    requests = [SampleRequest(Sequence([1], SamplingParams(max_tokens=4, temperature=0.9, top_k=ks[i % 2],
                                                           top_p=top_p)), i, []) for i in range(2 * n)]
    draws = DeviceSampler((), torch.device("cpu"), seed=4).sample(row.repeat(2 * n, 1), requests)
    for parity, k in enumerate(ks):
        freq = torch.bincount(draws[parity::2], minlength=len(row)).float() / n
        expected = _top_k_top_p_probs(row, 0.9, k, top_p)
        assert torch.allclose(freq, expected, atol=0.015), (k, freq, expected)
        assert (freq[expected == 0] == 0).all()
    mixed = [SampleRequest(Sequence([1], SamplingParams(max_tokens=4, temperature=0.9, top_k=top_k if i % 2 else 0,
                                                        top_p=top_p if i % 2 else 0.5)), i, [])
             for i in range(400)]
    ids = DeviceSampler((), torch.device("cpu"), seed=5).sample(row.repeat(400, 1), mixed)
    for i, token in enumerate(ids.tolist()):
        support = _top_k_top_p_probs(row, 0.9, top_k if i % 2 else len(row), top_p if i % 2 else 0.5)
        assert support[token] > 0, (i, token)
