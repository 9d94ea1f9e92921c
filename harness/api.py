"""`execute_once(config) -> RunOutcome`: one measured run, start to finish, without the CLI.

Every run comes through here (`servescope run`, each repetition of `--repeat`,
each step of `capacity`, each side of a `lab`; those live one layer up, in
`harness.orchestration`). The order matters and is the contract with users:

1. everything that can be checked is checked before anything starts (exit 2);
2. run.json is written (status `running`) before the engine starts, so even a
   target that never comes up leaves a run directory saying why;
3. workers prewarm their connections, then the phases run, while records and
   server metrics stream to disk;
4. Ctrl-C stops sending, lets in-flight requests finish for `grace_s`, cancels
   the rest; everything measured is written (status `interrupted`, exit 130);
5. the analyzers build summary.json / report.html; if they fail, the measured
   data stays and the exit status is still the run's.
"""

from __future__ import annotations

import itertools
import json
import math
import os
import platform
import signal
import socket
import sys
import threading
import time
import traceback
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from servescope.errors import EXIT_FAILED, EXIT_INTERRUPTED, EXIT_OK
from servescope.harness.client.client import FORCE_REJECTED_NOTICE
from servescope.harness.config import ConfigError, RunConfig, redact_command_line
from servescope.harness.console import RunConsole
from servescope.harness.loadgen.dispatcher import Dispatcher, DispatchResult, Progress
from servescope.harness.loadgen.models import Phase, default_workers, plan_phases, usable_cpus
from servescope.harness.scrape import MetricsSources
from servescope.harness.targets import EngineError, EngineProcess, auth_headers, resolve_model
from servescope.harness.worker import WorkerSettings
from servescope.rundir.schema import RUN_JSON, SUMMARY_JSON, RunDirError
from servescope.rundir.writer import RunDirWriter, write_json_atomic
from servescope.version import __version__

# Without --workload: a small fixed-length workload (--prompt-tokens / --max-tokens replace either length).
DEFAULT_PROMPT_TOKENS = 128
DEFAULT_MAX_TOKENS = 64
ENGINE_DEFAULT_PRESET = "tiny"  # what `python -m servescope.reference_engine` serves without --preset


@dataclass
class RunOutcome:
    """What a run left behind. `runs` holds each repetition's outcome for `--repeat N`."""

    run_dir: Path
    status: str  # "complete" | "interrupted" | "failed"
    exit_code: int
    summary: dict[str, Any] | None = None
    runs: list["RunOutcome"] = field(default_factory=list)


def default_out_dir() -> Path:
    return Path("runs") / datetime.now().strftime("run-%Y%m%d-%H%M%S")


# -- one run ----------------------------------------------------------------------------------


@dataclass
class _Prepared:
    """Everything resolved before the directory is written: nothing here can fail later."""

    phases: list[Phase]
    workers: int
    workload_meta: dict[str, Any]
    tokenizer: Any
    sessions: Iterator[Any]
    api_key: str | None
    force_output_length: bool
    users: Any = None  # the loaded user script (harness.users.script.LoadedScript) for --users
    cluster: dict[str, Any] | None = None  # --ray: the cluster joined (address, nodes, CPUs)
    replay: bool = False  # --trace of agent traces: the sessions are ReplayFlows, run as flows by the workers


def execute_once(config: RunConfig, out: Path | None = None, console: RunConsole | None = None,
                 *, last: bool = True) -> RunOutcome:
    """One measured run of `config` into `out` (default: config.out, else runs/run-<time>).

    `last`: no run follows this one (`--repeat` passes False but for its last repetition), so a
    live page may stay up after it for its report link.
    """
    console = console or RunConsole(config.show_progress)
    out = Path(out or config.out or default_out_dir())
    prepared = _prepare(config)  # ConfigError propagates: exit 2 before anything is written
    if config.live is None:
        return _execute(config, prepared, out, console, None)
    from servescope.harness.live.page import LivePage

    # The page's port is bound before the run directory exists: a busy port is exit 2 and costs nothing.
    live = LivePage.open(config, out, [p.describe() for p in prepared.phases], console)
    try:
        outcome = _execute(config, prepared, out, console, live)
        live.finished(outcome.status, outcome.exit_code, linger=last or outcome.status != "complete")
        return outcome
    finally:
        live.close()


