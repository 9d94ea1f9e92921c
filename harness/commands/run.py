"""`servescope run`: parse the flags into a RunConfig and call `harness.orchestration.repeat.execute_run`.

Everything the command does is in the harness; this module only maps flags
to fields and exit codes (0 complete, 1 SLO missed / run failed, 2 bad usage,
130 interrupted).
"""

from __future__ import annotations

import sys

import click

WORKERS_HELP = (
    "Load-generator processes. Default: min(CPUs - 1, ceil(max(peak concurrency / 48, peak rate / 200))), at least 1."
)


@click.command("run", context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--target", metavar="URL", help="Base URL of an OpenAI-compatible server (http://127.0.0.1:8000).")
@click.option("--engine", metavar="reference[:PRESET]", help="Start the bundled engine (the default without --target).")
@click.option("--engine-arg", "engine_args", multiple=True, metavar="ARG",
              help="Extra argument for the bundled engine, repeatable (e.g. --engine-arg=--max-num-seqs=8).")
@click.option("--model", help="Model name to request. Default: the first id of GET /v1/models.")
@click.option("--api", type=click.Choice(["completions", "chat"]), help="API to use (default: the workload's).")
@click.option("--workload", metavar="PRESET|FILE.yaml", help="Workload preset name or YAML file.")
@click.option("--prompt-tokens", type=int, help="Fix the prompts' length in the workload (default: 128).")
@click.option("--max-tokens", type=int, help="Fix the outputs' length (default: 64; forced without --workload).")
@click.option("--concurrency", type=int, help="Closed loop: N requests in flight.")
@click.option("--rate", type=float, help="Open loop: R requests per second.")
@click.option("--arrival", default="poisson", show_default=True, help="Open-loop spacing: poisson | constant | gamma:CV.")
@click.option("--sweep", metavar="SPEC", help="One phase per value: rate:1,2,4,8 or concurrency:1,8,64.")
@click.option("--trace", type=click.Path(dir_okay=False), help="Replay the arrivals of a trace file.")
@click.option("--trace-speed", type=float, default=1.0, show_default=True, help="Trace replay speed (2 = twice as fast).")
@click.option("--duration", help="Per phase: 500ms, 30s, 1m (default 60s unless --requests is given).")
@click.option("--requests", "num_requests", type=int, help="Per phase: this many sessions (requests, single-turn).")
@click.option("--warmup", default="0s", show_default=True, help="Warm-up at the first phase's load (phase `warmup`, not summarized).")
@click.option("--ramp", default="0s", show_default=True, help="Linear ramp of the rate or concurrency at the start of each phase.")
@click.option("--tokenizer", type=click.Path(file_okay=False), help="Target's tokenizer folder (default: the bundled one).")
@click.option("--metrics-url", help="Prometheus endpoint to scrape (default: the target's /metrics, if it answers).")
@click.option("--workers", type=int, help=WORKERS_HELP)
@click.option("--timeout", default="60s", show_default=True, help="Idle timeout per request.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the workload and the arrival times.")
@click.option("--slo", help="Objectives, e.g. ttft_p99=500ms,tpot_p99=50ms (exit 1 when missed).")
@click.option("--api-key-env", metavar="VAR", help="Environment variable holding the API key (never written to disk).")
@click.option("--out", type=click.Path(file_okay=False), help="Run directory (default: runs/run-<time>).")
@click.option("--no-report", is_flag=True, help="Skip report.html (summary.json is still written).")
@click.option("--no-stream", is_flag=True, help="Non-streaming requests (E2E only).")
@click.option("--transport", default="auto", show_default=True, metavar="auto|fast|httpx|aiohttp",
              help="HTTP client: auto is the fast asyncio+httptools one; httpx and aiohttp are fallbacks.")
@click.option("--force-output-length", is_flag=True, help="Send min_tokens/ignore_eos so outputs have max_tokens tokens.")
@click.option("--repeat", type=int, default=1, show_default=True, help="Run N times into OUT/run-1..N (for noise-aware compare).")
@click.option("--grace", default="5s", show_default=True, help="Ctrl-C: how long in-flight requests may finish.")
def run(**options: object) -> int:
    """Drive a target (or the bundled engine) with a workload and measure every request."""
    from servescope.harness.config import RunConfig
    from servescope.harness.orchestration.repeat import execute_run

    config = RunConfig(
        target=options["target"], engine=options["engine"], engine_args=tuple(options["engine_args"]),
        model=options["model"], api=options["api"], workload=options["workload"],
        prompt_tokens=options["prompt_tokens"], max_tokens=options["max_tokens"],
        concurrency=options["concurrency"], rate=options["rate"], arrival=options["arrival"],
        sweep=options["sweep"], trace=options["trace"], trace_speed=options["trace_speed"],
        duration_s=options["duration"], requests=options["num_requests"], warmup_s=options["warmup"],
        ramp_s=options["ramp"], tokenizer=options["tokenizer"], metrics_url=options["metrics_url"],
        workers=options["workers"], timeout_s=options["timeout"], seed=options["seed"], slo=options["slo"],
        api_key_env=options["api_key_env"], out=options["out"], report=not options["no_report"],
        stream=not options["no_stream"], transport=options["transport"],
        force_output_length=options["force_output_length"],
        repeat=options["repeat"], grace_s=options["grace"], command_line=tuple(sys.argv),
    )
    return execute_run(config).exit_code
