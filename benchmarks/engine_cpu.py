"""Tokens/s of the reference engine's tiny preset on the CPU: in-process vs through its HTTP server.

    python benchmarks/engine_cpu.py [--max-tokens 128] [--threads 1] [--concurrency 1,32] [--repeat 5]
                                    [--engine-mode thread|process|both]

In-process: `LLMEngine.generate` on N prompts at once (no HTTP, no detokenizer
streaming). HTTP: the same prompts sent concurrently by an aiohttp streaming
client to `python -m reference_engine` in its own process, as the harness runs
it, and the same load through `servescope run`. The server runs its step loop
in a thread of the HTTP process (`--no-engine-process`) or in an engine process
of its own (`--engine-process`); `--engine-mode both` (the default) measures
each, the two servers taking turns run by run. Output tokens come from each
response's usage. The overhead column is the throughput lost (best against
best) to HTTP + SSE + the hand-off between the HTTP loop and the step loop.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import subprocess
import sys
import time

import aiohttp


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
    """One closed-loop wave of `concurrency` requests through `servescope run` (harness.api.execute_run)."""
    import tempfile

    import pandas as pd

    from servescope.harness.orchestration.repeat import execute_run
    from servescope.harness.config import RunConfig

    with tempfile.TemporaryDirectory() as tmp:
        config = RunConfig(target=url, prompt_tokens=words * 4, max_tokens=max_tokens, concurrency=concurrency,
                           requests=concurrency, force_output_length=True, workers=1, out=os.path.join(tmp, "run"),
                           report=False, show_progress=False)
        outcome = execute_run(config)
        frame = pd.read_parquet(os.path.join(outcome.run_dir, "requests.parquet"))
    ok = frame[frame["status"] == "ok"]
    return int(ok["output_tokens"].sum()), float(ok["end_at"].max() - ok["sent_at"].min())


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_server(threads: int, engine_mode: str = "thread") -> tuple[subprocess.Popen, str]:
    """`python -m reference_engine` with its step loop in a thread or in its own process (`engine_mode`)."""
    port = _free_port()
    mode_flag = "--engine-process" if engine_mode == "process" else "--no-engine-process"
    proc = subprocess.Popen([sys.executable, "-m", "servescope.reference_engine", "--port", str(port), "--device", "cpu",
                             "--threads", str(threads), mode_flag], stdout=subprocess.DEVNULL,
                            stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"

    async def wait() -> None:
        async with aiohttp.ClientSession() as session:
            for _ in range(300):
                try:
                    async with session.get(url + "/health") as resp:
                        if resp.status == 200:
                            return
                except aiohttp.ClientError:
                    await asyncio.sleep(0.2)
        raise RuntimeError("engine did not start")

    asyncio.run(wait())
    return proc, url


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
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
    args = parser.parse_args()
    levels = [int(x) for x in args.concurrency.split(",")]
    engine_modes = ("thread", "process") if args.engine_mode == "both" else (args.engine_mode,)
    try:
        import uvloop
        uvloop.install()
    except ImportError:
        pass

    rows = []  # (client, engine mode, concurrency, tokens, seconds)
    # Both servers stay up (an idle one uses no CPU) and take turns run by run, so a slow spell of a
    # shared machine hits both modes alike instead of whichever was measured then.
    servers = {}
    try:
        for engine_mode in engine_modes:
            servers[engine_mode] = start_server(args.threads, engine_mode)
        for n in levels:
            prompts = _prompts(n, args.prompt_words)
            runs: dict[tuple[str, str], list[tuple[int, float]]] = {}
            for _ in range(args.repeat):
                for engine_mode, (_, url) in servers.items():
                    runs.setdefault(("http", engine_mode), []).append(
                        asyncio.run(_http_run(url, prompts, args.max_tokens)))
                for engine_mode, (_, url) in servers.items():
                    runs.setdefault(("servescope run", engine_mode), []).append(
                        _servescope_run(url, n, args.max_tokens, args.prompt_words))
            for (client, engine_mode), results in runs.items():
                rows.append((client, engine_mode, n, results))
    finally:
        for proc, _ in servers.values():
            proc.terminate()
            proc.wait(15)
    for n in levels:
        runs = [bench_in_process(n, args.max_tokens, args.prompt_words, args.threads) for _ in range(args.repeat)]
        rows.append(("in-process", "", n, runs))

    print(f"reference engine, preset tiny, CPU ({os.cpu_count()} cores, {args.threads} torch thread(s)), "
          f"{args.max_tokens} output tokens per request, ~{args.prompt_words * 4}-token prompts, "
          f"{args.repeat} runs per row: the best, and the median (a shared machine's noise moves the best)")
    print(f"{'client':<14} {'step loop':<9} {'concurrency':>11} {'tokens':>7} {'best tok/s':>10} "
          f"{'median tok/s':>12} {'HTTP overhead':>14}")
    best = {(client, mode, n): max(r[0] / r[1] for r in runs) for client, mode, n, runs in rows}
    order = {"in-process": 0, "http": 1, "servescope run": 2}
    for client, engine_mode, n, runs in sorted(rows, key=lambda r: (r[2], order[r[0]], r[1])):
        rate = best[client, engine_mode, n]
        median = statistics.median(r[0] / r[1] for r in runs)
        overhead = "" if client == "in-process" else f"{(1 - rate / best['in-process', '', n]) * 100:13.1f}%"
        print(f"{client:<14} {engine_mode:<9} {n:>11} {runs[0][0]:>7} {rate:>10.0f} {median:>12.0f} {overhead:>14}")


if __name__ == "__main__":
    main()
