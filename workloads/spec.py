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
"""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml

from workloads.distributions import Distribution, parse_distribution
from workloads.errors import WorkloadError

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
        for name in ("prompt", "output"):
            edges = getattr(self, name)
            if not edges or any(e <= 0 for e in edges) or list(edges) != sorted(set(edges)):
                raise WorkloadError(f"bucket edges must be positive and strictly increasing, got {list(edges)}", field=name)

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
        if not self.group or not _NAME.match(self.group):
            raise WorkloadError(f"prefix group must be a name of letters, digits, _.:-, got {self.group!r}", field="group")
        if self.tokens < 1:
            raise WorkloadError(f"prefix tokens must be >= 1, got {self.tokens}", field="tokens")


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
        if not self.name or not _NAME.match(self.name):
            raise WorkloadError(f"class name must be letters, digits, _.:-, got {self.name!r}", field="name")
        if not (math.isfinite(self.weight) and self.weight > 0):
            raise WorkloadError(f"weight must be a number > 0, got {self.weight}", field="weight")
        if self.api not in APIS:
            raise WorkloadError(f"unknown api {self.api!r}", field="api", allowed=APIS)
        if self.prefix is not None and self.prompt_tokens.upper_bound <= self.prefix.tokens:
            raise WorkloadError(
                f"prompts (at most {self.prompt_tokens.upper_bound:g} tokens) must be longer than the "
                f"shared prefix ({self.prefix.tokens} tokens): raise prompt_tokens or lower prefix.tokens",
                field="prompt_tokens",
            )


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
        if not self.classes:
            raise WorkloadError("a workload needs at least one class", field="classes")
        names = [c.name for c in self.classes]
        if len(set(names)) != len(names):
            raise WorkloadError(f"class names must be unique, got {names}", field="classes")
        groups: dict[str, int] = {}
        for i, cls in enumerate(self.classes):
            if cls.prefix is None:
                continue
            seen = groups.setdefault(cls.prefix.group, cls.prefix.tokens)
            if seen != cls.prefix.tokens:
                raise WorkloadError(
                    f"prefix group {cls.prefix.group!r} has {seen} tokens in one class and "
                    f"{cls.prefix.tokens} in another: one group, one length",
                    field=f"classes[{i}].prefix.tokens",
                )
        if self.arrival is not None:
            parse_arrival(self.arrival)

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

_SPEC_KEYS = ("name", "description", "seed", "arrival", "buckets", "classes")
_CLASS_KEYS = ("name", "weight", "api", "prompt_tokens", "output_tokens", "tenant", "prefix", "session", "labels")
_SESSION_KEYS = ("turns", "think_time_s", "history")


def _check_keys(data: Any, allowed: tuple[str, ...], path: str) -> dict[str, Any]:
    if not isinstance(data, dict):
        raise WorkloadError(f"expected a mapping, got {type(data).__name__}", field=path or None)
    unknown = [k for k in data if k not in allowed]
    if unknown:
        where = f"{path}.{unknown[0]}" if path else str(unknown[0])
        raise WorkloadError(f"unknown key {unknown[0]!r}", field=where, allowed=allowed)
    return data


def _tokens_dist(raw: Any, path: str) -> Distribution:
    """A token-count distribution; `4k` strings are accepted wherever a number is."""
    if isinstance(raw, str):
        raw = parse_size(raw, path)
    elif isinstance(raw, dict):
        raw = {
            k: (parse_size(v, f"{path}.{k}") if k in ("value", "min", "max", "mean", "median") and isinstance(v, str) else v)
            for k, v in raw.items()
        }
    return parse_distribution(raw, path)


def _parse_class(raw: Any, path: str) -> RequestClass:
    data = _check_keys(raw, _CLASS_KEYS, path)
    for required in ("name", "prompt_tokens", "output_tokens"):
        if required not in data:
            raise WorkloadError(f"missing required key `{required}`", field=f"{path}.{required}")
    kwargs: dict[str, Any] = {
        "name": str(data["name"]),
        "prompt_tokens": _tokens_dist(data["prompt_tokens"], f"{path}.prompt_tokens"),
        "output_tokens": _tokens_dist(data["output_tokens"], f"{path}.output_tokens"),
    }
    if "weight" in data:
        if isinstance(data["weight"], bool) or not isinstance(data["weight"], (int, float)):
            raise WorkloadError(f"expected a number > 0, got {data['weight']!r}", field=f"{path}.weight")
        kwargs["weight"] = float(data["weight"])
    if "api" in data:
        kwargs["api"] = data["api"]
    if data.get("tenant") is not None:
        kwargs["tenant"] = str(data["tenant"])
    if data.get("prefix") is not None:
        prefix = _check_keys(data["prefix"], ("group", "tokens"), f"{path}.prefix")
        if "group" not in prefix or "tokens" not in prefix:
            raise WorkloadError("a prefix needs `group` and `tokens`", field=f"{path}.prefix")
        try:
            kwargs["prefix"] = PrefixSettings(str(prefix["group"]), int(parse_size(prefix["tokens"], f"{path}.prefix.tokens")))
        except WorkloadError as err:
            raise err.within(prefix=f"{path}.prefix") from None
    if data.get("session") is not None:
        sess = _check_keys(data["session"], _SESSION_KEYS, f"{path}.session")
        skw: dict[str, Any] = {}
        if "turns" in sess:
            skw["turns"] = parse_distribution(sess["turns"], f"{path}.session.turns")
        if "think_time_s" in sess:
            skw["think_time_s"] = parse_distribution(sess["think_time_s"], f"{path}.session.think_time_s")
        if "history" in sess:
            if not isinstance(sess["history"], bool):
                raise WorkloadError(f"expected true or false, got {sess['history']!r}", field=f"{path}.session.history")
            skw["history"] = sess["history"]
        try:
            kwargs["session"] = SessionSettings(**skw)
        except WorkloadError as err:
            raise err.within(prefix=f"{path}.session") from None
    if data.get("labels") is not None:
        labels = data["labels"]
        if not isinstance(labels, dict):
            raise WorkloadError("expected a mapping of label names to values", field=f"{path}.labels")
        kwargs["labels"] = {str(k): str(v) for k, v in labels.items()}
    try:
        return RequestClass(**kwargs)
    except WorkloadError as err:
        raise err.within(prefix=path) from None


def spec_from_dict(data: Any, source: str | None = None) -> WorkloadSpec:
    """Validate plain data (parsed YAML) into a WorkloadSpec; errors carry `source` and the field path."""
    try:
        data = _check_keys(data, _SPEC_KEYS, "")
        classes = data.get("classes")
        if not isinstance(classes, list) or not classes:
            raise WorkloadError("expected a non-empty list of request classes", field="classes")
        kwargs: dict[str, Any] = {
            "name": str(data.get("name") or (Path(source).stem if source else "workload")),
            "description": str(data.get("description") or ""),
            "classes": tuple(_parse_class(c, f"classes[{i}]") for i, c in enumerate(classes)),
            "source": source,
        }
        if data.get("seed") is not None:
            if isinstance(data["seed"], bool) or not isinstance(data["seed"], int):
                raise WorkloadError(f"expected an integer, got {data['seed']!r}", field="seed")
            kwargs["seed"] = data["seed"]
        if data.get("arrival") is not None:
            kwargs["arrival"] = str(data["arrival"])
        if data.get("buckets") is not None:
            raw = _check_keys(data["buckets"], ("prompt", "output"), "buckets")
            bkw = {}
            for key in ("prompt", "output"):
                if key in raw:
                    if not isinstance(raw[key], list):
                        raise WorkloadError("expected a list of edges such as [256, 1k, 4k]", field=f"buckets.{key}")
                    bkw[key] = tuple(int(parse_size(v, f"buckets.{key}")) for v in raw[key])
            try:
                kwargs["buckets"] = Buckets(**bkw)
            except WorkloadError as err:
                raise err.within(prefix="buckets") from None
        return WorkloadSpec(**kwargs)
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
