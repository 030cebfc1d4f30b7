"""Run the chaos run: ``.venv/bin/python tools/chaos/run.py [--messages N] [--json FILE]``.

Works from the repository root (or anywhere) without installing ``tools``: the
repository root is put on ``sys.path`` so that ``tools.chaos`` imports.
"""

import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from tools.chaos.harness import main

if __name__ == "__main__":
    sys.exit(main())
