"""``python tests/inert_manager.py manager ARGS``: a real ``streamboss manager`` (API,
store, broker topology, reconciler) whose local dispatcher starts no process.

For the API fuzzer: it declares definitions with commands it makes up and
operations and archives that use them; none of those may ever run on this
machine. Scaling requests are recorded and ignored; starting a process at all
is an error that stops the manager.
"""

from __future__ import annotations

import os
import sys
from typing import Any

from streamboss.manager import server
from streamboss.manager.dispatch_local import LocalDispatcher
from streamboss.manager.model import Archive, Definition, Operation


class InertDispatcher(LocalDispatcher):
    """The local dispatcher with its process starts taken out."""

    def scale(self, operation: Operation, definition: Definition, count: int) -> None:
        """Nothing runs: the operation keeps zero agents whatever it wants."""

    def run_archiver(self, archive: Archive, run: bool) -> None:
        """No archiver runs either."""

    def _spawn(self, name: str, args: list[str]) -> Any:
        # Unreachable through scale/run_archiver; should a new path reach it, the manager
        # stops here rather than run a command the fuzzer wrote.
        # (A thread's SystemExit would end only the reconciler.)
        print(f"inert_manager: refusing to start {name}", file=sys.stderr, flush=True)
        os._exit(70)


if __name__ == "__main__":
    server.LocalDispatcher = InertDispatcher  # type: ignore[misc]
    from streamboss.manager.cli import main

    sys.argv[0] = "streamboss"
    main()
