"""What an operation's program may see of its agent: an allow-listed environment,
optionally another (unprivileged) user, and no way into the agent's memory.

The agent's own environment holds secrets: the broker URL with its password,
AWS credentials, on a laptop the manager's API token. A program gets only the
variables a program needs to run (:data:`BASE_NAMES`, ``LC_*``), the
definition's ``env`` and the names the operator passes through
(``STREAMBOSS_PASS_ENV`` or the config file's ``pass_env``), never one of
:data:`NEVER_PASSED`.

A program running as the agent's user could still read the agent's
``/proc/<pid>/environ`` or attach a debugger, so the agent makes itself
non-dumpable (:func:`make_non_dumpable`): the kernel then allows that only to
a process holding ``CAP_SYS_PTRACE`` (root). On nodes, programs can run as a
user of their own (``STREAMBOSS_CHILD_USER`` or ``child_user``), which cannot
read the agent's files either.
"""

from __future__ import annotations

import ctypes
import os
import pwd
import re
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

PASS_ENV_ENV = "STREAMBOSS_PASS_ENV"
CHILD_USER_ENV = "STREAMBOSS_CHILD_USER"

# What a program needs from its surroundings to behave like it does in a shell:
# where programs are, a home, the language, the time zone, where temporary files go.
BASE_NAMES = ("PATH", "HOME", "LANG", "LANGUAGE", "TZ", "TMPDIR")
BASE_PREFIXES = ("LC_",)
# A Python filter that block-buffers stdout would hold its answers back until
# its buffer fills; a service child must answer record by record.
DEFAULTS = {"PYTHONUNBUFFERED": "1"}
# Credentials the agent may hold; an operator cannot pass them through by name.
# (A definition's own env may hold anything: that is its author's value.)
NEVER_PASSED = frozenset({
    "STREAMBOSS_TOKEN", "STREAMBOSS_BROKER_URL",
    "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN",
    "AWS_CONTAINER_AUTHORIZATION_TOKEN", "AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE",
    "AWS_CONTAINER_CREDENTIALS_FULL_URI", "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI",
})
ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")

# Linux prctl(2) options and the capabilities (capability.h) starting a
# program as another user needs: setgroups/setregid, setreuid, and signalling
# that program (a timeout kills its process group).
PR_SET_DUMPABLE = 4
PR_SET_NO_NEW_PRIVS = 38
PR_CAP_AMBIENT = 47
PR_CAP_AMBIENT_CLEAR_ALL = 4
CAP_KILL, CAP_SETGID, CAP_SETUID = 5, 6, 7


class IsolationError(ValueError):
    """A child setting the agent cannot honour; one line naming the setting and the fix."""


@dataclass(frozen=True)
class ChildUser:
    """The user an operation's programs run as."""

    name: str
    uid: int
    gid: int
    home: str


@dataclass(frozen=True)
class ChildIsolation:
    """How the agent starts its programs.

    Attributes:
        pass_env: names passed from the agent's environment beside the base ones.
        user: the user programs run as; None for the agent's own.
    """

    pass_env: tuple[str, ...] = ()
    user: ChildUser | None = None


def parse_pass_env(value: Any) -> tuple[str, ...]:
    """Names from ``STREAMBOSS_PASS_ENV`` (comma-separated) or ``pass_env`` (a list or
    the same string), checked.

    Raises:
        IsolationError: not names, or a credential the agent never passes on.
    """
    if value is None:
        return ()
    if isinstance(value, str):
        items = [item.strip() for item in value.split(",")]
    elif isinstance(value, list) and all(isinstance(item, str) for item in value):
        items = [item.strip() for item in value]
    else:
        raise IsolationError("pass_env must be a list of environment variable names (or one "
                             "comma-separated string)")
    names = tuple(sorted({item for item in items if item}))
    for name in names:
        if not ENV_NAME.fullmatch(name):
            raise IsolationError(f"pass_env: {name!r} is not an environment variable name")
        if name in NEVER_PASSED:
            raise IsolationError(f"pass_env: {name} holds a credential of the agent and is "
                                 "never given to a program: put what the program needs in "
                                 "the definition's env instead")
    return names


