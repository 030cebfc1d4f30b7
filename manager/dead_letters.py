"""An operation's dead letters, kept in ``sb.dead.<operation>``: summarise, show,
requeue and purge them, on a blocking AMQP connection of their own.

Reading never consumes. A peek takes messages with ``basic.get`` without acking
them and then closes its channel, which puts every one back where it was (a
classic queue keeps its order through requeues). A requeue publishes a copy of
each dead letter into the operation's input queue ``sb.op.<operation>`` through
the default exchange, mandatory and with publisher confirms, and acks the dead
letter only after its copy is confirmed: interrupted anywhere, a message is in
one queue or, if the connection went between the confirm and the ack, in both
with the same id (at-least-once, like every other path), never in neither.

Dead letters are untrusted input: anyone allowed to publish to ``<op>.dead``
can put anything in them. Their headers are only read and shown, never acted on.
"""

from __future__ import annotations

import base64
import contextlib
import datetime as dt
import decimal
from collections import Counter
from collections.abc import Iterator, Mapping
from typing import Any

import pika
import pika.exceptions
from pika.adapters.blocking_connection import BlockingChannel

from streamboss.agent import retry
from streamboss.agent.broker import CONNECT_ERRORS, explain_close
from streamboss.agent.headers import (
    ATTEMPTS,
    BROKER_HEADERS,
    CE_ID,
    DEAD_ATTEMPTS,
    DEAD_EXIT_CODE,
    DEAD_OPERATION,
    DEAD_PATH,
    DEAD_REASON,
    ID,
    PARENT,
    PRODUCED_AT,
    RETRY_REASON,
    message_id,
)
from streamboss.agent.naming import dead_queue, operation_queue
from streamboss.agent.tls import connection_parameters

from .broker import BrokerUnavailable, passive_declare

# Every header the agent writes on a dead letter starts with this.
DEAD_PREFIX = "sb-dead-"
# ``list`` reads this many dead letters of an operation at most to count their
# reasons: one round trip each (about 0.3 ms here), so a long dead queue is
# summarised in about a second; the count itself is always exact.
SCAN_LIMIT = 2_000
# ``show`` shows this many at most: each is held unacked until the answer is built.
SHOW_LIMIT = 1_000
SHOW_DEFAULT = 10
# A body is shown up to this many bytes (body_size gives its length): enough to
# see what a program choked on, without a huge input filling the answer.
BODY_LIMIT = 1024 * 1024
# ``list`` names this many distinct reasons per operation, the commonest first.
REASONS_SHOWN = 20
# The path of a dead letter that says nothing about why.
UNKNOWN_PATH = "unknown"
# What the broker's x-delivery-limit backstop produced (no sb-dead-* headers):
# an agent died on the message before it could count and dead-letter it.
BACKSTOP_REASON = f"{retry.AGENT_DIED} (broker delivery limit)"


class RequeueError(RuntimeError):
    """A requeue that stopped part-way; ``requeued`` dead letters were moved before."""

    def __init__(self, message: str, requeued: int) -> None:
        super().__init__(message)
        self.requeued = requeued


# -- reading one dead letter -----------------------------------------------------------


def _text(value: Any) -> str:
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    return "" if value is None else str(value)


def _rfc3339(moment: dt.datetime) -> str:
    if moment.tzinfo is None:  # pika decodes AMQP timestamps as naive UTC
        moment = moment.replace(tzinfo=dt.UTC)
    return moment.astimezone(dt.UTC).isoformat().replace("+00:00", "Z")


def _broker_death(headers: Mapping[str, Any]) -> Mapping[str, Any] | None:
    """The ``x-death`` entry that explains a broker-made dead letter: the one for
    the delivery limit if any, else the most recent (the broker puts it first)."""
    deaths = headers.get("x-death")
    if not isinstance(deaths, list):
        return None
    entries = [d for d in deaths if isinstance(d, Mapping)]
    for entry in entries:
        if _text(entry.get("reason")) == "delivery_limit":
            return entry
    return entries[0] if entries else None


