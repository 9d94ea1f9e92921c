"""The incident simulator: deterministic per seed, and each planted effect is in its data."""

import numpy as np
import pytest

from servescope.analyzers.incidents.catalogue import EXPECTED, INCIDENTS
from servescope.analyzers.incidents.output import LOG_COLUMNS, write_log, write_run
from servescope.analyzers.incidents.simulator import simulate
from servescope.rundir.reader import load_run


def _ttft(sim):
    c = sim.columns
    return c["first_token_at"] - c["sent_at"]


def test_every_incident_has_its_expected_rules():
    assert set(INCIDENTS) == set(EXPECTED)


@pytest.mark.parametrize("name", ["healthy", "stall", "rate_limit"])
def test_same_seed_same_run_other_seed_other_run(name):
    a, b, c = (simulate(INCIDENTS[name](seed, 1000)) for seed in (1, 1, 2))
    assert np.array_equal(a.columns["end_at"], b.columns["end_at"])
    assert np.array_equal(a.itl_values, b.itl_values)
    assert len(a) != len(c) or not np.array_equal(a.columns["end_at"], c.columns["end_at"])


def test_a_stall_freezes_everything_in_flight():
    sim = simulate(INCIDENTS["stall"](0, 2000))
    c = sim.columns
    pause = (50.0, 56.0)  # the first pause: every 100 s from 50 s, 6 s long
    events = np.concatenate([c["first_token_at"], c["end_at"]])
    assert not ((events > pause[0] + 0.01) & (events < pause[1] - 0.01)).any()
    across = (c["sent_at"] < pause[0]) & (c["end_at"] > pause[1])
    assert across.sum() > 5 and np.nanmin(sim.itl_values) > 0


def test_convoy_long_prompts_delay_short_ones_only_without_chunking():
    plain = simulate(INCIDENTS["healthy"](0, 2000))
    convoy = simulate(INCIDENTS["convoy"](0, 2000))
    short = convoy.columns["prompt_tokens"] < 512
    assert np.nanpercentile(_ttft(convoy)[short], 90) > 3 * np.nanpercentile(_ttft(plain)[plain.columns["prompt_tokens"] < 512], 90)


def test_queueing_grows_over_the_run():
    sim = simulate(INCIDENTS["queueing"](0, 2000))
    wait = sim.columns["wait_s"]
    assert wait[-200:].mean() > 10 * max(wait[:200].mean(), 0.01)


def test_rate_limit_hits_one_tenant():
    sim = simulate(INCIDENTS["rate_limit"](0, 2000))
    limited = sim.columns["http_status"] == 429
    assert limited.sum() > 100 and set(sim.columns["tenant"][limited]) == {2}


def test_slow_model_decodes_slower():
    sim = simulate(INCIDENTS["slow_model"](0, 2000))
    c = sim.columns
    tpot = (c["end_at"] - c["first_token_at"]) / (c["output_tokens"] - 1)
    ratio = np.median(tpot[c["model"] == 1]) / np.median(tpot[c["model"] == 0])
    assert 1.9 < ratio < 2.5


def test_preemption_and_cache_miss_show_in_server_metrics():
    pre = simulate(INCIDENTS["preemption"](0, 2000))
    assert pre.gauges["vllm:num_preemptions_total"][-1] > 20
    miss = simulate(INCIDENTS["cache_miss"](0, 2000)).columns
    late = miss["sent_at"] > miss["sent_at"].max() / 2
    assert (miss["cached_tokens"][(miss["prefix_group"] == 1) & late] == 0).all()
    assert (miss["cached_tokens"][(miss["prefix_group"] == 0) & late] > 0).mean() > 0.8


def test_run_directory_and_log(tmp_path):
    sim = simulate(INCIDENTS["rate_limit"](0, 500))
    run = load_run(write_run(sim, tmp_path / "run", "rate_limit"))
    assert len(run.requests) == len(sim)
    assert set(run.server_metrics["name"]) >= {"vllm:num_requests_running", "vllm:kv_cache_usage_perc"}
    assert (run.requests["http_status"] == 429).sum() == (sim.columns["http_status"] == 429).sum()
    log = write_log(sim, tmp_path / "log.csv")
    assert log.read_text().splitlines()[0] == ",".join(LOG_COLUMNS)


def test_a_million_rows_is_quick():
    import time

    start = time.perf_counter()
    settings = INCIDENTS["slow_model"](0, 1_000_000)
    settings.itl = False
    sim = simulate(settings)
    assert len(sim) > 900_000 and time.perf_counter() - start < 15
