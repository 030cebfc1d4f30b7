"""The manager's view of and hand on the broker.

Topology is declared over AMQP (the same names the agent uses). Demand needs
to know which queues are bound to a stream, which AMQP cannot list: that comes
from RabbitMQ's management HTTP API, and each queue's depth and consumer
count from an AMQP passive declare (immediate, where the management API's
statistics lag by seconds).
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass
from urllib.parse import quote, unquote, urlsplit

import httpx
import pika
import pika.exceptions
from pika.adapters.blocking_connection import BlockingChannel

from streamboss.agent.broker import explain_close
from streamboss.agent.naming import (
    OPERATION_PREFIX,
    archive_queue,
    dead_stream,
    operation_queue,
    stream_exchange,
)

log = logging.getLogger(__name__)

MANAGEMENT_PORT = 15672
# A hung management API must not stall the reconciler's pass for long.
MANAGEMENT_TIMEOUT = 3.0


class BrokerUnavailable(RuntimeError):
    """The broker (or its management API) cannot be reached; the message says where."""


@dataclass(frozen=True)
class QueueState:
    messages: int
    consumers: int
    # Another connection's exclusive queue: its depth is hidden from us, but it
    # lives exactly as long as the connection that consumes from it.
    locked: bool = False


@dataclass(frozen=True)
class Subscriber:
    """A queue bound to a stream."""

    queue: str
    consumers: int
    exclusive: bool

    @property
    def operation(self) -> str | None:
        """The operation this queue feeds, if it is an operation's queue."""
        if self.queue.startswith(OPERATION_PREFIX):
            return self.queue[len(OPERATION_PREFIX):]
        return None


