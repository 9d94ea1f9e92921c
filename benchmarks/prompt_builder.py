"""How fast token-exact prompts are built (prompts/s), for 1k- and 16k-token prompts.

    python benchmarks/prompt_builder.py [--tokenizer DIR] [--seconds 1.0]

`additive` is the default path (corpus sentence counts add up; proven per
tokenizer at start-up); `verify` re-encodes every prompt in full (the fallback
for tokenizers where sums are not exact). `stream` is the whole
`session_stream` (class draw, lengths, labels, RequestSpec) for a fixed workload.
"""

from __future__ import annotations

import argparse
import itertools
import time

from workloads import fixed_workload, load_tokenizer, session_stream
from workloads.prompt_builder import PromptBuilder


def rate(fn, seconds: float) -> float:
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        for _ in range(10):
            fn(n)
            n += 1
    return n / (time.perf_counter() - t0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokenizer", default=None, help="HF tokenizer folder (default: the bundled one)")
    parser.add_argument("--seconds", type=float, default=1.0, help="time per cell")
    args = parser.parse_args()
    tok = load_tokenizer(args.tokenizer)
    t0 = time.perf_counter()
    fast = PromptBuilder(tok)
    print(f"tokenizer {tok.name}: index {len(fast.index)} sentences, {fast.index.total_tokens} tokens, "
          f"setup {time.perf_counter() - t0:.2f}s, additive sums exact: {not fast.verify}")
    slow = PromptBuilder(tok, verify=True)
    print(f"{'tokens':>7} {'api':<12} {'mode':<9} {'prompts/s':>10}")
    for tokens in (1024, 16384):
        for api in ("completions", "chat"):
            for mode, b in (("additive", fast), ("verify", slow)):
                if api == "completions":
                    fn = lambda i, b=b: b.completion(tokens, i * 31)  # noqa: E731
                else:
                    fn = lambda i, b=b: b.chat(tokens, i * 31)  # noqa: E731
                print(f"{tokens:>7} {api:<12} {mode:<9} {rate(fn, args.seconds):>10,.0f}")
            stream = session_stream(fixed_workload(tokens, 64, api), tok, 0)
            print(f"{tokens:>7} {api:<12} {'stream':<9} {rate(lambda i: next(stream), args.seconds):>10,.0f}")


if __name__ == "__main__":
    main()
