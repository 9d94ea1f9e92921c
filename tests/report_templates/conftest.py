"""A small synthetic run directory with hostile labels, shared by the report tests."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from servescope.analyzers.synthetic import SyntheticSpec, synthetic_table, write_synthetic_run

HOSTILE = "</script><img src=x onerror=alert(1)>"


@pytest.fixture(scope="session")
def hostile_run_dir(tmp_path_factory):
    """800 requests; one tenant label is an HTML/script injection attempt."""
    out = tmp_path_factory.mktemp("report") / "run"
    write_synthetic_run(out, SyntheticSpec(requests=800, rate=40, seed=1, error_rate=0.02, warmup=20))
    table = synthetic_table(SyntheticSpec(requests=800, rate=40, seed=1, error_rate=0.02, warmup=20))
    tenants = table.column("tenant").to_pylist()
    tenants = [HOSTILE if t == "team-c" else t for t in tenants]
    table = table.set_column(table.schema.get_field_index("tenant"), "tenant", pa.array(tenants))
    pq.write_table(table, out / "requests.parquet")
    return out


@pytest.fixture(scope="session")
def hostile_text() -> str:
    return HOSTILE
