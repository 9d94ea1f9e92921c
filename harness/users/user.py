"""The user-script API: `User`, `@task`, `StopUser`, and wait times (`between`, `constant`, ...).

Shaped like Locust's so a Locust user feels at home: a class per kind of user,
`weight` for its share of the users, `wait_time` for the think time after each
task, `@task(n)` for a task's relative frequency, `on_start` / `on_stop` once
per user. Here every task is a coroutine (`async def`): calls to the model
are awaited, and parallel calls are an `asyncio.gather` away.

Wait times are functions of the user (`wait_time(user) -> seconds`), drawn
from the user's own seeded `rng`, so a seeded run repeats its think times.
"""

from __future__ import annotations

import inspect
import random
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from servescope.harness.users.client import UserClient

TASK_WEIGHT_ATTR = "servescope_task_weight"


def task(weight: int | Callable[..., Any] = 1) -> Any:
    """Mark a coroutine method as a task: `@task` (weight 1) or `@task(3)` (three times as often)."""
    if callable(weight):  # used bare: @task
        setattr(weight, TASK_WEIGHT_ATTR, 1)
        return weight
    if not isinstance(weight, int) or isinstance(weight, bool) or weight < 1:
        raise ValueError(f"@task(weight): the weight must be a whole number >= 1, got {weight!r}")

    def mark(function: Callable[..., Any]) -> Callable[..., Any]:
        setattr(function, TASK_WEIGHT_ATTR, weight)
        return function

    return mark


class StopUser(Exception):
    """Raise in a task or `on_start` to retire the user (no further tasks); not an error."""


def between(low: float, high: float) -> Callable[["User"], float]:
    """Think time drawn uniformly from [low, high] seconds after each task."""
    if not 0 <= low <= high:
        raise ValueError(f"between({low}, {high}): need 0 <= low <= high seconds")

    def wait(user: "User") -> float:
        return user.rng.uniform(low, high)

    wait.describe = f"between({low:g}, {high:g})"  # type: ignore[attr-defined]
    return wait


def constant(seconds: float) -> Callable[["User"], float]:
    """The same think time after every task."""
    if seconds < 0:
        raise ValueError(f"constant({seconds}): seconds must be >= 0")

    def wait(user: "User") -> float:
        return seconds

    wait.describe = f"constant({seconds:g})"  # type: ignore[attr-defined]
    return wait


def constant_pacing(seconds: float) -> Callable[["User"], float]:
    """Start a task every `seconds` (if a task took longer, the next starts at once)."""
    if not seconds > 0:
        raise ValueError(f"constant_pacing({seconds}): seconds must be > 0")

    def wait(user: "User") -> float:
        started = user.task_started_at
        return seconds if started is None else max(0.0, seconds - (time.perf_counter() - started))

    wait.describe = f"constant_pacing({seconds:g})"  # type: ignore[attr-defined]
    return wait


def constant_throughput(tasks_per_second: float) -> Callable[["User"], float]:
    """At most `tasks_per_second` task starts per second for this user (constant_pacing(1/x))."""
    if not tasks_per_second > 0:
        raise ValueError(f"constant_throughput({tasks_per_second}): the rate must be > 0")
    wait = constant_pacing(1.0 / tasks_per_second)
    wait.describe = f"constant_throughput({tasks_per_second:g})"  # type: ignore[attr-defined]
    return wait


def describe_wait(wait: Callable[..., float] | None) -> str:
    if wait is None:
        return "none"
    return getattr(wait, "describe", getattr(wait, "__name__", repr(wait)))


