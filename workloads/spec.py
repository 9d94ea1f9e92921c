"""The workload spec: a weighted mix of request classes, read from YAML and validated.

    name: chat
    description: Interactive chat with multi-turn sessions.
    seed: 7                      # optional; `--seed` overrides
    arrival: gamma:3             # optional: poisson | constant | gamma:CV (open-loop runs)
    buckets: {prompt: [256, 1k, 4k, 16k], output: [64, 256, 1k]}   # optional, these are the defaults
    classes:
      - name: chat
        weight: 3
        api: chat                # completions | chat
        prompt_tokens: {dist: lognormal, mean: 700, sigma: 0.8, min: 32, max: 8k}
        output_tokens: {dist: uniform, min: 32, max: 512}
        tenant: free
        prefix: {group: assistant-v1, tokens: 300}   # exact shared-prefix length
        session: {turns: 3, think_time_s: {dist: uniform, min: 1, max: 5}, history: true}
        labels: {team: search}

Token counts accept `1k` (= 1024) style strings. In a session, `prompt_tokens`
is the first turn's prompt length; each later turn adds a fresh sample of it
(the new user message with its chat framing) on top of the history (previous
prompt + the previous reply of `max_tokens` tokens) when `history: true`.

A file is validated as a whole: every problem is listed at once, each with its
field path, and an unknown key is named with the keys allowed where it sits.
`with_lengths` fixes one dimension of a spec (`--prompt-tokens`, `--max-tokens`).
"""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import yaml

from servescope.workloads.distributions import Distribution, parse_distribution
from servescope.workloads.errors import WorkloadError

APIS = ("completions", "chat")
ARRIVALS = ("poisson", "constant", "gamma:CV")
DEFAULT_PROMPT_EDGES = (256, 1024, 4096, 16384)
DEFAULT_OUTPUT_EDGES = (64, 256, 1024)
PRESETS_DIR = Path(__file__).resolve().parent / "presets"

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kKmM]?)\s*$")
_NAME = re.compile(r"^[A-Za-z0-9_.:-]+$")


def parse_size(value: Any, path: str) -> float:
    """A token count: a number, or a string like `4k` (k = 1024, m = 1024 * 1024)."""
    if isinstance(value, bool):
        raise WorkloadError(f"expected a token count, got {value!r}", field=path)
    if isinstance(value, (int, float)):
        return float(value)
    match = _SIZE.match(str(value))
    if not match:
        raise WorkloadError(f"expected a token count such as 512 or 4k, got {value!r}", field=path)
    scale = {"": 1, "k": 1024, "m": 1024 * 1024}[match.group(2).lower()]
    return float(match.group(1)) * scale


def size_label(n: int) -> str:
    """`1024` -> `1k`, `16384` -> `16k`, `256` -> `256` (bucket labels)."""
    if n and n % (1024 * 1024) == 0:
        return f"{n // (1024 * 1024)}m"
    if n and n % 1024 == 0:
        return f"{n // 1024}k"
    if n and n % 1000 == 0:
        return f"{n // 1000}k"
    return str(n)


def _edges_label(edges: tuple[int, ...], n: int) -> str:
    lower = 0
    for edge in edges:
        if n < edge:
            return f"{size_label(lower)}-{size_label(edge)}"
        lower = edge
    return f"{size_label(lower)}+"


@dataclass(frozen=True)
class Buckets:
    """Bucket edges for the `prompt_bucket` / `output_bucket` labels: [lower, upper)."""

    prompt: tuple[int, ...] = DEFAULT_PROMPT_EDGES
    output: tuple[int, ...] = DEFAULT_OUTPUT_EDGES

    def __post_init__(self) -> None:
        problems = [
            WorkloadError(f"bucket edges must be positive and strictly increasing, got {list(edges)}", field=name)
            for name, edges in (("prompt", self.prompt), ("output", self.output))
            if not edges or any(e <= 0 for e in edges) or list(edges) != sorted(set(edges))
        ]
        if problems:
            raise WorkloadError.collect(problems)

    def prompt_label(self, tokens: int) -> str:
        return _edges_label(self.prompt, tokens)

    def output_label(self, tokens: int) -> str:
        return _edges_label(self.output, tokens)


@dataclass(frozen=True)
class PrefixSettings:
    """Requests of one group start with the same `tokens` tokens (exactly); what follows diverges."""

    group: str
    tokens: int

    def __post_init__(self) -> None:
        problems = []
        if not self.group or not _NAME.match(self.group):
            problems.append(WorkloadError(f"prefix group must be a name of letters, digits, _.:-, got {self.group!r}",
                                          field="group"))
        if self.tokens < 1:
            problems.append(WorkloadError(f"prefix tokens must be >= 1, got {self.tokens}", field="tokens"))
        if problems:
            raise WorkloadError.collect(problems)


