"""The manager's API token: generated, kept private, found by the CLI on the same machine.

A manager started without ``STREAMBOSS_TOKEN`` makes a token of its own (once;
later starts reuse it) and keeps it in its state directory as ``manager.token``
(0600, written through a 0600 temporary file and renamed into place, so it is
never readable by anyone else, not even for a moment). Because the CLI may run
from another directory than the manager (the state directory depends on the
working directory), the manager also leaves a per-user *pointer*, keyed by its
port, naming that file: ``<user state dir>/streamboss/tokens/<port>`` in a 0700
directory. The CLI reads a local token only for a loopback manager URL, so the
token is never sent to another machine.

The token itself appears in no log line, banner, error message or argv.
"""

from __future__ import annotations

import base64
import contextlib
import hmac
import ipaddress
import logging
import os
import re
import secrets
import stat
from pathlib import Path
from urllib.parse import urlsplit

import platformdirs

from .private_files import OTHERS, private_dir, write_private

log = logging.getLogger(__name__)

TOKEN_FILE = "manager.token"
# 32 random bytes: far beyond guessing, and URL-safe so it fits a header as is.
TOKEN_BYTES = 32
# What a token we wrote looks like; anything else in the file is not ours.
_TOKEN_SHAPE = re.compile(r"[A-Za-z0-9_-]{32,256}")
LOOPBACK_NAMES = frozenset({"localhost", "127.0.0.1", "::1"})


def token_file(state_dir: Path) -> Path:
    return state_dir / TOKEN_FILE


def _read_private(path: Path) -> str | None:
    """The token in ``path`` if it is a regular file of ours that only we may read and
    holds a token; None otherwise (missing, a symlink, loose mode, foreign, garbage)."""
    text = _private_text(path, 1024)
    return text if text is not None and _TOKEN_SHAPE.fullmatch(text) else None


def _private_text(path: Path, limit: int) -> str | None:
    """The text of ``path`` (at most ``limit`` bytes, stripped) if it is a regular file of
    ours that no one else may read; None otherwise (missing, a symlink, loose, larger)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError:
        return None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode) or info.st_uid != os.geteuid() \
                or stat.S_IMODE(info.st_mode) & OTHERS or info.st_size > limit:
            return None
        return os.read(fd, limit).decode(errors="replace").strip()
    finally:
        os.close(fd)


def load_or_create(state_dir: Path) -> str:
    """The token kept in ``state_dir``, made now if there is none usable.

    A file that others could read (or that is not ours, or not a token) is
    replaced by a new token: the old one may have leaked.

    Raises:
        OSError: the state directory cannot be written.
    """
    path = token_file(state_dir)
    token = _read_private(path)
    if token is not None:
        return token
    if path.exists() or path.is_symlink():
        log.warning("%s was not a private token file of this user: replaced with a new "
                    "token", path)
    token = secrets.token_urlsafe(TOKEN_BYTES)
    write_private(path, token + "\n")
    return token


def read(state_dir: Path) -> str | None:
    """The token a manager keeps in ``state_dir``, or None."""
    return _read_private(token_file(state_dir))


# -- the per-user pointer ---------------------------------------------------------------


def pointer_dir() -> Path:
    return Path(platformdirs.user_state_dir("streamboss")) / "tokens"


def pointer_path(port: int) -> Path:
    return pointer_dir() / str(port)


def publish_pointer(port: int, state_dir: Path) -> None:
    """Tell clients of this user where the token of the manager on ``port`` is."""
    directory = private_dir(pointer_dir())
    write_private(directory / str(port), str(token_file(state_dir).resolve()) + "\n")


def withdraw_pointer(port: int, state_dir: Path | None = None) -> None:
    """Remove the pointer for ``port``: any, or only one naming ``state_dir``'s token."""
    path = pointer_path(port)
    with contextlib.suppress(OSError):
        if state_dir is not None and \
                path.read_text().strip() != str(token_file(state_dir).resolve()):
            return  # another manager on this port since: its pointer stays
        path.unlink()


def _pointer_target(pointer: Path) -> Path | None:
    """The token file a pointer names, if the pointer is a private file of ours."""
    named = _private_text(pointer, 4096)
    return Path(named) if named is not None and named.startswith("/") else None


def is_loopback_url(url: str) -> bool:
    try:
        host = urlsplit(url).hostname
    except ValueError:
        return False
    if host is None:
        return False
    if host in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def find_local(url: str, state_dir: Path | None) -> str | None:
    """The token of the manager at ``url`` on this machine, for the CLI: the pointer its
    port left, else the one in ``state_dir``. None for a URL beyond loopback."""
    if not is_loopback_url(url):
        return None
    try:
        port = urlsplit(url).port or 80
    except ValueError:
        return None
    found = None
    target = _pointer_target(pointer_path(port))
    if target is not None:
        found = _read_private(target)
    if found is None and state_dir is not None:
        found = read(state_dir)
    return found


# -- checking what a request carries -----------------------------------------------------


def supplied(authorization: str) -> str:
    """The token in an ``Authorization`` header: a bearer token, or the password of HTTP
    basic auth (the seed's registration call); empty when neither."""
    scheme, _, value = authorization.partition(" ")
    if scheme.lower() == "bearer":
        return value.strip()
    if scheme.lower() == "basic":
        try:
            return base64.b64decode(value.strip(), validate=True).decode().partition(":")[2]
        except (ValueError, UnicodeDecodeError):
            return ""
    return ""


def matches(authorization: str, token: str) -> bool:
    """Whether the header carries ``token`` (compared in constant time)."""
    return hmac.compare_digest(supplied(authorization).encode(), token.encode())
