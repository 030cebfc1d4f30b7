"""The agent's one connection to RabbitMQ: topology checks, consume, confirmed publish.

Every broker quirk lives here: the connection life cycle of pika's
SelectConnection (open, channel, declare, consume; reconnect is the caller's
decision), publisher confirms with their sequence numbers, and the mapping of
AMQP close reasons to one-line explanations.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import pika
import pika.exceptions
from pika.adapters.select_connection import IOLoop
from pika.channel import Channel
from pika.spec import Basic

from .config import redact

log = logging.getLogger(__name__)

# Which broker frames the agent cares about: a delivery, and a confirm for
# one (or, with ``multiple``, every earlier) publish.
OnMessage = Callable[[int, pika.BasicProperties, bytes], None]
OnConfirm = Callable[[int, bool, bool], None]


@dataclass(frozen=True)
class Topology:
    """What the agent needs on the broker before it consumes.

    ``required`` exchanges must exist already (streams are declared by their
    owner); ``declared`` exchanges, the queue and its binding are ours to
    create, idempotently.
    """

    required: tuple[tuple[str, str], ...]  # (exchange, what to call it in an error)
    declared: tuple[str, ...]
    queue: str
    bind_to: str
    # A queue someone else owns (an archive's subscription) is only checked, never
    # declared or bound: its owner may have unbound it on purpose.
    own_queue: bool = True
    # One consumer at a time (an archive's index has a single writer).
    exclusive: bool = False


class BrokerError(Exception):
    """A broker condition the agent cannot work around; the message says what to do."""


def _root_cause(error: BaseException) -> str:
    """The innermost reason pika wrapped (e.g. ``Connection refused``)."""
    for _ in range(8):
        if isinstance(error, OSError):
            return error.strerror or str(error)
        inner = getattr(error, "exceptions", None)
        if inner:
            error = inner[-1]
        elif isinstance(getattr(error, "exception", None), BaseException):
            error = error.exception  # type: ignore[attr-defined]
        elif error.args and isinstance(error.args[0], BaseException):
            error = error.args[0]
        else:
            break
    return str(error) or type(error).__name__


def explain_close(reason: BaseException, url: str, opening: bool = False) -> str:
    """One line that says why the broker connection went away (or never came)."""
    where = redact(url)
    if isinstance(reason, pika.exceptions.ProbableAuthenticationError |
                  pika.exceptions.ProbableAccessDeniedError):
        return (f"the broker at {where} refused the credentials or vhost: "
                "check the user, password and vhost in STREAMBOSS_BROKER_URL or the config file")
    if opening:
        return (f"cannot reach the broker at {where} ({_root_cause(reason)}): start RabbitMQ "
                "or set STREAMBOSS_BROKER_URL")
    return f"connection to {where} lost: {_root_cause(reason)}"


class BrokerSession:
    """One connection and channel; call :meth:`connect` again after it is lost.

    Parameters:
        url: AMQP URL (never logged unredacted).
        ioloop: the loop shared with the process runners.
        topology: exchanges and queue to check and declare after opening.
        prefetch: the unacked window the broker may deliver.
        on_ready: called once consuming has started.
        on_message: ``(delivery_tag, properties, body)`` for each delivery.
        on_confirm: ``(publish_seq, multiple, ack)`` for each publisher confirm.
        on_lost: ``(reason_text, fatal)`` when the connection is gone; ``fatal``
            is true for conditions that retrying cannot fix (a missing stream).
        on_cancelled: the broker cancelled the consumer or confirmed our cancel.
    """

    def __init__(
        self,
        url: str,
        ioloop: IOLoop,
        topology: Topology,
        prefetch: int,
        on_ready: Callable[[], None],
        on_message: OnMessage,
        on_confirm: OnConfirm,
        on_lost: Callable[[str, bool], None],
        on_cancelled: Callable[[], None],
        connection_name: str = "streamboss-agent",
    ) -> None:
        self.url = url
        self.connection_name = connection_name
        self.ioloop = ioloop
        self.topology = topology
        self.prefetch = prefetch
        self._on_ready = on_ready
        self._on_message = on_message
        self._on_confirm = on_confirm
        self._on_lost = on_lost
        self._on_cancelled = on_cancelled
        self.connection: pika.SelectConnection | None = None
        self.channel: Channel | None = None
        self.consumer_tag: str | None = None
        self.publish_seq = 0
        self._fatal: str | None = None
        self._closing = False

    # -- life cycle ---------------------------------------------------------

    def connect(self) -> None:
        """Open a new connection; progress arrives through the callbacks."""
        self.channel = None
        self.consumer_tag = None
        self.publish_seq = 0
        self._fatal = None
        self._closing = False
        self._checking_queue = False
        params = pika.URLParameters(self.url)
        # Long transforms must not look like a dead peer; heartbeats run on the loop.
        params.heartbeat = 30
        params.client_properties = {"connection_name": self.connection_name}
        self.connection = pika.SelectConnection(
            parameters=params,
            on_open_callback=self._on_connection_open,
            on_open_error_callback=self._on_connection_open_error,
            on_close_callback=self._on_connection_closed,
            custom_ioloop=self.ioloop,
        )

    def close(self) -> None:
        """Close the connection cleanly; unacked deliveries return to the queue."""
        self._closing = True
        conn = self.connection
        if conn is not None and not (conn.is_closed or conn.is_closing):
            conn.close()

    @property
    def is_open(self) -> bool:
        return self.channel is not None and self.channel.is_open

    def _on_connection_open_error(self, _conn: pika.SelectConnection, error: Exception) -> None:
        self.connection = None
        self._on_lost(explain_close(error, self.url, opening=True), False)

    def _on_connection_closed(self, _conn: pika.SelectConnection, reason: Exception) -> None:
        self.connection = None
        self.channel = None
        if self._fatal is not None:
            self._on_lost(self._fatal, True)
        elif self._closing:
            self._on_lost("closed", False)
        else:
            self._on_lost(explain_close(reason, self.url), False)

    def _on_connection_open(self, conn: pika.SelectConnection) -> None:
        conn.channel(on_open_callback=self._on_channel_open)

    def _on_channel_open(self, channel: Channel) -> None:
        self.channel = channel
        channel.add_on_close_callback(self._on_channel_closed)
        channel.add_on_cancel_callback(self._on_consumer_cancelled)
        self._check_required(list(self.topology.required))

    def _on_channel_closed(self, _channel: Channel, reason: Exception) -> None:
        self.channel = None
        if self._fatal is None and not self._closing:
            self._fatal_if_missing(reason)
        if self.connection is not None and self.connection.is_open:
            self.connection.close()

    def _fatal_if_missing(self, reason: Exception) -> None:
        code = getattr(reason, "reply_code", None)
        if code == 404 and self._pending_check is not None:
            exchange, what = self._pending_check
            stream = exchange.removeprefix("sb.stream.")
            self._fatal = (f"{what} {stream!r} does not exist (no exchange {exchange} on the "
                           f"broker): create it first, e.g. `streamboss create-stream {stream}`")
        elif code == 404 and self._checking_queue:
            self._fatal = (f"queue {self.topology.queue} does not exist on the broker: the "
                           "manager declares it")
        elif code in (403, 406):
            self._fatal = f"the broker refused the agent's topology: {reason}"

    # -- topology -----------------------------------------------------------

    _pending_check: tuple[str, str] | None = None
    _checking_queue = False

    def _check_required(self, remaining: list[tuple[str, str]]) -> None:
        assert self.channel is not None
        if not remaining:
            self._pending_check = None
            self._declare(list(self.topology.declared))
            return
        exchange, what = remaining[0]
        self._pending_check = (exchange, what)
        self.channel.exchange_declare(
            exchange, exchange_type="topic", passive=True,
            callback=lambda _frame: self._check_required(remaining[1:]),
        )

    def _declare(self, remaining: list[str]) -> None:
        assert self.channel is not None
        if remaining:
            self.channel.exchange_declare(
                remaining[0], exchange_type="topic", durable=True,
                callback=lambda _frame: self._declare(remaining[1:]),
            )
            return
        if not self.topology.own_queue:
            self._checking_queue = True
            self.channel.queue_declare(self.topology.queue, passive=True,
                                       callback=self._on_bound)
            return
        self.channel.queue_declare(self.topology.queue, durable=True, callback=self._on_queue)

    def _on_queue(self, _frame: pika.frame.Method) -> None:
        assert self.channel is not None
        self.channel.queue_bind(self.topology.queue, self.topology.bind_to, routing_key="#",
                                callback=self._on_bound)

    def _on_bound(self, _frame: pika.frame.Method) -> None:
        assert self.channel is not None
        self._checking_queue = False
        self.channel.confirm_delivery(ack_nack_callback=self._on_delivery_confirmation,
                                      callback=self._on_confirm_mode)

    def _on_confirm_mode(self, _frame: pika.frame.Method) -> None:
        assert self.channel is not None
        self.channel.basic_qos(prefetch_count=self.prefetch, callback=self._on_qos)

    def _on_qos(self, _frame: pika.frame.Method) -> None:
        assert self.channel is not None
        self.consumer_tag = self.channel.basic_consume(self.topology.queue, self._deliver,
                                                       exclusive=self.topology.exclusive)
        self._on_ready()

    # -- data ---------------------------------------------------------------

    def _deliver(self, _channel: Channel, method: Basic.Deliver,
                 properties: pika.BasicProperties, body: bytes) -> None:
        self._on_message(method.delivery_tag, properties, body)

    def _on_delivery_confirmation(self, frame: pika.frame.Method) -> None:
        method = frame.method
        self._on_confirm(method.delivery_tag, method.multiple, isinstance(method, Basic.Ack))

    def publish(self, exchange: str, body: bytes, properties: pika.BasicProperties) -> int:
        """Publish with confirms; return the sequence number its confirm will carry."""
        assert self.channel is not None
        self.channel.basic_publish(exchange, "", body, properties)
        self.publish_seq += 1
        return self.publish_seq

    def ack(self, delivery_tag: int, multiple: bool) -> None:
        if self.is_open:
            assert self.channel is not None
            self.channel.basic_ack(delivery_tag, multiple=multiple)

    def nack(self, delivery_tag: int, requeue: bool) -> None:
        if self.is_open:
            assert self.channel is not None
            self.channel.basic_nack(delivery_tag, multiple=False, requeue=requeue)

    def cancel(self) -> None:
        """Stop consuming; :attr:`on_cancelled` fires once the broker agrees."""
        if self.is_open and self.consumer_tag is not None:
            assert self.channel is not None
            self.channel.basic_cancel(self.consumer_tag,
                                      callback=lambda _frame: self._on_cancelled())
            # pika rejects (requeues) deliveries that cross our Basic.Cancel on the
            # wire; AMQP lets a consumer keep them until Basic.CancelOk, and a
            # draining agent should: it handles them like any other, so scale-in
            # requeues nothing. pika has no public switch; without this attribute
            # the late deliveries are merely requeued, which loses nothing.
            cancelled = getattr(self.channel, "_cancelled", None)
            if isinstance(cancelled, set):
                cancelled.discard(self.consumer_tag)
        else:
            self._on_cancelled()

    def _on_consumer_cancelled(self, _frame: pika.frame.Method) -> None:
        # The queue was deleted under us: start over, which re-checks the streams.
        log.warning("broker cancelled the consumer on %s; reconnecting", self.topology.queue)
        if self.connection is not None and self.connection.is_open:
            self.connection.close()
