"""Triton kernels for the reference engine, each beside its plain-torch reference."""
