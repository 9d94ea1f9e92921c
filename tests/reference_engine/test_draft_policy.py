"""Speculation that never loses: the drafting decision from acceptance and measured step times.

The decision functions get given timings here; the engine tests run the real tiny engine with its
measured step times replaced by a given profile (a step's seconds as a function of its kind and
token count), so what they check does not depend on how busy this machine is.
"""

from __future__ import annotations

import pytest

from servescope.reference_engine.config import SpecConfig
from servescope.reference_engine.draft_policy import (
    PLAIN,
    SPEC,
    Acceptance,
    DraftCandidate,
    StepTimes,
    drafting_can_pay,
    expected_accepted,
    plan_drafts,
)
from servescope.reference_engine.sequence import SamplingParams


def _times(plain, spec=None, sizes=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 640, 1024)) -> StepTimes:
    """A step-time table measured from profiles: seconds as a function of the step's token count."""
    times = StepTimes()
    for tokens in sizes:
        for _ in range(3):  # the first sample of a bucket is dropped as warm-up
            times.observe(PLAIN, tokens, plain(tokens))
            if spec is not None:
                times.observe(SPEC, tokens, spec(tokens))
    return times


# A GPU at small batch: a step reads all the weights whatever its size; a step with drafts costs a
# fixed 20% more (it cannot replay the decode graph). A compute-bound device: every token costs.
MEMORY_BOUND = dict(plain=lambda n: 4.4e-3 + 2e-6 * n, spec=lambda n: 5.3e-3 + 2e-6 * n)
COMPUTE_BOUND = dict(plain=lambda n: 1e-3 + 1e-4 * n, spec=lambda n: 1.2e-3 + 1e-4 * n)


def _candidates(rate: float, count: int, room: int = 4) -> list[DraftCandidate]:
    return [DraftCandidate(i, rate, room) for i in range(count)]


def test_acceptance_rate_is_accepted_over_accepted_plus_rejections() -> None:
    acc = Acceptance()
    assert acc.rate(prior=0.3) == pytest.approx(0.3)  # no history: the prior
    for _ in range(20):
        acc.record(drafted=4, accepted=1)  # one accepted, then a rejection
    assert acc.rate(prior=0.5, weight=0.0) == pytest.approx(0.5)
    for _ in range(20):
        acc.record(drafted=4, accepted=4)  # fully accepted drafts add no rejection
    assert acc.rate(prior=0.5) > 0.95
    assert expected_accepted(0.5, 3) == pytest.approx(0.5 + 0.25 + 0.125)


def test_step_times_interpolate_and_extend_the_measured_sizes() -> None:
    times = _times(lambda n: 1e-3 * n, sizes=(16, 64))
    assert times.estimate(PLAIN, 16) == pytest.approx(16e-3)
    assert times.estimate(PLAIN, 40) == pytest.approx(40e-3, rel=0.05)
    assert times.estimate(PLAIN, 128) == pytest.approx(128e-3, rel=0.05)  # the last slope, extended
    assert times.estimate(PLAIN, 4) == pytest.approx(16e-3)  # below the smallest: no cheaper than it
    assert times.estimate(SPEC, 16) is None
    fresh = StepTimes()
    fresh.observe(PLAIN, 8, 5.0)  # a first sample (compiles, allocations) is not a measurement
    assert not fresh.measured(PLAIN, 8) and fresh.estimate(PLAIN, 8) is None


def test_batch_cutoff_comes_from_the_measured_step_times() -> None:
    """The same high acceptance drafts at every batch size where verification is nearly free, and
    stops at the batch size where the measured step times say it costs more than it saves."""
    memory, compute = _times(**MEMORY_BOUND), _times(**COMPUTE_BOUND)
    for batch in (1, 8, 128):
        assert plan_drafts(_candidates(0.8, batch), batch, 0, memory) == {i: 4 for i in range(batch)}
    assert plan_drafts(_candidates(0.8, 1), 1, 0, compute)  # one stream: the step's fixed cost dominates
    cutoff = next(b for b in range(1, 200) if not plan_drafts(_candidates(0.8, b), b, 0, compute))
    assert 2 <= cutoff < 128
    assert not plan_drafts(_candidates(0.8, 128), 128, 0, compute)
    assert not drafting_can_pay(128, 0, 4 * 128, _times(plain=lambda n: 1e-3 + 1e-4 * n,
                                                        spec=lambda n: 1e-3 + 6e-4 * n))


def test_low_acceptance_drafts_nothing_and_each_request_gets_its_own_length() -> None:
    memory, compute = _times(**MEMORY_BOUND), _times(**COMPUTE_BOUND)
    assert plan_drafts(_candidates(0.02, 1), 1, 0, memory) == {}  # 21% dearer steps for 2% acceptance
    assert plan_drafts(_candidates(0.02, 128), 128, 0, compute) == {}
    mixed = [DraftCandidate(0, 0.9, 4), DraftCandidate(1, 0.05, 4), DraftCandidate(2, 0.9, 2)]
    plan = plan_drafts(mixed, 3, 0, compute)
    assert plan == {0: 4, 2: 2}  # the failing request drafts nothing; room caps the third
    # Medium acceptance on the compute-bound profile: the draft length shrinks to what pays.
    medium = plan_drafts(_candidates(0.5, 4), 4, 0, compute)
    assert medium and all(1 <= k < 4 for k in medium.values())


