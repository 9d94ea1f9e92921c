"""`servescope run`: parse the flags into a RunConfig and call `harness.orchestration.repeat.execute_run`.

Everything the command does is in the harness; this module only maps flags
to fields and exit codes (0 complete, 1 SLO missed / run failed, 2 bad usage,
130 interrupted).
"""

from __future__ import annotations

import sys

import click

from servescope.harness.commands.options import CLIENT, TARGET, WORKLOAD, with_options
from servescope.harness.config import LIVE_DEFAULT_PORT, TRACE_FORMATS


@click.command("run", context_settings={"help_option_names": ["-h", "--help"]})
@with_options(TARGET, WORKLOAD)
@click.option("--concurrency", type=int, help="Closed loop: N requests in flight (with --users: N users).")
@click.option("--spawn-rate", "spawn_rate", type=float,
              help="Closed loop: start the N users (slots) at this many per second instead of all at once.")
@click.option("--rate", type=float, help="Open loop: R requests per second (with --users: R arriving users per second).")
@click.option("--sweep", metavar="SPEC", help="One phase per value: rate:1,2,4,8 or concurrency:1,8,64.")
@click.option("--trace", type=click.Path(dir_okay=False),
              help="Replay a trace: request arrivals (BurstGPT .csv, Mooncake .jsonl) or agent traces "
                   "(OTLP GenAI spans .json/.jsonl, agent-graph .jsonl), each trace a flow.")
@click.option("--trace-speed", type=float, default=1.0, show_default=True,
              help="Trace replay speed (2 = twice as fast): scales arrivals and the gaps between an agent's calls.")
@click.option("--trace-format", type=click.Choice(TRACE_FORMATS), default="auto", show_default=True,
              help="What --trace FILE is, when its name and first record do not tell.")
@click.option("--duration", "duration_s", help="Per phase: 500ms, 30s, 1m (default 60s unless --requests is given).")
@click.option("--requests", type=int,
              help="Per phase: this many sessions (requests, single-turn; with --users: tasks; agent traces: traces).")
@click.option("--warmup", "warmup_s", default="0s", show_default=True,
              help="Warm-up at the first phase's load (phase `warmup`, not summarized).")
@click.option("--ramp", "ramp_s", default="0s", show_default=True,
              help="Linear ramp of the rate or concurrency at the start of each phase.")
@with_options(CLIENT)
@click.option("--slo", help="Objectives, e.g. ttft_p99=500ms,tpot_p99=50ms (exit 1 when missed).")
@click.option("--out", type=click.Path(file_okay=False), help="Run directory (default: runs/run-<time>).")
@click.option("--report/--no-report", default=True, help="Build report.html (summary.json is always written).")
@click.option("--stream/--no-stream", default=True, help="Streaming requests (--no-stream: E2E only).")
@click.option("--repeat", type=int, default=1, show_default=True, help="Run N times into OUT/run-1..N (for noise-aware compare).")
@click.option("--grace", "grace_s", default="5s", show_default=True, help="Ctrl-C: how long in-flight requests may finish.")
@click.option("--live", type=int, is_flag=False, flag_value=LIVE_DEFAULT_PORT, default=None, metavar="[PORT]",
              help=f"Serve a live page of the run on PORT (default {LIVE_DEFAULT_PORT}; 0: any free port): charts, "
                   "findings as they fire, a stop button.")
@click.option("--live-host", default="127.0.0.1", show_default=True,
              help="Address of the live page; off loopback it needs the token printed on the console.")
def run(**options: object) -> int:
    """Drive a target (or the bundled engine) with a workload and measure every request."""
    from servescope.harness.config import RunConfig
    from servescope.harness.orchestration.repeat import execute_run

    return execute_run(RunConfig(**options, command_line=tuple(sys.argv))).exit_code
