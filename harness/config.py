"""`RunConfig`: everything `servescope run` needs, validated before anything starts.

The command line, `servescope lab`, `servescope capacity` and `--repeat` all
build one of these and hand it to `harness.api.execute_run`, so every flag is
checked in one place. Bad values raise `ConfigError` with a message naming the
flag, what was wrong and how to fix it; the CLI turns it into exit status 2.

Durations accept `500ms`, `2s`, `1m` (and plain seconds as numbers);
load models are spelled as in DESIGN.md: `--concurrency N`, `--rate R
--arrival poisson|constant|gamma:CV`, `--sweep rate:1,2,4` or
`--sweep concurrency:1,8,64`, `--trace FILE`.
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import asdict, dataclass
from typing import Any

from servescope.errors import UsageError
from servescope.units import DurationError, parse_seconds

APIS = ("completions", "chat")
ARRIVALS = ("poisson", "constant", "gamma")
TRACE_FORMATS = ("auto", "burstgpt", "mooncake", "otel", "agent-graph")  # as workloads.trace_formats reads them
DEFAULT_DURATION_S = 60.0  # used when neither --duration nor --requests is given (trace: whole trace)
DEFAULT_GRACE_S = 5.0  # Ctrl-C: how long in-flight requests may finish before they are cancelled
LIVE_DEFAULT_PORT = 8089  # `--live` without a port; a free port is taken when this one is busy

class ConfigError(UsageError):
    """A run option that cannot work; the message says which one, why, and how to fix it."""


def parse_duration(value: str | float | int, flag: str = "duration") -> float:
    """Seconds from `500ms`, `2s`, `1m`, `1.5` (seconds) or a number; errors name the flag."""
    try:
        return parse_seconds(value)
    except DurationError as exc:
        raise ConfigError(f"--{flag}: {exc}") from None


@dataclass(frozen=True)
class Arrival:
    """How open-loop send times are spaced: `poisson`, `constant` or `gamma` with coefficient of variation `cv`."""

    kind: str = "poisson"
    cv: float = 1.0

    def __post_init__(self) -> None:
        if self.kind not in ARRIVALS:
            raise ConfigError(f"--arrival: unknown kind {self.kind!r}; use poisson, constant or gamma:CV (e.g. gamma:2)")
        if self.kind == "gamma" and not (self.cv > 0 and math.isfinite(self.cv)):
            raise ConfigError(f"--arrival gamma:CV needs a positive CV (burstiness; 1 = poisson), got {self.cv}")

    @classmethod
    def parse(cls, text: str) -> "Arrival":
        kind, _, arg = text.strip().lower().partition(":")
        if kind == "gamma":
            try:
                return cls("gamma", float(arg) if arg else 1.0)
            except ValueError:
                raise ConfigError(f"--arrival {text!r}: CV must be a number, e.g. gamma:2") from None
        if arg:
            raise ConfigError(f"--arrival {text!r}: only gamma takes a parameter (gamma:CV)")
        return cls(kind)

    def __str__(self) -> str:
        return f"gamma:{self.cv:g}" if self.kind == "gamma" else self.kind


@dataclass(frozen=True)
class Sweep:
    """`--sweep rate:1,2,4` or `--sweep concurrency:1,8,64`: one phase per value."""

    kind: str  # "rate" | "concurrency"
    values: tuple[float, ...]

    def __post_init__(self) -> None:
        if self.kind not in ("rate", "concurrency"):
            raise ConfigError(f"--sweep: unknown kind {self.kind!r}; write rate:1,2,4 or concurrency:1,8,64")
        if not self.values:
            raise ConfigError("--sweep: give at least one value, e.g. rate:1,2,4")
        for v in self.values:
            if not (v > 0 and math.isfinite(v)):
                raise ConfigError(f"--sweep: every value must be positive, got {v:g}")
            if self.kind == "concurrency" and v != int(v):
                raise ConfigError(f"--sweep concurrency: values must be whole numbers, got {v:g}")

    @classmethod
    def parse(cls, text: str) -> "Sweep":
        kind, sep, values = text.strip().partition(":")
        if not sep:
            raise ConfigError(f"--sweep {text!r}: write KIND:V1,V2,..., e.g. rate:1,2,4,8 or concurrency:1,8,64")
        try:
            parsed = tuple(float(v) for v in values.split(",") if v.strip())
        except ValueError:
            raise ConfigError(f"--sweep {text!r}: values must be numbers separated by commas") from None
        return cls(kind.strip().lower(), parsed)

    def __str__(self) -> str:
        return f"{self.kind}:" + ",".join(f"{v:g}" for v in self.values)


def check_slo(text: str) -> str:
    """Judge `--slo` before any load is sent, with the analyzers' own parser.

    A typo found only after a ten-minute run costs the run; parsing here uses the
    same grammar the report will apply, so what passes here is what gets judged.
    """
    from servescope.slo import SLOError, parse_slos  # imported lazily: pandas is slow to load

    try:
        if not parse_slos(text):
            raise ConfigError("--slo: empty; write e.g. ttft_p99=500ms,tpot_p99=50ms")
    except SLOError as exc:
        raise ConfigError(f"--slo: {exc}") from None
    return text.strip()


@dataclass
class RunConfig:
    """The options of one `servescope run` (DESIGN.md "The command line").

    Exactly one of `target` (a base URL) or `engine` (`reference` or
    `reference:PRESET`, the default when neither is set) names what is driven.
    At most one load model: `concurrency`, `rate` (+ `arrival`), `sweep` or
    `trace`; with none, the run is closed-loop `concurrency=1`.
    Durations may be given as strings (`"10s"`) and are stored as seconds.
    """

    target: str | None = None
    engine: str | None = None
    engine_args: tuple[str, ...] = ()
    model: str | None = None
    api: str | None = None  # None: the workload's own choice
    workload: str | None = None
    users: str | None = None  # --users FILE.py | bundled example: scripted users instead of a workload
    spawn_rate: float | None = None  # --spawn-rate: closed loop, users (slots) started per second
    ray: str | None = None  # --ray [ADDRESS]: workers as Ray actors on this cluster (auto, host:port, ray://host:port)
    prompt_tokens: int | None = None
    max_tokens: int | None = None
    concurrency: int | None = None
    rate: float | None = None
    arrival: Arrival | str = "poisson"
    sweep: Sweep | str | None = None
    trace: str | None = None
    trace_speed: float = 1.0
    trace_format: str = "auto"  # --trace-format: what --trace FILE is (workloads.trace_formats.TRACE_FORMATS)
    duration_s: float | str | None = None
    requests: int | None = None
    warmup_s: float | str = 0.0
    ramp_s: float | str = 0.0
    tokenizer: str | None = None
    metrics_url: str | tuple[str, ...] | None = None  # one URL or several (`--metrics-url` repeated); kept as a tuple
    workers: int | None = None
    timeout_s: float | str = 60.0
    seed: int = 0
    slo: str | None = None
    api_key_env: str | None = None
    out: str | None = None
    report: bool = True
    stream: bool = True
    transport: str = "auto"  # HTTP client: auto (= fast) | fast | httpx | aiohttp (harness/client/transports)
    force_output_length: bool = False
    repeat: int = 1
    grace_s: float | str = DEFAULT_GRACE_S
    command_line: tuple[str, ...] = ()  # what the user typed, for run.json (keys redacted there)
    show_progress: bool | None = None  # None: when stdout is a terminal
    live: int | None = None  # --live [PORT]: serve the live page on this port (0: any free port)
    live_host: str = "127.0.0.1"  # --live-host: loopback unless asked; elsewhere the page needs the printed token

    def __post_init__(self) -> None:
        self._check_target()
        self._check_workload()
        self._check_load()
        self.duration_s = None if self.duration_s is None else parse_duration(self.duration_s, "duration")
        self.warmup_s = parse_duration(self.warmup_s, "warmup")
        self.ramp_s = parse_duration(self.ramp_s, "ramp")
        self.timeout_s = parse_duration(self.timeout_s, "timeout")
        self.grace_s = parse_duration(self.grace_s, "grace")
        if self.duration_s == 0:
            raise ConfigError("--duration: must be longer than 0s, e.g. --duration 30s")
        if self.timeout_s == 0:
            raise ConfigError("--timeout: must be longer than 0s, e.g. --timeout 60s")
        if self.requests is not None and self.requests < 1:
            raise ConfigError(f"--requests: must be at least 1, got {self.requests}")
        if self.ray is not None and not self.ray.strip():
            raise ConfigError("--ray: give a cluster address (auto, HOST:PORT or ray://HOST:PORT), or --ray alone for auto")
        if self.workers is not None and self.workers < 1:
            raise ConfigError(f"--workers: must be at least 1, got {self.workers}")
        if self.repeat < 1:
            raise ConfigError(f"--repeat: must be at least 1, got {self.repeat}")
        from servescope.harness.client.config import check_transport

        try:
            check_transport(self.transport)
        except ValueError as exc:
            raise ConfigError(f"--transport: {exc}") from None
        if self.slo is not None:
            self.slo = check_slo(self.slo)
        if self.api_key_env is not None and not self.api_key_env.strip():
            raise ConfigError("--api-key-env: give the NAME of an environment variable holding the key, e.g. OPENAI_API_KEY")
        urls = (self.metrics_url,) if isinstance(self.metrics_url, str) else tuple(self.metrics_url or ())
        self.metrics_url = tuple(_check_url(url, "metrics-url") for url in urls) or None
        if self.live is not None and not 0 <= self.live <= 65535:
            raise ConfigError(f"--live: a port number from 1 to 65535 (0: any free port), got {self.live}")
        if not self.live_host.strip():
            raise ConfigError("--live-host: give an address to bind the live page to, e.g. 127.0.0.1 or 0.0.0.0")

    # -- validation, one concern each -------------------------------------------------

    def _check_target(self) -> None:
        if self.target and self.engine:
            raise ConfigError("give either --target URL or --engine reference[:PRESET], not both")
        if self.target:
            self.target = _check_url(self.target, "target").rstrip("/")
            if self.target.endswith("/v1"):
                raise ConfigError(
                    f"--target {self.target}: give the server's base URL without /v1 "
                    "(servescope appends /v1/completions or /v1/chat/completions)"
                )
            if self.engine_args:
                raise ConfigError("--engine-arg only applies to --engine reference; drop it when using --target")
        else:
            self.engine = self.engine or "reference"
            name, colon, preset = self.engine.partition(":")
            if name != "reference":
                raise ConfigError(f"--engine {self.engine!r}: only the bundled engine exists; write reference or reference:PRESET")
            if colon and not preset:
                raise ConfigError("--engine reference:PRESET needs a preset name after the colon")
        self.engine_args = tuple(self.engine_args)

    def _check_workload(self) -> None:
        if self.api is not None and self.api not in APIS:
            raise ConfigError(f"--api: must be completions or chat, got {self.api!r}")
        # Each of --prompt-tokens / --max-tokens, alone or together, fixes that length in the workload
        # (the default one without --workload): workloads.spec.with_lengths.
        for flag, value in (("--prompt-tokens", self.prompt_tokens), ("--max-tokens", self.max_tokens)):
            if value is not None and value < 1:
                raise ConfigError(f"{flag}: must be at least 1, got {value}")
        if self.trace and (self.workload or self.prompt_tokens is not None or self.max_tokens is not None):
            raise ConfigError("--trace brings its own requests; drop --workload/--prompt-tokens/--max-tokens")
        if self.users is not None:
            clashing = [flag for flag, value in (("--workload", self.workload), ("--trace", self.trace),
                                                 ("--prompt-tokens", self.prompt_tokens),
                                                 ("--max-tokens", self.max_tokens), ("--api", self.api)) if value]
            if clashing:
                raise ConfigError(f"--users: the script makes its own calls; drop {', '.join(clashing)} "
                                  "(set prompt and output lengths in the script: self.prompt(tokens=N), max_tokens=M)")

    def _check_load(self) -> None:
        given = [name for name, v in (("--concurrency", self.concurrency), ("--rate", self.rate),
                                      ("--sweep", self.sweep), ("--trace", self.trace)) if v is not None]
        if len(given) > 1:
            raise ConfigError(f"choose one load model, got {' and '.join(given)}")
        if self.concurrency is not None and self.concurrency < 1:
            raise ConfigError(f"--concurrency: must be at least 1, got {self.concurrency}")
        if self.rate is not None and not (self.rate > 0 and math.isfinite(self.rate)):
            raise ConfigError(f"--rate: must be a positive number of requests per second, got {self.rate}")
        if self.spawn_rate is not None:
            if not (self.spawn_rate > 0 and math.isfinite(self.spawn_rate)):
                raise ConfigError(f"--spawn-rate: must be a positive number of users per second, got {self.spawn_rate}")
            if self.rate is not None or self.trace is not None or (self.sweep is not None and "rate" in str(self.sweep)):
                raise ConfigError("--spawn-rate starts closed-loop users (--concurrency); with --rate users arrive at "
                                  "the rate: drop --spawn-rate")
            if parse_duration(self.ramp_s, "ramp") > 0:
                raise ConfigError("--spawn-rate and --ramp both set how the users start: give one of them")
        if isinstance(self.arrival, str):
            self.arrival = Arrival.parse(self.arrival)
        if isinstance(self.sweep, str):
            self.sweep = Sweep.parse(self.sweep)
        if not (self.trace_speed > 0 and math.isfinite(self.trace_speed)):
            raise ConfigError(f"--trace-speed: must be positive (2 = twice as fast), got {self.trace_speed}")
        if self.trace is not None and not os.path.isfile(self.trace):
            raise ConfigError(f"--trace {self.trace}: no such file")
        if self.trace_format not in TRACE_FORMATS:
            raise ConfigError(f"--trace-format: one of {', '.join(TRACE_FORMATS)}, got {self.trace_format!r}")
        if self.trace_format != "auto" and self.trace is None:
            raise ConfigError("--trace-format says what the --trace FILE is: give --trace FILE too, or drop it")

    # -- derived views ------------------------------------------------------------------

    @property
    def engine_preset(self) -> str | None:
        if not self.engine:
            return None
        return self.engine.partition(":")[2] or None

    @property
    def length_overrides(self) -> dict[str, int]:
        """The workload lengths fixed by --prompt-tokens / --max-tokens, named by workload field (for run.json)."""
        return {name: value for name, value in (("prompt_tokens", self.prompt_tokens), ("output_tokens", self.max_tokens))
                if value is not None}

    def ramp_for(self, concurrency: float) -> float:
        """Closed loop: seconds over which `concurrency` users start (--spawn-rate, else --ramp)."""
        return concurrency / self.spawn_rate if self.spawn_rate else float(self.ramp_s)

    @property
    def load_kind(self) -> str:
        if self.trace is not None:
            return "trace"
        if self.sweep is not None:
            return f"sweep-{self.sweep.kind}"
        if self.rate is not None:
            return "rate"
        return "concurrency"

    def read_api_key(self) -> str | None:
        """The API key from the environment (never stored in the config or run.json)."""
        if self.api_key_env is None:
            return None
        key = os.environ.get(self.api_key_env)
        if not key:
            raise ConfigError(f"--api-key-env {self.api_key_env}: that environment variable is not set or empty")
        return key

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready view for run.json: no secrets (the key's variable name only)."""
        data = asdict(self)
        data["arrival"] = str(self.arrival)
        data["sweep"] = None if self.sweep is None else str(self.sweep)
        data["engine_args"] = list(self.engine_args)
        data.pop("command_line")
        data.pop("show_progress")
        return data


def _check_url(url: str, flag: str) -> str:
    if not re.match(r"^https?://[^/\s]+", url):
        raise ConfigError(f"--{flag} {url!r}: expected an http(s) URL such as http://127.0.0.1:8000")
    return url


def redact_command_line(argv: list[str] | tuple[str, ...]) -> list[str]:
    """The command line with any literal key/token value replaced by `***` (e.g. `--api-key X`, `key=X`)."""
    out: list[str] = []
    hide_next = False
    for arg in argv:
        if hide_next:
            out.append("***")
            hide_next = False
            continue
        lowered = arg.lower()
        if re.match(r"^--?[\w-]*(key|token|secret|password)[\w-]*$", lowered) and not lowered.endswith("-env"):
            hide_next = True
            out.append(arg)
        elif re.match(r"^--?[\w-]*(key|token|secret|password)[\w-]*=", lowered) and "-env=" not in lowered:
            out.append(arg.split("=", 1)[0] + "=***")
        elif re.match(r"^(sk|api|key)[-_][A-Za-z0-9_-]{12,}$", arg) or lowered.startswith("bearer "):
            out.append("***")
        else:
            out.append(arg)
    return out