def _execute(config: RunConfig, prepared: _Prepared, out: Path, console: RunConsole, live: Any) -> RunOutcome:
    try:
        writer = RunDirWriter(out)
    except RunDirError as exc:
        raise ConfigError(str(exc)) from exc
    started_wall = datetime.now(timezone.utc)
    writer.start(_initial_meta(config, prepared, started_wall))
    engine: EngineProcess | None = None
    try:
        if config.target is None:
            console.info(f"starting the reference engine ({config.engine}) …")
            engine = EngineProcess(config.engine_preset, config.engine_args)
            try:
                engine.start()
            except EngineError as exc:
                console.error(str(exc))
                writer.finish("failed", problems=[str(exc)], ended_at=_now_iso(), target=_target_meta(config, engine))
                return _finish(config, out, "failed", console)
        base_url = config.target or engine.base_url
        fallback = None if config.target else (config.engine_preset or ENGINE_DEFAULT_PRESET)
        choice = resolve_model(base_url, config.model, prepared.api_key, fallback)
        for remark in choice.remarks:
            console.warn(remark)
        writer.update(model_source=choice.source, models_endpoint=choice.describe())
        status, extra = _drive(config, prepared, writer, base_url, choice.name, engine, console, live)
        writer.finish(status, ended_at=_now_iso(), **extra)
    except ConfigError as exc:
        writer.finish("failed", problems=[str(exc)], ended_at=_now_iso())
        raise
    except KeyboardInterrupt:  # Ctrl-C before the load started (e.g. while the engine loads)
        writer.finish("interrupted", problems=["interrupted before the load started"], ended_at=_now_iso())
        status = "interrupted"
    except Exception:
        writer.finish("failed", problems=[traceback.format_exc(limit=20)], ended_at=_now_iso())
        raise
    finally:
        if engine is not None:
            engine.close()
    return _finish(config, out, status, console)


def _prepare(config: RunConfig) -> _Prepared:
    from servescope.workloads.errors import WorkloadError
    from servescope.workloads.generator import session_stream
    from servescope.workloads.spec import fixed_workload, load_workload, with_lengths
    from servescope.workloads.tokenizer import load_tokenizer
    from servescope.workloads.trace_formats import open_trace

    api_key = config.read_api_key()
    phases = plan_phases(config)
    if config.trace is not None and config.warmup_s > 0:
        raise ConfigError("--warmup does not combine with --trace (the trace's own start is the warm-up); drop --warmup")
    cluster = None
    if config.ray is not None:  # joined before anything is written: an unreachable cluster is exit 2
        from servescope.harness.loadgen.ray_pool import connect

        cluster = connect(config.ray)
    workers = config.workers or (cluster["spare_cpus"] if cluster else default_workers(phases, usable_cpus()))
    if config.users is not None:
        prepared = _prepare_users(config, phases, workers, api_key)
        prepared.cluster = cluster
        return prepared
    try:
        tokenizer = load_tokenizer(config.tokenizer, target_is_reference=config.target is None)
        # --prompt-tokens/--max-tokens means fixed lengths: force the output length (DESIGN.md).
        force = config.force_output_length or (config.workload is None and config.trace is None)
        replay = False
        if config.trace is not None:
            trace = open_trace(config.trace, tokenizer, config.seed, speed=config.trace_speed,
                               fmt=config.trace_format, api=config.api, force_output_length=force)
            sessions, workload_meta, replay = trace.jobs, trace.meta, trace.flows
            force = force or replay  # agent traces replay their recorded output lengths
        else:
            if config.workload:
                spec = load_workload(config.workload)
                if config.length_overrides:
                    spec = with_lengths(spec, prompt_tokens=config.prompt_tokens, output_tokens=config.max_tokens)
            else:
                spec = fixed_workload(config.prompt_tokens or DEFAULT_PROMPT_TOKENS, config.max_tokens or DEFAULT_MAX_TOKENS,
                                      config.api or "completions")
            sessions = session_stream(spec, tokenizer, config.seed, api=config.api, force_output_length=force)
            workload_meta = spec.to_dict()
        sessions = _primed(sessions)
    except WorkloadError as exc:
        raise ConfigError(str(exc)) from exc
    return _Prepared(phases, workers, workload_meta, tokenizer, sessions, api_key, force, replay=replay, cluster=cluster)


