"""Is the diagnosis right? Every rule judged like a classifier on simulated incidents whose cause is known.

For each incident of `servescope.analyzers.incidents.catalogue` x seeds x sizes, in two forms: simulate,
write a run directory (token gaps, server metrics, client timing) and a production-style CSV log imported
the way `servescope slice LOG.csv` does (no gaps, no metrics), then `diagnose(load_run(dir))` each. Prints
the confusion table (incident x form x rule: the highest severity seen over the seeds and sizes, and how
many runs reached medium), precision and recall per rule and form at medium or above (a finding is right
when the catalogue's `expected(incident, form)` holds that rule: a cause a log cannot show is not expected
of the log, `UNSEEN_IN_LOG` says why), and the time to diagnose a one-million-row production-style run.

    python -m benchmarks.diagnosis                  # 8 seeds x sizes 2,000 and 8,000, then 1M rows
    python -m benchmarks.diagnosis --smoke          # 2 seeds x 2,000 requests, 200k rows
    python -m benchmarks.diagnosis --save           # also write benchmarks/results/diagnosis_<cpu>.json
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

if __package__ in (None, ""):  # `python benchmarks/<script>.py`: import from the repository root, not benchmarks/
    sys.path[0] = str(Path(__file__).resolve().parents[1])

from benchmarks.common import ResultsFile, add_results_args, cpu_name, print_table, run_info  # noqa: E402
from servescope.analyzers.findings import SEVERITIES  # noqa: E402
from servescope.analyzers.incidents.catalogue import FORMS, INCIDENTS, UNSEEN_IN_LOG, expected  # noqa: E402
from servescope.analyzers.incidents.output import write_log, write_run  # noqa: E402
from servescope.analyzers.incidents.simulator import Simulation  # noqa: E402
from servescope.analyzers.incidents.simulator import simulate  # noqa: E402
from servescope.analyzers.rules import RULE_IDS, diagnose  # noqa: E402
from servescope.harness.orchestration.log_import import import_log  # noqa: E402
from servescope.rundir.reader import load_run  # noqa: E402

MEDIUM_OR_ABOVE = ("high", "medium")


def _worst(severities: list[str]) -> str | None:
    return min(severities, key=SEVERITIES.index) if severities else None


def write_form(sim: Simulation, out: Path, incident: str, form: str) -> Path:
    """The run directory `diagnose` reads for one form: written directly, or a CSV log imported as `slice` does."""
    if form == "run":
        return write_run(sim, out, incident)
    return import_log(write_log(sim, out.with_suffix(".csv")), out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, default=8, help="seeds per incident and size (the target: at least 5)")
    parser.add_argument("--sizes", default="2000,8000", help="requests per simulated run, comma-separated")
    parser.add_argument("--big", type=int, default=1_000_000, help="rows of the timed diagnosis (0: skip)")
    parser.add_argument("--smoke", action="store_true", help="a quick check: 2 seeds x 2,000 requests, 200k rows")
    add_results_args(parser, default_save=False)
    args = parser.parse_args()
    seeds, sizes, big = (2, [2000], 200_000) if args.smoke else (args.seeds, [int(x) for x in args.sizes.split(",")], args.big)

    seen: dict[tuple[str, str, str], list[str]] = {}  # (incident, form, rule) -> severities
    per_incident = seeds * len(sizes)
    with tempfile.TemporaryDirectory() as tmp:
        for name, incident in INCIDENTS.items():
            for size in sizes:
                for seed in range(seeds):
                    sim = simulate(incident(seed, size))
                    for form in FORMS:
                        out = write_form(sim, Path(tmp) / f"{name}-{size}-{seed}-{form}", name, form)
                        for f in diagnose(load_run(out)):
                            seen.setdefault((name, form, f.rule), []).append(f.severity)
        planted_anywhere = {r for n in INCIDENTS for r in expected(n, "run")}
        rules = [r for r in RULE_IDS if any(rule == r for *_, rule in seen) or r in planted_anywhere]
        rows = []
        for name in INCIDENTS:
            for form in FORMS:
                cells = []
                for rule in rules:
                    sev = seen.get((name, form, rule), [])
                    hits = sum(s in MEDIUM_OR_ABOVE for s in sev)
                    mark = "*" if rule in expected(name, form) else "~" if rule in UNSEEN_IN_LOG.get(name, {}) else ""
                    cells.append(f"{mark}{_worst(sev) or '-'}" + (f" {hits}/{per_incident}" if hits else ""))
                rows.append([name, form, *cells])
        print_table(["incident", "form", *rules], rows,
                    title=f"highest severity over {per_incident} runs per incident and form (* planted; "
                          "~ planted but not in a log's columns; n/N: runs at medium or above)")
        for name, reasons in UNSEEN_IN_LOG.items():
            for rule, reason in reasons.items():
                print(f"  ~ {name} / {rule}: not expected of a log: {reason}")

        scores = []
        for form in FORMS:
            for rule in rules:
                def medium_hits(names: list[str]) -> int:
                    return sum(sum(s in MEDIUM_OR_ABOVE for s in seen.get((n, form, rule), [])) for n in names)
                tp = medium_hits([n for n in INCIDENTS if rule in expected(n, form)])
                fp = medium_hits([n for n in INCIDENTS if rule not in expected(n, form)])
                planted = per_incident * sum(rule in expected(n, form) for n in INCIDENTS)
                scores.append({"rule": rule, "form": form, "tp": tp, "fp": fp, "planted": planted,
                               "precision": tp / (tp + fp) if tp + fp else None, "recall": tp / planted if planted else None})
        print_table(["rule", "form", "true pos", "false pos", "planted", "precision", "recall"],
                    [[s["rule"], s["form"], s["tp"], s["fp"], s["planted"], s["precision"], s["recall"]] for s in scores],
                    title="per rule and form, at medium or above")

        timing = {}
        if big:
            settings = INCIDENTS["stall"](0, big)
            settings.itl = False
            start = time.perf_counter()
            sim = simulate(settings)
            timing["simulate_s"] = time.perf_counter() - start
            out = write_run(sim, Path(tmp) / "big", "stall")
            start = time.perf_counter()
            run = load_run(out)
            timing["load_s"] = time.perf_counter() - start
            start, cpu_start = time.perf_counter(), time.process_time()
            found = diagnose(run)
            timing["diagnose_s"] = time.perf_counter() - start
            # CPU seconds beside the wall clock: on a host shared with other work the wall clock waits for cores
            timing["diagnose_cpu_s"] = time.process_time() - cpu_start
            timing["load_average_1min"] = os.getloadavg()[0]
            print_table(["rows", "simulate s", "load s", "diagnose s", "diagnose CPU s", "load avg", "findings"],
                        [[len(sim), timing["simulate_s"], timing["load_s"], timing["diagnose_s"], timing["diagnose_cpu_s"],
                          timing["load_average_1min"], ", ".join(f"{f.rule}:{f.severity}" for f in found)]],
                        title=f"one large production-style run (stall incident, no token gaps), {cpu_name()}")
            timing["rows"] = len(sim)
    if args.save:
        results = ResultsFile("diagnosis", cpu_name(), args.out, args.copy_to)
        confusion = {f"{n}|{form}|{r}": v for (n, form, r), v in seen.items()}
        results.put("smoke" if args.smoke else "full", {"seeds": seeds, "sizes": sizes, "forms": list(FORMS), "confusion": confusion,
                                                        "scores": scores, "large_run": timing}, run_info())
        print(f"results: {results.path}")


if __name__ == "__main__":
    main()
