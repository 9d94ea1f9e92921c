"""Where requests go: the parsed base URL and the OpenAI-compatible paths under it."""

from __future__ import annotations

from dataclasses import dataclass
from urllib.parse import urlsplit

API_PATHS = {"completions": "/v1/completions", "chat": "/v1/chat/completions"}
# Cheap GETs that open a connection without loading the server, tried in order.
PREWARM_PATHS = ("/health", "/v1/models", "/")


@dataclass(frozen=True, slots=True)
class Endpoint:
    scheme: str
    host: str
    port: int
    base_path: str  # "" or a prefix such as "/openai", never ending in "/"

    @classmethod
    def from_url(cls, base_url: str) -> "Endpoint":
        parts = urlsplit(base_url)
        base_path = parts.path.rstrip("/")
        # Users often paste the URL they give the OpenAI SDK (".../v1"); the
        # client appends /v1/... itself, so drop it rather than send /v1/v1/.
        if base_path.endswith("/v1"):
            base_path = base_path[: -len("/v1")]
        port = parts.port or (443 if parts.scheme == "https" else 80)
        return cls(parts.scheme, parts.hostname or "", port, base_path)

    @property
    def tls(self) -> bool:
        return self.scheme == "https"

    @property
    def host_header(self) -> str:
        default = 443 if self.tls else 80
        host = f"[{self.host}]" if ":" in self.host else self.host
        return host if self.port == default else f"{host}:{self.port}"

    @property
    def origin(self) -> str:
        return f"{self.scheme}://{self.host_header}"

    def path(self, suffix: str) -> str:
        return self.base_path + suffix
