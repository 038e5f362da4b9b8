"""Benchmarks: figures measured side by side with their floors and with freezer-api.

Run them with ``session-worker bench`` (``--quick`` for a smoke run, ``--full`` for the
figures in ``benchmarks/RESULTS.md``); see ``benchmarks/run.py``.
"""
