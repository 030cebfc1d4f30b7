"""The agent's one connection to RabbitMQ: topology checks, consume, confirmed publish.

Every broker quirk lives here: the connection life cycle of pika's
SelectConnection (open, channel, declare, consume; reconnect is the caller's
decision), publisher confirms with their sequence numbers, and the mapping of
AMQP close reasons to one-line explanations.
"""

from __future__ import annotations

import logging
import re
import ssl
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pika
import pika.exceptions
from pika.adapters.select_connection import IOLoop
from pika.adapters.utils.connection_workflow import AMQPConnectorException
from pika.channel import Channel
from pika.spec import Basic

from .config import redact
from .tls import BROKER_CA_ENV, BrokerTLSError, connection_parameters

log = logging.getLogger(__name__)

# Which broker frames the agent cares about: a delivery, and a confirm for
# one (or, with ``multiple``, every earlier) publish.
OnMessage = Callable[[int, pika.BasicProperties, bytes], None]
OnConfirm = Callable[[int, bool, bool], None]
# A mandatory publish that no queue took: (properties, reply text).
OnReturn = Callable[[pika.BasicProperties, str], None]
# A broker's refusal of a message over its max_message_size, which a publisher
# learns only by being refused.
_MAX_SIZE = re.compile(r"larger than configured max size (\d+)")


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
    # Declare-arguments of ``queue`` (and of ``solo_queue``).
    queue_arguments: dict[str, Any] = field(default_factory=dict)
    # A second queue consumed one message at a time, declared like ``queue`` but unbound.
    solo_queue: str | None = None
    # A queue of ours bound to an exchange of ours: dead letters are kept, never unroutable.
    kept: tuple[tuple[str, str], ...] = ()  # (queue, exchange)


# What opening a blocking connection raises when the broker is away or stuck: pika's
# AMQP errors, its connection workflow's own (a handshake that times out, say), which
# are not AMQP errors, and the socket's own from the TLS handshake (a certificate that
# does not verify), which pika re-raises unwrapped.
CONNECT_ERRORS = (pika.exceptions.AMQPError, AMQPConnectorException, OSError)


class BrokerError(Exception):
    """A broker condition the agent cannot work around; the message says what to do."""


def max_size_refused(reason: BaseException) -> int | None:
    """The broker's message size limit, when ``reason`` is its refusal of a larger message."""
    match = _MAX_SIZE.search(str(getattr(reason, "reply_text", "") or reason))
    return int(match.group(1)) if match else None


def _root_cause(error: BaseException) -> str:
    """The innermost reason pika wrapped (e.g. ``Connection refused``)."""
    error = _innermost(error)
    if isinstance(error, ssl.SSLCertVerificationError):
        return error.verify_message or str(error)
    if isinstance(error, OSError):
        return error.strerror or str(error)
    return str(error) or type(error).__name__


def _innermost(error: BaseException) -> BaseException:
    """The innermost exception pika wrapped."""
    for _ in range(8):
        if isinstance(error, OSError):
            return error
        inner = getattr(error, "exceptions", None)
        if inner:
            error = inner[-1]
        elif isinstance(getattr(error, "exception", None), BaseException):
            error = error.exception  # type: ignore[attr-defined]
        elif error.args and isinstance(error.args[0], BaseException):
            error = error.args[0]
        else:
            break
    return error


