"""servescope's load generator: CLI, load models, streaming client, workers, run directory."""

__version__ = "0.1.0"
