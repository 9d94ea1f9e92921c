"""Open-loop send times, drawn from the seed before they are needed.

Send times never depend on replies: that is what keeps an open loop open when
the server slows down. They come from a seeded `numpy.random.Generator`, so
the same seed gives the same schedule.

A ramp is done by time rescaling: draw a unit-rate process (gaps with mean 1)
and map its cumulative "work" u through the inverse of
Lambda(t) = integral of rate(t), with rate rising linearly from 0 to R over
`ramp_s`. This keeps the arrival kind (poisson / constant / gamma) intact
during the ramp instead of thinning or bolting on a second process.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import numpy as np

from servescope.harness.config import Arrival

_BATCH = 1024  # gaps drawn per numpy call


def unit_gaps(arrival: Arrival, rng: np.random.Generator, n: int) -> np.ndarray:
    """`n` inter-arrival gaps with mean 1 for the given arrival kind."""
    if arrival.kind == "constant":
        return np.ones(n)
    if arrival.kind == "poisson":
        return rng.exponential(1.0, n)
    shape = 1.0 / (arrival.cv * arrival.cv)  # gamma with mean 1 and CV `cv`
    return rng.gamma(shape, 1.0 / shape, n)


def ramped_time(u: np.ndarray, rate: float, ramp_s: float) -> np.ndarray:
    """Real time at which cumulative unit-work `u` is reached under a linear ramp to `rate`."""
    if ramp_s <= 0:
        return u / rate
    ramp_work = rate * ramp_s / 2.0  # work done during the ramp
    return np.where(u < ramp_work, np.sqrt(2.0 * ramp_s * u / rate), ramp_s + (u - ramp_work) / rate)


def send_offsets(
    arrival: Arrival,
    rate: float,
    rng: np.random.Generator,
    *,
    duration_s: float | None = None,
    count: int | None = None,
    ramp_s: float = 0.0,
) -> Iterator[float]:
    """Send offsets (s from phase start), ascending, until `duration_s` or `count` is reached.

    The first send is at 0 for a constant process without ramp (a load test
    should not idle for one gap before it starts) and one drawn gap later
    otherwise.
    """
    if duration_s is None and count is None:
        raise ValueError("send_offsets needs a duration or a count, or it never ends")
    sent = 0
    work = 0.0
    first = True
    while True:
        gaps = unit_gaps(arrival, rng, _BATCH)
        if first and arrival.kind == "constant" and ramp_s <= 0:
            gaps[0] = 0.0
        first = False
        cumulative = work + np.cumsum(gaps)
        work = float(cumulative[-1])
        for t in ramped_time(cumulative, rate, ramp_s).tolist():
            if duration_s is not None and t >= duration_s:
                return
            if count is not None and sent >= count:
                return
            sent += 1
            yield t


def slot_offsets(concurrency: int, ramp_s: float) -> list[float]:
    """Start offsets of closed-loop slots: all at once, or spread linearly over `ramp_s`."""
    if ramp_s <= 0 or concurrency <= 1:
        return [0.0] * concurrency
    return [ramp_s * i / concurrency for i in range(concurrency)]


def expected_count(rate: float, duration_s: float, ramp_s: float = 0.0) -> int:
    """About how many sends a rate phase makes (for progress bars, not for scheduling)."""
    ramp = min(ramp_s, duration_s)
    return max(1, math.floor(rate * (duration_s - ramp / 2.0)))
