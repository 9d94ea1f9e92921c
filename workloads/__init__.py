"""Workloads: specs, token-exact prompt building, presets and importers.

The load generator consumes an iterator of `Session`s (see `workloads.types`).
"""
