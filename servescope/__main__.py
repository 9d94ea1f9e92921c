"""`python -m servescope ...`: the same command as `servescope ...`."""

from servescope.cli import main

main(prog_name="servescope")
