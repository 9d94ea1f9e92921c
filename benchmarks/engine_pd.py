"""Disaggregated prefill and decode against one colocated engine: what TTFT and TPOT do at rising rates,
and how close the KV transfer comes to the bandwidth of the link it uses.

    python -m benchmarks.engine_pd [--parts ...] [--rates 2,4,8,16]    # on a GPU
    python -m benchmarks.engine_pd --smoke                             # CPU check, tiny preset

The parts:

  link     the measured copy bandwidth of the transport's link: one KV-sized buffer through the
           shared-memory transport (producer write, consumer copy-out; on a GPU the device-to-host
           and host-to-device copies it stages through), and a plain host copy and, on a GPU, a
           device-to-host and a host-to-device copy of the same buffer for reference;
  served   `servescope serve` colocated (chunked prefill) and `--disaggregate 1:1`, each driven by
           `servescope run` on a mixed workload (chat turns, short answers to long prompts, long
           documents) at each rate for --duration: TTFT and TPOT p50/p99 per rate and, for the
           disaggregated server, the per-request transfer time (usage `kv_transfer_s`) p50/p99 and
           the bandwidth it achieved (bytes over seconds of its transfer histograms), set against
           the link's.

On one GPU the two engine processes share it (each gets --kv-gib of KV cache, 16 by default); on two the pools
still share the first until the engine places pools on devices of their own. Figures go to
benchmarks/results/engine_pd_<device>.json as each part ends.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

if __package__ in (None, ""):  # `python benchmarks/<script>.py`: import from the repository root, not benchmarks/
    sys.path[0] = str(Path(__file__).resolve().parents[1])

import numpy as np  # noqa: E402
import torch  # noqa: E402
import yaml  # noqa: E402

from benchmarks.common import ResultsFile, add_results_args, print_table, run_info  # noqa: E402
from benchmarks.engine_served import harness_run, phase_row  # noqa: E402
from benchmarks.gpu_common import device_name, ms, on_cuda  # noqa: E402
from servescope import load_run  # noqa: E402
from servescope.analyzers.pools import pool_metrics  # noqa: E402
from servescope.analyzers.server_metrics import ServerMetrics  # noqa: E402
from servescope.harness.targets.engine import EngineProcess  # noqa: E402
from servescope.reference_engine.disagg.transport import SharedMemoryTransport  # noqa: E402

BENCHMARK = "engine_pd"
PARTS = ("link", "served")
MODES = {"colocated": (), "disaggregated": ("--disaggregate", "1:1")}


def mixed_workload(smoke: bool) -> dict:
    """Chat turns, short answers to long prompts (the transfer dominates their decode), long documents."""
    scale = 1 if smoke else 4

    def fixed(name: str, prompt: int, output: int, weight: int) -> dict:
        return {"name": name, "weight": weight, "api": "completions", "prompt_tokens": prompt * scale,
                "output_tokens": output * (1 if smoke else 2)}

    return {"name": "pd-mixed", "description": "engine_pd mixed workload",
            "classes": [fixed("chat", 64, 48, 4), fixed("answer", 256, 4, 2), fixed("document", 1024, 24, 1)]}


def _gbps(nbytes: int, seconds: float) -> float:
    return nbytes / seconds / 1e9


def _median_s(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return float(np.median(times))


def link(device: str, nbytes: int, repeats: int) -> dict:
    """Seconds and GB/s of one transfer of `nbytes` through the transport, and of the plain copies it is made of."""
    transport = SharedMemoryTransport()
    kv = torch.randn(nbytes // 2, dtype=torch.bfloat16, device=device)
    target = torch.device(device)

    def sync() -> None:
        if on_cuda(device):
            torch.cuda.synchronize()

    def through_transport() -> None:
        transport.receive(transport.send(kv), target)
        sync()

    host = kv.to("cpu")
    host_copy = torch.empty_like(host)
    figures = {"bytes": nbytes, "transport": transport.name}
    through_transport()  # first touch of the pages
    figures["transport_s"] = _median_s(through_transport, repeats)
    figures["host_copy_s"] = _median_s(lambda: host_copy.copy_(host), repeats)
    if on_cuda(device):
        pinned = torch.empty_like(host).pin_memory()
        figures["d2h_s"] = _median_s(lambda: (pinned.copy_(kv), sync()), repeats)
        figures["h2d_s"] = _median_s(lambda: (kv.copy_(pinned), sync()), repeats)
    for key in [k for k in figures if k.endswith("_s")]:
        figures[key.removesuffix("_s") + "_gbps"] = _gbps(nbytes, figures[key])
    return figures


def _transfer_bandwidth(run_dir: Path, t0: float | None, t1: float | None) -> dict:
    """The decode pool's mean transfer size and time over [t0, t1] from its histograms, and their ratio."""
    decode = pool_metrics(ServerMetrics.from_frame(load_run(run_dir).server_metrics)).get("decode")
    if decode is None:
        return {}
    size = decode.histogram_mean("kv_transfer_bytes_hist", t0, t1)
    seconds = decode.histogram_mean("kv_transfer_hist", t0, t1)
    return {"transfer_bytes_mean": size, "transfer_s_mean": seconds,
            "transfer_gbps": _gbps(int(size), seconds) if size and seconds else None}


