"""When to speculate and how far: per-request acceptance, measured step times, and the decision joining them.

Drafting pays only when the tokens it is expected to save outweigh what the
verification costs, and both sides move: acceptance differs per request (a
prompt that repeats itself against one that does not), and what k more tokens
cost a step depends on the batch (nearly nothing for one stream on a GPU,
memory-bound; most of a step at 128 streams, compute-bound), on the device and
on whether the step can be overlapped. So nothing here is a fixed threshold:

- `Acceptance` keeps each request's per-token acceptance rate from its
  verified drafts and, while it does not draft, from shadow proposals checked
  against the tokens it produced anyway (a proposal's first draft matches the
  sampled token with exactly the probability that rejection sampling accepts
  it, so the shadow estimate is the drafted one's).
- `StepTimes` keeps the wall time of steps by kind (`plain`: no drafts,
  `spec`: with drafts) and size (tokens in the step), as the engine measured
  them in this process.
- `plan_drafts` turns both into this step's draft length per request: a draft
  position is worth its verification when its chance of being accepted exceeds
  its marginal cost in units of a plain step's time per token, and the step
  drafts at all only when the tokens it expects beat a plain step's tokens per
  second at the measured times.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field

PLAIN = "plain"
SPEC = "spec"

# Each request's counts decay by this per verification: about the last five drafts speak for it.
REQUEST_DECAY = 0.8
# The engine-wide rate (the prior of a request with little history) remembers more.
POPULATION_DECAY = 0.98
PRIOR_WEIGHT = 2.0  # pseudo-verifications of the population rate in a request's estimate
# A bucket whose kind was not run for this many steps is run once more: costs drift with context
# length and load, and an estimate that is never refreshed could keep a kind off for good.
STALE_STEPS = 256
BUCKETS_PER_OCTAVE = 4  # step sizes are grouped by token count in steps of 2**(1/4)
NEAR_BUCKETS = 2  # a measurement this many buckets away still speaks for a size (no exploring there)
# A step drafts only when it expects this much more throughput than a plain step: step times measured
# on a busy host move by a few percent, and a predicted gain inside that noise is as likely a loss.
MIN_GAIN = 0.02


@dataclass(slots=True)
class Acceptance:
    """Decayed counts of accepted draft tokens and of rejections; rate = accepted / (accepted + rejected).

    With a per-token acceptance chance a and verification stopping at the first rejection, this ratio is
    a's maximum-likelihood estimate (a fully accepted draft adds successes and no rejection)."""

    accepted: float = 0.0
    rejected: float = 0.0
    shadow_at: int = -1  # context length a pending shadow proposal was made at (-1: none)
    shadow: list[int] = field(default_factory=list)

    def record(self, drafted: int, accepted: int, decay: float = REQUEST_DECAY) -> None:
        self.accepted = self.accepted * decay + accepted
        self.rejected = self.rejected * decay + (1.0 if accepted < drafted else 0.0)

    def rate(self, prior: float = 0.5, weight: float = PRIOR_WEIGHT) -> float:
        accepted = self.accepted + weight * prior
        return accepted / (accepted + self.rejected + weight * (1.0 - prior))


def expected_accepted(rate: float, k: int) -> float:
    """Expected accepted tokens of a k-token draft when each is accepted with chance `rate`, in order."""
    return sum(rate ** j for j in range(1, k + 1))


def _bucket(tokens: int) -> int:
    return round(BUCKETS_PER_OCTAVE * math.log2(max(1, tokens)))


def _bucket_tokens(bucket: int) -> float:
    return 2.0 ** (bucket / BUCKETS_PER_OCTAVE)


@dataclass(slots=True)
class _Cell:
    seconds: float
    samples: int
    last_step: int


class StepTimes:
    """Exponentially weighted wall seconds of steps, by kind and by token-count bucket.

    The first sample of a bucket is dropped (a new shape may compile or allocate on first use); an
    estimate between measured buckets interpolates in tokens, above them extends the last slope."""

    def __init__(self, weight: float = 0.2) -> None:
        self.weight = weight
        self.cells: dict[str, dict[int, _Cell]] = {PLAIN: {}, SPEC: {}}
        self.steps = 0
        # Sorted (tokens, seconds) per kind, and the drafted steps' extra over plain ones: rebuilt after
        # an observation, read several times per step by the decision.
        self._cache: dict[str, list[tuple[float, float]]] = {}

    def observe(self, kind: str, tokens: int, seconds: float) -> None:
        self.steps += 1
        self._cache.clear()
        cells = self.cells[kind]
        bucket = _bucket(tokens)
        cell = cells.get(bucket)
        if cell is None:
            cells[bucket] = _Cell(seconds, 0, self.steps)  # warm-up sample: replaced by the next one
        elif cell.samples == 0:
            cells[bucket] = _Cell(seconds, 1, self.steps)
        else:
            cell.seconds += self.weight * (seconds - cell.seconds)
            cell.samples += 1
            cell.last_step = self.steps

    def measured(self, kind: str, tokens: int) -> bool:
        """Whether this kind has a fresh, warmed-up measurement at this size or near it (within 2**(1/2))."""
        bucket = _bucket(tokens)
        return any(cell.samples > 0 and self.steps - cell.last_step <= STALE_STEPS
                   for b, cell in self.cells[kind].items() if abs(b - bucket) <= NEAR_BUCKETS)

    def brackets(self, kind: str, tokens: int) -> bool:
        """Whether this kind was measured at sizes on both sides of this one (an estimate between them
        interpolates; beyond them it extrapolates)."""
        points = self._points(kind)
        return bool(points) and points[0][0] <= tokens <= points[-1][0]

    def fresh(self, kind: str) -> bool:
        """Whether some size of this kind was measured within the last STALE_STEPS steps."""
        return any(c.samples > 0 and self.steps - c.last_step <= STALE_STEPS for c in self.cells[kind].values())

    def estimate(self, kind: str, tokens: int) -> float | None:
        """Seconds of a step of this kind and size, or None when the kind has no measurement."""
        points = self._points(kind)
        if not points:
            return None
        if kind == SPEC:
            return self._spec_estimate(tokens, points)
        return _interpolate(points, float(tokens), extend=True)

    def _points(self, kind: str) -> list[tuple[float, float]]:
        points = self._cache.get(kind)
        if points is None:
            points = self._cache[kind] = sorted((_bucket_tokens(b), c.seconds)
                                                for b, c in self.cells[kind].items() if c.samples > 0)
        return points

    def _spec_estimate(self, tokens: int, spec_points: list[tuple[float, float]]) -> float:
        """A drafted step costs a plain step of as many tokens (a verified token is a token through the
        model, like a prefill token) plus the measured extra of drafting (it runs alone, not overlapped,
        and cannot replay a decode graph), interpolated between the sizes it was measured at."""
        plain = self._points(PLAIN)
        if not plain:
            return _interpolate(spec_points, float(tokens), extend=True)
        extra = self._cache.get("extra")
        if extra is None:
            # Never below zero: a drafted step does a plain step's work and more; a negative extra is noise.
            extra = self._cache["extra"] = [(x, max(0.0, y - _interpolate(plain, x, extend=True)))
                                            for x, y in spec_points]
        return _interpolate(plain, float(tokens), extend=True) + _interpolate(extra, float(tokens), extend=False)