class Broker:
    """A blocking AMQP connection plus the management API, reopened when lost."""

    def __init__(self, url: str, management_url: str | None = None) -> None:
        self.url = url
        parts = urlsplit(url)
        self.vhost = unquote(parts.path[1:]) if len(parts.path) > 1 else "/"
        self._auth = (unquote(parts.username or "guest"), unquote(parts.password or "guest"))
        scheme = "https" if parts.scheme == "amqps" else "http"
        self.management_url = management_url or f"{scheme}://{parts.hostname or '127.0.0.1'}:" \
                                                 f"{MANAGEMENT_PORT}"
        self._connection: pika.BlockingConnection | None = None
        self._channel: BlockingChannel | None = None
        self._http = httpx.Client(base_url=self.management_url, auth=self._auth,
                                  timeout=MANAGEMENT_TIMEOUT)

    def close(self) -> None:
        self._http.close()
        self.reset()

    def reset(self) -> None:
        """Drop the AMQP connection; the next call opens a fresh one."""
        if self._connection is not None and self._connection.is_open:
            with contextlib.suppress(pika.exceptions.AMQPError):
                self._connection.close()
        self._connection = self._channel = None

    def channel(self) -> BlockingChannel:
        """An open channel, reconnecting if needed.

        Raises:
            BrokerUnavailable: the broker cannot be reached.
        """
        if self._channel is not None and self._channel.is_open:
            return self._channel
        if self._connection is None or not self._connection.is_open:
            try:
                params = pika.URLParameters(self.url)
                params.client_properties = {"connection_name": "streamboss-manager"}
                self._connection = pika.BlockingConnection(params)
            except pika.exceptions.AMQPError as exc:
                raise BrokerUnavailable(explain_close(exc, self.url, opening=True)) from None
        self._channel = self._connection.channel()
        return self._channel

    # -- topology ------------------------------------------------------------

    def ensure_stream(self, name: str) -> None:
        self.channel().exchange_declare(stream_exchange(name), "topic", durable=True)

    def delete_stream(self, name: str) -> None:
        self.channel().exchange_delete(stream_exchange(name))

    def ensure_operation(self, name: str, input_stream: str) -> None:
        """The operation's queue bound to its input, and its dead-letter stream."""
        channel = self.channel()
        channel.exchange_declare(stream_exchange(dead_stream(name)), "topic", durable=True)
        channel.queue_declare(operation_queue(name), durable=True)
        channel.queue_bind(operation_queue(name), stream_exchange(input_stream), "#")

    def ensure_dead_queue(self, operation: str, queue: str) -> None:
        """Keep ``operation``'s dead letters in ``queue``: a stream drops what nobody holds."""
        channel = self.channel()
        channel.queue_declare(queue, durable=True)
        channel.queue_bind(queue, stream_exchange(dead_stream(operation)), "#")

    def delete_operation(self, name: str, dead_queue: str) -> None:
        """Remove the operation's queue, and its dead-letter queue and stream when empty."""
        channel = self.channel()
        channel.queue_delete(operation_queue(name))
        try:
            channel.queue_delete(dead_queue, if_empty=True)
        except pika.exceptions.ChannelClosedByBroker as exc:
            # 406: dead letters are waiting; someone should read them before they go.
            self._channel = None
            if exc.reply_code != 406:
                raise
            return
        channel.exchange_delete(stream_exchange(dead_stream(name)))

    def ensure_archive(self, stream: str) -> None:
        """The archive's durable subscription, bound to every message of ``stream``."""
        channel = self.channel()
        channel.queue_declare(archive_queue(stream), durable=True)
        channel.queue_bind(archive_queue(stream), stream_exchange(stream), "#")

    def unbind_archive(self, stream: str) -> None:
        """Stop new messages reaching the archive; what it holds can still be drained."""
        channel = self.channel()
        try:
            channel.queue_unbind(archive_queue(stream), stream_exchange(stream), "#")
        except pika.exceptions.ChannelClosedByBroker as exc:
            self._channel = None
            if exc.reply_code != 404:  # the queue or the stream is gone already
                raise

    def delete_archive(self, stream: str) -> bool:
        """Delete the archive's subscription if it is empty; return whether it was."""
        try:
            self.channel().queue_delete(archive_queue(stream), if_empty=True)
        except pika.exceptions.ChannelClosedByBroker as exc:
            self._channel = None
            if exc.reply_code != 406:  # 406: a message came back (an archiver died)
                raise
            return False
        return True

    # -- observation -----------------------------------------------------------

    def queue_state(self, queue: str) -> QueueState | None:
        """Depth and consumers of ``queue``; None when it does not exist."""
        try:
            frame = self.channel().queue_declare(queue, passive=True)
        except pika.exceptions.ChannelClosedByBroker as exc:
            self._channel = None
            if exc.reply_code == 404:
                return None
            if exc.reply_code == 405:
                return QueueState(0, 1, locked=True)
            raise
        return QueueState(frame.method.message_count, frame.method.consumer_count)

    def subscribers(self, stream: str) -> list[Subscriber]:
        """Every queue bound to ``stream``, with its consumer count.

        Raises:
            BrokerUnavailable: the management API cannot be reached.
        """
        path = f"/api/exchanges/{quote(self.vhost, safe='')}/" \
               f"{quote(stream_exchange(stream), safe='')}/bindings/source"
        try:
            response = self._http.get(path)
        except httpx.HTTPError as exc:
            raise BrokerUnavailable(
                f"cannot reach RabbitMQ's management API at {self.management_url} ({exc}): "
                "enable it with `rabbitmq-plugins enable rabbitmq_management`") from None
        if response.status_code == 404:
            return []
        if response.status_code != 200:
            raise BrokerUnavailable(f"management API answered {response.status_code} for "
                                    f"{path}: check the broker user's management tag")
        found: dict[str, Subscriber] = {}
        for binding in response.json():
            if binding.get("destination_type") != "queue":
                continue
            queue = binding["destination"]
            if queue in found:
                continue
            state = self.queue_state(queue)
            if state is None:
                continue
            found[queue] = Subscriber(queue, state.consumers, state.locked)
        return list(found.values())

    def queue_rates(self, queue: str) -> tuple[float, float] | None:
        """Messages/s into and acked out of ``queue`` (management statistics, a few
        seconds behind), or None when the management API cannot say."""
        path = f"/api/queues/{quote(self.vhost, safe='')}/{quote(queue, safe='')}"
        try:
            response = self._http.get(path)
        except httpx.HTTPError:
            return None
        if response.status_code != 200:
            return None
        body = response.json()
        stats = (body.get("message_stats") if isinstance(body, dict) else None) or {}
        rate_in = (stats.get("publish_details") or {}).get("rate", 0.0)
        rate_out = (stats.get("ack_details") or {}).get("rate", 0.0)
        return float(rate_in), float(rate_out)

    def management_available(self) -> bool:
        try:
            return self._http.get("/api/overview").status_code == 200
        except httpx.HTTPError:
            return False
