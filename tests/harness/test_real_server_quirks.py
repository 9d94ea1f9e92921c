"""`servescope run` against a server that behaves like `transformers serve` (the scripted server emulating it).

What it must survive without wrong numbers (docs/real_servers.md): GET /v1/models
answers 500, there is no /metrics, min_tokens / ignore_eos are refused with a
422, chat opens with a bare role chunk, usage rides on the finish chunk, several
tokens share a chunk, no `[DONE]`. The console must say what it could not get.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner
from rich.console import Console
from support.scripted_server import ScriptedServer

from servescope.cli import main
from servescope.harness.config import RunConfig
from servescope.harness.console import RunConsole
from servescope.harness.orchestration.repeat import execute_run

pytestmark = pytest.mark.timeout(90)

FIRST_TOKEN_DELAY_S = 0.05


@pytest.fixture(scope="module")
def hf_like():
    with ScriptedServer.transformers_like(tokens_per_chunk=3, first_token_delay_s=FIRST_TOKEN_DELAY_S,
                                          itl_s=0.002) as srv:
        yield srv


def _console() -> tuple[RunConsole, io.StringIO]:
    buffer = io.StringIO()
    return RunConsole(show_progress=False, console=Console(file=buffer, width=300, highlight=False)), buffer


def _requests(run_dir: Path):
    return pq.read_table(run_dir / "requests.parquet").to_pandas()


@pytest.mark.parametrize("api, load", [("chat", {"concurrency": 3}), ("completions", {"rate": 20.0})],
                         ids=["chat-closed-loop", "completions-open-loop"])
def test_a_transformers_like_server_gives_a_clean_run(hf_like, tmp_path, api, load) -> None:
    console, said = _console()
    config = RunConfig(target=hf_like.base_url, model="/ckpt", api=api, prompt_tokens=32, max_tokens=8,
                       requests=12, out=str(tmp_path / "run"), report=False, workers=1, **load)
    outcome = execute_run(config, console)
    text = said.getvalue()
    assert outcome.status == "complete" and outcome.exit_code == 0, text

    frame = _requests(outcome.run_dir)
    assert len(frame) == 12 and (frame["status"] == "ok").all(), frame["error_message"].unique()
    # TTFT counts from the first chunk with text: never the role-only chunk that comes at once.
    assert frame["ttft_s"].min() >= FIRST_TOKEN_DELAY_S - 0.001
    assert (frame["output_tokens"] == 8).all() and set(frame["output_tokens_source"]) == {"usage"}
    assert all(list(c) == [3, 3, 2] for c in frame["chunk_tokens"])  # 3 tokens a chunk, adding up to usage
    assert all(len(gaps) == 2 for gaps in frame["itl_s"])
    assert frame["tpot_s"].notna().all()

    meta = json.loads((outcome.run_dir / "run.json").read_text())
    assert meta["model"] == "/ckpt" and meta["model_source"] == "flag"
    assert meta["models_endpoint"]["ok"] is False and "HTTP 500" in meta["models_endpoint"]["problem"]
    assert meta["server_metrics"]["available"] is False and meta["server_metrics"]["reason"] == "HTTP 404"
    assert meta["output_length_forced"] is False
    assert len(meta["notices"]) == 1 and "min_tokens" in meta["notices"][0]
    summary = outcome.summary
    assert summary["overall"]["ok"] == 12 and not summary["overall"]["errors"]

    # The console says what it could not get, and what it did instead.
    assert "/v1/models failed (HTTP 500" in text and "--model" in text
    assert "no server metrics" in text and "/metrics" in text
    assert "rejected min_tokens / ignore_eos" in text and "not forced" in text


def test_without_model_a_failing_v1_models_asks_for_model(hf_like, tmp_path) -> None:
    result = CliRunner().invoke(main, ["run", "--target", hf_like.base_url, "--prompt-tokens", "8", "--max-tokens",
                                              "2", "--requests", "1", "--out", str(tmp_path / "run"), "--no-report"])
    assert result.exit_code == 2, result.output
    assert "GET " + hf_like.base_url + "/v1/models failed (HTTP 500" in result.output
    assert "--model is needed" in result.output
    meta = json.loads((tmp_path / "run" / "run.json").read_text())
    assert meta["status"] == "failed" and "--model" in meta["problems"][0]


def test_a_model_the_server_does_not_list_is_pointed_out(tmp_path) -> None:
    console, said = _console()
    with ScriptedServer() as srv:  # lists "scripted", exports /metrics
        config = RunConfig(target=srv.base_url, model="typo", concurrency=1, requests=2, prompt_tokens=8,
                           max_tokens=2, out=str(tmp_path / "run"), report=False, workers=1)
        outcome = execute_run(config, console)
    text = said.getvalue()
    assert outcome.exit_code == 0, text
    assert "--model 'typo' is not among the models" in text and "'scripted'" in text
    assert "scraping server metrics from" in text


def test_output_tokens_counted_by_the_tokenizer_carry_no_bos(tmp_path) -> None:
    """No usage at all: the bundled tokenizer counts the output text, without the BOS a prompt count adds."""
    console, said = _console()
    with ScriptedServer(default_script={"usage": "none"}) as srv:
        config = RunConfig(target=srv.base_url, concurrency=2, requests=4, prompt_tokens=8, max_tokens=5,
                           out=str(tmp_path / "run"), report=False, workers=1)
        outcome = execute_run(config, console)
    assert outcome.exit_code == 0, said.getvalue()
    frame = _requests(outcome.run_dir)
    assert set(frame["output_tokens_source"]) == {"tokenizer"}
    assert (frame["output_tokens"] == 5).all()  # " tok" x 5 is 5 tokens, not 6
    assert all(list(c) == [1] * 5 for c in frame["chunk_tokens"])