def resolve_child_user(name: str) -> ChildUser:
    """The user ``name``, checked: it exists, is not root, and this process can start
    programs as it.

    Raises:
        IsolationError: naming the user and what to do.
    """
    setting = f"{CHILD_USER_ENV} {name!r}"
    try:
        entry = pwd.getpwnam(name)
    except KeyError:
        raise IsolationError(
            f"{setting}: no such user: create it (useradd --system --no-create-home "
            f"--shell /usr/sbin/nologin {name}) or unset {CHILD_USER_ENV}") from None
    if entry.pw_uid == 0:
        raise IsolationError(f"{setting} is root: name an unprivileged user")
    user = ChildUser(name, entry.pw_uid, entry.pw_gid, entry.pw_dir)
    if (user.uid, user.gid) != (os.geteuid(), os.getegid()) and not can_switch_users():
        raise IsolationError(
            f"{setting}: the agent runs as uid {os.geteuid()} without CAP_SETUID, CAP_SETGID "
            "and CAP_KILL, so it cannot start programs as another user: run it as root (or "
            "with those capabilities) or unset the setting")
    return user


def child_isolation(file_values: Mapping[str, Any]) -> ChildIsolation:
    """The agent's child settings: the environment's, else the config file's.

    Raises:
        IsolationError: a bad pass-through name or child user.
    """
    pass_env = os.environ.get(PASS_ENV_ENV)
    user = os.environ.get(CHILD_USER_ENV)
    file_user = file_values.get("child_user")
    if not user and file_user is not None and not isinstance(file_user, str):
        raise IsolationError("child_user must be a user name")
    user = (user or file_user or "").strip()
    return ChildIsolation(
        pass_env=parse_pass_env(pass_env if pass_env is not None
                                else file_values.get("pass_env")),
        user=resolve_child_user(user) if user else None)


def child_env(definition_env: Mapping[str, str], children: ChildIsolation,
              environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """A program's whole environment.

    Parameters:
        definition_env: the definition's ``env`` (wins over everything else).
        children: the pass-through names and the child user.
        environ: the agent's environment (default ``os.environ``).
    """
    source = os.environ if environ is None else environ
    passed = set(BASE_NAMES) | set(children.pass_env)
    env = {name: value for name, value in source.items()
           if name in passed or name.startswith(BASE_PREFIXES)}
    env.setdefault("PATH", os.defpath)
    if children.user is not None:
        # Its own home and name, not the agent's.
        env.update(HOME=children.user.home, USER=children.user.name,
                   LOGNAME=children.user.name)
    env.update(DEFAULTS)
    env.update(definition_env)
    return env


def _prctl(option: int, argument: int, extra: int = 0) -> bool:
    """prctl(2) on Linux; False where there is none or it fails."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(option, argument, extra, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def make_non_dumpable() -> bool:
    """Keep processes of the same user out of this one: no ``/proc/<pid>/environ``,
    ``/proc/<pid>/mem`` or ptrace without ``CAP_SYS_PTRACE``. Linux only.

    Returns:
        whether it took effect (False elsewhere).
    """
    return _prctl(PR_SET_DUMPABLE, 0)


def is_dumpable() -> bool | None:
    """This process's dumpable flag (None where it cannot be read)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return bool(libc.prctl(3, 0, 0, 0, 0))  # PR_GET_DUMPABLE
    except (OSError, AttributeError):
        return None


def drop_inherited_privileges() -> None:
    """Before starting programs as another user: no capability survives their exec
    (ambient ones would: systemd's AmbientCapabilities= sets them), and no setuid
    program can give them more."""
    _prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL)
    _prctl(PR_SET_NO_NEW_PRIVS, 1)


def can_switch_users() -> bool:
    """Whether this process holds CAP_SETUID, CAP_SETGID and CAP_KILL (root usually does)."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("CapEff:"):
                    effective = int(line.split()[1], 16)
                    return all(effective >> bit & 1 for bit in (CAP_KILL, CAP_SETGID,
                                                                 CAP_SETUID))
    except (OSError, ValueError):
        pass
    return os.geteuid() == 0
