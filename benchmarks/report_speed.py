"""How long `servescope report` takes on a large run, stage by stage.

Generates a synthetic run directory (realistic shapes: Poisson arrivals,
log-normal lengths per bucket, millions of token gaps; see
analyzers/synthetic.py), then times `build_report` on it and prints a table.
The target: a 100k-request run in under 10 s on one core, report under 10 MB.

    python benchmarks/report_speed.py                  # 100k requests
    python benchmarks/report_speed.py --requests 10000 --repeat 3
    python benchmarks/report_speed.py --browser     # also time opening it in Chromium
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=100_000)
    parser.add_argument("--rate", type=float, default=200.0, help="synthetic arrival rate (req/s)")
    parser.add_argument("--repeat", type=int, default=1)
    parser.add_argument("--keep", type=Path, default=None, help="write the run directory here and keep it")
    parser.add_argument("--browser", action="store_true", help="time opening the report in /usr/bin/chromium until every chart is drawn")
    args = parser.parse_args()

    from analyzers.report import build_report
    from analyzers.synthetic import SyntheticSpec, write_synthetic_run

    with tempfile.TemporaryDirectory() as tmp:
        run_dir = args.keep or Path(tmp) / "run"
        t0 = time.perf_counter()
        write_synthetic_run(run_dir, SyntheticSpec(requests=args.requests, rate=args.rate, warmup=args.requests // 100))
        generate_s = time.perf_counter() - t0
        gaps = _gap_count(run_dir)
        print(f"synthetic run: {args.requests:,} requests, {gaps:,} token gaps, generated in {generate_s:.2f} s")
        print(f"{'repeat':>6} {'load s':>8} {'summarize s':>12} {'diagnose s':>11} {'render s':>9} {'total s':>8} {'size MB':>8}")
        for i in range(args.repeat):
            timings: dict[str, float] = {}
            t0 = time.perf_counter()
            report = build_report(run_dir, timings=timings)
            total = time.perf_counter() - t0
            size = os.path.getsize(report) / 1e6
            print(f"{i + 1:>6} {timings['load']:>8.2f} {timings['summarize']:>12.2f} {timings['diagnose']:>11.2f} "
                  f"{timings['render']:>9.2f} {total:>8.2f} {size:>8.2f}")
        if args.browser:
            charts, seconds = _open_in_chromium(report)
            print(f"opened in Chromium: {charts} charts drawn in {seconds:.2f} s (file:// load to last chart)")


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
