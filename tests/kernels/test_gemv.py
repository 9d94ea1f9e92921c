"""The skinny-matrix kernel (kernels/gemv.py) against its plain-torch reference, and the policy
that decides when TritonOps uses it."""

from __future__ import annotations

import json

import pytest
import torch

from servescope.kernels.backend import TritonOps
from servescope.kernels.gemv import MAX_ROWS, GemvConfig, GemvPolicy, gemv, gemv_ref
from servescope.reference_engine.ops import TorchOps

HALF = [torch.bfloat16, torch.float16]
CONFIGS = [
    GemvConfig(block_n=16, block_k=64, num_warps=4, use_dot=False),
    GemvConfig(block_n=8, block_k=32, num_warps=2, use_dot=False),
    GemvConfig(block_n=16, block_k=64, num_warps=4, num_stages=2, use_dot=True),
    GemvConfig(block_n=32, block_k=128, num_warps=4, use_dot=True),
]


def _randn(generator, *shape, dtype, device, scale=1.0):
    return (torch.randn(*shape, generator=generator) * scale).to(dtype).to(device)


def _check_summed(summed, ref_summed, dtype):
    # One rounding of an exact sum; Triton's interpreter truncates to bf16 instead of rounding (1 ulp).
    rtol = 2**-7 if dtype == torch.bfloat16 else 0.0
    torch.testing.assert_close(summed, ref_summed, rtol=rtol, atol=0)


@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: c.key())
@pytest.mark.parametrize("rows", [1, 2, 3, 5, 8])
@pytest.mark.parametrize("n,k", [(48, 192), (64, 128), (40, 100)])  # N and K off the block grid too
def test_gemv_matches_reference(dtype, config, rows, n, k, generator, device, assert_close):
    a = _randn(generator, rows, k, dtype=dtype, device=device)
    w = _randn(generator, n, k, dtype=dtype, device=device, scale=k**-0.5)
    out, summed = gemv(a, w, config=config)
    assert out.shape == (rows, n) and out.dtype == dtype and summed is None
    ref, _ = gemv_ref(a.float(), w.float())
    assert_close(out, ref)


@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("config", CONFIGS[::2], ids=lambda c: c.key())
@pytest.mark.parametrize("rows", [1, 4, 7])
def test_gemv_silu_mul_prologue(dtype, config, rows, generator, device, assert_close):
    n, k = 48, 160
    a = _randn(generator, rows, 2 * k, dtype=dtype, device=device, scale=2.0)
    w = _randn(generator, n, k, dtype=dtype, device=device, scale=k**-0.5)
    out, _ = gemv(a, w, "silu_mul", config=config)
    ref, _ = gemv_ref(a.float(), w.float(), "silu_mul")
    assert_close(out, ref)


@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("config", CONFIGS[1:3], ids=lambda c: c.key())
@pytest.mark.parametrize("rows", [1, 3, 8])
@pytest.mark.parametrize("with_residual", [False, True])
def test_gemv_norm_prologue(dtype, config, rows, with_residual, generator, device, assert_close):
    n, k = 32, 192
    a = _randn(generator, rows, k, dtype=dtype, device=device, scale=3.0)
    w = _randn(generator, n, k, dtype=dtype, device=device, scale=k**-0.5)
    nw = _randn(generator, k, dtype=dtype, device=device)
    residual = _randn(generator, rows, k, dtype=dtype, device=device) if with_residual else None
    out, summed = gemv(a, w, "norm", nw, 1e-5, residual, config=config)
    ref, ref_summed = gemv_ref(a, w, "norm", nw, 1e-5, residual)
    assert_close(out, ref.float())
    if with_residual:
        _check_summed(summed, ref_summed, dtype)
    else:
        assert summed is None


def test_gemv_m16_dot_and_float32(generator, device, assert_close):
    a = _randn(generator, MAX_ROWS, 96, dtype=torch.float16, device=device)
    w = _randn(generator, 48, 96, dtype=torch.float16, device=device, scale=0.1)
    out, _ = gemv(a, w, config=GemvConfig(block_n=16, block_k=32, use_dot=True))
    assert_close(out, gemv_ref(a.float(), w.float())[0])
    a32, w32 = a.float(), w.float()
    out32, _ = gemv(a32, w32, config=GemvConfig(block_n=16, block_k=32, use_dot=False))
    assert_close(out32, gemv_ref(a32, w32)[0])


