"""`python -m servescope.reference_engine [flags]`: the same command as `servescope serve`."""

from servescope.reference_engine.cli import serve

if __name__ == "__main__":
    serve(prog_name="python -m servescope.reference_engine")
