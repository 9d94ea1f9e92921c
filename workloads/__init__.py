"""Workloads: specs, token-exact prompt building, presets and importers.

The load generator consumes an iterator of `Session`s (see `workloads.types`).
"""

from workloads.errors import WorkloadError
from workloads.generator import apply_output_length, prompt_builder, session_stream, stream_fingerprint
from workloads.importers import import_sessions
from workloads.spec import (
    Buckets,
    PresetInfo,
    RequestClass,
    WorkloadSpec,
    fixed_workload,
    list_presets,
    load_workload,
    spec_from_dict,
)
from workloads.tokenizer import PromptTokenizer, load_tokenizer
from workloads.traces import trace_sessions
from workloads.types import RequestSpec, Session

__all__ = [
    "Buckets", "PresetInfo", "PromptTokenizer", "RequestClass", "RequestSpec", "Session", "WorkloadError",
    "WorkloadSpec", "apply_output_length", "fixed_workload", "import_sessions", "list_presets", "load_tokenizer",
    "load_workload", "prompt_builder", "session_stream", "spec_from_dict", "stream_fingerprint", "trace_sessions",
]