def _prepare_users(config: RunConfig, phases: list[Phase], workers: int, api_key: str | None) -> _Prepared:
    """--users: the script is imported here first, so a broken one is exit 2 before any load."""
    from servescope.harness.users.jobs import user_jobs
    from servescope.harness.users.script import load_script
    from servescope.workloads.errors import WorkloadError
    from servescope.workloads.tokenizer import load_tokenizer

    script = load_script(config.users)
    try:
        tokenizer = load_tokenizer(config.tokenizer, target_is_reference=config.target is None)
    except WorkloadError as exc:
        raise ConfigError(str(exc)) from exc
    jobs = user_jobs([(name, float(cls.weight)) for name, cls in script.classes.items()], config.seed)
    return _Prepared(phases, workers, {"users": script.to_json()}, tokenizer, jobs, api_key,
                     config.force_output_length, users=script)


def _primed(sessions: Iterator[Any]) -> Iterator[Any]:
    """Build the first session now: a generator's first one pays for loading its corpus
    (about a second), which must not land inside the first phase's schedule."""
    first = next(sessions, None)
    return sessions if first is None else itertools.chain([first], sessions)


def _drive(
    config: RunConfig, prepared: _Prepared, writer: RunDirWriter, base_url: str, model: str,
    engine: EngineProcess | None, console: RunConsole, live: Any = None,
) -> tuple[str, dict[str, Any]]:
    """Prewarm, run the phases, stop everything; returns the final status and run.json fields.

    `live` (harness.live.page.LivePage, with --live) listens to the dispatcher's hooks and the scrapers.
    """
    from servescope.harness.loadgen.pool import LocalWorkerPool

    headers = auth_headers(prepared.api_key)
    sources = MetricsSources(list(config.metrics_url or [f"{base_url}/metrics"]), headers=headers)
    _say_metrics_sources(sources, explicit=bool(config.metrics_url), console=console)
    writer.update(model=model, target=_target_meta(config, engine, base_url), server_metrics=sources.describe())

    origin = time.perf_counter()
    clock = lambda: time.perf_counter() - origin  # noqa: E731 - the run clock, shared with the workers
    # The origin on perf_counter's own scale joins the records with other logs of the same clock.
    writer.update(clock_origin_wall=_now_iso(), clock_origin_perf_counter_s=origin)
    settings = _worker_settings(config, prepared, base_url, model, origin)
    if prepared.cluster is not None:
        from servescope.harness.loadgen.ray_pool import RayWorkerPool

        console.info(f"starting {prepared.workers} worker actor(s) on the Ray cluster at {config.ray} "
                     f"({prepared.cluster['nodes']} node(s), {prepared.cluster['cpus']} CPUs)")
        pool: Any = RayWorkerPool(prepared.workers, settings)
        writer.update(ray={**prepared.cluster, **pool.describe()})
    else:
        pool = LocalWorkerPool(prepared.workers, settings)
    hooks = _Hooks(writer, console, clock, engine)
    dispatch_hooks: Any = hooks
    sink = writer.add_metric_samples
    if live is not None:
        live.attach(clock, {"status": "running", "slo": config.slo}, console.warn)
        dispatch_hooks, sink = live.hooks(hooks), live.tee(sink)
    sources.start(sink, clock)
    console.info(f"servescope run → {base_url} model={model} phases={', '.join(p.name for p in prepared.phases)} "
                 f"workers={prepared.workers} out={writer.path}")
    console.start()
    try:
        with _sigint_counter() as interrupts:
            hooks.interrupts = interrupts
            user_classes = ([(name, float(cls.weight)) for name, cls in prepared.users.classes.items()]
                            if prepared.users is not None else None)
            result = Dispatcher(pool, prepared.phases, prepared.sessions, clock, dispatch_hooks, seed=config.seed,
                                grace_s=config.grace_s, user_classes=user_classes).run()
    finally:
        console.stop()
        sources.stop()
        pool.close()
        if live is not None:
            live.run_ended()
    status = _final_status(result, writer)
    for problem in result.problems:
        console.error(problem)
    for notice in result.notices:
        console.warn(notice)
    if result.retired_users:
        console.warn(f"{result.retired_users} scripted user(s) retired early (on_start failed or StopUser); "
                     "flows.parquet has their on_start rows with the error")
    extra = {
        "client_check": client_check(result), "phases": result.phases, "problems": result.problems,
        "prewarm": result.prewarm, "cancelled_in_flight": result.cancelled, "notices": result.notices,
        **({"users": {"flows": result.flows, "retired": result.retired_users}}
           if prepared.users is not None or prepared.replay else {}),
        **({"ray": {**prepared.cluster, **pool.describe()}} if prepared.cluster is not None else {}),
        "lost_workers": result.lost_workers,
        "output_length_forced": prepared.force_output_length and not any(
            n.startswith(FORCE_REJECTED_NOTICE) for n in result.notices),
        "server_metrics": sources.describe(),
    }
    return status, extra


