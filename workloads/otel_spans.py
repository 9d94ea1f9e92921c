"""Import agent traces from OpenTelemetry GenAI spans (an OTLP JSON export).

The file is what an OTLP exporter or the collector's file exporter writes: a
JSON object `{"resourceSpans": [...]}` (or a list of them), or JSON lines of
such objects. Each `resourceSpans[].scopeSpans[].spans[]` span has `traceId`,
`spanId`, `parentSpanId`, `name`, `startTimeUnixNano`, `endTimeUnixNano` and
`attributes` (`[{"key": ..., "value": {"stringValue"|"intValue"|...: ...}}]`).

Which spans are calls: those whose `gen_ai.operation.name` is an inference
(`chat`, `text_completion`, `generate_content`), or, from instrumentations
older than that attribute, spans with both token counts and no operation name.
A call span that has another call span below it (a framework wrapping the
client's own span) stands for the same request: the innermost one is the call.
Agent, tool and other spans shape nothing but the trace's start and its name.

What a call waits for: every call of its trace that had ended before it
started (happens-before: whatever ended earlier may have fed it), reduced to
the latest such calls (a call already waited for through another is dropped),
plus calls it names in span `links`. Its delay is its start minus the latest
end among them; a call that waited for nothing keeps its offset from the
trace's first span. Calls that overlapped in the recording wait for none of
each other, so they run in parallel again.

Token counts: `gen_ai.usage.input_tokens` / `gen_ai.usage.output_tokens`
(older `gen_ai.usage.prompt_tokens` / `gen_ai.usage.completion_tokens` are
read too); a call span without them cannot be replayed and is an error. The
model is `gen_ai.request.model` (else `gen_ai.response.model`). A trace's flow
is labelled with its service (`service.name`, else `trace`) and its root
span's `gen_ai.agent.name` or name.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from servescope.workloads.agent_graph import DEFAULT_USER_CLASS, AgentCall, AgentTrace, build_trace
from servescope.workloads.errors import WorkloadError
from servescope.workloads.jsonstream import iter_jsonl

CALL_OPERATIONS = {"chat": "chat", "text_completion": "completions", "generate_content": "chat"}
INPUT_KEYS = ("gen_ai.usage.input_tokens", "gen_ai.usage.prompt_tokens")
OUTPUT_KEYS = ("gen_ai.usage.output_tokens", "gen_ai.usage.completion_tokens")
MODEL_KEYS = ("gen_ai.request.model", "gen_ai.response.model")


@dataclass(slots=True)
class _Span:
    trace_id: str
    span_id: str
    parent_id: str
    name: str
    start_ns: int
    end_ns: int
    attributes: dict[str, Any]
    service: str | None
    links: tuple[str, ...] = ()
    children: list["_Span"] = field(default_factory=list)

    @property
    def label(self) -> str:
        return f"span {self.span_id} ({self.name!r}) of trace {self.trace_id}"


def looks_like_otlp(record: Any) -> bool:
    """Whether a parsed JSON document (or first JSON line) is an OTLP traces export."""
    if isinstance(record, list):
        return bool(record) and all(looks_like_otlp(r) for r in record[:1])
    return isinstance(record, dict) and "resourceSpans" in record


def read_otel_spans(path: str | Path) -> list[AgentTrace]:
    """Every trace of the export that made at least one model call, in order of their start."""
    path = Path(path)
    source = str(path)
    traces: dict[str, list[_Span]] = {}
    for where, document in _documents(path):
        if not looks_like_otlp(document):
            raise WorkloadError(f"{where}: not an OTLP traces export (no `resourceSpans` at the top)", source=source)
        for export in document if isinstance(document, list) else [document]:
            for span in _spans(export, where, source):
                traces.setdefault(span.trace_id, []).append(span)
    out = [trace for spans in traces.values() if (trace := _trace(spans, source)) is not None]
    if not out:
        raise WorkloadError("no model-call spans: none has gen_ai.operation.name chat, text_completion or "
                            "generate_content (or gen_ai.usage token counts)", source=source)
    return sorted(out, key=lambda t: t.start_s)


def _documents(path: Path) -> list[tuple[str, Any]]:
    if path.suffix == ".jsonl" or path.suffix == ".ndjson":
        return [(f"line {lineno}", obj) for lineno, obj in iter_jsonl(path)]
    try:
        with path.open(encoding="utf-8") as fh:
            return [("the file", json.load(fh))]
    except json.JSONDecodeError as exc:
        raise WorkloadError(f"not valid JSON (line {exc.lineno}: {exc.msg}); an OTLP export is one JSON object, "
                            "or one object per line in a .jsonl file", source=str(path)) from None


def _spans(export: dict[str, Any], where: str, source: str) -> list[_Span]:
    out = []
    for resource_spans in export.get("resourceSpans") or []:
        resource = _attributes((resource_spans.get("resource") or {}).get("attributes"))
        service = resource.get("service.name")
        scopes = resource_spans.get("scopeSpans") or resource_spans.get("instrumentationLibrarySpans") or []
        for scope in scopes:
            for raw in scope.get("spans") or []:
                out.append(_span(raw, service if isinstance(service, str) else None, where, source))
    return out


def _span(raw: Any, service: str | None, where: str, source: str) -> _Span:
    if not isinstance(raw, dict) or not raw.get("traceId") or not raw.get("spanId"):
        raise WorkloadError(f"{where}: a span without traceId/spanId: {str(raw)[:120]}", source=source)
    trace_id, span_id = str(raw["traceId"]), str(raw["spanId"])
    start, end = _nanos(raw.get("startTimeUnixNano")), _nanos(raw.get("endTimeUnixNano"))
    label = f"span {span_id} ({raw.get('name')!r}) of trace {trace_id}"
    if start is None or end is None:
        raise WorkloadError(f"{where}: {label} has no startTimeUnixNano/endTimeUnixNano", source=source)
    if end < start:
        raise WorkloadError(f"{where}: {label} ends before it starts", source=source)
    links = tuple(str(link["spanId"]) for link in raw.get("links") or []
                  if isinstance(link, dict) and link.get("spanId") and str(link.get("traceId", trace_id)) == trace_id)
    return _Span(trace_id, span_id, str(raw.get("parentSpanId") or ""), str(raw.get("name") or ""), start, end,
                 _attributes(raw.get("attributes")), service, links)


def _nanos(value: Any) -> int | None:
    """OTLP JSON writes 64-bit integers as strings."""
    try:
        return int(value)
    except (TypeError, ValueError):
        return None


def _attributes(items: Any) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for item in items or []:
        if isinstance(item, dict) and "key" in item:
            out[str(item["key"])] = _value(item.get("value"))
    return out


def _value(value: Any) -> Any:
    if not isinstance(value, dict):
        return value
    if "intValue" in value:
        return _nanos(value["intValue"])
    if "arrayValue" in value:
        return [_value(v) for v in (value["arrayValue"] or {}).get("values") or []]
    for key in ("stringValue", "doubleValue", "boolValue"):
        if key in value:
            return value[key]
    return None


def _is_call(span: _Span) -> bool:
    operation = span.attributes.get("gen_ai.operation.name")
    if operation is not None:
        return operation in CALL_OPERATIONS
    return _first(span, INPUT_KEYS) is not None and _first(span, OUTPUT_KEYS) is not None


def _first(span: _Span, keys: tuple[str, ...]) -> Any:
    return next((span.attributes[k] for k in keys if span.attributes.get(k) is not None), None)


def _trace(spans: list[_Span], source: str) -> AgentTrace | None:
    by_id = {s.span_id: s for s in spans}
    for span in spans:
        if span.parent_id in by_id:
            by_id[span.parent_id].children.append(span)
    calls = [s for s in spans if _is_call(s) and not _has_call_below(s)]
    if not calls:
        return None
    calls.sort(key=lambda s: (s.start_ns, s.end_ns))
    first_ns = min(s.start_ns for s in spans)
    roots = [s for s in spans if s.parent_id not in by_id]
    root = min(roots or spans, key=lambda s: s.start_ns)
    ends = {c.span_id: c.end_ns for c in calls}
    waits: dict[str, set[str]] = {}  # call -> every call it waits for, directly or not
    graph = []
    for call in calls:
        earlier = [c for c in calls if c.end_ns <= call.start_ns and c is not call]
        direct: list[str] = []
        for c in sorted(earlier, key=lambda c: c.end_ns, reverse=True):
            if not any(c.span_id in waits[d] for d in direct):
                direct.append(c.span_id)
        direct += [link for link in call.links if link in ends and link not in direct and link != call.span_id]
        waits[call.span_id] = set(direct).union(*(waits.get(d, set()) for d in direct))
        base = max((ends[d] for d in direct), default=first_ns)
        graph.append(AgentCall(call.span_id, _count(call, INPUT_KEYS, source), _count(call, OUTPUT_KEYS, source),
                               parents=tuple(direct), delay_s=max(0, call.start_ns - base) / 1e9,
                               model=_model(call), api=CALL_OPERATIONS.get(call.attributes.get("gen_ai.operation.name"))))
    task = root.attributes.get("gen_ai.agent.name") or root.name or "trace"
    return build_trace(root.trace_id, graph, source, start_s=first_ns / 1e9,
                       user_class=root.service or DEFAULT_USER_CLASS, task=str(task))


def _has_call_below(span: _Span) -> bool:
    stack, seen = list(span.children), {span.span_id}
    while stack:
        child = stack.pop()
        if child.span_id in seen:  # a parent loop in a malformed export
            continue
        seen.add(child.span_id)
        if _is_call(child):
            return True
        stack.extend(child.children)
    return False


def _count(span: _Span, keys: tuple[str, ...], source: str) -> int:
    value = _first(span, keys)
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        what = "no" if value is None else f"a bad ({value!r})"
        raise WorkloadError(f"{span.label} has {what} {keys[0]}: every model-call span needs its input and output "
                            "token counts to be replayed (gen_ai.usage.input_tokens, gen_ai.usage.output_tokens)",
                            source=source)
    return value


def _model(span: _Span) -> str | None:
    value = _first(span, MODEL_KEYS)
    return str(value) if value else None
