"""The stop rules (`sequence.stop_reason`), which the host step and the overlapped step both apply."""

from __future__ import annotations

from servescope.reference_engine.sequence import SamplingParams, Sequence, stop_reason

EOS = frozenset({2})
PROMPT = [10, 11, 12]


def _seq(outputs: list[int], **params) -> Sequence:
    seq = Sequence(list(PROMPT), SamplingParams(**params))
    seq.token_ids += outputs
    return seq


def _last(seq: Sequence, max_model_len: int | None = None, stop_string: bool = False) -> str | None:
    return stop_reason(seq, seq.num_tokens, EOS, max_model_len, stop_string)


def test_max_tokens_comes_first() -> None:
    assert _last(_seq([5, 6], max_tokens=2)) == "length"
    assert _last(_seq([5, 2], max_tokens=2)) == "length"  # EOS on the last allowed token: still length
    assert _last(_seq([5, 6], max_tokens=3)) is None


def test_eos_stops_unless_ignored_or_before_min_tokens() -> None:
    assert _last(_seq([5, 2], max_tokens=8)) == "stop"
    assert _last(_seq([5, 2], max_tokens=8, ignore_eos=True)) is None
    assert _last(_seq([5, 2], max_tokens=8, min_tokens=3)) is None
    assert _last(_seq([5, 2], max_tokens=8, min_tokens=2)) == "stop"


def test_the_context_limit_comes_after_eos() -> None:
    assert _last(_seq([5, 6], max_tokens=8), max_model_len=5) == "length"
    assert _last(_seq([5, 2], max_tokens=8), max_model_len=5) == "stop"
    assert _last(_seq([5, 6], max_tokens=8), max_model_len=6) is None
    assert _last(_seq([5, 6], max_tokens=8), max_model_len=None) is None


def test_a_stop_string_ends_only_what_no_token_rule_ended() -> None:
    assert _last(_seq([5, 6], max_tokens=8), stop_string=True) == "stop"
    assert _last(_seq([5, 6], max_tokens=2), stop_string=True) == "length"
    assert _last(_seq([5, 6], max_tokens=8), max_model_len=5, stop_string=True) == "length"


def test_the_token_judged_is_the_one_at_num_tokens() -> None:
    """The overlapped step judges a token while a placeholder (not sampled yet) follows it."""
    seq = _seq([2, -1], max_tokens=8)
    assert stop_reason(seq, 4, EOS, None) == "stop"
    assert stop_reason(seq, 5, EOS, None) is None  # a placeholder is never EOS
    assert stop_reason(_seq([2, -1], max_tokens=2), 5, EOS, None) == "length"  # a length is known ahead
