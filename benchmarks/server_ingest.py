"""How fast does the reference server take in a burst of requests?

A closed loop's wave, or a client opening many streams at once, reaches `servescope serve` in one
go. Until the HTTP process has parsed, tokenized and handed a request to the engine, the engine
cannot schedule it, and while it works through the burst it writes no SSE chunks. This script
starts the server (tiny preset, CPU, engine in its own process), opens `--streams` connections,
then sends that many streaming completions at once, each a `--prompt-tokens`-token prompt with
max_tokens=1, and reports when each response's headers arrived: the server sends them right after
handing the request to the engine, so the last header is the end of the burst's ingest. It runs
the burst with text prompts and with the same prompts as token ids (no tokenizing), `--repeat`
times each, and prints the medians.

    python -m benchmarks.server_ingest [--streams 128] [--prompt-tokens 512] [--repeat 5] [--save]
    python -m benchmarks.server_ingest --smoke     # a quick check of this script

The server is the one this Python environment imports: to compare two commits, install each
checkout in its own virtual environment and run the script with that environment's python.
With --save the medians go to benchmarks/results/server_ingest_<cpu>.json.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # `python benchmarks/<script>.py`: import from the repository root, not benchmarks/
    sys.path[0] = str(Path(__file__).resolve().parents[1])

import aiohttp  # noqa: E402

from benchmarks.common import ResultsFile, add_results_args, cpu_name, print_table, run_info  # noqa: E402
from servescope.harness.targets.engine import EngineProcess  # noqa: E402
from servescope.reference_engine.tokenization import EngineTokenizer, tokenizer_dir_for  # noqa: E402

CORPUS = Path(__file__).resolve().parents[1] / "workloads" / "corpus" / "prose.txt"


def prompts(count: int, tokens: int) -> tuple[list[str], list[list[int]]]:
    """`count` distinct prose prompts of `tokens` tokens (re-encoded: within a few), as text and as ids."""
    tok = EngineTokenizer(tokenizer_dir_for(None, None))
    ids = tok.encode(CORPUS.read_text(), add_special_tokens=False)
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


async def measure(base_url: str, texts: list[str], ids: list[list[int]], repeat: int) -> dict[str, list]:
    url = base_url + "/v1/completions"
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector) as session:
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
    parser.add_argument("--smoke", action="store_true", help="a quick check: 16 streams of 64-token prompts, once")
    add_results_args(parser, default_save=False)
    args = parser.parse_args()
    if args.smoke:
        args.streams, args.prompt_tokens, args.repeat = 16, 64, 1
    texts, ids = prompts(args.streams, args.prompt_tokens)
    blocks = args.streams * (args.prompt_tokens // 16 + 2) * 2
    server = EngineProcess(preset="tiny", extra_args=("--device", "cpu", "--max-num-seqs", "256", "--num-kv-blocks",
                                                      str(blocks), "--max-model-len", "2048"))
    with server:
        results = asyncio.run(measure(server.base_url, texts, ids, args.repeat))
    rows, figures = [], {}
    for name, runs in results.items():
        first, median, last = (statistics.median(col) for col in zip(*runs))
        rows.append([name, first, median, last, last / args.streams])
        figures[name] = {"first_ms": first, "median_ms": median, "last_ms": last, "runs_ms": runs}
    print_table(["prompts", "first ms", "median ms", "last ms", "last / request ms"], rows,
                title=f"server_ingest: {args.streams} streaming requests at once, {args.prompt_tokens}-token prompts, "
                      f"{cpu_name()}; headers received after the sends began (median of {args.repeat})")
    if args.save:
        out = ResultsFile("server_ingest", cpu_name(), args.out, args.copy_to)
        out.put("burst", {"streams": args.streams, "prompt_tokens": args.prompt_tokens, "repeat": args.repeat,
                          **figures}, run_info())
        print(f"results: {out.path}")


if __name__ == "__main__":
    main()
