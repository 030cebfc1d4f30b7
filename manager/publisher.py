"""A fast confirmed publisher for bulk loads (replay, ``publish`` from stdin).

Waiting for each publisher confirm caps a client at about one message per
round trip. This one keeps a window of unconfirmed messages in flight on a
pika SelectConnection (as pika's asynchronous publisher example does), so it
runs at the broker's pace, and still returns only once the broker has
confirmed every message. An optional rate limit paces it.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator

import pika
import pika.exceptions
import pika.frame
from pika.adapters.select_connection import IOLoop
from pika.channel import Channel
from pika.spec import Basic

from streamboss.agent.broker import explain_close
from streamboss.agent.naming import stream_exchange
from streamboss.agent.tls import connection_parameters

# Unconfirmed messages in flight: enough to hide the round trip at ~10k msg/s,
# small enough that a refusal is noticed within a fraction of a second.
DEFAULT_WINDOW = 1000
# Published per turn of the loop before confirms are read again.
BATCH = 200

Message = tuple[bytes, pika.BasicProperties]


class PublishError(RuntimeError):
    """The broker refused, or went away; the message says what to do."""


class ConfirmedPublisher:
    """Publish an iterable of ``(body, properties)`` to one stream, confirmed.

    Parameters:
        url: AMQP URL.
        stream: the target stream (checked to exist before the first message).
        window: unconfirmed messages allowed in flight.
        rate: messages per second at most (None: as fast as the broker confirms).
        on_progress: called with the number of messages just confirmed.
    """

    def __init__(self, url: str, stream: str, *, window: int = DEFAULT_WINDOW,
                 rate: float | None = None,
                 on_progress: Callable[[int], None] | None = None) -> None:
        self.url = url
        self.stream = stream
        self.exchange = stream_exchange(stream)
        self.window = max(1, window)
        self.rate = rate
        self.on_progress = on_progress
        self.published = 0
        self.confirmed = 0
        self._messages: Iterator[Message] = iter(())
        # Sequence numbers not yet confirmed, in order, and those confirmed singly
        # ahead of an older one.
        self._pending: deque[int] = deque()
        self._early: set[int] = set()
        self._exhausted = False
        self._error: str | None = None
        self._ioloop = IOLoop()
        self._connection: pika.SelectConnection | None = None
        self._channel: Channel | None = None
        self._started = 0.0
        self._timer: object | None = None

    def run(self, messages: Iterable[Message]) -> int:
        """Publish every message; return how many the broker confirmed.

        Raises:
            PublishError: the broker is away, the stream does not exist, the
                broker refused a message, or the connection was lost. Messages
                confirmed before that are :attr:`confirmed`.
        """
        self._messages = iter(messages)
        params = connection_parameters(self.url)
        params.client_properties = {"connection_name": "streamboss-publisher"}
        self._connection = pika.SelectConnection(
            parameters=params, on_open_callback=self._on_open,
            on_open_error_callback=self._on_open_error, on_close_callback=self._on_closed,
            custom_ioloop=self._ioloop)
        try:
            self._ioloop.start()
        finally:
            self._ioloop.close()
        if self._error is not None:
            raise PublishError(self._error)
        return self.confirmed

    # -- connection life cycle ----------------------------------------------------

    def _on_open_error(self, _conn: pika.SelectConnection, error: Exception) -> None:
        self._error = explain_close(error, self.url, opening=True)
        self._ioloop.stop()

    def _on_closed(self, _conn: pika.SelectConnection, reason: Exception) -> None:
        if self._error is None and not self._done:
            self._error = explain_close(reason, self.url)
        self._ioloop.stop()

    def _on_open(self, connection: pika.SelectConnection) -> None:
        connection.channel(on_open_callback=self._on_channel)

    def _on_channel(self, channel: Channel) -> None:
        self._channel = channel
        channel.add_on_close_callback(self._on_channel_closed)
        channel.exchange_declare(self.exchange, exchange_type="topic", passive=True,
                                 callback=self._on_stream_checked)

    def _on_channel_closed(self, _channel: Channel, reason: Exception) -> None:
        if self._error is None and not self._done:
            if getattr(reason, "reply_code", None) == 404 and self.published == 0:
                self._error = (f"stream {self.stream!r} does not exist: create it with "
                               f"`streamboss create-stream {self.stream}`")
            else:
                self._error = f"the broker closed the channel: {reason}"
        self._close()

    def _on_stream_checked(self, _frame: pika.frame.Method) -> None:
        assert self._channel is not None
        self._channel.confirm_delivery(ack_nack_callback=self._on_confirm,
                                       callback=lambda _frame: self._start())

    def _start(self) -> None:
        self._started = time.monotonic()
        self._pump()

    @property
    def _done(self) -> bool:
        return self._exhausted and self.confirmed == self.published

    def _close(self) -> None:
        if self._connection is not None and not (self._connection.is_closing
                                                 or self._connection.is_closed):
            self._connection.close()
        else:
            self._ioloop.stop()

    # -- publishing -------------------------------------------------------------------

    def _pump(self) -> None:
        self._timer = None
        channel = self._channel
        if channel is None or not channel.is_open or self._error is not None:
            return
        sent = 0
        while not self._exhausted and self.published - self.confirmed < self.window \
                and sent < BATCH:
            if self.rate is not None:
                due = self._started + self.published / self.rate
                wait = due - time.monotonic()
                if wait > 0:
                    self._timer = self._ioloop.call_later(wait, self._pump)
                    return
            try:
                body, properties = next(self._messages)
            except StopIteration:
                self._exhausted = True
                break
            except Exception as exc:  # the source failed (a corrupt segment): stop here
                self._error = str(exc) or type(exc).__name__
                self._close()
                return
            channel.basic_publish(self.exchange, "", body, properties)
            self.published += 1
            self._pending.append(self.published)
            sent += 1
        if self._done:
            self._close()
        elif sent == BATCH and not self._exhausted and self._timer is None:
            # Let the loop write and read confirms before the next batch.
            self._ioloop.add_callback_threadsafe(self._pump)

    def _settle(self, tag: int, multiple: bool) -> None:
        """Count confirms exactly, whether they come singly, out of order or several at once."""
        pending, early = self._pending, self._early
        if multiple:
            while pending and pending[0] <= tag:
                seq = pending.popleft()
                if seq in early:
                    early.discard(seq)
                else:
                    self.confirmed += 1
        elif pending and pending[0] == tag:
            pending.popleft()
            self.confirmed += 1
        else:
            early.add(tag)
            self.confirmed += 1
        while pending and pending[0] in early:
            early.discard(pending.popleft())

    def _on_confirm(self, frame: pika.frame.Method) -> None:
        method = frame.method
        if not isinstance(method, Basic.Ack):
            self._error = (f"the broker refused message(s) up to #{method.delivery_tag} on "
                           f"{self.stream!r} (a queue over its length limit, or the broker "
                           "out of resources); messages before it were published")
            self._close()
            return
        before = self.confirmed
        self._settle(method.delivery_tag, method.multiple)
        if self.on_progress is not None and self.confirmed > before:
            self.on_progress(self.confirmed - before)
        if self._done:
            self._close()
        elif self._timer is None:
            self._pump()
