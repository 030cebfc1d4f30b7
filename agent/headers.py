"""Headers carried on every message streamboss publishes.

The ``sb-*`` headers are ours; the ``cloudEvents:*`` ones follow the CloudEvents
AMQP protocol binding (binary content mode, application properties).
"""

from __future__ import annotations

import hashlib
import itertools
import os
import time
from dataclasses import dataclass
from typing import Any

import pika

ID = "sb-id"
STREAM = "sb-stream"
PRODUCED_AT = "sb-produced-at"
PARENT = "sb-parent"

CE_ID = "cloudEvents:id"
CE_SOURCE = "cloudEvents:source"
CE_TYPE = "cloudEvents:type"
CE_SPECVERSION = "cloudEvents:specversion"
CE_RECORD_TYPE = "io.streamboss.record"

DEAD_REASON = "sb-dead-reason"
DEAD_EXIT_CODE = "sb-dead-exit-code"
DEAD_ATTEMPTS = "sb-dead-attempts"
DEAD_STDERR = "sb-dead-stderr"
DEAD_OPERATION = "sb-dead-operation"
# The failure path, one of retry.PATHS: what sb-dead-reason starts with, for grouping.
DEAD_PATH = "sb-dead-path"
# Attempts a message has used up, carried on the copies the agent republishes
# (a retry waiting out its delay, a message moved to run alone): the broker's
# own count (x-delivery-count) starts again at 0 for each copy.
ATTEMPTS = "sb-attempts"
# Why the previous attempt failed, on a retry copy.
RETRY_REASON = "sb-retry-reason"
# Headers the broker sets; a republished copy must not carry them back.
DELIVERY_COUNT = "x-delivery-count"
BROKER_HEADERS = (DELIVERY_COUNT, "x-death", "x-first-death-exchange",
                  "x-first-death-queue", "x-first-death-reason", "x-last-death-exchange",
                  "x-last-death-queue", "x-last-death-reason")

# An object reference (claim check): the message stands for an object in storage.
OBJECT_URL = "sb-object-url"
OBJECT_SIZE = "sb-object-size"
OBJECT_SHA256 = "sb-object-sha256"
OBJECT_CONTENT_TYPE = "sb-object-content-type"
# Set on a replayed message: the stream whose archive it came from.
REPLAYED_FROM = "sb-replayed-from"

PERSISTENT = 2


@dataclass(frozen=True)
class ObjectReference:
    """A message's claim check, as its publisher wrote it (nothing here is trusted).

    Attributes:
        url: ``sb-object-url``.
        sha256: ``sb-object-sha256``, lowercase hex, stripped; "" when absent.
        size: ``sb-object-size`` in bytes; None when absent or not a whole number >= 0.
    """

    url: str
    sha256: str
    size: int | None


def object_reference(properties: pika.BasicProperties) -> ObjectReference | None:
    """The message's object reference, or None when it is not one."""
    headers = properties.headers
    if not headers or OBJECT_URL not in headers:
        return None

    def text(value: Any) -> str:
        return value.decode(errors="replace") if isinstance(value, bytes) \
            else str(value or "")

    return ObjectReference(text(headers[OBJECT_URL]),
                           text(headers.get(OBJECT_SHA256)).strip().lower(),
                           _size(headers.get(OBJECT_SIZE)))


def _size(value: Any) -> int | None:
    """A declared size: an AMQP integer, or decimal digits as text (another publisher's
    choice); anything else is no size."""
    if isinstance(value, bytes):
        value = value.decode(errors="replace")
    if isinstance(value, str) and value.strip().isdigit() and value.strip().isascii():
        value = int(value.strip())
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        return None
    return value


_second_cache: tuple[int, str] = (-1, "")


def now_rfc3339() -> str:
    """The current UTC time as RFC 3339 with microseconds and a ``Z``.

    The date-and-second part is formatted once per second: this runs for every
    message, and strftime costs more than the rest of the headers together.
    """
    global _second_cache
    now = time.time()
    second = int(now)
    if second != _second_cache[0]:
        _second_cache = (second, time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second)))
    return f"{_second_cache[1]}.{int((now - second) * 1_000_000):06d}Z"


# 64 random bits per process, then a counter: unique without a syscall per message
# (uuid4 reads os.urandom every time).
_ID_PREFIX = os.urandom(8).hex()
_id_counter = itertools.count(1)


def new_id() -> str:
    """A fresh message id, unique across processes."""
    return f"{_ID_PREFIX}{next(_id_counter):012x}"


def derived_id(operation: str, parent: str, index: int | str) -> str:
    """The id of output ``index`` of input ``parent`` in ``operation``: the same for
    every redelivery of that input, so a consumer keeping ids can drop duplicates.
    28 hex digits, like :func:`new_id`."""
    key = f"{operation}\x00{parent}\x00{index}".encode()
    return hashlib.blake2b(key, digest_size=14).hexdigest()


def message_id(properties: pika.BasicProperties) -> str | None:
    """The streamboss id of a received message: ``sb-id``, else the AMQP message-id."""
    headers = properties.headers
    if headers:
        value = headers.get(ID)
        if value:
            return value.decode() if isinstance(value, bytes) else str(value)
    return properties.message_id


def output_properties(
    stream: str,
    source: str,
    parent: str | None,
    extra: dict[str, Any] | None = None,
    content_type: str | None = None,
    ident: str | None = None,
) -> pika.BasicProperties:
    """Properties for a message published to ``stream``.

    Parameters:
        stream: the stream the message is published to.
        source: the CloudEvents source, a URI reference naming the producer.
        parent: the id of the message this one was derived from, if any.
        extra: more headers (dead-letter reasons, the input's own headers).
        content_type: the AMQP content-type, when known.
        ident: the message's id (see :func:`derived_id`); a fresh one when not given.
    """
    ident = ident or new_id()
    produced_at = now_rfc3339()
    headers: dict[str, Any] = dict(extra) if extra else {}
    headers[ID] = ident
    headers[STREAM] = stream
    headers[PRODUCED_AT] = produced_at
    if parent is not None:
        headers[PARENT] = parent
    headers[CE_ID] = ident
    headers[CE_SOURCE] = source
    headers[CE_TYPE] = CE_RECORD_TYPE
    headers[CE_SPECVERSION] = "1.0"
    return pika.BasicProperties(
        message_id=ident,
        delivery_mode=PERSISTENT,
        headers=headers,
        content_type=content_type,
    )
