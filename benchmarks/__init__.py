"""Benchmarks of fura that live outside the library's import graph (nothing under ``src/`` imports them)."""