@dataclass(frozen=True)
class SessionSettings:
    """Multi-turn sessions: turns per session, think time between turns, history carried or not."""

    turns: Distribution = field(default_factory=lambda: Distribution("fixed", value=1))
    think_time_s: Distribution = field(default_factory=lambda: Distribution("fixed", value=0))
    history: bool = True

    def __post_init__(self) -> None:
        if self.turns.upper_bound < 1:
            raise WorkloadError("turns must allow at least 1 turn", field="turns")


@dataclass(frozen=True)
class RequestClass:
    """One kind of request in the mix, drawn with probability weight / total weight."""

    name: str
    prompt_tokens: Distribution
    output_tokens: Distribution
    weight: float = 1.0
    api: str = "completions"
    tenant: str | None = None
    prefix: PrefixSettings | None = None
    session: SessionSettings = field(default_factory=SessionSettings)
    labels: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        problems = _class_problems(self.name, self.weight, self.api, self.prompt_tokens, self.prefix)
        if problems:
            raise WorkloadError.collect(problems)


def _class_problems(name: str | None, weight: float, api: Any, prompt_tokens: Distribution | None,
                    prefix: PrefixSettings | None) -> list[WorkloadError]:
    """What is wrong with one class's own fields (paths relative to the class)."""
    problems = []
    if name is not None and (not name or not _NAME.match(name)):
        problems.append(WorkloadError(f"class name must be letters, digits, _.:-, got {name!r}", field="name"))
    if not (math.isfinite(weight) and weight > 0):
        problems.append(WorkloadError(f"weight must be a number > 0, got {weight}", field="weight"))
    if api not in APIS:
        problems.append(WorkloadError(f"unknown api {api!r}", field="api", allowed=APIS))
    if prefix is not None and prompt_tokens is not None and prompt_tokens.upper_bound <= prefix.tokens:
        problems.append(WorkloadError(
            f"prompts (at most {prompt_tokens.upper_bound:g} tokens) must be longer than the "
            f"shared prefix ({prefix.tokens} tokens): raise prompt_tokens or lower prefix.tokens",
            field="prompt_tokens",
        ))
    return problems


@dataclass(frozen=True)
class WorkloadSpec:
    """A validated workload: what `session_stream` turns into requests."""

    name: str
    classes: tuple[RequestClass, ...]
    description: str = ""
    buckets: Buckets = field(default_factory=Buckets)
    arrival: str | None = None  # poisson | constant | gamma:CV; None: the run's --arrival decides
    seed: int | None = None
    source: str | None = None  # the file it came from, for messages and run.json

    def __post_init__(self) -> None:
        problems = _mix_problems([(i, c.name, c.prefix) for i, c in enumerate(self.classes)])
        if not self.classes:
            problems.append(WorkloadError("a workload needs at least one class", field="classes"))
        if self.arrival is not None:
            try:
                parse_arrival(self.arrival)
            except WorkloadError as err:
                problems.append(err)
        if problems:
            raise WorkloadError.collect(problems)

    @property
    def total_weight(self) -> float:
        return sum(c.weight for c in self.classes)

    def to_dict(self) -> dict[str, Any]:
        """The resolved spec as plain data (for run.json)."""
        data = asdict(self)
        for cls in data["classes"]:
            for key in ("prompt_tokens", "output_tokens"):
                cls[key] = _dist_dict(cls[key])
            cls["session"]["turns"] = _dist_dict(cls["session"]["turns"])
            cls["session"]["think_time_s"] = _dist_dict(cls["session"]["think_time_s"])
        return data


def _mix_problems(classes: list[tuple[int, str | None, PrefixSettings | None]]) -> list[WorkloadError]:
    """What is wrong between classes (names unique, one length per prefix group), from each class's
    (index, name, prefix); a part that could not be read is None and is left out."""
    problems = []
    first_named: dict[str, int] = {}
    groups: dict[str, int] = {}
    for i, name, prefix in classes:
        seen = first_named.setdefault(name, i) if name is not None else i
        if seen != i:
            problems.append(WorkloadError(f"class name {name!r} is used by classes[{seen}] too: "
                                          "class names must be unique", field=f"classes[{i}].name"))
        if prefix is None:
            continue
        tokens = groups.setdefault(prefix.group, prefix.tokens)
        if tokens != prefix.tokens:
            problems.append(WorkloadError(
                f"prefix group {prefix.group!r} has {tokens} tokens in one class and "
                f"{prefix.tokens} in another: one group, one length",
                field=f"classes[{i}].prefix.tokens",
            ))
    return problems