def served(args, device: str, runs_dir: Path) -> dict:
    workload_file = runs_dir / "workload.yaml"
    workload_file.parent.mkdir(parents=True, exist_ok=True)
    workload_file.write_text(yaml.safe_dump(mixed_workload(args.smoke), sort_keys=False))
    common = ["--device", device, "--max-num-batched-tokens", str(args.max_num_batched_tokens)]
    common += ["--kv-cache-memory", f"{args.kv_gib}GB"] if on_cuda(device) else ["--num-kv-blocks", "1024"]
    out: dict = {"rates": args.rates, "duration": args.duration, "workload": mixed_workload(args.smoke), "modes": {}}
    for mode, flags in MODES.items():
        server = EngineProcess(preset=args.preset, extra_args=(*common, *flags, *args.serve_args.split()))
        rows = []
        try:
            server.start()
            run_dir = runs_dir / mode
            summary = harness_run(server.base_url, run_dir, ["--workload", str(workload_file), "--sweep",
                                                            "rate:" + ",".join(f"{r:g}" for r in args.rates),
                                                            "--duration", args.duration, "--seed", "1"],
                                  timeout_s=args.run_timeout)
            requests = load_run(run_dir).requests
            for phase in summary["phases"]:
                if phase["phase"] == "warmup":
                    continue
                row = phase_row(phase)
                transfer = requests.loc[(requests["phase"] == phase["phase"]) & (requests["status"] == "ok"),
                                        "kv_transfer_s"].to_numpy(dtype=np.float64)
                transfer = transfer[np.isfinite(transfer)]
                if transfer.size:
                    row["kv_transfer_p50_s"] = float(np.quantile(transfer, 0.5))
                    row["kv_transfer_p99_s"] = float(np.quantile(transfer, 0.99))
                    window = phase.get("window") or {}
                    row.update(_transfer_bandwidth(run_dir, window.get("start_s"), window.get("end_s")))
                rows.append(row)
        finally:
            server.close()
        out["modes"][mode] = rows
    return out