def test_unmeasured_sizes_are_explored_plain_first() -> None:
    empty = StepTimes()
    assert plan_drafts(_candidates(0.9, 4), 4, 0, empty) == {}  # plain first: drafting is judged against it
    plain_only = _times(plain=MEMORY_BOUND["plain"])
    assert plan_drafts(_candidates(0.9, 4), 4, 0, plain_only) == {i: 4 for i in range(4)}  # then try spec


# -- the engine, with a given step-time profile ----------------------------------------------------
def _profiled(engine, profile: dict) -> None:
    """Replace the engine's measured step seconds with the profile's, keeping everything else real."""
    drafter = engine.drafter
    measured = drafter.step_timed

    def timed(drafted: bool, tokens: int, other_tokens: int, seconds: float) -> None:
        measured(drafted, tokens, other_tokens, profile["spec" if drafted else "plain"](tokens))

    drafter.step_timed = timed


def _repeating(seed: int) -> list[int]:
    """A prompt of a two-token pattern: the tiny model's greedy continuation repeats it."""
    a, b = 100 + seed, 2000 + 7 * seed
    return [a, b] * 48


def _random(seed: int, n: int = 96) -> list[int]:
    import torch

    return torch.randint(10, 8192, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


GREEDY = SamplingParams(max_tokens=64, temperature=0, ignore_eos=True)


def test_failing_drafts_stop_while_accepted_ones_go_on_and_gain(engine_factory) -> None:
    plain = engine_factory()
    # Under the fixed policy the two random prompts' drafts are accepted 0 of 28 and 1 of 19 times.
    prompts = [_random(1), _repeating(1), _random(6)]
    expected = [s.output_token_ids for s in plain.generate(prompts, GREEDY)]
    engine = engine_factory(spec=SpecConfig(k=4, n=3))
    _profiled(engine, COMPUTE_BOUND)
    seqs = engine.generate(prompts, GREEDY)
    assert [s.output_token_ids for s in seqs] == expected  # greedy: identical with speculation on
    failing, repeating, other = seqs
    assert repeating.spec_accepted_tokens >= 40 and repeating.spec_accepted_tokens >= 0.9 * repeating.spec_draft_tokens
    for seq in (failing, other):
        assert seq.spec_draft_tokens <= 12, "a request whose drafts fail stops drafting"
        assert seq.draft_acceptance.rate(0.5) < 0.3
    alone = engine_factory(spec=SpecConfig(k=4, n=3))
    _profiled(alone, COMPUTE_BOUND)
    alone.generate([prompts[1]], GREEDY)
    assert alone.num_steps < 32  # 64 tokens in under half the steps: the accepted drafts gain
    assert engine.block_manager.num_free_blocks == engine.num_blocks


def test_large_batch_stops_drafting_when_the_profile_says_verification_costs_more(engine_factory) -> None:
    prompts = [[100 + i, 3000 + 11 * i] * 24 for i in range(24)]
    params = SamplingParams(max_tokens=40, temperature=0, ignore_eos=True)
    # Each verified token as dear as a decode (compute-bound), a drafted step 20% dearer: at 24
    # decodes drafting cannot pay even for drafts that are all accepted.
    steep = dict(plain=lambda n: 1e-4 + 1e-4 * n, spec=lambda n: 1.2e-4 + 3e-4 * n)
    engine = engine_factory(spec=SpecConfig(k=4, n=3))
    _profiled(engine, steep)
    engine.generate(prompts, params)
    large = engine.scheduler.spec_draft_tokens
    cheap = engine_factory(spec=SpecConfig(k=4, n=3))
    _profiled(cheap, MEMORY_BOUND)
    cheap.generate(prompts, params)
    assert cheap.scheduler.spec_accepted_tokens > 100
    # The steep profile's drafted step is tried twice (its first sample is a warm-up), then never again
    # in this run; the cheap profile drafts on.
    assert large <= 2 * len(prompts) * 4 < cheap.scheduler.spec_draft_tokens / 2


def test_fixed_policy_drafts_every_step(engine_factory) -> None:
    engine = engine_factory(spec=SpecConfig(k=4, n=3, adaptive=False))
    seqs = engine.generate([_random(3)], SamplingParams(max_tokens=32, temperature=0, ignore_eos=True))
    assert seqs[0].spec_draft_tokens > 0
    assert SpecConfig.parse("ngram:k=4,adaptive=0") == SpecConfig(k=4, adaptive=False)
    assert SpecConfig.parse("ngram:k=2") == SpecConfig(k=2, adaptive=True)
