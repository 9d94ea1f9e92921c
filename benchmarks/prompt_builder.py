"""How fast are token-exact prompts built (prompts/s), for 1k- and 16k-token prompts?

    python -m benchmarks.prompt_builder [--tokenizer DIR] [--seconds 1.0] [--save]
    python -m benchmarks.prompt_builder --smoke      # a quick check of this script

`additive` is the default path (corpus sentence counts add up; proven per
tokenizer at start-up); `verify` re-encodes every prompt in full (the fallback
for tokenizers where sums are not exact). `stream` is the whole
`session_stream` (class draw, lengths, labels, RequestSpec) for a fixed workload.
With --save the rows go to benchmarks/results/prompt_builder_<cpu>.json.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # `python benchmarks/<script>.py`: import from the repository root, not benchmarks/
    sys.path[0] = str(Path(__file__).resolve().parents[1])

from benchmarks.common import ResultsFile, add_results_args, cpu_name, print_table, run_info  # noqa: E402
from servescope.workloads.generator import session_stream  # noqa: E402
from servescope.workloads.prompt_builder import PromptBuilder  # noqa: E402
from servescope.workloads.spec import fixed_workload  # noqa: E402
from servescope.workloads.tokenizer import load_tokenizer  # noqa: E402


def rate(fn, seconds: float) -> float:
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        for _ in range(10):
            fn(n)
            n += 1
    return n / (time.perf_counter() - t0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokenizer", default=None, help="HF tokenizer folder (default: the bundled one)")
    parser.add_argument("--seconds", type=float, default=1.0, help="time per cell")
    parser.add_argument("--smoke", action="store_true", help="a quick check: 0.05 s per cell")
    add_results_args(parser, default_save=False)
    args = parser.parse_args()
    if args.smoke:
        args.seconds = 0.05
    tok = load_tokenizer(args.tokenizer)
    t0 = time.perf_counter()
    fast = PromptBuilder(tok)
    setup_s = time.perf_counter() - t0
    slow = PromptBuilder(tok, verify=True)
    rows = []
    for tokens in (1024, 16384):
        for api in ("completions", "chat"):
            for mode, b in (("additive", fast), ("verify", slow)):
                if api == "completions":
                    fn = lambda i, b=b: b.completion(tokens, i * 31)  # noqa: E731
                else:
                    fn = lambda i, b=b: b.chat(tokens, i * 31)  # noqa: E731
                rows.append([tokens, api, mode, rate(fn, args.seconds)])
            stream = session_stream(fixed_workload(tokens, 64, api), tok, 0)
            rows.append([tokens, api, "stream", rate(lambda i: next(stream), args.seconds)])
    print_table(["tokens", "api", "mode", "prompts/s"], rows,
                title=f"tokenizer {tok.name}: index {len(fast.index)} sentences, {fast.index.total_tokens} tokens, "
                      f"setup {setup_s:.2f} s, additive sums exact: {not fast.verify}; {cpu_name()}")
    if args.save:
        results = ResultsFile("prompt_builder", cpu_name(), args.out, args.copy_to)
        results.put("prompts", {"tokenizer": tok.name, "setup_s": setup_s, "additive_exact": not fast.verify,
                                "rows": [dict(zip(("tokens", "api", "mode", "prompts_per_s"), r)) for r in rows]},
                    run_info())
        print(f"results: {results.path}")


if __name__ == "__main__":
    main()
