"""Where the manager keeps its state."""

from __future__ import annotations

import os
from pathlib import Path

import platformdirs

STATE_DIR_ENV = "STREAMBOSS_STATE_DIR"
CHECKOUT_STATE = ".streamboss"


def _in_checkout(directory: Path) -> bool:
    pyproject = directory / "pyproject.toml"
    try:
        return 'name = "streamboss"' in pyproject.read_text()
    except OSError:
        return False


def state_dir(explicit: str | Path | None = None) -> Path:
    """``--state-dir``, else ``STREAMBOSS_STATE_DIR``, else ``./.streamboss`` in a project
    checkout, else the platform's user state directory."""
    if explicit:
        return Path(explicit).expanduser().resolve()
    if os.environ.get(STATE_DIR_ENV):
        return Path(os.environ[STATE_DIR_ENV]).expanduser().resolve()
    here = Path.cwd()
    if _in_checkout(here):
        return here / CHECKOUT_STATE
    return Path(platformdirs.user_state_dir("streamboss"))


def objects_dir(state: Path) -> Path:
    """Where the embedded default keeps objects (``file://`` store) under a state directory."""
    return state / "objects"


def archives_dir(state: Path) -> Path:
    """Where the embedded default keeps stream archives (``file://`` store)."""
    return state / "archive"