def _say_metrics_sources(sources: MetricsSources, explicit: bool, console: RunConsole) -> None:
    for url, problem in sources.problems.items():
        if problem and explicit:
            console.warn(f"--metrics-url {url} gave no Prometheus metrics ({problem}); running without it")
        elif problem:
            console.info(f"no server metrics: {url} gave no Prometheus metrics ({problem}); the run goes on "
                         "with client-side measurements only (pass --metrics-url if the server exports them elsewhere)")
        else:
            console.info(f"scraping server metrics from {url}")


def _final_status(result: DispatchResult, writer: RunDirWriter) -> str:
    """`failed` also when requests went out and not one succeeded (nothing was measured)."""
    if result.status != "complete":
        return result.status
    return "failed" if writer.requests.rows > 0 and writer.ok_requests == 0 else "complete"


def client_check(result: DispatchResult) -> dict[str, Any]:
    """The load generator's self-check figures for run.json.

    The verdict (`client_bound`, `reasons`) is the analyzers' (analyzers/client_health.py),
    judged against the latencies measured, and is merged in once the summary exists.
    """
    import numpy as np

    lags = np.asarray(result.schedule_lags, dtype=np.float64)
    lags = lags[np.isfinite(lags)]
    pct = (lambda q: float(np.percentile(lags, q))) if len(lags) else (lambda q: None)
    return {
        "schedule_lag_p50_s": pct(50), "schedule_lag_p99_s": pct(99),
        "schedule_lag_max_s": float(lags.max()) if len(lags) else None, "schedule_lag_n": int(len(lags)),
        "loop_lag_max_s": max((w.max_s for w in result.loop_lag), default=None),
        "loop_lag_p99_s": max((w.p99_s for w in result.loop_lag), default=None),
        "per_worker": [{"worker": w.worker, "loop_lag_max_s": w.max_s, "loop_lag_p99_s": w.p99_s,
                        "loop_lag_mean_s": w.mean_s, "samples": w.samples, "cpu_s": w.cpu_s}
                       for w in result.loop_lag],
    }


def _record_client_verdict(run_dir: Path, summary: dict[str, Any]) -> None:
    """Copy the analyzers' client-bound verdict into run.json's client_check (one judgement, two places)."""
    client = summary.get("client") or {}
    path = run_dir / RUN_JSON
    try:
        meta = json.loads(path.read_text())
    except (OSError, ValueError):
        return
    check = meta.setdefault("client_check", {})
    check.update({key: client.get(key) for key in ("client_bound", "reasons", "behind", "lag_limit_s",
                                                     "loop_lag_p99_limit_s", "loop_lag_max_limit_s")})
    write_json_atomic(path, meta)


