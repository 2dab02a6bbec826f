"""Benchmarks: speed and reproducibility measurements (run with `make bench`)."""
