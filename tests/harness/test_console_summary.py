"""The console's final table reads summary.json: latencies from the scheduled time appear only when they matter."""

from rich.console import Console

from servescope.analyzers.summary import summarize
from servescope.harness.console import RunConsole
from support.cluster_runs import falling_behind_sim


def printed(summary) -> str:
    console = Console(record=True, width=160)
    RunConsole(show_progress=False, console=console).summary_table(summary)
    return console.export_text()


def test_final_table_shows_both_figures_when_the_generator_fell_behind(make_sim):
    text = printed(summarize(falling_behind_sim(make_sim, lag_slope=0.001).run()))
    assert "TTFT from scheduled" in text and "E2E from scheduled" in text


def test_final_table_shows_one_figure_when_it_kept_up(make_sim):
    text = printed(summarize(falling_behind_sim(make_sim, lag_slope=0.0).run()))
    assert "TTFT" in text and "from scheduled" not in text
