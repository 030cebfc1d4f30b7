"""``python -m tools.bench`` from the repository root."""

import sys

from tools.bench.harness import main

sys.exit(main())
