"""Broker names for streams and operations (the wire contract in DESIGN.md).

An operation owns four kinds of queue, each under a prefix of its own so that
no operation name can collide with another operation's queue:

- ``sb.op.<op>``: the input queue, bound to the input stream, shared by the
  operation's agents. A quorum queue: the broker counts each message's
  deliveries (``x-delivery-count``), a count that survives any agent.
- ``sb.solo.<op>``: messages that were in flight when an agent died. Each agent
  takes one of them at a time, so a message that kills agents is charged its
  attempts alone and the messages that happened to share its agent are not.
- ``sb.retry.<op>.<ms>``: failed messages waiting out their retry delay; when
  the delay expires the broker dead-letters them back to ``sb.op.<op>``.
- ``sb.dead.<op>``: keeps what is published to the stream ``<op>.dead``.
"""

from __future__ import annotations

import re
from typing import Any

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


# Above any sensible max_attempts: the broker's own cut-off for a message that
# agents keep dying on before they can even dead-letter it. Agents dead-letter
# long before (they count attempts themselves); definitions may not ask for more.
MAX_ATTEMPTS_LIMIT = 100
DELIVERY_LIMIT = MAX_ATTEMPTS_LIMIT + 1
SOLO_PREFIX = "sb.solo."
RETRY_PREFIX = "sb.retry."
DEAD_QUEUE_PREFIX = "sb.dead."


def _quorum_arguments(dead_letter_exchange: str, dead_letter_routing_key: str | None = None,
                      ) -> dict[str, Any]:
    arguments: dict[str, Any] = {
        "x-queue-type": "quorum",
        "x-dead-letter-exchange": dead_letter_exchange,
        # The broker confirms a dead-lettered message into its target before it
        # drops it here (needs reject-publish; these queues have no length limit).
        "x-dead-letter-strategy": "at-least-once",
        "x-overflow": "reject-publish",
    }
    if dead_letter_routing_key is not None:
        arguments["x-dead-letter-routing-key"] = dead_letter_routing_key
    return arguments


def operation_queue_arguments(operation: str) -> dict[str, Any]:
    """Declare-arguments of ``sb.op.<op>`` and ``sb.solo.<op>``; the agent and the
    manager must declare them identically (the broker refuses a mismatch)."""
    arguments = _quorum_arguments(stream_exchange(dead_stream(operation)))
    arguments["x-delivery-limit"] = DELIVERY_LIMIT
    return arguments


def solo_queue(operation: str) -> str:
    """Where messages that were in flight when an agent died wait to run alone."""
    return SOLO_PREFIX + operation


def retry_queue(operation: str, delay_ms: int) -> str:
    """The queue where failed messages of ``operation`` wait ``delay_ms`` at most."""
    return f"{RETRY_PREFIX}{operation}.{delay_ms}"


def retry_queue_arguments(operation: str) -> dict[str, Any]:
    """A retry queue dead-letters each message, once its expiration passes, back
    into the operation's input queue (through the default exchange)."""
    return _quorum_arguments("", operation_queue(operation))


def dead_queue(operation: str) -> str:
    """The durable queue that keeps an operation's dead letters until someone reads them."""
    return DEAD_QUEUE_PREFIX + operation


def dead_stream(operation: str) -> str:
    """The stream that receives messages ``operation`` gave up on."""
    return operation + DEAD_SUFFIX


def archive_queue(stream: str) -> str:
    """The durable subscription that an archive of ``stream`` drains."""
    return f"{SUBSCRIPTION_PREFIX}archive.{stream}"
