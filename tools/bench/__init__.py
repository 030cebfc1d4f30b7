"""``tools/bench``: the stream agent against plain pika relays, on the same broker.

Run from the repository root: ``.venv/bin/python tools/bench/run.py [--quick] [--json FILE]``
(or ``.venv/bin/python -m tools.bench``). See :mod:`tools.bench.harness` for what is timed.
"""