def explain_close(reason: BaseException, url: str, opening: bool = False) -> str:
    """One line that says why the broker connection went away (or never came)."""
    where = redact(url)
    if isinstance(reason, pika.exceptions.ProbableAuthenticationError |
                  pika.exceptions.ProbableAccessDeniedError):
        return (f"the broker at {where} refused the credentials or vhost: "
                "check the user, password and vhost in STREAMBOSS_BROKER_URL or the config file")
    if isinstance(_innermost(reason), ssl.SSLCertVerificationError):
        return (f"the broker at {where} presented a certificate that does not verify "
                f"({_root_cause(reason)}): set {BROKER_CA_ENV} to the broker's CA certificate "
                "and use the host name its certificate names")
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
        on_solo_message: like ``on_message``, for deliveries from ``topology.solo_queue``.
        on_return: a mandatory publish that no queue took.
        on_refused: the channel was closed after start-up by a refusal (a 406, say)
            that reconnecting gets past; the text says what was refused.
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
        on_solo_message: OnMessage | None = None,
        on_return: OnReturn | None = None,
        on_refused: Callable[[BaseException], None] | None = None,
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
        self._on_solo_message = on_solo_message
        self._on_return = on_return
        self._on_refused = on_refused
        self.connection: pika.SelectConnection | None = None
        self.channel: Channel | None = None
        self.consumer_tag: str | None = None
        self.solo_consumer_tag: str | None = None
        self.publish_seq = 0
        self.ready = False
        self._fatal: str | None = None
        self._closing = False
        self._declared_queues: set[str] = set()

    # -- life cycle ---------------------------------------------------------

    def connect(self) -> None:
        """Open a new connection; progress arrives through the callbacks."""
        self.channel = None
        self.consumer_tag = None
        self.solo_consumer_tag = None
        self.publish_seq = 0
        self.ready = False
        self._fatal = None
        self._closing = False
        self._checking_queue = False
        self._declaring_queue = None
        self._declared_queues = set()
        try:
            params = connection_parameters(self.url)
        except BrokerTLSError as exc:
            # A TLS setting no retry can fix (a CA file that is not there, a CA for a
            # plain amqp:// URL): fatal, reported from the loop like any refusal.
            self.connection = None
            reason = str(exc)
            self.ioloop.call_later(0, lambda: self._on_lost(reason, True))
            return
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
        if self._on_return is not None:
            channel.add_on_return_callback(self._on_basic_return)
        self._check_required(list(self.topology.required))

    def _on_channel_closed(self, _channel: Channel, reason: Exception) -> None:
        self.channel = None
        if self._fatal is None and not self._closing:
            if self.ready:
                # Refused after start-up (a message over the broker's size limit, say):
                # the refusal is about one message, not the configuration, so the
                # agent reconnects rather than exits.
                log.warning("broker closed the channel: %s", reason)
                if self._on_refused is not None:
                    self._on_refused(reason)
            else:
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
        elif code == 406 and self._declaring_queue is not None:
            self._fatal = (f"queue {self._declaring_queue} exists with other arguments (a classic "
                           "queue from an earlier streamboss?): start the stream manager of this "
                           "release, which migrates it, or delete the queue")
        elif code in (403, 406):
            self._fatal = f"the broker refused the agent's topology: {reason}"

    # -- topology -----------------------------------------------------------

    _pending_check: tuple[str, str] | None = None
    _checking_queue = False
    _declaring_queue: str | None = None

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
        self._declare_queues()

    def _declare_queues(self) -> None:
        """The operation's queue bound to its input, the solo queue, the kept queues."""
        assert self.channel is not None
        topology = self.topology
        steps: list[tuple[str, str | None, dict[str, Any]]] = [
            (topology.queue, topology.bind_to, topology.queue_arguments)]
        if topology.solo_queue:
            steps.append((topology.solo_queue, None, topology.queue_arguments))
        steps.extend((queue, exchange, {}) for queue, exchange in topology.kept)

        def declare(remaining: list[tuple[str, str | None, dict[str, Any]]]) -> None:
            assert self.channel is not None
            if not remaining:
                self._declaring_queue = None
                self._on_bound(None)
                return
            queue, exchange, arguments = remaining[0]
            self._declaring_queue = queue

            def bind(_frame: pika.frame.Method) -> None:
                assert self.channel is not None
                if exchange is None:
                    declare(remaining[1:])
                else:
                    self.channel.queue_bind(queue, exchange, routing_key="#",
                                            callback=lambda _f: declare(remaining[1:]))

            self.channel.queue_declare(queue, durable=True, arguments=arguments or None,
                                       callback=bind)

        declare(steps)

    def _on_bound(self, _frame: pika.frame.Method | None) -> None:
        assert self.channel is not None
        self._checking_queue = False
        self.channel.confirm_delivery(ack_nack_callback=self._on_delivery_confirmation,
                                      callback=self._on_confirm_mode)

    def _on_confirm_mode(self, _frame: pika.frame.Method) -> None:
        self._consume(self._after_consume)

    def _after_consume(self) -> None:
        self.ready = True
        self._on_ready()

    def _consume(self, then: Callable[[], None]) -> None:
        """Start the consumers: the solo queue's with a window of one, then the main one.

        ``basic.qos`` without ``global`` applies to consumers started after it on
        the channel, so each consumer gets its own window.
        """
        channel = self.channel
        assert channel is not None
        solo = self.topology.solo_queue

        def main(_frame: pika.frame.Method | None = None) -> None:
            assert self.channel is not None
            self.channel.basic_qos(prefetch_count=self.prefetch, callback=start_main)

        def start_main(_frame: pika.frame.Method) -> None:
            assert self.channel is not None
            self.consumer_tag = self.channel.basic_consume(
                self.topology.queue, self._deliver, exclusive=self.topology.exclusive)
            then()

        def start_solo(_frame: pika.frame.Method) -> None:
            assert self.channel is not None and solo is not None
            self.solo_consumer_tag = self.channel.basic_consume(solo, self._deliver_solo)
            main()

        if solo and self._on_solo_message is not None:
            channel.basic_qos(prefetch_count=1, callback=start_solo)
        else:
            main()

    # -- data ---------------------------------------------------------------

    def _deliver(self, _channel: Channel, method: Basic.Deliver,
                 properties: pika.BasicProperties, body: bytes) -> None:
        self._on_message(method.delivery_tag, properties, body)

    def _deliver_solo(self, _channel: Channel, method: Basic.Deliver,
                      properties: pika.BasicProperties, body: bytes) -> None:
        assert self._on_solo_message is not None
        self._on_solo_message(method.delivery_tag, properties, body)

    def _on_basic_return(self, _channel: Channel, method: Basic.Return,
                         properties: pika.BasicProperties, _body: bytes) -> None:
        assert self._on_return is not None
        self._on_return(properties, f"{method.reply_code} {method.reply_text}")

    def _on_delivery_confirmation(self, frame: pika.frame.Method) -> None:
        method = frame.method
        self._on_confirm(method.delivery_tag, method.multiple, isinstance(method, Basic.Ack))

    def publish(self, exchange: str, body: bytes, properties: pika.BasicProperties,
                routing_key: str = "") -> int:
        """Publish with confirms, ``mandatory`` when returns are handled; return the
        sequence number its confirm will carry."""
        assert self.channel is not None
        self.channel.basic_publish(exchange, routing_key, body, properties,
                                   mandatory=self._on_return is not None)
        self.publish_seq += 1
        return self.publish_seq

    def ensure_queue(self, queue: str, arguments: dict[str, Any],
                     then: Callable[[], None]) -> None:
        """Declare ``queue`` once per connection, then call ``then`` (at once if done)."""
        if queue in self._declared_queues:
            then()
            return
        assert self.channel is not None

        def declared(_frame: pika.frame.Method) -> None:
            self._declared_queues.add(queue)
            then()

        self.channel.queue_declare(queue, durable=True, arguments=arguments, callback=declared)

    def ack(self, delivery_tag: int, multiple: bool) -> None:
        if self.is_open:
            assert self.channel is not None
            self.channel.basic_ack(delivery_tag, multiple=multiple)

    def nack(self, delivery_tag: int, requeue: bool) -> None:
        if self.is_open:
            assert self.channel is not None
            self.channel.basic_nack(delivery_tag, multiple=False, requeue=requeue)

    def queue_depth(self, queue: str, then: Callable[[int], None]) -> None:
        """Ready messages in ``queue`` (a passive declare), passed to ``then``."""
        assert self.channel is not None
        self.channel.queue_declare(queue, passive=True,
                                   callback=lambda frame: then(frame.method.message_count))

    def cancel(self) -> None:
        """Stop consuming; :attr:`on_cancelled` fires once the broker confirmed every
        consumer's cancel."""
        tags = [tag for tag in (self.consumer_tag, self.solo_consumer_tag) if tag is not None]
        self.consumer_tag = self.solo_consumer_tag = None
        then = self._on_cancelled
        if not (self.is_open and tags):
            then()
            return
        # One at a time: pika registers a cancel's callback for any Basic.CancelOk on
        # the channel, so two cancels in flight would each see the first one's reply.
        def cancel_next(_frame: pika.frame.Method | None = None) -> None:
            channel = self.channel
            if not tags or channel is None or not channel.is_open:
                then()
                return
            tag = tags.pop()
            channel.basic_cancel(tag, callback=cancel_next)
            # pika rejects (requeues) deliveries that cross our Basic.Cancel on the
            # wire; AMQP lets a consumer keep them until Basic.CancelOk, and a
            # draining agent should: it handles them like any other, so scale-in
            # requeues nothing (a requeue would count as a delivery without an
            # outcome). pika has no public switch; without this attribute the late
            # deliveries are merely requeued, which loses nothing.
            pending = getattr(channel, "_cancelled", None)
            if isinstance(pending, set):
                pending.discard(tag)

        cancel_next()

    def _on_consumer_cancelled(self, _frame: pika.frame.Method) -> None:
        # The queue was deleted under us: start over, which re-checks the streams.
        log.warning("broker cancelled the consumer on %s; reconnecting", self.topology.queue)
        if self.connection is not None and self.connection.is_open:
            self.connection.close()
