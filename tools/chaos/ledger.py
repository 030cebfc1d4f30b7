"""Counting what comes out of the chain: every output, every dead letter, and when.

The harness follows the chain's output through its durable subscription (declared
before the first publish, so nothing can be missed, and kept through a broker
restart) with manual acks, and its own copy of the dead letters the same way. It
also watches the two intermediate streams through exclusive queues, only for the
times at which outputs arrive there (to tell when an operation flows again after a
fault on it); what a broker restart drops there is of no account.

A delivery that the harness's own consumer receives twice (its ack was lost with
its connection) is not a duplicate of the chain: it comes back ``redelivered``,
with an id among the last ``PREFETCH`` this consumer saw before it reconnected,
and is counted apart.
"""

from __future__ import annotations

import bisect
import contextlib
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pika
from pika.adapters.blocking_connection import BlockingChannel
from pika.spec import Basic

from streamboss.agent.dedup import SeenIds
from streamboss.agent.headers import message_id

from .chain import Chain

# Unacked deliveries the harness's consumer allows itself; also how far back it
# looks when telling its own redeliveries from the chain's duplicates.
PREFETCH = 500
RECONNECT_PAUSE = 0.5


def _text(value: Any) -> str | None:
    if value is None:
        return None
    return value.decode(errors="replace") if isinstance(value, bytes) else str(value)


@dataclass
class DeadLetter:
    """One dead letter of the chain, as the harness's copy received it."""

    at: float
    body: bytes
    headers: dict[str, Any]
    # The dead-letter stream's exchange it came through: names the operation.
    exchange: str

    def header(self, name: str) -> Any:
        value = self.headers.get(name)
        return _text(value) if isinstance(value, bytes) else value

    @property
    def delivery_limit_deaths(self) -> list[dict[str, Any]]:
        """The broker's ``x-death`` entries for its delivery-limit backstop."""
        deaths = self.headers.get("x-death") or []
        return [d for d in deaths if isinstance(d, dict)
                and _text(d.get("reason")) == "delivery_limit"]

    @property
    def operation(self) -> str:
        return self.exchange.removeprefix("sb.stream.").removesuffix(".dead")


@dataclass
class Flow:
    """Arrival times (``time.time()``) of messages on one stream, in order."""

    times: list[float] = field(default_factory=list)

    def first_after(self, moment: float) -> float | None:
        index = bisect.bisect_right(self.times, moment)
        return self.times[index] if index < len(self.times) else None


class Tally:
    """Deliveries at the chain's end, per sequence number, and the dead letters.

    Parameters:
        chain: names the run and parses its bodies.
        messages: N, the sequence numbers 0 .. N-1.
        dedup_window: the ``--dedup`` window to apply as a consumer would.
    """

    def __init__(self, chain: Chain, messages: int, dedup_window: int) -> None:
        self.chain = chain
        self.lock = threading.Lock()
        self.counts = [0] * messages
        self.after_dedup = [0] * messages
        # The memory ``streamboss consume --dedup N`` keeps, applied to the same ids.
        self.dedup = SeenIds(dedup_window)
        self.output = Flow()
        self.distinct = 0
        self.deliveries = 0
        self.wrong_bodies: list[tuple[int, bytes]] = []
        self.strangers: list[bytes] = []
        self.poison_outputs = 0
        self.own_redeliveries = 0
        self.consumer_reconnects = 0
        self.dead: list[DeadLetter] = []
        self.poison_dead: DeadLetter | None = None

    def on_output(self, body: bytes, properties: pika.BasicProperties) -> None:
        now = time.time()
        seq = self.chain.sequence(body)
        with self.lock:
            self.output.times.append(now)
            self.deliveries += 1
            if seq is None or not 0 <= seq < len(self.counts):
                if self.chain.poison_marker.encode() in body:
                    self.poison_outputs += 1
                elif len(self.strangers) < 5:
                    self.strangers.append(body[:120])
                return
            if body != self.chain.body(seq).upper():
                self.wrong_bodies.append((seq, body[:120]))
            if self.counts[seq] == 0:
                self.distinct += 1
            self.counts[seq] += 1
            if self.dedup.first_time(message_id(properties)):
                self.after_dedup[seq] += 1

    def on_dead(self, body: bytes, properties: pika.BasicProperties, exchange: str) -> None:
        letter = DeadLetter(time.time(), body, dict(properties.headers or {}), exchange)
        with self.lock:
            self.dead.append(letter)
            if self.poison_dead is None and self.chain.poison_marker.encode() in body.upper():
                self.poison_dead = letter

    def snapshot(self) -> tuple[int, int, int]:
        """``(distinct delivered, deliveries, dead letters)`` now."""
        with self.lock:
            return self.distinct, self.deliveries, len(self.dead)


OnMessage = Callable[[str, Basic.Deliver, pika.BasicProperties, bytes], None]