def _dist_dict(d: dict[str, Any]) -> dict[str, Any]:
    out = {"dist": d["kind"]}
    out.update({k: (list(map(list, v)) if k == "table" else v) for k, v in d.items() if k not in ("kind", "_cum_weights") and v not in (None, ())})
    return out


def parse_arrival(text: str) -> tuple[str, float | None]:
    """`poisson` -> ("poisson", None); `gamma:3` -> ("gamma", 3.0)."""
    kind, _, param = str(text).partition(":")
    if kind in ("poisson", "constant") and not param:
        return kind, None
    if kind == "gamma":
        try:
            cv = float(param)
        except ValueError:
            cv = -1.0
        if cv > 0 and math.isfinite(cv):
            return "gamma", cv
    raise WorkloadError(f"unknown arrival {text!r}", field="arrival", allowed=ARRIVALS)


# ---- YAML -> spec ---------------------------------------------------------------------------
#
# The parser reads the whole file before it raises: each part that cannot be used adds its
# problems to one list (every one with its field path), and parsing goes on with the rest.

_SPEC_KEYS = ("name", "description", "seed", "arrival", "buckets", "classes")
_CLASS_KEYS = ("name", "weight", "api", "prompt_tokens", "output_tokens", "tenant", "prefix", "session", "labels")
_PREFIX_KEYS = ("group", "tokens")
_SESSION_KEYS = ("turns", "think_time_s", "history")
_BUCKET_KEYS = ("prompt", "output")
_SIZE_KEYS = ("value", "min", "max", "mean", "median")


class _Problems(list):
    """The problems found so far; `attempt` runs one step and keeps its error instead of raising it."""

    def attempt(self, step, *args: Any, prefix: str | None = None) -> Any:
        try:
            return step(*args)
        except WorkloadError as err:
            self.append(err.within(prefix=prefix) if prefix else err)
            return None


def _mapping(data: Any, allowed: tuple[str, ...], path: str, problems: _Problems) -> dict[str, Any] | None:
    """`data` as a mapping; each unknown key is a problem (and is left out)."""
    if not isinstance(data, dict):
        problems.append(WorkloadError(f"expected a mapping, got {type(data).__name__}", field=path or None))
        return None
    for key in data:
        if key not in allowed:
            problems.append(WorkloadError.unknown_key(key, path, allowed))
    return {k: v for k, v in data.items() if k in allowed}


def _tokens_dist(raw: Any, path: str) -> Distribution:
    """A token-count distribution; `4k` strings are accepted wherever a number is."""
    if isinstance(raw, str):
        return parse_distribution(parse_size(raw, path), path)
    if not isinstance(raw, dict):
        return parse_distribution(raw, path)
    problems = _Problems()
    sizes = {k: problems.attempt(parse_size, v, f"{path}.{k}") if k in _SIZE_KEYS and isinstance(v, str) else v
             for k, v in raw.items()}
    if not problems:
        return parse_distribution(sizes, path)
    # The rest of the mapping is still checked, without the unreadable sizes (already reported).
    reported = {p.field for p in problems}
    try:
        parse_distribution({k: v for k, v in sizes.items() if v is not None}, path)
    except WorkloadError as err:
        problems.extend(p for p in err.problems if p.field not in reported)
    raise WorkloadError.collect(problems)


def _parse_prefix(raw: Any, path: str, problems: _Problems) -> PrefixSettings | None:
    data = _mapping(raw, _PREFIX_KEYS, path, problems)
    if data is None:
        return None
    missing = [k for k in _PREFIX_KEYS if k not in data]
    for key in missing:
        problems.append(WorkloadError(f"a prefix needs `group` and `tokens`; `{key}` is missing", field=f"{path}.{key}"))
    tokens = problems.attempt(parse_size, data["tokens"], f"{path}.tokens") if "tokens" in data else None
    if missing or tokens is None:
        return None
    return problems.attempt(PrefixSettings, str(data["group"]), int(tokens), prefix=path)


def _parse_session(raw: Any, path: str, problems: _Problems) -> SessionSettings | None:
    data = _mapping(raw, _SESSION_KEYS, path, problems)
    if data is None:
        return None
    kwargs: dict[str, Any] = {}
    before = len(problems)
    for key in ("turns", "think_time_s"):
        if key in data:
            kwargs[key] = problems.attempt(parse_distribution, data[key], f"{path}.{key}")
    if "history" in data:
        if isinstance(data["history"], bool):
            kwargs["history"] = data["history"]
        else:
            problems.append(WorkloadError(f"expected true or false, got {data['history']!r}", field=f"{path}.history"))
    if len(problems) > before:
        return None
    return problems.attempt(lambda: SessionSettings(**kwargs), prefix=path)


