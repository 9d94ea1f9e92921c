"""Write OTLP JSON trace exports (as an OTLP exporter or the collector's file exporter does) for tests.

    spans = [span("t1", "root", "", "invoke_agent planner", 0, 600, operation="invoke_agent", agent="planner"),
             call("t1", "c1", "root", 10, 110, inputs=200, outputs=10, model="gpt-4o")]
    write_otlp(path, spans, service="svc")

Times are milliseconds from a fixed epoch; 64-bit integers are written as
strings, as OTLP JSON does.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

EPOCH_NS = 1_700_000_000_000_000_000
MS = 1_000_000


def attribute(key: str, value: Any) -> dict[str, Any]:
    if isinstance(value, bool):
        return {"key": key, "value": {"boolValue": value}}
    if isinstance(value, int):
        return {"key": key, "value": {"intValue": str(value)}}
    if isinstance(value, float):
        return {"key": key, "value": {"doubleValue": value}}
    return {"key": key, "value": {"stringValue": value}}


def span(trace: str, span_id: str, parent: str, name: str, start_ms: float, end_ms: float,
         links: tuple[str, ...] = (), **attributes: Any) -> dict[str, Any]:
    """A span; `attributes` keys use `__` for dots (gen_ai__operation__name)."""
    out = {"traceId": trace, "spanId": span_id, "parentSpanId": parent, "name": name, "kind": 3,
           "startTimeUnixNano": str(EPOCH_NS + int(start_ms * MS)), "endTimeUnixNano": str(EPOCH_NS + int(end_ms * MS)),
           "attributes": [attribute(k.replace("__", "."), v) for k, v in attributes.items()]}
    if links:
        out["links"] = [{"traceId": trace, "spanId": link} for link in links]
    return out


def call(trace: str, span_id: str, parent: str, start_ms: float, end_ms: float, *, inputs: int | None,
         outputs: int | None, model: str = "gpt-4o", operation: str = "chat", **extra: Any) -> dict[str, Any]:
    """A model-call span with the GenAI attributes (a count given as None is left out)."""
    attributes: dict[str, Any] = {"gen_ai__operation__name": operation, "gen_ai__request__model": model, **extra}
    if inputs is not None:
        attributes["gen_ai__usage__input_tokens"] = inputs
    if outputs is not None:
        attributes["gen_ai__usage__output_tokens"] = outputs
    return span(trace, span_id, parent, f"{operation} {model}", start_ms, end_ms, **attributes)


def export(spans: list[dict[str, Any]], service: str | None = "agent-svc") -> dict[str, Any]:
    resource = {"attributes": [attribute("service.name", service)]} if service else {}
    return {"resourceSpans": [{"resource": resource, "scopeSpans": [{"scope": {"name": "test"}, "spans": spans}]}]}


def write_otlp(path: Path, spans: list[dict[str, Any]], service: str | None = "agent-svc") -> Path:
    path.write_text(json.dumps(export(spans, service)))
    return path
