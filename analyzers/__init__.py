"""Analyzers: metrics, slices, diagnosis rules, comparison and capacity evaluation over run directories."""
