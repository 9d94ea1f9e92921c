"""Sampling Prometheus endpoints during a run: the target's `/metrics` and any others given.

One daemon thread per endpoint in the main process GETs its URL every
`interval_s` and stores every sample (histogram buckets, `_sum` and `_count`
included) as `{t, name, labels, value, source}`, t in seconds since the run
start and `source` the endpoint's URL, so an engine, a DCGM exporter and
node-exporter scraped side by side stay apart. Parsing is `prometheus_client`'s
own text parser. A target without metrics is normal: `probe_metrics` says so
before the run and the run goes on without them.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from typing import Any

import httpx
from prometheus_client.parser import text_string_to_metric_families

SCRAPE_INTERVAL_S = 1.0
SCRAPE_TIMEOUT_S = 2.0


def parse_samples(text: str, t: float, source: str | None = None) -> list[dict[str, Any]]:
    """Every sample of a Prometheus text exposition as run-directory rows."""
    rows = []
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            rows.append({
                "t": t,
                "name": sample.name,
                "labels": json.dumps(sample.labels, sort_keys=True),
                "value": float(sample.value),
                "source": source,
            })
    return rows


def probe_metrics(url: str, headers: dict[str, str] | None = None) -> str | None:
    """None when `url` answers with parseable Prometheus text; otherwise why not (for run.json)."""
    try:
        response = httpx.get(url, timeout=SCRAPE_TIMEOUT_S, headers=headers)
    except httpx.HTTPError as exc:
        return f"{type(exc).__name__}: {exc}"
    if response.status_code != 200:
        return f"HTTP {response.status_code}"
    try:
        if not parse_samples(response.text, 0.0):
            return "no samples in the answer"
    except Exception as exc:  # noqa: BLE001 - the parser raises plain ValueErrors and others
        return f"not Prometheus text ({type(exc).__name__}: {exc})"
    return None


class MetricsScraper:
    """Scrapes `url` every `interval_s` on a daemon thread until `stop()`."""

    def __init__(
        self,
        url: str,
        sink: Callable[[list[dict[str, Any]]], None],
        clock: Callable[[], float],
        interval_s: float = SCRAPE_INTERVAL_S,
        headers: dict[str, str] | None = None,
    ) -> None:
        self.url = url
        self.sink = sink
        self.clock = clock
        self.interval_s = interval_s
        self.headers = headers
        self.scrapes = 0
        self.failures = 0
        self.last_error: str | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="metrics-scraper", daemon=True)

    def start(self) -> "MetricsScraper":
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop and take one last sample, so the end state of counters is kept."""
        self._stop.set()
        self._thread.join(timeout=SCRAPE_TIMEOUT_S + 1.0)

    def _loop(self) -> None:
        with httpx.Client(timeout=SCRAPE_TIMEOUT_S, headers=self.headers) as client:
            next_at = time.monotonic()
            while True:
                self._scrape_once(client)
                if self._stop.is_set():
                    return
                next_at += self.interval_s
                if self._stop.wait(max(0.0, next_at - time.monotonic())):
                    self._scrape_once(client)
                    return

    def _scrape_once(self, client: httpx.Client) -> None:
        t = self.clock()
        try:
            response = client.get(self.url)
            response.raise_for_status()
            rows = parse_samples(response.text, t, self.url)
        except Exception as exc:  # noqa: BLE001 - one bad scrape must not end the run
            self.failures += 1
            self.last_error = f"{type(exc).__name__}: {exc}"
            return
        self.scrapes += 1
        self.sink(rows)

    def describe(self) -> dict[str, Any]:
        return {"url": self.url, "interval_s": self.interval_s, "scrapes": self.scrapes,
                "failures": self.failures, "last_error": self.last_error}


class MetricsSources:
    """Every endpoint of a run (the `--metrics-url`s, else the target's `/metrics`): probed, then scraped.

    Each endpoint is probed before the load starts; the ones that answer get a
    scraper, the others are reported and skipped, so one dead exporter never
    costs the run its other telemetry.
    """

    def __init__(self, urls: list[str], headers: dict[str, str] | None = None) -> None:
        self.urls, self.headers = urls, headers
        self.problems = {url: probe_metrics(url, headers) for url in urls}
        self.scrapers: list[MetricsScraper] = []

    @property
    def available(self) -> list[str]:
        return [url for url in self.urls if self.problems[url] is None]

    def start(self, sink: Callable[[list[dict[str, Any]]], None], clock: Callable[[], float]) -> "MetricsSources":
        self.scrapers = [MetricsScraper(url, sink, clock, headers=self.headers or None).start() for url in self.available]
        return self

    def stop(self) -> None:
        for scraper in self.scrapers:
            scraper.stop()

    def describe(self) -> dict[str, Any]:
        """run.json's `server_metrics`: the first endpoint's fields at the top (as before several
        endpoints existed), and every endpoint under `sources`."""
        scraped = {s.url: s.describe() for s in self.scrapers}
        sources = [{"url": url, "available": self.problems[url] is None, "reason": self.problems[url],
                    **scraped.get(url, {})} for url in self.urls]
        return {**sources[0], "sources": sources}