def print_tables(results: ResultsFile) -> None:
    device = results.data["device"]
    lk = results.parts.get("link")
    if lk:
        rows = [["transport (" + lk["transport"] + ")", lk["bytes"] / 2**20, ms(lk["transport_s"]), lk["transport_gbps"]],
                ["host copy", lk["bytes"] / 2**20, ms(lk["host_copy_s"]), lk["host_copy_gbps"]]]
        for key, label in (("d2h", "device to host"), ("h2d", "host to device")):
            if key + "_s" in lk:
                rows.append([label, lk["bytes"] / 2**20, ms(lk[key + "_s"]), lk[key + "_gbps"]])
        print_table(["link", "MiB", "ms", "GB/s"], rows, title=f"{device}: one KV transfer's copies")
    sv = results.parts.get("served")
    if sv:
        link_gbps = lk["transport_gbps"] if lk else None
        rows = []
        for mode, mode_rows in sv["modes"].items():
            for r in mode_rows:
                achieved = r.get("transfer_gbps")
                rows.append([mode, r["phase"], r["req_per_s"], ms(r["ttft_p50_s"]), ms(r["ttft_p99_s"]),
                             ms(r["tpot_p50_s"]), ms(r["tpot_p99_s"]), ms(r.get("kv_transfer_p50_s")),
                             ms(r.get("kv_transfer_p99_s")), achieved,
                             f"{achieved / link_gbps:.1%}" if achieved and link_gbps else None])
        print_table(["mode", "phase", "req/s", "TTFT p50 ms", "TTFT p99 ms", "TPOT p50 ms", "TPOT p99 ms",
                     "transfer p50 ms", "transfer p99 ms", "transfer GB/s", "of link"], rows,
                    title=f"{device}: colocated against --disaggregate 1:1 on the mixed workload")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated, of {', '.join(PARTS)}")
    parser.add_argument("--smoke", action="store_true", help="tiny preset on the CPU, two low rates, short phases")
    parser.add_argument("--preset", default=None, help="default: llama3-8b on a GPU, tiny with --smoke")
    parser.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    parser.add_argument("--rates", default=None, help="comma-separated req/s (default 2,4,8,16; 2,4 with --smoke)")
    parser.add_argument("--duration", default=None, help="per rate (default 30s; 4s with --smoke)")
    parser.add_argument("--max-num-batched-tokens", type=int, default=None, help="default 2048 (512 with --smoke)")
    parser.add_argument("--kv-gib", type=float, default=16.0,
                        help="GPU: KV cache of each engine process, GiB (two 8B engines and their KV share one GPU)")
    parser.add_argument("--link-mib", type=int, default=None, help="buffer of the link part (default 256; 16 with --smoke)")
    parser.add_argument("--serve-args", default="", help="more `servescope serve` flags for both servers")
    parser.add_argument("--runs-dir", default=None, help="keep the run directories here (default: a temporary folder)")
    parser.add_argument("--run-timeout", type=float, default=1800.0)
    add_results_args(parser, default_save=True)
    args = parser.parse_args()
    device = args.device or ("cuda" if torch.cuda.is_available() and not args.smoke else "cpu")
    args.preset = args.preset or ("tiny" if args.smoke or not on_cuda(device) else "llama3-8b")
    args.rates = [float(r) for r in (args.rates or ("2,4" if args.smoke else "2,4,8,16")).split(",")]
    args.duration = args.duration or ("4s" if args.smoke else "30s")
    args.max_num_batched_tokens = args.max_num_batched_tokens or (512 if args.smoke else 2048)
    parts = [p for p in args.parts.split(",") if p]
    unknown = sorted(set(parts) - set(PARTS))
    if unknown:
        parser.error(f"unknown part(s) {', '.join(unknown)}; choose from {', '.join(PARTS)}")
    results = ResultsFile(BENCHMARK, device_name(device), args.out, args.copy_to,
                          save=args.save and not args.smoke)  # a smoke run checks the script, it measures nothing
    if "link" in parts:
        nbytes = (args.link_mib or (16 if args.smoke else 256)) << 20
        results.put("link", link(device, nbytes, repeats=5 if args.smoke else 20), run_info(device=device))
    if "served" in parts:
        scratch = None if args.runs_dir else tempfile.mkdtemp(prefix="engine_pd_")
        try:
            figures = served(args, device, Path(args.runs_dir or scratch))
        finally:
            if scratch is not None:
                shutil.rmtree(scratch, ignore_errors=True)
        results.put("served", figures, run_info(device=device, preset=args.preset))
    print_tables(results)


if __name__ == "__main__":
    main()