def _parse_class(raw: Any, path: str, problems: _Problems) -> RequestClass | None:
    data = _mapping(raw, _CLASS_KEYS, path, problems)
    if data is None:
        return None
    before = len(problems)
    for required in ("name", "prompt_tokens", "output_tokens"):
        if required not in data:
            problems.append(WorkloadError(f"missing required key `{required}`", field=f"{path}.{required}"))
    kwargs: dict[str, Any] = {"name": str(data.get("name", ""))}
    for key in ("prompt_tokens", "output_tokens"):
        if key in data:
            kwargs[key] = problems.attempt(_tokens_dist, data[key], f"{path}.{key}")
    if "weight" in data:
        if isinstance(data["weight"], bool) or not isinstance(data["weight"], (int, float)):
            problems.append(WorkloadError(f"expected a number > 0, got {data['weight']!r}", field=f"{path}.weight"))
        else:
            kwargs["weight"] = float(data["weight"])
    if "api" in data:
        kwargs["api"] = data["api"]
    if data.get("tenant") is not None:
        kwargs["tenant"] = str(data["tenant"])
    if data.get("prefix") is not None:
        kwargs["prefix"] = _parse_prefix(data["prefix"], f"{path}.prefix", problems)
    if data.get("session") is not None:
        kwargs["session"] = _parse_session(data["session"], f"{path}.session", problems)
    if data.get("labels") is not None:
        if isinstance(data["labels"], dict):
            kwargs["labels"] = {str(k): str(v) for k, v in data["labels"].items()}
        else:
            problems.append(WorkloadError("expected a mapping of label names to values", field=f"{path}.labels"))
    if len(problems) > before:
        # What could be read is still checked as a class, so its other problems (name, api, ...) are listed too.
        problems.extend(p.within(prefix=path) for p in _class_problems(
            None if "name" not in data else kwargs["name"], kwargs.get("weight", 1.0), kwargs.get("api", "completions"),
            kwargs.get("prompt_tokens"), kwargs.get("prefix")))
        return None
    return problems.attempt(lambda: RequestClass(**kwargs), prefix=path)


def _parse_buckets(raw: Any, problems: _Problems) -> Buckets | None:
    data = _mapping(raw, _BUCKET_KEYS, "buckets", problems)
    if data is None:
        return None
    kwargs = {}
    before = len(problems)
    for key, edges in data.items():
        if not isinstance(edges, list):
            problems.append(WorkloadError("expected a list of edges such as [256, 1k, 4k]", field=f"buckets.{key}"))
            continue
        sizes = [problems.attempt(parse_size, v, f"buckets.{key}") for v in edges]
        kwargs[key] = tuple(int(v) for v in sizes if v is not None)
    if len(problems) > before:
        return None
    return problems.attempt(lambda: Buckets(**kwargs), prefix="buckets")


def spec_from_dict(data: Any, source: str | None = None) -> WorkloadSpec:
    """Validate plain data (parsed YAML) into a WorkloadSpec.

    Every problem of the file is raised at once (`WorkloadError.problems`), each with the
    file (`source`) and its field path."""
    problems = _Problems()
    data = _mapping(data, _SPEC_KEYS, "", problems)
    if data is None:
        raise WorkloadError.collect(problems, source=source)
    kwargs: dict[str, Any] = {
        "name": str(data.get("name") or (Path(source).stem if source else "workload")),
        "description": str(data.get("description") or ""),
        "source": source,
    }
    classes = data.get("classes")
    if not isinstance(classes, list) or not classes:
        problems.append(WorkloadError("expected a non-empty list of request classes", field="classes"))
        parsed = []
    else:
        parsed = [_parse_class(c, f"classes[{i}]", problems) for i, c in enumerate(classes)]
    if data.get("seed") is not None:
        if isinstance(data["seed"], bool) or not isinstance(data["seed"], int):
            problems.append(WorkloadError(f"expected an integer, got {data['seed']!r}", field="seed"))
        else:
            kwargs["seed"] = data["seed"]
    if data.get("arrival") is not None:
        kwargs["arrival"] = str(data["arrival"])
        problems.attempt(parse_arrival, kwargs["arrival"])
    if data.get("buckets") is not None:
        kwargs["buckets"] = _parse_buckets(data["buckets"], problems)
    if problems:
        # The classes that did parse are still checked against each other (unique names, prefix lengths).
        problems.extend(_mix_problems([
            (i, str(raw["name"]) if isinstance(raw, dict) and "name" in raw else None, c.prefix if c else None)
            for i, (raw, c) in enumerate(zip(classes or [], parsed))]))
        raise WorkloadError.collect(problems, source=source)
    try:
        return WorkloadSpec(**{k: v for k, v in kwargs.items() if v is not None}, classes=tuple(parsed))
    except WorkloadError as err:
        raise err.within(source=source) from None


