"""What the load is sent to: the bundled engine (started as a subprocess) or any OpenAI-compatible URL."""

from servescope.harness.targets.engine import EngineError, EngineProcess, free_port
from servescope.harness.targets.probe import auth_headers, list_models, resolve_model

__all__ = ["EngineError", "EngineProcess", "auth_headers", "free_port", "list_models", "resolve_model"]