def _worker_settings(config: RunConfig, prepared: _Prepared, base_url: str, model: str, origin: float) -> list[WorkerSettings]:
    n = prepared.workers
    peak_conc = max((p.load.peak_concurrency for p in prepared.phases), default=0)
    peak_rate = max((p.load.peak_rate for p in prepared.phases), default=0.0)
    # Prewarm each worker's share of the first wave: its closed-loop slots, or about one
    # second of open-loop arrivals (at least 4: a trace's rate is unknown up front).
    share = max(math.ceil(peak_conc / n), math.ceil(peak_rate / n), 4 if peak_conc == 0 else 1)
    settings = []
    for _ in range(n):
        client = {"base_url": base_url, "model": model, "clock_origin": origin, "api_key": prepared.api_key,
                  "timeout_s": config.timeout_s, "stream": config.stream, "pool_size": max(64, share),
                  "transport": config.transport,
                  "force_output_length": prepared.force_output_length}
        remote = prepared.cluster is not None
        settings.append(WorkerSettings(client=client, prewarm=share, count_tokens=True,
                                       tokenizer=config.tokenizer, seed=config.seed, replay=prepared.replay,
                                       users_script=str(prepared.users.path) if prepared.users is not None else None,
                                       users_source=prepared.users.path.read_text() if remote and prepared.users else None,
                                       report_starts=remote))
    return settings


class TargetDownWatch:
    """Notices a target that stopped accepting connections, so the run ends instead of spinning.

    Only `connect` failures count (refused, unreachable): a server that answers, even with
    errors, is up. Every answer resets the watch. After TARGET_DOWN_S of nothing but
    connection failures the run stops as failed, keeping every record it has.
    """

    TARGET_DOWN_S = 5.0
    MIN_FAILURES = 10  # closed-loop users back off after refusals (harness/worker.py): few attempts

    def __init__(self) -> None:
        self.since: float | None = None
        self.failures = 0

    def observe(self, rows: list[dict[str, Any]], now: float) -> None:
        for row in rows:
            if row.get("error_kind") == "connect":
                self.failures += 1
                if self.since is None:
                    self.since = now
            elif row.get("status") != "cancelled":
                self.since, self.failures = None, 0

    def verdict(self, now: float) -> str | None:
        if self.since is None or self.failures < self.MIN_FAILURES or now - self.since < self.TARGET_DOWN_S:
            return None
        return (f"the target stopped accepting connections: {self.failures} connection failures in a row since "
                f"t={self.since:.1f} s and no answer since; the run was stopped (everything measured is kept)")


class _Hooks:
    """The dispatcher's view of the run directory, console, Ctrl-C, the engine and the target's health."""

    def __init__(self, writer: RunDirWriter, console: RunConsole, clock: Any, engine: EngineProcess | None) -> None:
        self.writer, self.console, self.clock, self.engine = writer, console, clock, engine
        self.interrupts: list[int] = [0]
        self.target_down = TargetDownWatch()

    def records(self, rows: list[dict[str, Any]]) -> None:
        self.writer.add_records(rows)
        self.target_down.observe(rows, self.clock())

    def flows(self, rows: list[dict[str, Any]]) -> None:
        self.writer.add_flows(rows)

    def notice(self, text: str) -> None:
        self.console.warn(text)

    def tick(self, progress: Progress) -> None:
        self.writer.tick()
        try:
            self.console.update(progress, self.clock())
        except Exception as exc:  # noqa: BLE001 - a display bug must never cost the measurement
            self.console.stop()
            self.console.live = False
            self.console.error(f"progress display disabled ({type(exc).__name__}: {exc})")

    def stop_requested(self) -> int:
        return self.interrupts[0]

    def failure(self) -> str | None:
        died = self.engine.died() if self.engine is not None else None
        return died or self.target_down.verdict(self.clock())


