"""Judging artifacts: verification against the reference, benchmarks, difference images, reports."""
