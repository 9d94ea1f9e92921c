"""Triton kernels for the reference engine, each beside its plain-torch reference.

One module per kernel (`paged_decode_attention`, `paged_prefill_attention`,
`kv_write`, `rmsnorm`, `rope`, `activation`, `sampling`, `gemv`); each holds the
`*_ref` function that defines the result, the Triton kernel and its launcher.
`kernels.backend.TritonOps` bundles them behind the engine's Ops interface.
Only reference_engine imports this package (it needs torch and triton).
"""
