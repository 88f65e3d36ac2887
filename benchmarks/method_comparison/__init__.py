"""Method comparison: does FuRA learn more and forget less? Every method trained the same way, measured honestly.

Run as ``python -m benchmarks.method_comparison {list,run,report}`` from the repository root; see ``README.md``
beside this file. Nothing in ``src/`` imports this package.
"""