def _interpolate(points: list[tuple[float, float]], x: float, extend: bool) -> float:
    """Piecewise-linear through sorted points; flat below the first, and above the last flat or (extend)
    along the last slope, never down."""
    if x <= points[0][0]:
        return points[0][1]
    for (x0, y0), (x1, y1) in zip(points, points[1:]):
        if x <= x1:
            return y0 + (y1 - y0) * (x - x0) / (x1 - x0)
    if not extend or len(points) == 1:
        return points[-1][1]
    (x0, y0), (x1, y1) = points[-2], points[-1]
    return y1 + max(0.0, (y1 - y0) / (x1 - x0)) * (x - x1)


@dataclass(frozen=True, slots=True)
class DraftCandidate:
    """A decoding request that could draft this step: its acceptance rate and the most drafts it may take."""

    key: int
    rate: float
    room: int


def drafting_can_pay(decodes: int, other_tokens: int, most_drafts: int, times: StepTimes) -> bool:
    """Whether a step could gain from drafting even if every draft were accepted: when it cannot, the
    acceptance of this batch's requests changes nothing, and the drafter need not track it."""
    if decodes <= 0 or most_drafts <= 0:
        return False
    base = decodes + other_tokens
    t_plain = times.estimate(PLAIN, base)
    t_spec = times.estimate(SPEC if times.fresh(SPEC) else PLAIN, base + most_drafts)
    if t_plain is None or t_spec is None:
        return True  # nothing measured yet
    return (decodes + most_drafts) * t_plain > decodes * t_spec


def plan_drafts(candidates: Iterable[DraftCandidate], decodes: int, other_tokens: int,
                times: StepTimes) -> dict[int, int]:
    """Draft length per candidate key for the next step; {} means a plain step (no drafts at all).

    `decodes`: sequences decoding this step (each yields one token without drafts); `other_tokens`:
    the step's other tokens (prefill chunks). A plain step yields `decodes` tokens in T_plain; with
    drafts it computes D more tokens and yields `decodes` + G (G: expected accepted drafts) in
    T_spec. Draft position j of a request (accepted with chance rate**j) is kept when
    rate**j * T_plain / decodes >= the marginal seconds of one more verified token, and the step
    drafts only when (decodes + G) / T_spec > (1 + MIN_GAIN) * decodes / T_plain. Exploring: a plain step
    comes first at a size that no plain step was measured near lately nor on both sides of (drafting is
    judged against it); a drafted step is tried at a plain step's cost while none was measured lately.
    """
    candidates = [c for c in candidates if c.room > 0]
    if not candidates or decodes <= 0:
        return {}
    base = decodes + other_tokens
    if not (times.measured(PLAIN, base) or times.brackets(PLAIN, base)):
        return {}  # measure the plain step first: it is what drafting is judged against
    t_plain = times.estimate(PLAIN, base)
    assert t_plain is not None

    def t_spec(tokens: int, optimistic: bool = False) -> float:
        est = None if optimistic else times.estimate(SPEC, tokens)
        return est if est is not None else times.estimate(PLAIN, tokens)  # type: ignore[return-value]

    most = base + sum(c.room for c in candidates)
    per_token = t_plain / decodes  # what an output token costs in a plain step
    # One more verified token costs what one more token of a plain step does.
    marginal = max(0.0, (times.estimate(PLAIN, most) - t_plain) / max(1, most - base))  # type: ignore[operator]
    plan: dict[int, int] = {}
    gain = 0.0
    for c in candidates:
        k = 0
        while k < c.room and c.rate > 0.0 and c.rate ** (k + 1) * per_token >= marginal:
            k += 1
        if k:
            plan[c.key] = k
            gain += expected_accepted(c.rate, k)
    if not plan:
        return {}
    size = base + sum(plan.values())
    # Drafted steps never measured, or not for a while (an estimate never refreshed could keep them off
    # for good): try one at the plain cost of as many tokens.
    explore = not times.fresh(SPEC)
    if (decodes + gain) * t_plain > (1.0 + MIN_GAIN) * decodes * t_spec(size, optimistic=explore):
        return plan
    return {}
