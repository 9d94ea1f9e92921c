"""The servescope version, in a module of its own so that workers and the engine read it without importing the public API."""

__version__ = "0.1.0"
