"""Tokens/s of the reference engine's tiny preset on the CPU: in-process vs through its HTTP server.

    python benchmarks/engine_cpu.py [--max-tokens 128] [--threads 1] [--concurrency 1,32] [--repeat 3]

In-process: `LLMEngine.generate` on N prompts at once (no HTTP, no detokenizer
streaming). HTTP: the same prompts sent concurrently by an aiohttp streaming
client to `python -m reference_engine` in its own process, as the harness runs
it. Output tokens come from each response's usage. The overhead column is the
throughput lost to HTTP + SSE + the engine thread hand-off.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import subprocess
import sys
import time

import aiohttp


def _prompts(count: int, words: int) -> list[str]:
    return [" ".join(f"req{i} word{j}" for j in range(words)) for i in range(count)]


def bench_in_process(concurrency: int, max_tokens: int, words: int, threads: int) -> tuple[int, float]:
    import torch

    from reference_engine.config import EngineConfig
    from reference_engine.engine import LLMEngine
    from reference_engine.sequence import SamplingParams

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

    from harness.api import execute_run
    from harness.config import RunConfig

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


def start_server(threads: int) -> tuple[subprocess.Popen, str]:
    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "reference_engine", "--port", str(port), "--device", "cpu",
                             "--threads", str(threads)], stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
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
    parser.add_argument("--repeat", type=int, default=3,
                        help="runs per row; the best is kept (other processes on a shared CPU only ever slow a run)")
    args = parser.parse_args()
    levels = [int(x) for x in args.concurrency.split(",")]
    try:
        import uvloop
        uvloop.install()
    except ImportError:
        pass

    rows = []
    proc, url = start_server(args.threads)
    try:
        for n in levels:
            prompts = _prompts(n, args.prompt_words)
            runs = [asyncio.run(_http_run(url, prompts, args.max_tokens)) for _ in range(args.repeat)]
            rows.append(("http", n, *max(runs, key=lambda r: r[0] / r[1])))
            runs = [_servescope_run(url, n, args.max_tokens, args.prompt_words) for _ in range(args.repeat)]
            rows.append(("servescope run", n, *max(runs, key=lambda r: r[0] / r[1])))
    finally:
        proc.terminate()
        proc.wait(15)
    for n in levels:
        runs = [bench_in_process(n, args.max_tokens, args.prompt_words, args.threads) for _ in range(args.repeat)]
        rows.append(("in-process", n, *max(runs, key=lambda r: r[0] / r[1])))

    print(f"reference engine, preset tiny, CPU ({os.cpu_count()} cores, {args.threads} torch thread(s)), "
          f"{args.max_tokens} output tokens per request, ~{args.prompt_words * 4}-token prompts, "
          f"best of {args.repeat}")
    print(f"{'mode':<14} {'concurrency':>11} {'tokens':>7} {'seconds':>8} {'tok/s':>9} {'HTTP overhead':>14}")
    in_proc = {n: t / s for mode, n, t, s in rows if mode == "in-process"}
    order = {"in-process": 0, "http": 1, "servescope run": 2}
    for mode, n, tokens, seconds in sorted(rows, key=lambda r: (r[1], order[r[0]])):
        rate = tokens / seconds
        overhead = "" if mode == "in-process" else f"{(1 - rate / in_proc[n]) * 100:13.1f}%"
        print(f"{mode:<14} {n:>11} {tokens:>7} {seconds:>8.2f} {rate:>9.0f} {overhead:>14}")


if __name__ == "__main__":
    main()