def test_gemv_rejects_bad_inputs(device):
    w = torch.randn(8, 32, device=device)
    with pytest.raises(ValueError, match="at most"):
        gemv(torch.randn(MAX_ROWS + 1, 32, device=device), w)
    with pytest.raises(ValueError, match="shape"):
        gemv(torch.randn(2, 32, device=device), w, "silu_mul")
    with pytest.raises(TypeError):
        gemv(torch.randn(2, 32, device=device, dtype=torch.float16), w)
    with pytest.raises(ValueError, match="norm_weight"):
        gemv(torch.randn(2, 32, device=device), w, "norm")
    with pytest.raises(ValueError, match="prologue"):
        gemv(torch.randn(2, 32, device=device), w, "gelu")


def test_policy_reads_the_tuned_table(tmp_path, monkeypatch):
    cfg = {"block_n": 8, "block_k": 256, "num_warps": 4, "num_stages": 3, "use_dot": False}
    table = {"devices": {"GPU X": {"64x32": {"none": {"1": cfg, "2": None}, "norm": {"4": cfg}}}}}
    policy = GemvPolicy("GPU X", mode="tuned", table=table)
    assert policy.config(64, 32, 1, "none") == GemvConfig(**cfg)
    assert policy.config(64, 32, 2, "none") is None
    assert policy.config(64, 32, 3, "norm") == GemvConfig(**cfg)  # 3 rows run in the 4-row bucket
    assert policy.config(64, 32, 9, "norm") is None
    assert policy.config(64, 32, 1, "silu_mul") is None
    assert policy.config(32, 64, 1, "none") is None
    assert GemvPolicy("GPU Y", mode="tuned", table=table).config(64, 32, 1, "none") is None
    assert GemvPolicy("GPU X", mode="off", table=table).config(64, 32, 1, "none") is None
    everything = GemvPolicy(None, mode="all", table={})
    assert everything.config(5, 7, 16, "silu_mul") is not None and everything.config(5, 7, 17, "none") is None
    path = tmp_path / "table.json"
    path.write_text(json.dumps(table))
    monkeypatch.setenv("KERNELS_GEMV_TABLE", str(path))
    monkeypatch.setenv("KERNELS_GEMV", "tuned")
    assert GemvPolicy("GPU X").config(64, 32, 1, "none") == GemvConfig(**cfg)
    monkeypatch.setenv("KERNELS_GEMV", "sometimes")
    with pytest.raises(ValueError):
        GemvPolicy("GPU X")


@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("rows", [1, 3, 20])  # 20 rows: past the kernel's limit, F.linear
def test_triton_ops_projections_match_torch_ops(dtype, rows, generator, device, assert_close):
    """One decoder layer's three projection entry points, through the kernel (policy 'all') and
    through TorchOps' unfused composition."""
    ops = TritonOps(gemv_policy=GemvPolicy(None, mode="all", table={}))
    ref_ops = TorchOps()
    hidden, inner, qkv_n = 64, 96, 96
    x = _randn(generator, rows, hidden, dtype=dtype, device=device)
    residual = _randn(generator, rows, hidden, dtype=dtype, device=device)
    nw = _randn(generator, hidden, dtype=dtype, device=device)
    w_qkv = _randn(generator, qkv_n, hidden, dtype=dtype, device=device, scale=hidden**-0.5)
    w_o = _randn(generator, hidden, qkv_n, dtype=dtype, device=device, scale=qkv_n**-0.5)
    w_down = _randn(generator, hidden, inner, dtype=dtype, device=device, scale=inner**-0.5)
    gate_up = _randn(generator, rows, 2 * inner, dtype=dtype, device=device)
    for res in (None, residual):
        got, got_res = ops.norm_linear(x, nw, 1e-5, res, w_qkv)
        want, want_res = ref_ops.norm_linear(x, nw, 1e-5, res, w_qkv)
        assert_close(got, want.float())
        if res is None:
            assert got_res is None and want_res is None
        else:
            _check_summed(got_res, want_res, dtype)
    attn_out = _randn(generator, rows, qkv_n, dtype=dtype, device=device)
    assert_close(ops.linear(attn_out, w_o), ref_ops.linear(attn_out, w_o).float())
    assert_close(ops.silu_mul_linear(gate_up, w_down), ref_ops.silu_mul_linear(gate_up, w_down).float())
    # A bias (Qwen's qkv) always takes F.linear.
    bias = _randn(generator, qkv_n, dtype=dtype, device=device)
    assert_close(ops.linear(x, w_qkv, bias), ref_ops.linear(x, w_qkv, bias).float())
