"""Files and directories only the manager's user may read.

The state directory holds the declarations (definitions' ``env`` values are
secrets), the agents' definition files, their logs and the API token. Each is
created with its final mode in the ``open``/``mkdir`` call itself, so there is
no moment in which another user could open it, and an existing one with
looser bits is tightened before it is used.
"""

from __future__ import annotations

import contextlib
import logging
import os
import stat
import tempfile
from pathlib import Path

log = logging.getLogger(__name__)

DIR_MODE = 0o700
FILE_MODE = 0o600
# Bits that let anyone but the owner in.
OTHERS = stat.S_IRWXG | stat.S_IRWXO


def private_dir(path: Path) -> Path:
    """Create ``path`` (and missing parents) as 0700, or tighten it to 0700.

    Returns:
        ``path``.
    Raises:
        OSError: it cannot be created, or is not ours to tighten.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    with contextlib.suppress(FileExistsError):
        path.mkdir(mode=DIR_MODE)
    tighten(path, DIR_MODE)
    return path


def tighten(path: Path, mode: int) -> None:
    """Set ``path`` to ``mode`` if it lets group or others in (a missing path is fine)."""
    try:
        current = stat.S_IMODE(path.stat().st_mode)
    except FileNotFoundError:
        return
    if current & OTHERS:
        os.chmod(path, mode)
        log.warning("%s was readable by others (mode %03o): set to %03o", path, current, mode)


def private_file(path: Path) -> Path:
    """Create ``path`` empty as 0600 if it is missing, else tighten it to 0600."""
    with contextlib.suppress(FileExistsError):
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, FILE_MODE))
    tighten(path, FILE_MODE)
    return path


def open_private(path: Path, flags: int = os.O_WRONLY | os.O_APPEND) -> int:
    """A descriptor on ``path`` opened with ``flags``, the file created 0600 if
    missing, else tightened to 0600 before anything is written."""
    fd = os.open(path, flags | os.O_CREAT, FILE_MODE)
    try:
        if stat.S_IMODE(os.fstat(fd).st_mode) & OTHERS:
            os.fchmod(fd, FILE_MODE)
    except OSError:
        os.close(fd)
        raise
    return fd


def write_private(path: Path, text: str) -> Path:
    """Replace ``path`` with ``text`` atomically, as a 0600 file.

    A reader sees the old file or the new one, never a part; mkstemp creates
    the temporary file 0600, so the text is never readable by others.
    """
    fd, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "w") as handle:
            handle.write(text)
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temporary)
        raise
    return path
