"""Throughput benchmarks: scripts that print tables (and optionally write CSV), not tests.

Run them from the repository root, e.g. ``python benchmarks/poisoning.py --csv poisoning.csv``.
"""
