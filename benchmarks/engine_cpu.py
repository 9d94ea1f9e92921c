"""What does the HTTP path cost the reference engine on the CPU: tokens/s of the tiny preset
in-process against through its HTTP server.

    python -m benchmarks.engine_cpu [--max-tokens 128] [--threads 1] [--concurrency 1,32] [--repeat 5]
                                    [--engine-mode thread|process|both] [--save]
    python -m benchmarks.engine_cpu --smoke       # a quick check of this script

In-process: `LLMEngine.generate` on N prompts at once (no HTTP, no detokenizer
streaming). HTTP: the same prompts sent concurrently by an aiohttp streaming
client to the engine's server (`servescope serve`, started as the harness starts it),
and the same load through `servescope run`. The server runs its step loop
in a thread of the HTTP process (`--no-engine-process`) or in an engine process
of its own (`--engine-process`); `--engine-mode both` (the default) measures
each, the two servers taking turns run by run. Output tokens come from each
response's usage. The overhead column is the throughput lost (best against
best) to HTTP + SSE + the hand-off between the HTTP loop and the step loop.
With --save the rows go to benchmarks/results/engine_cpu_<cpu>.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # `python benchmarks/<script>.py`: import from the repository root, not benchmarks/
    sys.path[0] = str(Path(__file__).resolve().parents[1])

import aiohttp  # noqa: E402

from benchmarks.common import ResultsFile, add_results_args, cpu_name, print_table, quiet_console, run_info  # noqa: E402
from servescope.harness.targets.engine import EngineProcess  # noqa: E402


def _prompts(count: int, words: int) -> list[str]:
    return [" ".join(f"req{i} word{j}" for j in range(words)) for i in range(count)]


def bench_in_process(concurrency: int, max_tokens: int, words: int, threads: int) -> tuple[int, float]:
    import torch

    from servescope.reference_engine.config import EngineConfig
    from servescope.reference_engine.engine import LLMEngine
    from servescope.reference_engine.sequence import SamplingParams

    torch.set_num_threads(threads)
    engine = LLMEngine.build(EngineConfig(), preset_name="tiny")
    params = SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True)
    warm = [engine.tokenizer.encode(p) for p in _prompts(2, words)]
    engine.generate(warm, SamplingParams(max_tokens=8, temperature=0, ignore_eos=True))
    prompts = [engine.tokenizer.encode(p) for p in _prompts(concurrency, words)]
    started = time.perf_counter()
    seqs = engine.generate(prompts, params)
    elapsed = time.perf_counter() - started
    return sum(s.num_output_tokens for s in seqs), elapsed


async def _one(session: aiohttp.ClientSession, url: str, prompt: str, max_tokens: int) -> int:
    body = {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True, "stream": True,
            "stream_options": {"include_usage": True}}
    tokens = 0
    async with session.post(url + "/v1/completions", json=body) as resp:
        resp.raise_for_status()
        async for raw in resp.content:
            line = raw.strip()
            if line.startswith(b"data: {"):
                chunk = json.loads(line[6:])
                if chunk.get("usage"):
                    tokens = chunk["usage"]["completion_tokens"]
    return tokens


async def _http_run(url: str, prompts: list[str], max_tokens: int) -> tuple[int, float]:
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector) as session:
        await asyncio.gather(*(session.get(url + "/health") for _ in range(len(prompts))))  # open connections
        await _one(session, url, prompts[0], 8)  # warm-up
        started = time.perf_counter()
        counts = await asyncio.gather(*(_one(session, url, p, max_tokens) for p in prompts))
        return sum(counts), time.perf_counter() - started


def _servescope_run(url: str, concurrency: int, max_tokens: int, words: int) -> tuple[int, float]:
    """One closed-loop wave of `concurrency` requests through `servescope run` (servescope.execute_run)."""
    import tempfile

    import pandas as pd

    from servescope import RunConfig, execute_run

    with tempfile.TemporaryDirectory() as tmp:
        config = RunConfig(target=url, prompt_tokens=words * 4, max_tokens=max_tokens, concurrency=concurrency,
                           requests=concurrency, force_output_length=True, workers=1, out=os.path.join(tmp, "run"),
                           report=False, show_progress=False)
        outcome = execute_run(config, quiet_console())
        frame = pd.read_parquet(os.path.join(outcome.run_dir, "requests.parquet"))
    ok = frame[frame["status"] == "ok"]
    return int(ok["output_tokens"].sum()), float(ok["end_at"].max() - ok["sent_at"].min())


def start_server(threads: int, engine_mode: str = "thread") -> EngineProcess:
    """The engine's server with its step loop in a thread or in its own process (`engine_mode`)."""
    mode_flag = "--engine-process" if engine_mode == "process" else "--no-engine-process"
    return EngineProcess(preset="tiny", extra_args=("--device", "cpu", "--threads", str(threads), mode_flag)).start()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--prompt-words", type=int, default=16, help="prompt length in words (~4 tokens each)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (in-process and server)")
    parser.add_argument("--concurrency", default="1,32")
    parser.add_argument("--repeat", type=int, default=5,
                        help="runs per row; the best and the median are printed (other processes on a shared CPU "
                             "only ever slow a run)")
    parser.add_argument("--engine-mode", choices=("thread", "process", "both"), default="both",
                        help="where the server runs its step loop: a thread of the HTTP process, its own "
                             "process, or each in turn")
    parser.add_argument("--smoke", action="store_true", help="a quick check: 16 tokens, concurrency 1 and 4, one run")
    add_results_args(parser, default_save=False)
    args = parser.parse_args()
    if args.smoke:
        args.max_tokens, args.concurrency, args.repeat = 16, "1,4", 1
    levels = [int(x) for x in args.concurrency.split(",")]
    engine_modes = ("thread", "process") if args.engine_mode == "both" else (args.engine_mode,)
    try:
        import uvloop
        uvloop.install()
    except ImportError:
        pass

    rows = []  # (client, engine mode, concurrency, [(tokens, seconds) per run])
    # Both servers stay up (an idle one uses no CPU) and take turns run by run, so a slow spell of a
    # shared machine hits both modes alike instead of whichever was measured then.
    servers: dict[str, EngineProcess] = {}
    try:
        for engine_mode in engine_modes:
            servers[engine_mode] = start_server(args.threads, engine_mode)
        for n in levels:
            prompts = _prompts(n, args.prompt_words)
            runs: dict[tuple[str, str], list[tuple[int, float]]] = {}
            for _ in range(args.repeat):
                for engine_mode, server in servers.items():
                    runs.setdefault(("http", engine_mode), []).append(
                        asyncio.run(_http_run(server.base_url, prompts, args.max_tokens)))
                for engine_mode, server in servers.items():
                    runs.setdefault(("servescope run", engine_mode), []).append(
                        _servescope_run(server.base_url, n, args.max_tokens, args.prompt_words))
            for (client, engine_mode), results in runs.items():
                rows.append((client, engine_mode, n, results))
    finally:
        for server in servers.values():
            server.close()
    for n in levels:
        runs = [bench_in_process(n, args.max_tokens, args.prompt_words, args.threads) for _ in range(args.repeat)]
        rows.append(("in-process", "", n, runs))

    best = {(client, mode, n): max(r[0] / r[1] for r in runs) for client, mode, n, runs in rows}
    order = {"in-process": 0, "http": 1, "servescope run": 2}
    table_rows, records = [], []
    for client, engine_mode, n, runs in sorted(rows, key=lambda r: (r[2], order[r[0]], r[1])):
        rate = best[client, engine_mode, n]
        median = statistics.median(r[0] / r[1] for r in runs)
        overhead = None if client == "in-process" else 1 - rate / best["in-process", "", n]
        table_rows.append([client, engine_mode, n, runs[0][0], rate, median,
                           "" if overhead is None else f"{overhead:.1%}"])
        records.append({"client": client, "step_loop": engine_mode or None, "concurrency": n, "tokens": runs[0][0],
                        "best_tok_per_s": rate, "median_tok_per_s": median, "http_overhead": overhead,
                        "runs_tok_per_s": [r[0] / r[1] for r in runs]})
    print_table(["client", "step loop", "concurrency", "tokens", "best tok/s", "median tok/s", "HTTP overhead"],
                table_rows,
                title=f"reference engine, preset tiny, {cpu_name()}, {args.threads} torch thread(s), {args.max_tokens} "
                      f"output tokens per request, ~{args.prompt_words * 4}-token prompts, {args.repeat} runs per row: "
                      f"the best, and the median (a shared machine's noise moves the best)")
    if args.save:
        results = ResultsFile("engine_cpu", cpu_name(), args.out, args.copy_to)
        results.put("throughput", {"max_tokens": args.max_tokens, "prompt_words": args.prompt_words,
                                   "threads": args.threads, "repeat": args.repeat, "rows": records}, run_info())
        print(f"results: {results.path}")


if __name__ == "__main__":
    main()