class Follower(threading.Thread):
    """Consumes some queues on one connection of its own, reconnecting until stopped.

    Parameters:
        url: the broker.
        name: the connection's name (as the management API shows it).
        declare: (re)declares the queues and returns their names; runs on every
            connection, so exclusive queues come back after a broker restart.
        on_message: ``(queue, method, properties, body)`` for each delivery.
        ack: manual acks (after ``on_message``) rather than automatic ones.
    """

    def __init__(self, url: str, name: str, declare: Callable[[BlockingChannel], list[str]],
                 on_message: OnMessage, ack: bool) -> None:
        super().__init__(name=name, daemon=True)
        self.url = url
        self.connection_name = name
        self.declare = declare
        self.on_message = on_message
        self.ack = ack
        self.stopping = threading.Event()
        self.connected = threading.Event()
        self.reconnects = 0
        self.last_error: str | None = None

    def run(self) -> None:
        while not self.stopping.is_set():
            connection: pika.BlockingConnection | None = None
            try:
                params = pika.URLParameters(self.url)
                params.client_properties = {"connection_name": self.connection_name}
                connection = pika.BlockingConnection(params)
                channel = connection.channel()
                channel.basic_qos(prefetch_count=PREFETCH)
                for queue in self.declare(channel):
                    channel.basic_consume(queue, self._callback(queue),
                                          auto_ack=not self.ack)
                self.connected.set()
                while not self.stopping.is_set():
                    connection.process_data_events(time_limit=0.2)
            # pika's connection workflow errors are not all AMQPErrors; whatever it
            # was, a new connection is the cure.
            except Exception as exc:
                self.last_error = f"{type(exc).__name__}: {exc}"
            finally:
                self.connected.clear()
                if connection is not None and connection.is_open:
                    with contextlib.suppress(Exception):
                        connection.close()
            if not self.stopping.is_set():
                self.reconnects += 1
                self.stopping.wait(RECONNECT_PAUSE)

    def _callback(self, queue: str) -> Callable[..., None]:
        def deliver(channel: BlockingChannel, method: Basic.Deliver,
                    properties: pika.BasicProperties, body: bytes) -> None:
            self.on_message(queue, method, properties, body)
            if self.ack:
                channel.basic_ack(method.delivery_tag)
        return deliver

    def stop(self) -> None:
        self.stopping.set()
        if self.ident is not None:
            self.join(timeout=10)


class Ledger:
    """The harness's consumers: outputs and dead letters (durable, acked) and the flow
    on each intermediate stream (exclusive, auto-acked)."""

    def __init__(self, url: str, chain: Chain, messages: int, dedup_window: int) -> None:
        self.chain = chain
        self.tally = Tally(chain, messages, dedup_window)
        self.flows: dict[str, Flow] = {s: Flow() for s in chain.streams[1:-1]}
        self.flows[chain.tail] = self.tally.output
        self._flow_lock = threading.Lock()
        # Ids this consumer saw last on its previous connection: the only ones that can
        # come back to it as its own redeliveries.
        self._recent: deque[tuple[str, str | None]] = deque(maxlen=PREFETCH)
        self._suspects: set[tuple[str, str | None]] = set()
        self._watch_queues: dict[str, str] = {}
        self.durable = Follower(url, "streamboss-chaos-ledger", self._declare_durable,
                                self._on_durable, ack=True)
        self.watch = Follower(url, "streamboss-chaos-watch", self._declare_watch,
                              self._on_watch, ack=False)

    def start(self, timeout: float = 30) -> None:
        self.durable.start()
        self.watch.start()
        for follower in (self.durable, self.watch):
            if not follower.connected.wait(timeout):
                raise RuntimeError(f"{follower.name} could not consume within {timeout:.0f} s: "
                                   f"{follower.last_error}")

    def stop(self) -> None:
        self.watch.stop()
        self.durable.stop()

    def _declare_durable(self, channel: BlockingChannel) -> list[str]:
        # Declared (with their bindings) by Admin.subscribe before the first publish;
        # declaring again is idempotent and finds them after a broker restart.
        channel.queue_declare(self.chain.output_queue, durable=True)
        channel.queue_declare(self.chain.dead_queue, durable=True)
        self._suspects = set(self._recent)
        self._recent.clear()
        return [self.chain.output_queue, self.chain.dead_queue]

    def _on_durable(self, queue: str, method: Basic.Deliver, properties: pika.BasicProperties,
                    body: bytes) -> None:
        key = (queue, message_id(properties))
        if method.redelivered and key in self._suspects:
            self._suspects.discard(key)
            with self.tally.lock:
                self.tally.own_redeliveries += 1
            return
        self._recent.append(key)
        if queue == self.chain.output_queue:
            self.tally.on_output(body, properties)
        else:
            self.tally.on_dead(body, properties, method.exchange)

    def _declare_watch(self, channel: BlockingChannel) -> list[str]:
        queues = []
        for stream in self.chain.streams[1:-1]:
            queue = channel.queue_declare("", exclusive=True, auto_delete=True).method.queue
            channel.queue_bind(queue, f"sb.stream.{stream}", "#")
            queues.append(queue)
        self._watch_queues = dict(zip(queues, self.chain.streams[1:-1], strict=True))
        return queues

    def _on_watch(self, queue: str, _method: Basic.Deliver, _properties: pika.BasicProperties,
                  _body: bytes) -> None:
        flow = self.flows[self._watch_queues[queue]]
        with self._flow_lock:
            flow.times.append(time.time())

    def first_after(self, stream: str, moment: float) -> float | None:
        """When the first message after ``moment`` arrived on ``stream``; None if none yet."""
        lock = self.tally.lock if stream == self.chain.tail else self._flow_lock
        with lock:
            return self.flows[stream].first_after(moment)
