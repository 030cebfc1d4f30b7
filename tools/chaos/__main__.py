"""``python -m tools.chaos`` from the repository root."""

import sys

from tools.chaos.harness import main

sys.exit(main())
