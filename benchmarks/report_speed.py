"""How long does `servescope report` take on a large run, stage by stage?

Generates a synthetic run directory (realistic shapes: Poisson arrivals,
log-normal lengths per bucket, millions of token gaps; see
analyzers/synthetic.py), then times `build_report` on it and prints a table.
The target: a 100k-request run in under 10 s on one core, report under 10 MB.

    python -m benchmarks.report_speed                  # 100k requests
    python -m benchmarks.report_speed --requests 10000 --repeat 3
    python -m benchmarks.report_speed --browser        # also time opening it in Chromium
    python -m benchmarks.report_speed --smoke          # a quick check of this script

With --save the rows go to benchmarks/results/report_speed_<cpu>.json.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

if __package__ in (None, ""):  # `python benchmarks/<script>.py`: import from the repository root, not benchmarks/
    sys.path[0] = str(Path(__file__).resolve().parents[1])

from benchmarks.common import ResultsFile, add_results_args, cpu_name, print_table, run_info  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=100_000)
    parser.add_argument("--rate", type=float, default=200.0, help="synthetic arrival rate (req/s)")
    parser.add_argument("--repeat", type=int, default=1)
    parser.add_argument("--keep", type=Path, default=None, help="write the run directory here and keep it")
    parser.add_argument("--browser", action="store_true", help="time opening the report in /usr/bin/chromium until every chart is drawn")
    parser.add_argument("--smoke", action="store_true", help="a quick check: 2,000 requests")
    add_results_args(parser, default_save=False)
    args = parser.parse_args()
    if args.smoke:
        args.requests = 2000

    from servescope.analyzers.report import build_report
    from servescope.analyzers.synthetic import SyntheticSpec, write_synthetic_run

    rows, figures = [], {}
    with tempfile.TemporaryDirectory() as tmp:
        run_dir = args.keep or Path(tmp) / "run"
        t0 = time.perf_counter()
        write_synthetic_run(run_dir, SyntheticSpec(requests=args.requests, rate=args.rate, warmup=args.requests // 100))
        generate_s = time.perf_counter() - t0
        gaps = _gap_count(run_dir)
        print(f"synthetic run: {args.requests:,} requests, {gaps:,} token gaps, generated in {generate_s:.2f} s")
        for i in range(args.repeat):
            timings: dict[str, float] = {}
            t0 = time.perf_counter()
            report = build_report(run_dir, timings=timings)
            total = time.perf_counter() - t0
            size = os.path.getsize(report) / 1e6
            rows.append([i + 1, timings["load"], timings["summarize"], timings["diagnose"], timings["render"], total,
                         size])
        if args.browser:
            charts, seconds = _open_in_chromium(report)
            figures["browser"] = {"charts": charts, "seconds": seconds}
            print(f"opened in Chromium: {charts} charts drawn in {seconds:.2f} s (file:// load to last chart)")
    print_table(["repeat", "load s", "summarize s", "diagnose s", "render s", "total s", "size MB"], rows,
                title=f"servescope report on {args.requests:,} synthetic requests ({gaps:,} token gaps), {cpu_name()}")
    if args.save:
        keys = ("repeat", "load_s", "summarize_s", "diagnose_s", "render_s", "total_s", "size_MB")
        results = ResultsFile("report_speed", cpu_name(), args.out, args.copy_to)
        results.put("report", {"requests": args.requests, "token_gaps": gaps, "generate_s": generate_s,
                               "rows": [dict(zip(keys, r)) for r in rows], **figures}, run_info())
        print(f"results: {results.path}")


def _open_in_chromium(report: Path) -> tuple[int, float]:
    from playwright.sync_api import sync_playwright

    expected = report.read_text().count('data-chart-for="')
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path="/usr/bin/chromium", args=[
            "--no-sandbox", "--headless", "--disable-gpu", "--no-first-run"])
        page = browser.new_page()
        t0 = time.perf_counter()
        page.goto(report.as_uri())
        page.wait_for_function(f"document.querySelectorAll('.js-plotly-plot').length >= {expected}", timeout=60_000)
        seconds = time.perf_counter() - t0
        browser.close()
    return expected, seconds


def _gap_count(run_dir: Path) -> int:
    import pyarrow.parquet as pq

    column = pq.read_table(run_dir / "requests.parquet", columns=["itl_s"]).column("itl_s")
    return int(sum(len(chunk.flatten()) for chunk in column.chunks))


if __name__ == "__main__":
    main()