class _sigint_counter:
    """Counts Ctrl-C presses while active (1: stop gracefully, 2: stop now); restores the old handlers.

    SIGTERM (a CI job's timeout, `kill`) counts as a Ctrl-C too: the run stops the
    same orderly way and keeps what it measured, instead of dying mid-write.
    """

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __enter__(self) -> list[int]:
        self.count = [0]
        self.previous: dict[int, Any] = {}
        if threading.current_thread() is threading.main_thread():
            self.previous = {sig: signal.signal(sig, self._handle) for sig in self.SIGNALS}
        return self.count

    def _handle(self, signum: int, frame: Any) -> None:
        self.count[0] += 1
        if self.count[0] == 1:
            print("\nstopping: letting in-flight requests finish (Ctrl-C again to cancel them now)", file=sys.stderr)

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)


# -- after the run --------------------------------------------------------------------------


def _finish(config: RunConfig, out: Path, status: str, console: RunConsole) -> RunOutcome:
    summary = _summarize(out, config.report, console)
    if summary is not None:
        _record_client_verdict(out, summary)
        console.summary_table(summary)
    console.info(f"run directory: {out}" + (f"  (report: {out / 'report.html'})" if (out / "report.html").exists() else ""))
    if status == "interrupted":
        return RunOutcome(out, status, EXIT_INTERRUPTED, summary)
    if status == "failed":
        return RunOutcome(out, status, EXIT_FAILED, summary)
    slo_ok = ((summary or {}).get("slo") or {}).get("ok", True)
    return RunOutcome(out, status, EXIT_OK if slo_ok else EXIT_FAILED, summary)


def _summarize(run_dir: Path, report: bool, console: RunConsole) -> dict[str, Any] | None:
    """summary.json (and report.html unless report is False) via the analyzers; None if they fail."""
    try:
        if report:
            from servescope.analyzers.report import build_report

            build_report(run_dir)
            return json.loads((run_dir / SUMMARY_JSON).read_text())
        from servescope.analyzers.summary import summarize
        from servescope.rundir.reader import load_run

        summary = summarize(load_run(run_dir))
        write_json_atomic(run_dir / SUMMARY_JSON, summary)
        return summary
    except Exception as exc:  # noqa: BLE001 - the measured data must survive an analyzer bug
        console.error(f"the analyzers failed ({type(exc).__name__}: {exc}); the measured data in {run_dir} is intact, "
                      f"retry with `servescope report {run_dir}`")
        return None


# -- run.json pieces ---------------------------------------------------------------------------


def _initial_meta(config: RunConfig, prepared: _Prepared, started: datetime) -> dict[str, Any]:
    tok = prepared.tokenizer
    return {
        "servescope_version": __version__,
        "command_line": redact_command_line(config.command_line or sys.argv),
        "config": config.to_json(),
        "target": _target_meta(config, None),
        "model": config.model,
        "api": config.api,
        "workload": prepared.workload_meta,
        "length_overrides": config.length_overrides,
        "load": {"kind": config.load_kind, "phases": [p.describe() for p in prepared.phases]},
        "seed": config.seed,
        "slo": config.slo,
        "workers": prepared.workers,
        "started_at": started.isoformat(),
        "ended_at": None,
        "host": host_info(),
        "tokenizer": {"name": tok.name, "path": str(tok.path), "fingerprint": tok.fingerprint,
                      "exact_for_target": bool(tok.exact_for_target)},
        "prompt_lengths_exact": bool(tok.exact_for_target),
        "clock": "time.perf_counter, seconds since run start",
    }


def _target_meta(config: RunConfig, engine: EngineProcess | None, base_url: str | None = None) -> dict[str, Any]:
    if config.target:
        return {"kind": "url", "base_url": config.target}
    meta = {"kind": "reference", "engine": config.engine, "engine_args": list(config.engine_args)}
    if engine is not None:
        meta.update(engine.describe())
    if base_url:
        meta["base_url"] = base_url
    return meta


def host_info() -> dict[str, Any]:
    return {"hostname": socket.gethostname(), "cpu_count": os.cpu_count(), "python": platform.python_version(),
            "platform": platform.platform()}


def _now_iso() -> str:
    return datetime.now(timezone.utc).isoformat()
