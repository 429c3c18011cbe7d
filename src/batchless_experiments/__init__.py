"""Experiments, benchmarks and the `batchless` command line (outside the library package)."""
