"""The live page in a real browser, during a bounded `servescope run --live` against a server scripted to saturate.

The page loads with no console error and no request off its own server, its
charts' data change between two reads, the queueing finding appears while the
run goes, and its stop button ends the run as Ctrl-C does (exit 130, records
kept), after which the page links to report.html.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from support.browser import ARTIFACTS, CHROMIUM, needs_chromium
from support.scripted_server import ScriptedServer

pytestmark = pytest.mark.timeout(180)

SATURATING = {"tokens": 5, "first_token_delay_s": 0.02, "itl_s": 0.02}  # one at a time: about 10 req/s

LATENCY_DATA_JS = """() => {
  const gd = document.getElementById('chart-latency');
  return gd && gd.data ? gd.data.map((t) => ({name: t.name, x: Array.from(t.x), y: Array.from(t.y)})) : null;
}"""


def _live_url(process: subprocess.Popen, deadline: float, lines: list[str]) -> str:
    while time.monotonic() < deadline:
        line = process.stdout.readline()
        if not line:
            break
        lines.append(line)
        if line.startswith("live page: "):
            return line.split()[2]
    raise AssertionError("servescope run printed no live page URL:\n" + "".join(lines))


@pytest.mark.browser
@needs_chromium
def test_live_page_in_chromium_shows_the_run_a_finding_and_stops_it(tmp_path):
    sync_api = pytest.importorskip("playwright.sync_api")
    out = tmp_path / "run"
    lines: list[str] = []
    with ScriptedServer(slots=1, default_script=SATURATING) as srv:
        process = subprocess.Popen(
            [sys.executable, "-m", "servescope", "run", "--target", srv.base_url, "--model", "scripted",
             "--rate", "25", "--duration", "90s", "--prompt-tokens", "16", "--max-tokens", "5", "--workers", "1",
             "--grace", "1s", "--live", "0", "--out", str(out)],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env={**_env(), "COLUMNS": "200"})
        try:
            url = _live_url(process, time.monotonic() + 60, lines)
            origin = url.rstrip("/")
            problems: list[str] = []
            with sync_api.sync_playwright() as p:
                browser = p.chromium.launch(executable_path=CHROMIUM, args=[
                    "--no-sandbox", "--headless", "--disable-gpu", "--disable-background-networking",
                    "--disable-component-update", "--disable-sync", "--no-first-run"])
                try:
                    page = browser.new_page(viewport={"width": 1300, "height": 1000})
                    page.on("console", lambda m: problems.append(m.text) if m.type == "error" else None)
                    page.on("pageerror", lambda e: problems.append(str(e)))
                    page.on("request", lambda r: None if r.url.startswith(origin) else problems.append(
                        f"request off the page's server: {r.url}"))
                    page.goto(url)
                    page.wait_for_function("window.servescopeLive && window.servescopeLive.windows.size >= 2",
                                           timeout=30_000)
                    first = page.evaluate(LATENCY_DATA_JS)
                    page.wait_for_timeout(2000)
                    second = page.evaluate(LATENCY_DATA_JS)
                    assert first and second and first != second, "the latency chart's data did not change"
                    ttft_p99 = next(t for t in second if t["name"] == "TTFT p99")
                    assert len(ttft_p99["x"]) > len(next(t for t in first if t["name"] == "TTFT p99")["x"])
                    finding = page.locator('.finding[data-rule="queueing"]')
                    finding.wait_for(timeout=45_000)
                    assert "arrive faster than they complete" in finding.inner_text()
                    assert page.locator("#chart-inflight .js-plotly-plot, #chart-inflight.js-plotly-plot").count() == 1
                    ARTIFACTS.mkdir(exist_ok=True)
                    page.screenshot(path=str(ARTIFACTS / "live.png"), full_page=True)
                    page.click("#stop")
                    page.locator("#report").wait_for(state="visible", timeout=60_000)
                    assert page.locator("#status").inner_text() == "interrupted"
                    report = page.request.get(origin + "/" + page.locator("#report-link").get_attribute("href"))
                    assert report.status == 200 and "servescope diagnosis" in report.text()
                    delays = page.evaluate("window.servescopeLive.delays")
                finally:
                    browser.close()
            code = process.wait(timeout=60)  # the page is closed: the server stops lingering
        finally:
            if process.poll() is None:
                process.kill()
                process.wait()
        lines += process.stdout.read().splitlines(keepends=True)
        process.stdout.close()
    log = "".join(lines)
    assert problems == [], problems
    assert code == 130, log
    assert "finding [" in log and "queueing" in log
    assert delays and max(delays) < 2.0  # page updates behind the data (the benchmark measures it properly)
    meta = json.loads((out / "run.json").read_text())
    assert meta["status"] == "interrupted"
    assert (pq.read_table(out / "requests.parquet").to_pandas()["status"] == "ok").sum() >= 20


def _env() -> dict[str, str]:
    import os

    return dict(os.environ)
