"""The flags that `servescope run` and `servescope capacity` share, declared once.

Each option's parameter name is the `RunConfig` field it fills, so a command
builds its config with `RunConfig(**picked(values, GROUP, ...))` and a flag
added here reaches every command that takes its group, with one help text.
Validation stays in `RunConfig`: the flags only carry strings and numbers.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import click

Decorator = Callable[[Callable[..., Any]], Callable[..., Any]]
Group = tuple[tuple[tuple[str, str], dict[str, Any]], ...]


def _opt(decls: list[str], **kwargs: Any) -> tuple[tuple[str, str], dict[str, Any]]:
    """One option: its flag and the RunConfig field it fills (the click parameter name), and click's settings."""
    flag, field = decls
    return (flag, field), kwargs

WORKERS_HELP = (
    "Load-generator processes. Default: min(CPUs - 1, ceil(max(peak concurrency / 48, peak rate / 200))), at least 1."
)

TARGET: Group = (
    _opt(["--target", "target"], metavar="URL",
                 help="Base URL of an OpenAI-compatible server (http://127.0.0.1:8000)."),
    _opt(["--engine", "engine"], metavar="reference[:PRESET]",
                 help="Start the bundled engine (the default without --target)."),
    _opt(["--engine-arg", "engine_args"], multiple=True, metavar="ARG",
                 help="Extra argument for the bundled engine, repeatable (e.g. --engine-arg=--max-num-seqs=8)."),
    _opt(["--model", "model"], help="Model name to request. Default: the first id of GET /v1/models."),
    _opt(["--api-key-env", "api_key_env"], metavar="VAR",
                 help="Environment variable holding the API key (never written to disk)."),
)

WORKLOAD: Group = (
    _opt(["--workload", "workload"], metavar="PRESET|FILE.yaml", help="Workload preset name or YAML file."),
    _opt(["--users", "users"], metavar="FILE.py|EXAMPLE",
                 help="Scripted users (User classes with @task coroutines) instead of a workload; "
                      "or a bundled example (agent_loop, rag_flow, chat_history, planner)."),
    _opt(["--api", "api"], type=click.Choice(["completions", "chat"]),
                 help="API to use (default: the workload's)."),
    _opt(["--prompt-tokens", "prompt_tokens"], type=int,
                 help="Fix the prompts' length in the workload (default: 128)."),
    _opt(["--max-tokens", "max_tokens"], type=int,
                 help="Fix the outputs' length (default: 64; forced without --workload)."),
    _opt(["--tokenizer", "tokenizer"], type=click.Path(file_okay=False),
                 help="Target's tokenizer folder (default: the bundled one)."),
    _opt(["--force-output-length", "force_output_length"], is_flag=True,
                 help="Send min_tokens/ignore_eos so outputs have max_tokens tokens."),
)

CLIENT: Group = (
    _opt(["--arrival", "arrival"], default="poisson", show_default=True,
                 help="Open-loop spacing: poisson | constant | gamma:CV."),
    _opt(["--timeout", "timeout_s"], default="60s", show_default=True, help="Idle timeout per request."),
    _opt(["--workers", "workers"], type=int, help=WORKERS_HELP),
    _opt(["--seed", "seed"], type=int, default=0, show_default=True,
                 help="Seed of the workload and the arrival times."),
    _opt(["--metrics-url", "metrics_url"], multiple=True, metavar="URL",
                 help="Prometheus endpoint to scrape, repeatable: the engine, a DCGM exporter, node-exporter "
                      "(default: the target's /metrics, if it answers)."),
    _opt(["--ray", "ray"], is_flag=False, flag_value="auto", default=None, metavar="[ADDRESS]",
                 help="Run the workers as Ray actors on a cluster (auto: the running one or RAY_ADDRESS; HOST:PORT; "
                      "ray://HOST:PORT), one per CPU, default as many as its nodes spare; needs servescope[ray]."),
    _opt(["--transport", "transport"], default="auto", show_default=True, metavar="auto|fast|httpx|aiohttp",
                 help="HTTP client: auto is the fast asyncio+httptools one; httpx and aiohttp are fallbacks."),
)


def with_options(*groups: Group) -> Decorator:
    """Add the groups' options to a click command, listed in `--help` in the order given.

    Each command gets its own click.Option objects (click keeps per-command state on them).
    """
    def decorate(command: Callable[..., Any]) -> Callable[..., Any]:
        for decls, kwargs in reversed([spec for group in groups for spec in group]):
            command = click.option(*decls, **kwargs)(command)
        return command

    return decorate


def picked(values: dict[str, Any], *groups: Group) -> dict[str, Any]:
    """The RunConfig fields the groups' options filled."""
    return {field: values[field] for group in groups for (_, field), _ in group}
