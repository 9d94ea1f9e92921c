"""Kernels fed per-step values must not specialize on them.

Triton compiles a new variant for each new alignment of a pointer argument and each new class
(1, divisible by 16, other) of an integer argument. The engine hands the attention kernels slices of
one packed per-step upload and widths and counts that change every step, so specializing on them
would compile new variants mid-serving: every request in flight would stall 0.5-1.5 s. The interpreter used by the other CPU tests has no
specialization, so this reads the compiled-mode kernels' parameters in a fresh interpreter.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

# kernel -> (integer args that must not be specialized, pointer args that must not be on alignment)
PER_STEP = {
    "servescope.kernels.paged_decode_attention:_decode_split_kernel": (
        ["stride_table", "num_splits"], ["block_tables_ptr", "context_lens_ptr"]),
    "servescope.kernels.paged_decode_attention:_decode_reduce_kernel": (["num_splits"], []),
    "servescope.kernels.paged_prefill_attention:_prefill_kernel": (
        ["stride_table", "num_m_blocks"], ["block_tables_ptr", "cu_seqlens_ptr", "context_lens_ptr"]),
    "servescope.kernels.rope:_rope_write_kv_kernel": ([], ["positions_ptr", "slot_ptr"]),
    "servescope.kernels.rope:_rope_kernel": ([], ["positions_ptr"]),
    "servescope.kernels.kv_write:_write_kv_kernel": ([], ["slot_ptr"]),
}

_PROBE = """
import importlib, json, sys
out = {}
for target in json.loads(sys.argv[1]):
    module, name = target.split(":")
    fn = getattr(importlib.import_module(module), name)
    out[target] = {p.name: [p.do_not_specialize, p.do_not_specialize_on_alignment] for p in fn.params}
print(json.dumps(out))
"""


def test_per_step_arguments_are_not_specialized() -> None:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    proc = subprocess.run([sys.executable, "-c", _PROBE, json.dumps(list(PER_STEP))], cwd=repo, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    params = json.loads(proc.stdout)
    for target, (ints, pointers) in PER_STEP.items():
        flags = params[target]
        for name in ints:
            assert flags[name][0], f"{target}: {name} changes every step but is specialized on"
        for name in pointers:
            assert flags[name][1], f"{target}: {name} is a per-step slice but is specialized on its alignment"
        # The data the kernels stream stays specialized (alignment lets Triton vectorize those loads).
        for name, (no_value, no_alignment) in flags.items():
            if name.endswith("cache_ptr") or name in ("q_ptr", "out_ptr"):
                assert not no_alignment, f"{target}: {name} lost its alignment specialization"
