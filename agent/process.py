"""Starting, describing and stopping the operation's child processes."""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import signal
import subprocess
from collections import deque

from . import isolation
from .config import ConfigError, ProcessDefinition
from .isolation import ChildIsolation

log = logging.getLogger(__name__)

# Enough of stderr to see a traceback's last lines in a dead-letter header
# without making the header larger than the message.
STDERR_TAIL_BYTES = 2048

_children = ChildIsolation()


def isolate_children(children: ChildIsolation) -> None:
    """Set how every program of this agent starts: its pass-through names and user.

    An agent process runs one operation, so this is the process's setting, like
    its environment: the CLI sets it once, before the runners start programs.
    """
    global _children
    _children = children


def children() -> ChildIsolation:
    """The settings :func:`isolate_children` made (none: the agent's own user)."""
    return _children


def child_env(definition: ProcessDefinition) -> dict[str, str]:
    """The child's environment: an allow-list of the agent's (never its broker URL,
    token or AWS credentials), the definition's env, unbuffered Python; see
    :mod:`isolation`."""
    return isolation.child_env(definition.env, _children)


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
    """Start a child with three pipes in its own process group (so a timeout kills it
    all), as the child user (its uid and group, no supplementary groups) if one is set."""
    user = _children.user
    if user is None:
        return subprocess.Popen(
            argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            env=env, start_new_session=True,
        )
    return subprocess.Popen(
        argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        env=env, start_new_session=True, user=user.uid, group=user.gid, extra_groups=[],
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
