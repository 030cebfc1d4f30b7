"""``publish`` and ``consume``: talk to a stream on the broker directly."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import pika
import pika.exceptions

from streamboss.agent.broker import CONNECT_ERRORS, explain_close
from streamboss.agent.dedup import SeenIds
from streamboss.agent.headers import message_id, output_properties
from streamboss.agent.naming import stream_exchange
from streamboss.agent.tls import connection_parameters

SOURCE = "/streamboss/cli"


class StreamError(RuntimeError):
    """A stream that cannot be used; the message says why."""


def _connect(url: str) -> pika.BlockingConnection:
    try:
        return pika.BlockingConnection(connection_parameters(url))
    except CONNECT_ERRORS as exc:
        raise StreamError(explain_close(exc, url, opening=True)) from None


def _check_stream(channel: pika.adapters.blocking_connection.BlockingChannel,
                  stream: str) -> None:
    try:
        channel.exchange_declare(stream_exchange(stream), "topic", passive=True)
    except pika.exceptions.ChannelClosedByBroker:
        raise StreamError(f"stream {stream!r} does not exist: create it with "
                          f"`streamboss create-stream {stream}`") from None


def check_stream(url: str, stream: str) -> None:
    """Raises: StreamError when the broker is away or ``stream`` does not exist."""
    connection = _connect(url)
    try:
        _check_stream(connection.channel(), stream)
    finally:
        if connection.is_open:
            connection.close()


def publish(url: str, stream: str, messages: Iterable[bytes],
            headers: dict[str, Any] | None = None) -> int:
    """Publish each message with confirms; return how many the broker confirmed.

    Raises:
        StreamError: the broker is away or the stream does not exist.
    """
    connection = _connect(url)
    try:
        channel = connection.channel()
        _check_stream(channel, stream)
        channel.confirm_delivery()
        count = 0
        exchange = stream_exchange(stream)
        for body in messages:
            channel.basic_publish(exchange, "", body,
                                  output_properties(stream, SOURCE, None, headers))
            count += 1
        return count
    finally:
        if connection.is_open:
            connection.close()


def consume(url: str, stream: str, on_message: Callable[[bytes, pika.BasicProperties], None],
            count: int | None = None, timeout: float | None = None, dedup: int = 0) -> int:
    """Follow ``stream`` through an exclusive queue until ``count`` messages or ``timeout``
    seconds without one; return how many were handed to ``on_message``.

    With ``dedup`` > 0, a message whose id (``sb-id``, else the AMQP message-id)
    is among the last ``dedup`` distinct ids handed over is acked and dropped: it
    is not handed over and not counted. Messages without an id are always handed
    over.

    Raises:
        StreamError: the broker is away or the stream does not exist.
    """
    seen = SeenIds(dedup) if dedup > 0 else None
    connection = _connect(url)
    received = 0
    try:
        channel = connection.channel()
        _check_stream(channel, stream)
        queue = channel.queue_declare("", exclusive=True, auto_delete=True).method.queue
        channel.queue_bind(queue, stream_exchange(stream), "#")
        channel.basic_qos(prefetch_count=100)
        for method, properties, body in channel.consume(queue, inactivity_timeout=timeout):
            if method is None:
                break
            if seen is not None and not seen.first_time(message_id(properties)):
                channel.basic_ack(method.delivery_tag)
                continue
            on_message(body, properties)
            channel.basic_ack(method.delivery_tag)
            received += 1
            if count is not None and received >= count:
                break
        return received
    finally:
        if connection.is_open:
            connection.close()
