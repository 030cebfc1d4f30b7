"""Starting, describing and stopping the operation's child processes."""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import signal
import subprocess
from collections import deque

from .config import ConfigError, ProcessDefinition

log = logging.getLogger(__name__)

# Enough of stderr to see a traceback's last lines in a dead-letter header
# without making the header larger than the message.
STDERR_TAIL_BYTES = 2048


def child_env(definition: ProcessDefinition) -> dict[str, str]:
    """The child's environment: the agent's, the definition's, unbuffered Python."""
    env = dict(os.environ)
    # A Python filter that block-buffers stdout would hold its answers back
    # until its buffer fills; a service child must answer record by record.
    env.setdefault("PYTHONUNBUFFERED", "1")
    env.update(definition.env)
    # The broker URL carries a password; the transform has no business with it.
    env.pop("STREAMBOSS_BROKER_URL", None)
    return env


def check_program(definition: ProcessDefinition) -> None:
    """Fail early when the program to exec cannot be found.

    Raises:
        ConfigError: naming the program and what to do.
    """
    program = definition.argv[0]
    found = shutil.which(program) if os.sep not in program else (
        program if os.access(program, os.X_OK) else None)
    if found is None:
        raise ConfigError(f"program {program!r} from 'exec' was not found or is not executable: "
                          "install it or give its full path")


def spawn(argv: list[str], env: dict[str, str]) -> subprocess.Popen[bytes]:
    """Start a child with three pipes in its own process group (so a timeout kills it all)."""
    return subprocess.Popen(
        argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        env=env, start_new_session=True,
    )


def kill_group(child: subprocess.Popen[bytes]) -> None:
    """SIGKILL the child and everything it started."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(child.pid, signal.SIGKILL)


def exit_reason(returncode: int) -> str:
    """Describe a return code as a person would."""
    if returncode < 0:
        try:
            name = signal.Signals(-returncode).name
        except ValueError:
            name = f"signal {-returncode}"
        return f"killed by {name}"
    return f"exited with code {returncode}"


class StderrTail:
    """Logs a child's stderr line by line and keeps its last bytes for dead letters."""

    def __init__(self, label: str) -> None:
        self._label = label
        self._tail: deque[bytes] = deque()
        self._size = 0
        self._partial = b""

    def feed(self, chunk: bytes) -> None:
        self._tail.append(chunk)
        self._size += len(chunk)
        while self._size - len(self._tail[0]) >= STDERR_TAIL_BYTES:
            self._size -= len(self._tail.popleft())
        lines = (self._partial + chunk).split(b"\n")
        self._partial = lines.pop()
        for line in lines:
            log.warning("%s stderr: %s", self._label, line.decode(errors="replace"))

    def flush(self) -> None:
        if self._partial:
            log.warning("%s stderr: %s", self._label, self._partial.decode(errors="replace"))
            self._partial = b""

    def text(self) -> str:
        """The last ``STDERR_TAIL_BYTES`` of stderr, decoded."""
        return b"".join(self._tail)[-STDERR_TAIL_BYTES:].decode(errors="replace")

    def clear(self) -> None:
        self._tail.clear()
        self._size = 0
        self._partial = b""
