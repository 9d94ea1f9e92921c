"""Asking a target what it serves before the run starts.

`resolve_model` picks the model name: the user's `--model`, else the first id
of `GET /v1/models`, else (for the bundled engine) its preset name; otherwise
a clear error asking for `--model`.
"""

from __future__ import annotations

import httpx

from harness.config import ConfigError

PROBE_TIMEOUT_S = 5.0


def auth_headers(api_key: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {api_key}"} if api_key else {}


def list_models(base_url: str, api_key: str | None = None) -> list[str]:
    """Model ids from `GET /v1/models` (OpenAI shape: {"data": [{"id": ...}]}); raises on any failure."""
    response = httpx.get(f"{base_url}/v1/models", headers=auth_headers(api_key), timeout=PROBE_TIMEOUT_S)
    response.raise_for_status()
    data = response.json().get("data") or []
    return [str(item["id"]) for item in data if isinstance(item, dict) and item.get("id")]


def resolve_model(base_url: str, model: str | None, api_key: str | None, fallback: str | None) -> tuple[str, str]:
    """(model name, where it came from: "flag" | "/v1/models" | "engine preset")."""
    if model:
        return model, "flag"
    try:
        ids = list_models(base_url, api_key)
        if ids:
            return ids[0], "/v1/models"
        reason = "it listed no models"
    except (httpx.HTTPError, ValueError) as exc:
        reason = f"{type(exc).__name__}: {exc}"
    if fallback:
        return fallback, "engine preset"
    raise ConfigError(
        f"cannot tell which model {base_url} serves: GET /v1/models failed ({reason}). "
        "Pass the served model name with --model NAME."
    )
