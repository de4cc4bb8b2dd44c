"""The session enricher's benchmark: ``python -m bench`` (``make bench``).

It brings up its own local stack, preloads the same generated traffic once, measures a
passthrough ceiling, ``enricher run`` (exactly once) and ``enricher batch`` on it, and writes
``bench/results/latest.{md,json,png}``. What is measured and how: ``docs/benchmark.md``.
"""
