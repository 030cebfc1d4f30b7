"""``tools/chaos``: a chaos run of a three-operation chain under faults, counted exactly.

Run from the repository root: ``.venv/bin/python tools/chaos/run.py [--messages N] ...``
(or ``.venv/bin/python -m tools.chaos``). See :mod:`tools.chaos.harness` for what it does
and :mod:`tools.chaos.report` for what each figure means.
"""
