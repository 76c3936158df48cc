"""Measurements of speed and memory (`python -m benchmarks`); never timed in tests."""
