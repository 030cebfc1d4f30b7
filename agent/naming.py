"""Broker names for streams and operations (the wire contract in DESIGN.md)."""

from __future__ import annotations

import re

NAME_PATTERN = re.compile(r"[a-z0-9][a-z0-9._-]{0,62}")
STREAM_PREFIX = "sb.stream."
OPERATION_PREFIX = "sb.op."
DEAD_SUFFIX = ".dead"
# Named durable subscriptions: they keep messages for a consumer that is away
# (an archive), so the manager counts them as demand.
SUBSCRIPTION_PREFIX = "sb.sub."


class InvalidName(ValueError):
    """A stream or operation name that the broker naming scheme cannot carry."""


def check_name(kind: str, name: str) -> str:
    """Return ``name`` if it is a valid stream/operation name.

    Raises:
        InvalidName: naming the kind, the bad value and the allowed pattern.
    """
    if not NAME_PATTERN.fullmatch(name):
        raise InvalidName(
            f"{kind} name {name!r} is invalid: use 1-63 characters of a-z, 0-9, '.', '_' "
            "or '-', starting with a letter or digit"
        )
    return name


def stream_exchange(stream: str) -> str:
    """The durable topic exchange that carries ``stream``."""
    return STREAM_PREFIX + stream


def operation_queue(operation: str) -> str:
    """The durable queue shared by all agents of ``operation``."""
    return OPERATION_PREFIX + operation


def dead_stream(operation: str) -> str:
    """The stream that receives messages ``operation`` gave up on."""
    return operation + DEAD_SUFFIX


def archive_queue(stream: str) -> str:
    """The durable subscription that an archive of ``stream`` drains."""
    return f"{SUBSCRIPTION_PREFIX}archive.{stream}"
