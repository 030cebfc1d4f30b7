"""Retry policy: how many attempts a message gets, how long it waits between them,
and the names of the paths by which an attempt can fail.

The count lives where it survives the agent: the broker's delivery count on
the quorum queue (``x-delivery-count``: deliveries of this copy that ended
without an outcome, because the agent died or lost its connection) plus the
``sb-attempts`` header of a copy the agent republished (attempts used before
the copy was made). An agent never sleeps on a retry: it republishes the
message into a retry queue whose expiration brings it back later.
"""

from __future__ import annotations

import random
from typing import Any

import pika

from .headers import ATTEMPTS, DELIVERY_COUNT

# The path an attempt failed by; each dead letter's sb-dead-reason starts with one.
PROGRAM_FAILED = "program failure"
TIMED_OUT = "timeout"
AGENT_DIED = "agent crash or kill"
OUTPUT_NACKED = "broker nack of the output"
OBJECT_STORE = "object-store error"
UNEXPECTED = "unexpected exception"
OUTPUT_TOO_LARGE = "output too large"
BAD_INPUT = "bad input"
PATHS = (PROGRAM_FAILED, TIMED_OUT, AGENT_DIED, OUTPUT_NACKED, OBJECT_STORE, UNEXPECTED,
         OUTPUT_TOO_LARGE, BAD_INPUT)

# A second is long enough for something briefly away (a restarting database,
# a full disk being cleaned) to come back, short enough not to be noticed.
DEFAULT_RETRY_DELAY = 1.0
# Exponential backoff stops growing here: a retry is never more than a minute away.
RETRY_DELAY_MAX = 60.0


def _int_header(headers: dict[str, Any] | None, name: str) -> int:
    value = (headers or {}).get(name)
    if isinstance(value, bool) or not isinstance(value, int):
        return 0  # absent, or a publisher's nonsense: count from nothing
    return max(0, value)


def attempts_used(properties: pika.BasicProperties) -> tuple[int, int]:
    """``(header_attempts, crashed_deliveries)`` of a received message.

    ``header_attempts`` is ``sb-attempts`` (attempts before this copy existed);
    ``crashed_deliveries`` is the broker's ``x-delivery-count``: earlier
    deliveries of this copy that never came back with an outcome.

    A publisher may set ``sb-attempts`` itself; it can only make its own
    message give up sooner, which harms nobody else.
    """
    headers = properties.headers
    return _int_header(headers, ATTEMPTS), _int_header(headers, DELIVERY_COUNT)


def retry_delay(base: float, attempt: int) -> tuple[int, int]:
    """``(queue_ms, expiration_ms)`` before attempt ``attempt + 1`` (``attempt`` >= 1).

    The delay doubles per attempt up to :data:`RETRY_DELAY_MAX`; ``queue_ms``
    names the retry queue (one per step, so a queue holds messages of similar
    delays and a long one never holds a short one back for long) and the
    message's own expiration is jittered into its upper half, so retries of a
    burst of failures do not all come back at once.
    """
    delay = min(base * (2 ** (attempt - 1)), RETRY_DELAY_MAX)
    queue_ms = max(1, round(delay * 1000))
    expiration_ms = max(1, round(queue_ms * random.uniform(0.5, 1.0)))
    return queue_ms, expiration_ms