def classify(headers: Mapping[str, Any]) -> tuple[str, str]:
    """``(path, reason)`` of a dead letter.

    The agent's dead letters say it in ``sb-dead-reason`` (and ``sb-dead-path``;
    a letter without it is placed by the prefix of its reason, one of
    ``retry.PATHS``). A letter the broker made has an ``x-death`` entry instead:
    the delivery-limit backstop is an agent that died on the message.
    """
    reason = _text(headers.get(DEAD_REASON))
    if reason:
        path = _text(headers.get(DEAD_PATH)) or next(
            (p for p in retry.PATHS if reason.startswith(p)), UNKNOWN_PATH)
        return path, reason
    death = _broker_death(headers)
    if death is not None:
        why = _text(death.get("reason"))
        if why == "delivery_limit":
            return retry.AGENT_DIED, BACKSTOP_REASON
        return UNKNOWN_PATH, f"dead-lettered by the broker ({why or 'no reason given'})"
    return UNKNOWN_PATH, "no sb-dead-reason or x-death header"


def dead_at(properties: pika.BasicProperties) -> str | None:
    """When the message became a dead letter, as RFC 3339, if it says.

    A broker-made letter has the time of its ``x-death`` entry; the agent's have
    their AMQP timestamp or ``sb-produced-at`` (set when it published the letter).
    """
    headers = properties.headers or {}
    if not headers.get(DEAD_REASON):
        death = _broker_death(headers)
        if death is not None and isinstance(death.get("time"), dt.datetime):
            return _rfc3339(death["time"])
    if isinstance(properties.timestamp, int) and not isinstance(properties.timestamp, bool):
        with contextlib.suppress(OverflowError, OSError, ValueError):
            return _rfc3339(dt.datetime.fromtimestamp(properties.timestamp, dt.UTC))
    produced = _text(headers.get(PRODUCED_AT))
    return produced or None


