"""How fast the reference server takes in a burst of requests (issue 9 (e): the first wave's dead time).

A closed loop's wave, or a client opening many streams at once, reaches `servescope serve` in one
go. Until the HTTP process has parsed, tokenized and handed a request to the engine, the engine
cannot schedule it, and while it works through the burst it writes no SSE chunks. This script
starts the server (tiny preset, CPU, engine in its own process), opens `--streams` connections,
then sends that many streaming completions at once, each a `--prompt-tokens`-token prompt with
max_tokens=1, and reports when each response's headers arrived: the server sends them right after
handing the request to the engine, so the last header is the end of the burst's ingest. It runs
the burst with text prompts and with the same prompts as token ids (no tokenizing), `--repeat`
times each, and prints the medians.

    python benchmarks/server_ingest.py [--repo DIR]   # DIR: another checkout to measure, e.g. a git worktree
"""

from __future__ import annotations

import argparse
import asyncio
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

import aiohttp

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from reference_engine.tokenization import EngineTokenizer, tokenizer_dir_for  # noqa: E402


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def prompts(count: int, tokens: int) -> tuple[list[str], list[list[int]]]:
    """`count` distinct prose prompts of `tokens` tokens (re-encoded: within a few), as text and as ids."""
    tok = EngineTokenizer(tokenizer_dir_for(None, None))
    ids = tok.encode((REPO / "workloads" / "corpus" / "prose.txt").read_text(), add_special_tokens=False)
    if len(ids) < count * tokens:
        raise SystemExit(f"the corpus holds {len(ids)} tokens, fewer than {count} x {tokens}")
    texts, id_lists = [], []
    for i in range(count):
        text = tok.decode(ids[i * tokens:(i + 1) * tokens])
        texts.append(text)
        id_lists.append(tok.encode(text))
    return texts, id_lists


async def burst(session: aiohttp.ClientSession, url: str, batch: list) -> tuple[float, float, float]:
    """(first, median, last) header arrival in ms after the burst's sends began."""
    async def one(prompt) -> float:
        body = {"model": "tiny", "prompt": prompt, "max_tokens": 1, "stream": True}
        async with session.post(url, json=body) as response:
            arrived = time.perf_counter() - t0
            await response.read()
            return arrived

    t0 = time.perf_counter()
    arrivals = sorted(await asyncio.gather(*(one(p) for p in batch)))
    return arrivals[0] * 1e3, statistics.median(arrivals) * 1e3, arrivals[-1] * 1e3


async def measure(port: int, texts: list[str], ids: list[list[int]], repeat: int) -> dict[str, list]:
    url = f"http://127.0.0.1:{port}/v1/completions"
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector) as session:
        deadline = time.monotonic() + 120
        while True:
            try:
                async with session.get(f"http://127.0.0.1:{port}/health") as r:
                    if r.status == 200:
                        break
            except aiohttp.ClientError:
                pass
            if time.monotonic() > deadline:
                raise SystemExit("the server did not come up within 120 s")
            await asyncio.sleep(0.2)
        await burst(session, url, [t[:64] for t in texts])  # open every connection, warm the engine
        results: dict[str, list] = {"text": [], "token ids": []}
        for _ in range(repeat):
            results["text"].append(await burst(session, url, texts))
            results["token ids"].append(await burst(session, url, ids))
        return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--streams", type=int, default=128)
    parser.add_argument("--prompt-tokens", type=int, default=512)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--repo", type=Path, default=REPO, help="the checkout whose server to start")
    args = parser.parse_args()
    texts, ids = prompts(args.streams, args.prompt_tokens)
    port = free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "reference_engine", "--preset", "tiny", "--port", str(port), "--max-num-seqs", "256",
         "--num-kv-blocks", str(args.streams * (args.prompt_tokens // 16 + 2) * 2), "--max-model-len", "2048"],
        cwd=args.repo, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        results = asyncio.run(measure(port, texts, ids, args.repeat))
    finally:
        server.terminate()
        server.wait(30)
    print(f"server_ingest: {args.streams} streaming requests at once, {args.prompt_tokens}-token prompts, "
          f"server of {args.repo}; headers received, ms after the sends began (median of {args.repeat})")
    print(f"{'prompts':<10} {'first':>8} {'median':>8} {'last':>8} {'last / request':>15}")
    for name, rows in results.items():
        first, median, last = (statistics.median(col) for col in zip(*rows))
        print(f"{name:<10} {first:>8.1f} {median:>8.1f} {last:>8.1f} {last / args.streams:>12.2f} ms")


if __name__ == "__main__":
    main()
