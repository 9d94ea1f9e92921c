"""The units the dispatcher hands out for scripted users.

Closed loop (`--concurrency N`): each slot is one long-lived user; a `UserJob`
is "run your next task", so `--requests N` bounds task invocations. The class
of each slot is fixed by `slot_classes`, a smooth weighted round-robin: 64
users of classes weighted 3:1 are exactly 48 and 16, as in Locust.

Open loop (`--rate R`): each `UserJob` is one arriving user of the class
drawn for it (seeded): it runs `on_start`, its class's `session_tasks` tasks
with think times between, then `on_stop`, and leaves.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from dataclasses import dataclass


@dataclass(slots=True)
class UserJob:
    number: int  # unique in the run: names the arriving user (open loop)
    user_class: str  # open loop: the arriving user's class (closed-loop slots keep their own)


@dataclass(slots=True)
class SlotUser:
    """Closed loop: the user that slot `slot` of a phase runs."""

    slot: int
    user_class: str


def slot_classes(classes: list[tuple[str, float]], count: int) -> list[str]:
    """Classes for `count` slots in proportion to their weights, interleaved (smooth weighted round-robin)."""
    total = sum(w for _, w in classes)
    current = [0.0] * len(classes)
    out = []
    for _ in range(count):
        for i, (_, weight) in enumerate(classes):
            current[i] += weight
        best = max(range(len(classes)), key=lambda i: current[i])
        current[best] -= total
        out.append(classes[best][0])
    return out


def user_jobs(classes: list[tuple[str, float]], seed: int) -> Iterator[UserJob]:
    """An endless stream of jobs; each arriving user's class is drawn by weight from the seed."""
    rng = random.Random(f"users-{seed}")
    names = [name for name, _ in classes]
    weights = [w for _, w in classes]
    number = 0
    while True:
        yield UserJob(number, rng.choices(names, weights)[0])
        number += 1
