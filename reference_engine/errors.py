"""The engine's exceptions, in one place so callers can tell bad input from bad setup."""

from __future__ import annotations


class EngineError(Exception):
    """Base class of every error the reference engine raises on purpose."""


class ConfigError(EngineError):
    """A bad flag, preset or checkpoint: the message says what was wrong and what is allowed."""


class InvalidRequest(EngineError):
    """A request the engine cannot serve; the server turns it into an OpenAI-style 400."""

    def __init__(self, message: str, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.code = code
