"""Applications on top of the library: the offline demo (``demo.py``) and the benchmark harness (``bench.py``).

Nothing in the library imports them; the ``fura`` command line runs them (``fura demo``, ``fura bench``).
"""