def _jsonable(value: Any) -> Any:
    """A header value as JSON: bytes that are not UTF-8 as ``{"$b64": ...}`` (the
    archive's convention), AMQP timestamps as RFC 3339, decimals as text."""
    if isinstance(value, bytes | bytearray):
        try:
            return bytes(value).decode("utf-8")
        except UnicodeDecodeError:
            return {"$b64": base64.b64encode(bytes(value)).decode("ascii")}
    if isinstance(value, Mapping):
        return {_text(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, dt.datetime):
        return _rfc3339(value)
    if isinstance(value, decimal.Decimal):
        return str(value)
    return value


def _int(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def describe(position: int, properties: pika.BasicProperties, body: bytes) -> dict[str, Any]:
    """One dead letter as JSON: where it is in the queue (1 = next out), its id,
    path, reason, attempts, exit code and time, its headers and other properties,
    and its body (text, else ``body_base64``; cut at BODY_LIMIT bytes)."""
    headers = properties.headers or {}
    path, reason = classify(headers)
    shown = body[:BODY_LIMIT]
    view: dict[str, Any] = {
        "position": position,
        "id": message_id(properties),
        "path": path,
        "reason": reason,
        "attempts": _int(headers.get(DEAD_ATTEMPTS)),
        "exit_code": _int(headers.get(DEAD_EXIT_CODE)),
        "dead_at": dead_at(properties),
        "headers": _jsonable(dict(headers)),
        "properties": {name: _jsonable(value) for name, value in vars(properties).items()
                       if name != "headers" and value is not None},
        "body_size": len(body),
        "body_truncated": len(body) > BODY_LIMIT,
    }
    try:
        view["body"] = shown.decode("utf-8")
    except UnicodeDecodeError:
        view["body_base64"] = base64.b64encode(shown).decode("ascii")
    return view


def requeued_properties(properties: pika.BasicProperties) -> pika.BasicProperties:
    """The properties of a dead letter's copy in the input queue: its attempts start
    again, so the attempt count (``sb-attempts``), the reasons (``sb-dead-*``,
    ``sb-retry-reason``) and the broker's own headers go; its id and every other
    header and property stay, except two that would make the copy fail for a
    reason of its own: ``expiration`` (it would expire and die again) and
    ``user_id`` (the broker refuses one that is not the publishing user)."""
    source = properties.headers or {}
    stripped = {ATTEMPTS, RETRY_REASON, *BROKER_HEADERS}
    headers = {key: value for key, value in source.items()
               if key not in stripped and not key.startswith(DEAD_PREFIX)}
    kept = {name: value for name, value in vars(properties).items()
            if name not in ("headers", "expiration", "user_id")}
    if DEAD_OPERATION in source and source.get(PARENT):
        # An agent's dead letter has an id of its own and the input's in sb-parent:
        # the copy is the input again, so its outputs get the ids they would have had.
        original = source[PARENT]
        original = original.decode() if isinstance(original, bytes) else str(original)
        headers[ID] = headers[CE_ID] = kept["message_id"] = original
        del headers[PARENT]
    return pika.BasicProperties(headers=headers, **kept)


# -- the broker side ---------------------------------------------------------------------


@contextlib.contextmanager
def _connection(url: str) -> Iterator[pika.BlockingConnection]:
    """A connection of its own: requests run on the API's worker threads, and pika
    connections must not be shared between threads.

    Raises:
        BrokerUnavailable: the broker cannot be reached.
    """
    params = connection_parameters(url)
    params.client_properties = {"connection_name": "streamboss-manager-dead-letters"}
    try:
        connection = pika.BlockingConnection(params)
    # A broker that accepts the socket but does not finish the handshake in time
    # (stopping, starting, overloaded) fails with a connector error, not an AMQPError.
    except CONNECT_ERRORS as exc:
        raise BrokerUnavailable(explain_close(exc, url, opening=True)) from None
    try:
        yield connection
    except pika.exceptions.AMQPConnectionError as exc:
        raise BrokerUnavailable(explain_close(exc, url)) from None
    finally:
        if connection.is_open:
            with contextlib.suppress(pika.exceptions.AMQPError):
                connection.close()


def _depth(connection: pika.BlockingConnection, queue: str) -> int | None:
    """Ready messages in ``queue``; None when it does not exist (an operation whose
    dead-letter queue the manager has not declared yet has no dead letters)."""
    channel = connection.channel()
    state = passive_declare(channel, queue)
    if state is None:
        return None
    channel.close()
    return state.messages


@contextlib.contextmanager
def _peeking(connection: pika.BlockingConnection) -> Iterator[BlockingChannel]:
    """A channel for ``basic.get`` without acks; closing it puts back, in place,
    everything taken on it."""
    channel = connection.channel()
    try:
        yield channel
    finally:
        if channel.is_open:
            channel.close()


def _peek(channel: BlockingChannel, queue: str, limit: int
          ) -> Iterator[tuple[pika.BasicProperties, bytes]]:
    """Up to ``limit`` messages from the head of ``queue``, none acked."""
    for _ in range(limit):
        try:
            method, properties, body = channel.basic_get(queue, auto_ack=False)
        except pika.exceptions.ChannelClosedByBroker as exc:
            if exc.reply_code == 404:  # deleted meanwhile: nothing more to read
                return
            raise
        if method is None:
            return
        yield properties, body


def _summarise(connection: pika.BlockingConnection, operation: str) -> dict[str, Any]:
    queue = dead_queue(operation)
    paths: Counter[str] = Counter()
    reasons: Counter[str] = Counter()
    oldest: str | None = None
    scanned = 0
    count = _depth(connection, queue) or 0
    if count:
        with _peeking(connection) as channel:
            for properties, _body in _peek(channel, queue, min(count, SCAN_LIMIT)):
                if scanned == 0:
                    oldest = dead_at(properties)
                path, reason = classify(properties.headers or {})
                paths[path] += 1
                reasons[reason] += 1
                scanned += 1
    return {
        "operation": operation,
        "queue": queue,
        "count": count,
        "oldest": oldest,
        "scanned": scanned,
        "paths": dict(paths.most_common()),
        "reasons": [{"reason": r, "count": n} for r, n in reasons.most_common(REASONS_SHOWN)],
    }


def summaries(url: str, operations: list[str]) -> list[dict[str, Any]]:
    """Each operation's dead letters in brief, on one connection: how many, the
    oldest one's time, and how many by path and by reason among the first
    SCAN_LIMIT (``scanned``)."""
    with _connection(url) as connection:
        return [_summarise(connection, operation) for operation in operations]


def held(url: str, operation: str) -> bool:
    """Whether ``sb.dead.<operation>`` exists: it outlives its operation while it holds
    dead letters (deleting an operation deletes it only when empty)."""
    with _connection(url) as connection:
        return _depth(connection, dead_queue(operation)) is not None


def show(url: str, operation: str, count: int = SHOW_DEFAULT) -> dict[str, Any]:
    """The first ``count`` dead letters of ``operation`` (see :func:`describe`),
    left in the queue in their order.

    Raises:
        ValueError: ``count`` is not between 1 and SHOW_LIMIT.
    """
    if not 1 <= count <= SHOW_LIMIT:
        raise ValueError(f"count {count} is out of range: show 1 to {SHOW_LIMIT} at a time")
    queue = dead_queue(operation)
    messages: list[dict[str, Any]] = []
    with _connection(url) as connection:
        total = _depth(connection, queue) or 0
        if total:
            with _peeking(connection) as channel:
                for properties, body in _peek(channel, queue, min(count, total)):
                    messages.append(describe(len(messages) + 1, properties, body))
    return {"operation": operation, "queue": queue, "count": total, "messages": messages}


def requeue(url: str, operation: str, count: int | None = None) -> dict[str, Any]:
    """Move the first ``count`` dead letters of ``operation`` (all it holds now, when
    None) back into ``sb.op.<operation>``, in their order, attempts reset (see
    :func:`requeued_properties`).

    Only what the queue held when this began is moved: a message that fails
    again meanwhile comes back to the tail and must not go round in a loop.

    Raises:
        RequeueError: the input queue refused a copy (it does not exist, or the
            broker nacked it); what was moved before stays moved.
        ValueError: ``count`` is below 1.
    """
    if count is not None and count < 1:
        raise ValueError(f"count {count} is out of range: requeue 1 or more")
    queue, target = dead_queue(operation), operation_queue(operation)
    moved = 0
    with _connection(url) as connection:
        held = _depth(connection, queue) or 0
        wanted = held if count is None else min(count, held)
        if wanted:
            channel = connection.channel()
            channel.confirm_delivery()
            try:
                for _ in range(wanted):
                    method, properties, body = channel.basic_get(queue, auto_ack=False)
                    if method is None:
                        break
                    try:
                        channel.basic_publish("", target, body,
                                              requeued_properties(properties),
                                              mandatory=True)
                    except pika.exceptions.UnroutableError:
                        raise RequeueError(
                            f"queue {target} does not exist, so nothing can go back to "
                            f"{operation}: the manager declares it within seconds of "
                            f"create-operation; try again (requeued {moved} before)",
                            moved) from None
                    except pika.exceptions.NackError:
                        raise RequeueError(
                            f"the broker refused a copy into {target} (nack): is the "
                            f"queue full or the node low on resources? requeued {moved} "
                            "before; try again", moved) from None
                    # Only now: the copy is safe in the input queue.
                    channel.basic_ack(method.delivery_tag)
                    moved += 1
            except pika.exceptions.ChannelClosedByBroker as exc:
                raise RequeueError(f"the broker closed the channel ({exc.reply_code} "
                                   f"{exc.reply_text}) after {moved} requeued; try again",
                                   moved) from None
            finally:
                if channel.is_open:
                    channel.close()
        left = _depth(connection, queue) or 0
    return {"operation": operation, "queue": queue, "to": target, "requeued": moved,
            "left": left}


def purge(url: str, operation: str) -> int:
    """Delete every dead letter ``operation`` holds; return how many went."""
    queue = dead_queue(operation)
    with _connection(url) as connection:
        if _depth(connection, queue) is None:
            return 0
        channel = connection.channel()
        try:
            return channel.queue_purge(queue).method.message_count
        finally:
            if channel.is_open:
                channel.close()
