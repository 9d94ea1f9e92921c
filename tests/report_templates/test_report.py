import json
import re

from click.testing import CliRunner

from servescope.analyzers.report import build_report
from servescope.cli import main


def test_build_report_writes_the_three_files(hostile_run_dir):
    path = build_report(hostile_run_dir)
    assert path == hostile_run_dir / "report.html"
    summary = json.loads((hostile_run_dir / "summary.json").read_text())
    findings = json.loads((hostile_run_dir / "findings.json").read_text())
    assert summary["overall"]["requests"] == 780  # warm-up excluded
    assert [p["phase"] for p in summary["phases"]] == ["warmup", "rate=40"]
    assert {f["rule"] for f in findings} >= {"errors"}
    for f in findings:
        assert set(f) >= {"rule", "severity", "title", "summary", "evidence", "slices", "suggestion", "confidence"}
        assert f["confidence"] is None or 0 <= f["confidence"] <= 1
    html = path.read_text()
    for f in findings:
        if f["confidence"] is not None:
            assert f"confidence {f['confidence_level']} ({f['confidence']:.2f})" in html
    for f in findings:
        assert f'id="{f["rule"]}"' in html  # anchors by rule id
    assert path.stat().st_size < 10e6


def test_untrusted_text_is_escaped(hostile_run_dir, hostile_text):
    html = build_report(hostile_run_dir).read_text()
    assert hostile_text not in html
    assert "<img src=x" not in html
    assert "&lt;/script&gt;&lt;img src=x onerror=alert(1)&gt;" in html  # in tables, as text
    # Inside chart JSON the '<' is a \u escape, so no '</script' can end a script element early.
    for block in re.findall(r'<script type="application/json"[^>]*>(.*?)</script>', html, flags=re.S):
        assert "<" not in block


def test_plotly_is_inlined_once_and_nothing_is_fetched(hostile_run_dir):
    html = build_report(hostile_run_dir).read_text()
    assert html.count("plotly.js v") == 1
    assert not re.search(r"<script[^>]+src=", html)  # the browser test also fails on any network request


def test_every_percentile_has_its_sample_count(hostile_run_dir):
    html = build_report(hostile_run_dir).read_text()
    summary = json.loads((hostile_run_dir / "summary.json").read_text())
    assert f'n={summary["overall"]["metrics"]["ttft_s"]["n"]}' in html


def test_cli_report(hostile_run_dir, tmp_path):
    runner = CliRunner()
    ok = runner.invoke(main, ["report", str(hostile_run_dir)])
    assert ok.exit_code == 0, ok.output
    assert "report: " in ok.output and str(hostile_run_dir / "report.html") in ok.output
    failed = runner.invoke(main, ["report", str(hostile_run_dir), "--slo", "ttft_p99=1ms"])
    assert failed.exit_code == 1 and "FAILED (ttft_p99)" in failed.output
    assert json.loads((hostile_run_dir / "summary.json").read_text())["slo"]["ok"] is False
    not_a_run = runner.invoke(main, ["report", str(tmp_path)])
    assert not_a_run.exit_code == 2 and "not a run directory" in not_a_run.output
    bad_slo = runner.invoke(main, ["report", str(hostile_run_dir), "--slo", "ttft_p99=soon"])
    assert bad_slo.exit_code == 2 and "not a duration" in bad_slo.output


def test_report_from_a_run_that_died_before_compaction(tmp_path):
    """Only run.json and requests.jsonl: the report still builds from what was measured."""
    rows = [{"request_id": f"r{i}", "phase": "concurrency=1", "sent_at": i * 0.5, "first_token_at": i * 0.5 + 0.05,
             "end_at": i * 0.5 + 0.2, "ttft_s": 0.05, "e2e_s": 0.2, "tpot_s": 0.01, "itl_s": [0.01] * 15,
             "output_tokens": 16, "prompt_tokens": 64, "status": "ok"} for i in range(30)]
    (tmp_path / "run.json").write_text(json.dumps({"status": "interrupted", "slo": "ttft_p99=1s"}))
    (tmp_path / "requests.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    build_report(tmp_path)
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["status"] == "interrupted" and summary["overall"]["ok"] == 30
    assert summary["slo"]["ok"] is True  # SLO taken from run.json
    assert "interrupted" in (tmp_path / "report.html").read_text()


def test_report_of_a_run_with_no_requests(tmp_path):
    (tmp_path / "run.json").write_text(json.dumps({"status": "failed", "problems": ["engine did not start"]}))
    html = build_report(tmp_path).read_text()
    assert "engine did not start" in html
    assert json.loads((tmp_path / "findings.json").read_text()) == []
