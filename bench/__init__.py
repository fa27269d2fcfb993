"""Benchmarks on the `large` world (`make bench`); see bench/run.py."""