class User:
    """Subclass this in a user script. Class attributes:

    * `weight` - this class's share of the users (relative to the other classes);
    * `wait_time` - think time after each task: `between(a, b)`, `constant(s)`,
      `constant_pacing(s)`, `constant_throughput(x)`, or any `f(user) -> seconds`;
    * `tasks` - instead of `@task`: a list of coroutine functions or a {function: weight} dict;
    * `session_tasks` - open loop (`--rate`): tasks one arriving user runs before it leaves;
    * `tenant` - label put on every call of this class (the report slices by tenant);
    * `abstract = True` - a base class for other users, never started itself.

    Set by the runtime for each user: `client` (`UserClient`), `rng` (a
    `random.Random` seeded from the run's seed and the user's number),
    `user_id`, and `prompt()` / `prefix()` for token-exact text.
    """

    weight: float = 1
    wait_time: Callable[["User"], float] | None = None
    tasks: list[Callable[..., Any]] | dict[Callable[..., Any], int] | None = None
    session_tasks: int = 1
    tenant: str | None = None
    abstract: bool = True

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "abstract" not in cls.__dict__:
            cls.abstract = False

    def __init__(self, client: "UserClient", rng: random.Random, user_id: str, text: Any) -> None:
        self.client = client
        self.rng = rng
        self.user_id = user_id
        self._text = text
        self.task_started_at: float | None = None  # perf_counter() when the current/last task began
        self.flows_started = 0  # this user's task invocations so far (numbers its flow ids)

    async def on_start(self) -> None:
        """Once per user, before its first task (log in, load a profile, ...)."""

    async def on_stop(self) -> None:
        """Once per user, when it leaves (open loop) or the phase ends."""

    def prompt(self, tokens: int) -> str:
        """Fresh text of exactly `tokens` tokens with the run's tokenizer (no special tokens counted)."""
        return self._text.prompt(tokens, self.rng)

    def prefix(self, group: str, tokens: int) -> str:
        """Text of exactly `tokens` tokens, the same for every user of the run that names `group`:
        put it first (a system message, a document) so the server's prefix cache can share it."""
        return self._text.prefix(group, tokens)


def user_tasks(cls: type[User]) -> dict[str, tuple[Callable[..., Any], int]]:
    """The tasks of a user class, by name: `tasks` if given, else the `@task` methods along the MRO."""
    found: dict[str, tuple[Callable[..., Any], int]] = {}
    if cls.tasks is not None:
        items = cls.tasks.items() if isinstance(cls.tasks, dict) else ((f, 1) for f in cls.tasks)
        for function, weight in items:
            if not callable(function):
                raise TypeError(f"{cls.__name__}.tasks: {function!r} is not a function")
            found[function.__name__] = (function, int(weight))
        return found
    for klass in reversed(cls.__mro__):
        for name, value in vars(klass).items():
            weight = getattr(value, TASK_WEIGHT_ATTR, None)
            if weight is not None:
                found[name] = (value, weight)
    return found


def check_user_class(cls: type[User]) -> list[str]:
    """What is wrong with a user class, as messages (empty when it can run)."""
    problems = []
    tasks = user_tasks(cls)
    if not tasks:
        problems.append(f"{cls.__name__} has no tasks: mark a method `@task` (async def) or set `tasks = [...]`")
    for name, (function, weight) in tasks.items():
        if not inspect.iscoroutinefunction(function):
            problems.append(f"{cls.__name__}.{name} is a task but not a coroutine: write `async def {name}(self)`")
        if weight < 1:
            problems.append(f"{cls.__name__}.{name}: weight {weight} must be >= 1")
    for hook in ("on_start", "on_stop"):
        if not inspect.iscoroutinefunction(getattr(cls, hook)):
            problems.append(f"{cls.__name__}.{hook} must be a coroutine: write `async def {hook}(self)`")
    if not (isinstance(cls.weight, (int, float)) and cls.weight > 0):
        problems.append(f"{cls.__name__}.weight must be a positive number, got {cls.weight!r}")
    if cls.wait_time is not None and not callable(cls.wait_time):
        problems.append(f"{cls.__name__}.wait_time must be between(a, b), constant(s), ... or a function of the user")
    if not (isinstance(cls.session_tasks, int) and cls.session_tasks >= 1):
        problems.append(f"{cls.__name__}.session_tasks must be a whole number >= 1, got {cls.session_tasks!r}")
    return problems