def load_spec_file(path: Path) -> WorkloadSpec:
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise WorkloadError(f"cannot read workload file: {exc.strerror}", source=str(path)) from None
    except yaml.YAMLError as exc:
        raise WorkloadError(f"not valid YAML: {exc}", source=str(path)) from None
    return spec_from_dict(data, source=str(path))


@dataclass(frozen=True)
class PresetInfo:
    name: str
    description: str
    classes: list[str]
    path: Path


def preset_path(name: str) -> Path | None:
    path = PRESETS_DIR / f"{name}.yaml"
    return path if path.is_file() else None


def list_presets() -> list[PresetInfo]:
    """Every bundled preset, sorted by name."""
    infos = []
    for path in sorted(PRESETS_DIR.glob("*.yaml")):
        spec = load_spec_file(path)
        infos.append(PresetInfo(path.stem, spec.description, [c.name for c in spec.classes], path))
    return infos


def load_workload(name_or_path: str) -> WorkloadSpec:
    """A bundled preset by name, or a YAML file by path."""
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml") or path.is_file():
        if not path.is_file():
            raise WorkloadError("workload file not found", source=str(path))
        return load_spec_file(path)
    preset = preset_path(name_or_path)
    if preset is None:
        names = [p.stem for p in sorted(PRESETS_DIR.glob("*.yaml"))]
        raise WorkloadError(f"no preset or file named {name_or_path!r}", field="workload", allowed=names)
    return load_spec_file(preset)


def fixed_workload(prompt_tokens: int, max_tokens: int, api: str = "completions") -> WorkloadSpec:
    """`--prompt-tokens N --max-tokens M`: one class of fixed lengths."""
    if prompt_tokens < 1 or max_tokens < 1:
        raise WorkloadError(
            f"prompt and max tokens must be >= 1, got {prompt_tokens} and {max_tokens}", field="--prompt-tokens/--max-tokens"
        )
    cls = RequestClass(
        name="fixed", api=api,
        prompt_tokens=Distribution("fixed", value=prompt_tokens),
        output_tokens=Distribution("fixed", value=max_tokens),
    )
    return WorkloadSpec(
        name=f"fixed-{prompt_tokens}x{max_tokens}",
        description=f"{prompt_tokens}-token prompts, {max_tokens}-token outputs",
        classes=(cls,),
    )


def with_lengths(spec: WorkloadSpec, *, prompt_tokens: int | None = None,
                 output_tokens: int | None = None) -> WorkloadSpec:
    """`spec` with the prompt and/or output length of every class fixed (`--prompt-tokens N`, `--max-tokens N`).

    Everything else (classes, weights, apis, prefixes, sessions) stays. In a session every
    turn adds `prompt_tokens` new tokens on top of its history, as a fixed distribution does."""
    problems = []
    for flag, value in (("--prompt-tokens", prompt_tokens), ("--max-tokens", output_tokens)):
        if value is not None and value < 1:
            problems.append(WorkloadError(f"must be at least 1, got {value}", field=flag))
    if prompt_tokens is not None:
        for i, cls in enumerate(spec.classes):
            if cls.prefix is not None and prompt_tokens <= cls.prefix.tokens:
                problems.append(WorkloadError(
                    f"{prompt_tokens} tokens is not longer than the shared prefix of class {cls.name!r} "
                    f"(classes[{i}].prefix.tokens: {cls.prefix.tokens}); give a longer --prompt-tokens",
                    field="--prompt-tokens"))
    if problems:
        raise WorkloadError.collect(problems, source=spec.source)
    changes: dict[str, Distribution] = {}
    if prompt_tokens is not None:
        changes["prompt_tokens"] = Distribution("fixed", value=prompt_tokens)
    if output_tokens is not None:
        changes["output_tokens"] = Distribution("fixed", value=output_tokens)
    fixed = ", ".join(f"{k} fixed at {int(d.value)}" for k, d in changes.items())
    return replace(spec, classes=tuple(replace(cls, **changes) for cls in spec.classes),
                   description=f"{spec.description} ({fixed})" if spec.description else fixed)
