"""Run the benchmark: ``.venv/bin/python tools/bench/run.py [--quick] [--json FILE]``.

Works from the repository root (or anywhere) without installing ``tools``: the
repository root is put on ``sys.path`` so that ``tools.bench`` imports.
"""

import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from tools.bench.harness import main

if __name__ == "__main__":
    sys.exit(main())
