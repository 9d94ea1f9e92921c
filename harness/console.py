"""What `servescope run` prints: a live progress bar, then the per-phase table.

The table's numbers come from `analyzers.summarize` (summary.json); nothing
here computes a percentile. Without a terminal (CI logs, pipes) there is no
progress bar: only the start line, the final table and warnings, in plain text.
"""

from __future__ import annotations

import time
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, Progress, TaskID, TextColumn, TimeElapsedColumn
from rich.table import Table

from servescope.harness.loadgen.dispatcher import Progress as LoadProgress

REFRESH_S = 0.25
PERCENTILES = ("p50", "p90", "p99", "p99.9")
LATENCIES = (("ttft_s", "TTFT"), ("tpot_s", "TPOT"), ("itl_s", "ITL"), ("e2e_s", "E2E"))


class RunConsole:
    """Progress display for one run. `show_progress=None`: only when stdout is a terminal."""

    def __init__(self, show_progress: bool | None = None, console: Console | None = None) -> None:
        self.console = console or Console(stderr=False, highlight=False)
        self.live = self.console.is_terminal if show_progress is None else show_progress
        self._progress: Progress | None = None
        self._task: TaskID | None = None
        self._phase = ""
        self._last = 0.0
        self._rate_mark: tuple[float, int] | None = None
        self._rate = 0.0

    # -- messages -----------------------------------------------------------------------

    def info(self, text: str) -> None:
        self.console.print(text, markup=False, highlight=False)

    def warn(self, text: str) -> None:
        self.console.print(f"[bold yellow]warning:[/] {text}", highlight=False)

    def error(self, text: str) -> None:
        Console(stderr=True, highlight=False).print(f"[bold red]error:[/] {text}", highlight=False)

    # -- live progress -------------------------------------------------------------------

    def start(self) -> None:
        if not self.live:
            return
        self._progress = Progress(
            TextColumn("[bold]{task.fields[phase]}"), BarColumn(), TextColumn("{task.fields[counts]}"),
            TimeElapsedColumn(), console=self.console, transient=True,
        )
        self._progress.start()

    def update(self, p: LoadProgress, now: float) -> None:
        """Called from the dispatcher's loop; redraws at most every REFRESH_S."""
        if self._progress is None or time.monotonic() - self._last < REFRESH_S:
            return
        self._last = time.monotonic()
        self._update_rate(p.records)
        if self._task is None or p.phase != self._phase:
            self._phase = p.phase
            if self._task is not None:
                self._progress.remove_task(self._task)
            self._task = self._progress.add_task("", phase="", counts="", total=None)
        total, completed = self._bar(p, now)
        name = p.phase or "prewarming"
        label = f"{name} ({p.phase_index + 1}/{p.phase_count})" + (" stopping…" if p.stopping else "")
        counts = f"{p.phase_done}/{p.phase_expected or '?'} sessions  {self._rate:.1f} req/s  errors {p.errors}"
        self._progress.update(self._task, total=total, completed=completed, phase=label, counts=counts)

    def _bar(self, p: LoadProgress, now: float) -> tuple[float | None, float]:
        if p.phase_duration_s and p.phase_started_at is not None:
            return p.phase_duration_s, min(p.phase_duration_s, max(0.0, now - p.phase_started_at))
        if p.phase_expected:
            return float(p.phase_expected), float(p.phase_done)
        return None, float(p.phase_done)

    def _update_rate(self, records: int) -> None:
        now = time.monotonic()
        if self._rate_mark is None:
            self._rate_mark = (now, records)
            return
        then, count = self._rate_mark
        if now - then >= 1.0:
            self._rate = (records - count) / (now - then)
            self._rate_mark = (now, records)

    def stop(self) -> None:
        if self._progress is not None:
            self._progress.stop()
            self._progress = None

    # -- final table ------------------------------------------------------------------------

    def summary_table(self, summary: dict[str, Any]) -> None:
        """One line per phase (counts and rates), then a latency table per phase (ms, with sample counts)."""
        groups = list(summary.get("phases", []))
        if len(groups) > 1 and summary.get("overall"):
            groups.append({**summary["overall"], "phase": "overall (measured)"})
        overview = Table(title="servescope run", title_justify="left")
        for column in ("phase", "requests", "ok", "errors", "req/s", "out tok/s"):
            overview.add_column(column, justify="left" if column in ("phase", "errors") else "right")
        for group in groups:
            errors = ", ".join(f"{k} {v}" for k, v in (group.get("errors") or {}).items()) or "-"
            overview.add_row(str(group.get("phase", "")), str(group.get("requests", 0)), str(group.get("ok", "-")),
                             errors, _num(group.get("req_per_s")), _num(group.get("output_tok_per_s")))
        self.console.print(overview)
        for group in groups:
            latency = Table(title=f"{group.get('phase', '')}: latency (ms)", title_justify="left")
            latency.add_column("metric")
            for column in (*PERCENTILES, "n"):
                latency.add_column(column, justify="right")
            metrics = group.get("metrics") or {}
            for key, name in LATENCIES:
                stats = metrics.get(key) or {}
                latency.add_row(name, *(_ms(stats.get(p)) for p in PERCENTILES), str(stats.get("n", 0)))
            # Open loop with a late generator: what users arriving on schedule saw (summary.json decides when).
            scheduled = group.get("from_scheduled") or {}
            for key, name in LATENCIES if scheduled.get("differs") else ():
                if key in scheduled.get("metrics", {}):
                    stats = scheduled["metrics"][key]
                    latency.add_row(f"{name} from scheduled", *(_ms(stats.get(p)) for p in PERCENTILES), str(stats.get("n", 0)))
            self.console.print(latency)
        slo = summary.get("slo") or {}
        for objective in slo.get("objectives", []):
            mark = "[green]met[/]" if objective.get("ok") else "[red]MISSED[/]"
            value = objective.get("value")
            shown = "no data" if value is None else f"{value:g}"
            self.console.print(f"SLO {objective.get('name')}: {mark} (value {shown}, threshold {objective.get('threshold'):g})")
        telemetry = summary.get("telemetry") or {}
        if telemetry.get("energy_per_output_token_j") is not None:
            self.console.print(f"GPU energy: {telemetry['energy_per_output_token_j']:.3g} J per output token "
                               f"({telemetry['gpu_energy_j']:.0f} J over the measured window, "
                               f"{telemetry.get('gpu_energy_from')})", highlight=False)
        client = summary.get("client") or {}
        if client.get("client_bound"):
            self.warn("the load generator itself was too slow to keep its schedule; latencies include its own delay "
                      f"({'; '.join(client.get('reasons', [])) or 'see run.json client_check'}). "
                      "Use more --workers, a lower load, or a quieter machine.")


def _ms(seconds: Any) -> str:
    return "-" if seconds is None else f"{seconds * 1e3:.1f}"


def _num(value: Any) -> str:
    return "-" if value is None else f"{value:.1f}"

