"""Benchmarks (not tests): run with `python -m bench.e2e`."""
