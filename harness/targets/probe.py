"""Asking a target what it serves before the run starts.

`resolve_model` picks the model name: the user's `--model`, else the first id
of `GET /v1/models`, else (for the bundled engine) its preset name; otherwise
a clear error asking for `--model`. `GET /v1/models` is asked even when
`--model` is given, so that the console can say when it fails (some servers
answer it with a 500: `transformers serve`) or does not list that name (a typo
that would turn every request into a 404).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import httpx

from servescope.harness.config import ConfigError

PROBE_TIMEOUT_S = 5.0
MAX_REASON = 200


def auth_headers(api_key: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {api_key}"} if api_key else {}


def list_models(base_url: str, api_key: str | None = None) -> list[str]:
    """Model ids from `GET /v1/models` (OpenAI shape: {"data": [{"id": ...}]}); raises on any failure."""
    response = httpx.get(f"{base_url}/v1/models", headers=auth_headers(api_key), timeout=PROBE_TIMEOUT_S)
    response.raise_for_status()
    data = response.json().get("data") or []
    return [str(item["id"]) for item in data if isinstance(item, dict) and item.get("id")]


def describe_failure(exc: Exception) -> str:
    """A one-line reason: "HTTP 500: <the server's message>", "cannot connect: ...", "answer is not JSON"."""
    if isinstance(exc, httpx.HTTPStatusError):
        response = exc.response
        said = _error_text(response)
        return f"HTTP {response.status_code}" + (f": {said}" if said else "")
    if isinstance(exc, httpx.ConnectError):
        return f"cannot connect ({exc})"
    if isinstance(exc, httpx.TimeoutException):
        return f"no answer within {PROBE_TIMEOUT_S:g}s"
    if isinstance(exc, (ValueError, AttributeError)):
        return "the answer is not the OpenAI model list (JSON with a data list)"
    return f"{type(exc).__name__}: {exc}"


def _error_text(response: httpx.Response) -> str:
    try:
        body: Any = response.json()
    except ValueError:
        text = response.text.strip()
    else:
        err = body.get("error") if isinstance(body, dict) else None
        if isinstance(err, dict) and err.get("message"):
            text = str(err["message"])
        elif isinstance(body, dict) and (err or body.get("detail") or body.get("message")):
            text = str(err or body.get("detail") or body.get("message"))
        else:
            text = response.text.strip()
    text = " ".join(text.split())
    return text if len(text) <= MAX_REASON else text[: MAX_REASON - 3] + "..."


@dataclass
class ModelChoice:
    """The model the run requests, where the name came from, and what GET /v1/models said."""

    name: str
    source: str  # "flag" | "/v1/models" | "engine preset"
    listed: list[str] | None = None  # ids GET /v1/models listed (None: it failed)
    problem: str | None = None  # why GET /v1/models gave no usable list
    remarks: list[str] = field(default_factory=list)  # for the console (warnings)

    def describe(self) -> dict[str, Any]:
        """run.json's `models_endpoint`."""
        return {"ok": self.problem is None, "ids": self.listed, "problem": self.problem}


def resolve_model(base_url: str, model: str | None, api_key: str | None, fallback: str | None) -> ModelChoice:
    endpoint = f"GET {base_url}/v1/models"
    ids: list[str] | None = None
    problem: str | None = None
    try:
        ids = list_models(base_url, api_key)
        if not ids:
            problem = "it listed no models"
    except (httpx.HTTPError, ValueError, AttributeError) as exc:
        problem = describe_failure(exc)
    if model:
        choice = ModelChoice(model, "flag", ids, problem)
        if problem:
            choice.remarks.append(f"{endpoint} failed ({problem}); requesting model {model!r} as given by --model")
        elif model not in ids:  # type: ignore[operator]
            shown = ", ".join(repr(i) for i in ids[:5]) + (" …" if len(ids) > 5 else "")  # type: ignore[index]
            choice.remarks.append(f"--model {model!r} is not among the models {endpoint} lists ({shown}); "
                                  "requests may fail with 404")
        return choice
    if ids:
        return ModelChoice(ids[0], "/v1/models", ids, None)
    if fallback:
        return ModelChoice(fallback, "engine preset", ids, problem,
                           [f"{endpoint} failed ({problem}); requesting the engine preset name {fallback!r}"])
    raise ConfigError(
        f"cannot tell which model {base_url} serves: {endpoint} failed ({problem}). "
        "--model is needed with this server: pass the name it expects in a request's \"model\" field "
        "with --model NAME (for `transformers serve` or `vllm serve`, the model path or id it was started with)."
    )
