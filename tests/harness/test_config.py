"""RunConfig and its parsers: bad input fails early with a message that says how to fix it."""

from __future__ import annotations

import numpy as np
import pytest

from servescope.harness.config import Arrival, ConfigError, RunConfig, Sweep, parse_duration, redact_command_line
from servescope.harness.loadgen.arrivals import send_offsets, slot_offsets
from servescope.harness.loadgen.models import WARMUP_PHASE, ConcurrencyLoad, RateLoad, default_workers, plan_phases


@pytest.mark.parametrize("text, seconds", [("500ms", 0.5), ("2s", 2.0), ("1m", 60.0), ("1.5", 1.5), (3, 3.0), ("250us", 0.00025)])
def test_durations(text, seconds):
    assert parse_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize("text", ["5x", "", "-1s", "ms", "1 minute"])
def test_bad_durations_say_how_to_write_one(text):
    with pytest.raises(ConfigError, match="500ms"):
        parse_duration(text, "duration")


def test_config_normalizes_strings():
    cfg = RunConfig(target="http://127.0.0.1:9/", rate=4, arrival="gamma:2", duration_s="2s", warmup_s="500ms",
                    sweep=None, timeout_s="1m")
    assert cfg.target == "http://127.0.0.1:9"
    assert cfg.duration_s == 2.0 and cfg.warmup_s == 0.5 and cfg.timeout_s == 60.0
    assert cfg.arrival == Arrival("gamma", 2.0)
    assert cfg.engine is None


@pytest.mark.parametrize("kwargs, message", [
    ({"rate": 1, "concurrency": 2}, "choose one load model"),
    ({"rate": -1}, "--rate"),
    ({"concurrency": 0}, "--concurrency"),
    ({"arrival": "weibull"}, "--arrival"),
    ({"arrival": "gamma:x"}, "gamma:2"),
    ({"sweep": "rate"}, "rate:1,2,4"),
    ({"sweep": "concurrency:1.5"}, "whole numbers"),
    ({"prompt_tokens": 0}, "--prompt-tokens: must be at least 1"),
    ({"max_tokens": -1}, "--max-tokens: must be at least 1"),
    ({"target": "localhost:8000"}, "http"),
    ({"target": "http://h:1/v1"}, "without /v1"),
    ({"target": "http://h:1", "engine": "reference"}, "not both"),
    ({"engine": "vllm"}, "bundled engine"),
    ({"slo": "ttft_p99<500ms"}, "KEY=VALUE"),
    ({"slo": "foo_p99=1s"}, "unknown objective"),
    ({"slo": "ttft_p99=fast"}, "not a duration"),
    ({"requests": 0}, "--requests"),
    ({"transport": "curl"}, "--transport"),
    ({"repeat": 0}, "--repeat"),
    ({"trace": "/no/such/trace.jsonl"}, "no such file"),
])
def test_bad_options_are_rejected_with_the_flag_named(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        RunConfig(**kwargs)


def test_api_key_is_read_from_env_and_never_serialized(monkeypatch):
    monkeypatch.setenv("SERVESCOPE_TEST_KEY", "sk-secret-value-123456")
    cfg = RunConfig(target="http://127.0.0.1:9", api_key_env="SERVESCOPE_TEST_KEY")
    assert cfg.read_api_key() == "sk-secret-value-123456"
    assert "sk-secret" not in repr(cfg.to_json())
    monkeypatch.delenv("SERVESCOPE_TEST_KEY")
    with pytest.raises(ConfigError, match="not set"):
        cfg.read_api_key()


def test_command_line_redaction():
    argv = ["servescope", "run", "--api-key", "abc", "--token=xyz", "--api-key-env", "VAR", "sk-abcdefghijklmnop"]
    assert redact_command_line(argv) == ["servescope", "run", "--api-key", "***", "--token=***", "--api-key-env", "VAR", "***"]


def test_phases_sweep_and_warmup_labels():
    cfg = RunConfig(target="http://127.0.0.1:9", sweep="rate:1,2.5", warmup_s="1s", duration_s="3s")
    phases = plan_phases(cfg)
    assert [p.name for p in phases] == [WARMUP_PHASE, "rate=1.0", "rate=2.5"]
    assert phases[0].duration_s == 1.0 and phases[1].duration_s == 3.0
    cfg = RunConfig(target="http://127.0.0.1:9", sweep=Sweep("concurrency", (1, 8)), requests=5)
    assert [p.name for p in plan_phases(cfg)] == ["concurrency=1", "concurrency=8"]
    assert plan_phases(RunConfig(target="http://127.0.0.1:9"))[0].load == ConcurrencyLoad(1)


def test_open_loop_send_times_are_seeded_and_hold_the_rate():
    def draw(seed, kind="poisson"):
        return list(send_offsets(Arrival.parse(kind), 50.0, np.random.default_rng(seed), duration_s=20.0))

    a, b = draw(1), draw(1)
    assert a == b and a != draw(2)
    assert len(a) == pytest.approx(1000, rel=0.1)
    assert all(x < y for x, y in zip(a, a[1:]))
    constant = draw(0, "constant")
    assert constant[:3] == pytest.approx([0.0, 0.02, 0.04]) and len(constant) == 1000
    bursty = np.diff(draw(3, "gamma:3"))
    assert np.std(bursty) / np.mean(bursty) == pytest.approx(3.0, rel=0.25)


def test_ramp_rises_linearly():
    ramp = list(send_offsets(Arrival("constant"), 100.0, np.random.default_rng(0), duration_s=4.0, ramp_s=2.0))
    first_second = sum(1 for t in ramp if t < 1.0)
    second_second = sum(1 for t in ramp if 1.0 <= t < 2.0)
    after = sum(1 for t in ramp if 2.0 <= t < 3.0)
    assert first_second == pytest.approx(25, abs=2) and second_second == pytest.approx(75, abs=2)
    assert after == pytest.approx(100, abs=1)
    assert slot_offsets(4, 2.0) == [0.0, 0.5, 1.0, 1.5]
    assert RateLoad(8).label == "rate=8.0"


def test_default_workers_rule():
    cfg = RunConfig(target="http://127.0.0.1:9", concurrency=192)
    assert default_workers(plan_phases(cfg), cpu_count=16) == 4
    assert default_workers(plan_phases(cfg), cpu_count=2) == 1
    assert default_workers(plan_phases(RunConfig(target="http://127.0.0.1:9", rate=500)), cpu_count=16) == 3
    assert default_workers(plan_phases(RunConfig(target="http://127.0.0.1:9", rate=5)), cpu_count=16) == 1
