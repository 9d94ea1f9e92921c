"""What every benchmark script shares: the results file, run information and the final table.

A results file is data, one per benchmark and device: `benchmarks/results/<benchmark>_<device>.json`,

    {"benchmark": ..., "device": ..., "parts": {part: {...figures..., "run": {date, command, commit, ...}}}}

A run replaces the parts it measured and keeps the others, so a run of one part updates that part
alone; each part says which run measured it. Nothing here imports torch: the harness benchmarks
run without it.
"""

from __future__ import annotations

import math
import os
import platform
import re
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Sequence

from servescope.rundir.jsonio import write_json_atomic
from servescope.version import __version__

REPO = Path(__file__).resolve().parents[1]
RESULTS_DIR = REPO / "benchmarks" / "results"


def slug(name: str) -> str:
    """`NVIDIA H200` -> `nvidia_h200`: the device part of a results file name."""
    return re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_")


def cpu_name() -> str:
    """The CPU model and the number of CPUs this process may use, e.g. `AMD EPYC 9654 (16 CPUs)`."""
    model = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return f"{model} ({cpus} CPUs)"


def git_commit() -> str | None:
    """`git describe --always --dirty` of the checkout, or None outside a git checkout."""
    try:
        out = subprocess.run(["git", "-C", str(REPO), "describe", "--always", "--dirty"], capture_output=True,
                             text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return (out.stdout.strip() or None) if out.returncode == 0 else None


def command_line() -> str:
    """This process's command, as `python -m benchmarks.<script> ARGS`."""
    return " ".join(["python", "-m", f"benchmarks.{Path(sys.argv[0]).stem}", *sys.argv[1:]])


def run_info(**extra: Any) -> dict[str, Any]:
    """What a part's figures depend on besides the code: when, the command, the commit, the host."""
    return {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "command": command_line(),
            "commit": git_commit(), "servescope": __version__, "python": platform.python_version(),
            "host_cpus": os.cpu_count(), **extra}


class ResultsFile:
    """One benchmark's figures on one device, rewritten after every part so that a run cut short
    keeps what it measured. `copy_to`: a second folder that gets a copy at every save; with
    `save=False` the figures stay in memory (the tables still print)."""

    def __init__(self, benchmark: str, device: str, out_dir: str | Path = RESULTS_DIR,
                 copy_to: str | Path | None = None, save: bool = True) -> None:
        self.path = Path(out_dir) / f"{benchmark}_{slug(device)}.json"
        self.copy_to = Path(copy_to) if copy_to else None
        self.enabled = save
        self.data: dict[str, Any] = {"benchmark": benchmark, "device": device, "parts": {}}
        if self.path.exists():
            import json

            self.data["parts"].update(json.loads(self.path.read_text()).get("parts", {}))

    @property
    def parts(self) -> dict[str, Any]:
        return self.data["parts"]

    def put(self, part: str, figures: dict[str, Any], run: dict[str, Any]) -> None:
        self.parts[part] = {**figures, "run": run}
        self.save()

    def save(self) -> None:
        if not self.enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        write_json_atomic(self.path, self.data)
        if self.copy_to is not None:
            self.copy_to.mkdir(parents=True, exist_ok=True)
            write_json_atomic(self.copy_to / self.path.name, self.data)


def add_results_args(parser, default_save: bool) -> None:
    """--out / --copy-to, and --save (CPU scripts, which only save when asked) or --no-save."""
    parser.add_argument("--out", default=str(RESULTS_DIR),
                        help="folder of the results file (default: benchmarks/results)")
    parser.add_argument("--copy-to", default=None, help="also write a copy of the results file here after every part")
    if default_save:
        parser.add_argument("--no-save", dest="save", action="store_false", help="print the tables only")
    else:
        parser.add_argument("--save", action="store_true",
                            help="write the figures to OUT/<benchmark>_<device>.json")


def fmt(value: Any) -> str:
    """A table cell: '-' for None/NaN, thousands separators for large numbers, 3 significant digits below."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        size = abs(value)
        if size >= 1000:
            return f"{value:,.0f}"
        if size >= 100:
            return f"{value:.1f}"
        if size >= 1:
            return f"{value:.2f}"
        return f"{value:.3g}"
    return str(value)


def table(header: Sequence[str], rows: Sequence[Sequence[Any]], title: str | None = None) -> str:
    """A plain-text table: the first column left-aligned, the others right-aligned."""
    cells = [[fmt(c) for c in row] for row in rows]
    widths = [max([len(h)] + [len(r[i]) for r in cells if i < len(r)]) for i, h in enumerate(header)]

    def line(values: Sequence[str]) -> str:
        return "  ".join(v.ljust(w) if i == 0 else v.rjust(w) for i, (v, w) in enumerate(zip(values, widths)))

    out = ([title] if title else []) + [line(header), line(["-" * w for w in widths])] + [line(r) for r in cells]
    return "\n".join(out)


def print_table(header: Sequence[str], rows: Sequence[Sequence[Any]], title: str | None = None) -> None:
    print("\n" + table(header, rows, title), flush=True)


def quiet_console():
    """A RunConsole that prints nothing: for `servescope.execute_run` inside a benchmark, whose own
    table is the output."""
    from rich.console import Console

    from servescope.harness.console import RunConsole

    return RunConsole(show_progress=False, console=Console(file=open(os.devnull, "w")))


def scripted_server_class():
    """tests/support/scripted_server.py's ScriptedServer, loaded by path: putting tests/ on sys.path
    would let its per-area folders shadow installed packages."""
    import importlib.util

    path = REPO / "tests" / "support" / "scripted_server.py"
    spec = importlib.util.spec_from_file_location("scripted_server", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.ScriptedServer


def cpu_ticks(pid: int) -> int:
    """utime + stime + cutime + cstime of one process, in clock ticks (0 when it is gone)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0
    return sum(int(v) for v in fields[11:15])


def descendants(pid: int) -> list[int]:
    """Process ids of `pid`'s children, their children, and so on (from /proc)."""
    out, frontier = [], [pid]
    while frontier:
        parent = frontier.pop()
        try:
            children = Path(f"/proc/{parent}/task/{parent}/children").read_text().split()
        except OSError:
            continue
        out.extend(int(c) for c in children)
        frontier.extend(int(c) for c in children)
    return out


def client_cpu_s(exclude: set[int]) -> float:
    """CPU seconds of this process and its descendants (worker processes, their forkserver), minus `exclude`."""
    own = resource.getrusage(resource.RUSAGE_SELF)
    ticks = sum(cpu_ticks(p) for p in descendants(os.getpid()) if p not in exclude)
    return own.ru_utime + own.ru_stime + ticks / os.sysconf("SC_CLK_TCK")


def timing_errors(run_dir: Path, log: dict[str, list[float]]) -> tuple[list[float], list[float], int]:
    """(first-chunk errors, later-chunk errors, chunks) in seconds, joined on response id and chunk index."""
    import numpy as np

    from servescope.rundir.reader import load_run

    run = load_run(run_dir)
    origin = run.run["clock_origin_perf_counter_s"]
    ok = run.requests[(run.requests["status"] == "ok") & (run.requests["phase"] != "warmup")]
    ttft, itl, chunks = [], [], 0
    for rid, first, gaps in zip(ok["response_id"], ok["first_token_at"], ok["itl_s"]):
        written = log.get(rid)
        if not written:
            continue
        seen = origin + first + np.concatenate(([0.0], np.cumsum(gaps)))
        n = min(len(seen), len(written))
        errors = seen[:n] - np.asarray(written[:n])
        ttft.append(float(errors[0]))
        itl.extend(errors[1:].tolist())
        chunks += len(seen)
    return ttft, itl, chunks
