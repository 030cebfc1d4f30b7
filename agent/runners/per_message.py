"""``per-message`` mode: one child per message, several at once.

stdin is the body, the whole of stdout is the output, a non-zero exit is a
failure. Children run in a small thread pool because each one blocks on its
pipes; results return to the loop thread through ``add_callback_threadsafe``.
"""

from __future__ import annotations

import logging
import subprocess
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from ..config import ProcessDefinition
from ..delivery import Delivery
from ..process import StderrTail, child_env, exit_reason, kill_group, spawn
from . import Outcomes

log = logging.getLogger(__name__)

# A failing program is retried after a short pause so that a program that
# fails because something it needs is briefly away gets a second chance.
RETRY_DELAY = 0.2
RETRY_DELAY_MAX = 5.0


@dataclass(frozen=True)
class Result:
    returncode: int
    stdout: bytes
    timed_out: bool


def run_once(argv: list[str], env: dict[str, str], body: bytes, timeout: float | None,
             stderr: StderrTail, live: set[subprocess.Popen[bytes]]) -> Result:
    """Run the program once on ``body``; kill its process group if it overruns ``timeout``.

    The child sits in ``live`` while it runs, so that a hard stop can kill it.
    """
    try:
        child = spawn(argv, env)
    except OSError as exc:
        stderr.feed(f"cannot start {argv[0]}: {exc.strerror}\n".encode())
        return Result(127, b"", False)
    live.add(child)
    timed_out = False
    try:
        out, err = child.communicate(body, timeout=timeout)
    except subprocess.TimeoutExpired:
        timed_out = True
        kill_group(child)
        out, err = child.communicate()
    finally:
        live.discard(child)
    stderr.feed(err)
    stderr.flush()
    return Result(child.returncode, out, timed_out)


class PerMessageRunner:
    """Runs up to ``concurrency`` children at once."""

    def __init__(self, definition: ProcessDefinition, concurrency: int, outcomes: Outcomes,
                 label: str) -> None:
        self.definition = definition
        self.outcomes = outcomes
        self.label = label
        self._argv = definition.argv
        self._env = child_env(definition)
        self._pool = ThreadPoolExecutor(max_workers=concurrency,
                                        thread_name_prefix=f"{label}-child")
        self._live: set[subprocess.Popen[bytes]] = set()
        self._stopped = threading.Event()

    def start(self) -> None:
        pass

    def submit(self, delivery: Delivery) -> None:
        self._pool.submit(self._work, delivery)

    def stop(self) -> None:
        # Called once nothing is in flight, or on a hard exit: anything still
        # running is abandoned to the broker's redelivery.
        self._stopped.set()
        self._pool.shutdown(wait=False, cancel_futures=True)
        for child in list(self._live):
            kill_group(child)

    def _work(self, delivery: Delivery) -> None:
        definition = self.definition
        delay = RETRY_DELAY
        while True:
            stderr = StderrTail(self.label)
            result = run_once(self._argv, self._env, delivery.body, definition.timeout, stderr,
                              self._live)
            delivery.attempts += 1
            if result.returncode == 0 and not result.timed_out:
                self._report(self.outcomes.emit, delivery, result.stdout)
                return
            if result.timed_out:
                reason = f"timed out after {definition.timeout:g}s"
            else:
                reason = f"program {exit_reason(result.returncode)}"
            if delivery.attempts >= definition.max_attempts:
                code = None if result.timed_out else result.returncode
                self._report(self.outcomes.dead_letter, delivery, reason, code, stderr.text())
                return
            log.info("%s: attempt %d of %d failed (%s); retrying", self.label,
                     delivery.attempts, definition.max_attempts, reason)
            if self._stopped.wait(delay):
                return
            delay = min(delay * 2, RETRY_DELAY_MAX)

    def _report(self, callback: object, *args: object) -> None:
        self.outcomes.ioloop.add_callback_threadsafe(lambda: callback(*args))  # type: ignore[operator]
