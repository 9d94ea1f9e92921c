"""What does sampling cost per decode step on the GPU, and where does a sampling kernel pay?

The engine samples with `DeviceSampler` (reference_engine/sampler.py) on the device, with no host
sync. Greedy is one argmax; top-k selects the k best with torch.topk. Temperature and top-p run
either as torch ops (a softmax, an exponential draw and an argmax; top-p sorts every row of the
vocabulary first) or through kernels/sampling.py's sort-free kernel, the default on CUDA (for
temperature alone from 64 rows): the "torch" rows time the former on the same requests.
This script times each mode at the batch sizes the decode graphs use, over llama3's
128,256-token vocabulary, and sets the time beside a decode step of `llama3-8b` at that batch
(the graph replay times of `python -m benchmarks.engine_decode_roofline --parts decode-profile`;
pass your own with --step-ms). A kernel pays where the sampler is a visible share of the step.
--sweep also times the kernel's launch configurations (block, warps), which
`servescope.kernels.sampling.launch_config` is chosen from.

    python -m benchmarks.sampling [--sweep]      # on a GPU: benchmarks/results/sampling_<device>.json
    python -m benchmarks.sampling --smoke        # CPU: small vocabulary, checks the script only
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
if "--smoke" in sys.argv:  # CPU dry run of this script's own logic, the kernel on Triton's interpreter
    os.environ.setdefault("TRITON_INTERPRET", "1")

import torch  # noqa: E402

from benchmarks.common import ResultsFile, add_results_args, print_table, run_info  # noqa: E402
from servescope.reference_engine.sampler import DeviceSampler, SampleRequest  # noqa: E402
from servescope.reference_engine.sequence import SamplingParams, Sequence  # noqa: E402

VOCAB = 128256
BATCHES = (1, 8, 32, 128, 256)
# llama3-8b decode graph replay per step on an H200 (engine_decode_roofline_nvidia_h200.json, part decode-profile).
H200_STEP_MS = "1:4.27,8:4.57,64:5.40,128:6.33,256:8.64"
MODES: dict[str, dict] = {
    "greedy": dict(temperature=0.0),
    "temperature 0.8": dict(temperature=0.8),
    "top-k 50": dict(temperature=0.8, top_k=50),
    "top-p 0.9": dict(temperature=0.8, top_p=0.9),
    "top-k 50 + top-p 0.9": dict(temperature=0.8, top_k=50, top_p=0.9),
}
# The torch ops beside the kernel (DeviceSampler(sampling_kernel=False)), the same requests as the mode named.
TORCH_MODES = {"temperature 0.8, torch": "temperature 0.8", "top-p 0.9, torch sort": "top-p 0.9"}
KERNEL_CONFIGS = ((1024, 4), (2048, 8), (4096, 8), (4096, 16), (8192, 16), (4096, 32))


def time_us(fn, device: str) -> float:
    """Median of timed calls: CUDA events on a GPU, the host clock on the CPU (one call: --smoke only
    checks the code path, on Triton's interpreter)."""
    warm, timed = (3, 20) if device == "cuda" else (0, 1)
    for _ in range(warm):
        fn()
    times = []
    for _ in range(timed):
        if device == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) * 1e3)
        else:
            t = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t) * 1e6)
    return sorted(times)[len(times) // 2]


def step_ms_at(table: dict[int, float], batch: int) -> float | None:
    """The decode step of the smallest measured bucket holding `batch` (None past the table)."""
    held = [b for b in sorted(table) if b >= batch]
    return table[held[0]] if held else None


def sweep_kernel(batches: list[int], vocab: int, device: str, gen: torch.Generator) -> list[dict]:
    """The top-p kernel alone (no sampler around it) at each (block, warps): the table
    `servescope.kernels.sampling.launch_config` is read from. Marks the configuration it picks."""
    from servescope.kernels.sampling import launch_config, top_p_sample

    rows, cells = [], []
    seed = torch.tensor([1], device=device)
    for block, warps in KERNEL_CONFIGS:
        line = [f"{block}, {warps}"]
        for batch in batches:
            logits = torch.randn(batch, vocab, generator=gen, device=device, dtype=torch.float32) * 3
            temps = torch.full((batch,), 0.8, device=device)
            tops = torch.full((batch,), 0.9, device=device)
            us = time_us(lambda: top_p_sample(logits, temps, tops, seed, block=block, num_warps=warps), device)
            picked = launch_config(batch) == (block, warps)
            rows.append({"block": block, "num_warps": warps, "batch": batch, "us": us, "picked": picked})
            line.append(f"{us:.0f}{'*' if picked else ''}")
        cells.append(line)
    print_table(["block, warps"] + [f"B={b}" for b in batches], cells,
                title="top-p kernel alone, us per launch; * = launch_config's pick")
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--vocab", type=int, default=VOCAB)
    parser.add_argument("--batches", default=",".join(map(str, BATCHES)))
    parser.add_argument("--step-ms", default=H200_STEP_MS, help="batch:ms,... decode step times to compare with")
    parser.add_argument("--smoke", action="store_true",
                        help="CPU, vocabulary 2048, batches 1 and 4: checks this script, times nothing; "
                             "results in a temporary folder")
    parser.add_argument("--sweep", action="store_true", help="also time the kernel's (block, warps) configurations")
    add_results_args(parser, default_save=True)
    args = parser.parse_args()
    device = "cpu" if args.smoke or not torch.cuda.is_available() else "cuda"
    vocab = 2048 if args.smoke else args.vocab
    if args.smoke:
        args.out = tempfile.mkdtemp(prefix="sampling_smoke_")
        args.batches = "1,4"
    batches = [int(b) for b in args.batches.split(",")]
    steps = {int(b): float(ms) for b, ms in (item.split(":") for item in args.step_ms.split(","))}
    gen = torch.Generator(device=device).manual_seed(0)
    rows, cells = [], []
    name = torch.cuda.get_device_name() if device == "cuda" else "cpu"
    kernel_sampler = DeviceSampler((), torch.device(device), seed=0, sampling_kernel=True)
    torch_sampler = DeviceSampler((), torch.device(device), seed=0, sampling_kernel=False)
    for mode, knobs in {**MODES, **{label: MODES[same] for label, same in TORCH_MODES.items()}}.items():
        line = [mode]
        for batch in batches:
            logits = torch.randn(batch, vocab, generator=gen, device=device, dtype=torch.float32) * 3
            requests = [SampleRequest(Sequence([1], SamplingParams(max_tokens=16, **knobs)), i, [])
                        for i in range(batch)]
            use = torch_sampler if mode in TORCH_MODES else kernel_sampler
            us = time_us(lambda: use.sample(logits.clone(), requests), device)
            step = step_ms_at(steps, batch)
            share = us / (step * 1e3) if step and device == "cuda" else None
            rows.append({"mode": mode, "batch": batch, "us": us, "step_ms": step, "share_of_step": share})
            line.append(f"{us:.0f} us" + (f" ({share:.1%})" if share is not None else ""))
        cells.append(line)
    print_table(["mode"] + [f"B={b}" for b in batches], cells,
                title=f"sampling on {name}, vocabulary {vocab}: us per call (share of a llama3-8b decode step "
                      "at that batch)")
    results = ResultsFile("sampling", name, args.out, args.copy_to, save=args.save and (device == "cuda" or args.smoke))
    run = run_info(device=name, torch=torch.__version__)
    results.put("sampling", {"vocab": vocab, "step_ms": steps, "rows": rows,
                             "note": "us includes one logits clone (the sampler masks in place)"}, run)
    if args.sweep:
        results.put("kernel-sweep", {"vocab": vocab, "rows": sweep_kernel(batches, vocab, device, gen)}, run)
    if results.enabled:
        print(f"results: {results.path}")


if __name__ == "__main__":
    main()
