"""One Prometheus page from several engine processes: every series gains `pool` and `replica` labels.

Concatenating the engines' pages would repeat each family's HELP and TYPE
lines, which scrapers reject; so the pages are parsed (prometheus_client's
parser) and each family is emitted once with the samples of every engine.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample


class _Merged:
    def __init__(self, families: list[Metric]) -> None:
        self.families = families

    def collect(self):
        yield from self.families


def merge_pages(pages: list[tuple[dict[str, str], bytes]]) -> bytes:
    """`pages`: (labels to add, one engine's exposition text) pairs; the merged exposition text."""
    merged: dict[str, Metric] = {}
    for extra, page in pages:
        for family in text_string_to_metric_families(page.decode()):
            into = merged.get(family.name)
            if into is None:
                into = merged[family.name] = Metric(family.name, family.documentation, family.type, family.unit)
            for sample in family.samples:
                into.samples.append(Sample(sample.name, {**sample.labels, **extra}, sample.value,
                                           sample.timestamp, sample.exemplar))
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Merged(list(merged.values())))
    return generate_latest(registry)
