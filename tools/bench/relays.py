"""The benchmark's baseline relays and its latency publisher, one per process.

The harness runs each of these as its own process (``python relays.py KIND ...``)
so that a baseline is started, fed and timed exactly like the agent: from the
outside, by watching the capture queue. Only the standard library and pika are
used here (``plain-headers`` also imports the agent's header module), so the
file also runs as a plain script.

Kinds:

``plain``  the reference relay: ``SelectConnection``, consume the input queue
           (prefetch 200), publish each body to the output exchange with publisher
           confirms, and ack the inputs (``multiple``) as their outputs are confirmed.
``plain-headers``  the same, but every output carries the headers the agent puts on
           its outputs (built per message by ``streamboss.agent.headers``): what the
           DESIGN's header set costs the broker and a relay, without the agent.
``naive``  ``BlockingConnection`` with ``confirm_delivery``: publish, wait for its
           confirm, ack, one message at a time.
``spawn``  ``BlockingConnection``: per message ``subprocess.run(["tr", "a-z", "A-Z"])``,
           publish (unconfirmed, in the baseline's favour), ack.
``publish``  the latency publisher: fixed rate, ``time.monotonic_ns()`` stamped into
           each 100-byte body just before ``basic_publish``.

With ``--count N`` a relay exits after its N-th ack and prints a JSON line with its
own view of the time; with ``--count 0`` it runs until SIGTERM.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from collections import deque
from collections.abc import Callable
from types import FrameType
from typing import Any

import pika
import pika.channel
import pika.frame
from pika.adapters.blocking_connection import BlockingChannel
from pika.spec import Basic

DEFAULT_URL = "amqp://guest:guest@127.0.0.1:5672/%2F"
BODY_SIZE = 100
PREFETCH = 200
PERSISTENT = pika.BasicProperties(delivery_mode=2)
_ALPHABET = b"abcdefghijklmnopqrstuvwxyz"
_LETTERS = _ALPHABET * (BODY_SIZE // len(_ALPHABET) + 2)
# A latency body: 20-digit monotonic_ns stamp, space, 9-digit sequence, space, letters.
STAMP_DIGITS = 20
SEQ_DIGITS = 9


def broker_url() -> str:
    return os.environ.get("STREAMBOSS_BROKER_URL") or DEFAULT_URL


def parameters(url: str, heartbeat: int | None = None) -> pika.URLParameters:
    params = pika.URLParameters(url)
    if heartbeat is not None:
        params.heartbeat = heartbeat
    return params


def body(index: int) -> bytes:
    """A 100-byte lowercase ASCII body (the alphabet, rotated by ``index``)."""
    start = index % len(_ALPHABET)
    return _LETTERS[start : start + BODY_SIZE]


def stamped_body(seq: int, stamp_ns: int) -> bytes:
    """A 100-byte latency body carrying its send time and sequence number."""
    head = f"{stamp_ns:0{STAMP_DIGITS}d} {seq:0{SEQ_DIGITS}d} ".encode()
    return head + _LETTERS[: BODY_SIZE - len(head)]


def parse_stamped(data: bytes) -> tuple[int, int]:
    """``(stamp_ns, seq)`` from a latency body (upper- or lower-cased)."""
    stamp = int(data[:STAMP_DIGITS])
    seq = int(data[STAMP_DIGITS + 1 : STAMP_DIGITS + 1 + SEQ_DIGITS])
    return stamp, seq


def _report(**values: Any) -> None:
    print(json.dumps(values), flush=True)


# -- plain: asynchronous confirms, ack on confirm --------------------------------------


class AsyncRelay:
    """Consume ``queue``, publish to ``exchange`` with confirms, ack (multiple) on confirm."""

    def __init__(self, url: str, queue: str, exchange: str, count: int, prefetch: int,
                 properties: Callable[[], pika.BasicProperties] | None = None) -> None:
        self.queue = queue
        self.properties = properties
        self.exchange = exchange
        self.count = count
        self.prefetch = prefetch
        self.channel: pika.channel.Channel | None = None
        self.seq = 0
        self.acked = 0
        self.confirmed_through = 0
        self.single: set[int] = set()
        self.pending: deque[tuple[int, int]] = deque()  # (publish seq, delivery tag)
        self.t_consume = 0.0
        self.t_done = 0.0
        self.error: str | None = None
        self.connection = pika.SelectConnection(
            parameters(url),
            on_open_callback=self._on_open,
            on_open_error_callback=self._on_open_error,
            on_close_callback=self._on_closed,
        )

    def run(self) -> int:
        signal.signal(signal.SIGTERM, self._on_signal)
        self.connection.ioloop.start()
        if self.error:
            print(f"plain relay: {self.error}", file=sys.stderr)
            return 1
        if self.count:
            _report(kind="plain", n=self.acked, t_consume=self.t_consume, t_done=self.t_done)
        return 0

    def _on_signal(self, _signum: int, _frame: FrameType | None) -> None:
        self.connection.ioloop.add_callback_threadsafe(self._close)

    def _close(self) -> None:
        if not (self.connection.is_closing or self.connection.is_closed):
            self.connection.close()

    def _on_open(self, connection: pika.SelectConnection) -> None:
        connection.channel(on_open_callback=self._on_channel)

    def _on_open_error(self, _connection: pika.SelectConnection, error: BaseException) -> None:
        self.error = f"cannot connect: {error}"
        self.connection.ioloop.stop()

    def _on_closed(self, _connection: pika.SelectConnection, reason: BaseException) -> None:
        if self.count and self.acked < self.count and self.error is None:
            self.error = f"connection closed after {self.acked} acks: {reason}"
        self.connection.ioloop.stop()

    def _on_channel(self, channel: pika.channel.Channel) -> None:
        self.channel = channel
        channel.confirm_delivery(self._on_confirm, callback=self._on_confirm_mode)

    def _on_confirm_mode(self, _frame: pika.frame.Method) -> None:
        assert self.channel is not None
        self.channel.basic_qos(prefetch_count=self.prefetch, callback=self._on_qos)

    def _on_qos(self, _frame: pika.frame.Method) -> None:
        assert self.channel is not None
        self.t_consume = time.monotonic()
        self.channel.basic_consume(self.queue, self._on_message)

    def _on_message(self, channel: pika.channel.Channel, method: Basic.Deliver,
                    _properties: pika.BasicProperties, data: bytes) -> None:
        props = self.properties() if self.properties else PERSISTENT
        channel.basic_publish(self.exchange, "", data, props)
        self.seq += 1
        self.pending.append((self.seq, method.delivery_tag))

    def _on_confirm(self, frame: pika.frame.Method) -> None:
        method = frame.method
        if not isinstance(method, Basic.Ack):
            self.error = "the broker nacked a publish"
            self._close()
            return
        if method.multiple:
            self.confirmed_through = max(self.confirmed_through, method.delivery_tag)
        else:
            self.single.add(method.delivery_tag)
        pending = self.pending
        last_tag = 0
        while pending and (pending[0][0] <= self.confirmed_through
                           or pending[0][0] in self.single):
            seq, last_tag = pending.popleft()
            self.single.discard(seq)
            self.acked += 1
        if last_tag:
            assert self.channel is not None
            self.channel.basic_ack(last_tag, multiple=True)
        if self.count and self.acked >= self.count and not self.t_done:
            self.t_done = time.monotonic()
            self._close()


def agent_like_properties(exchange: str) -> Callable[[], pika.BasicProperties]:
    """Properties as the agent builds them for each output (fresh id and time per message)."""
    from streamboss.agent import headers

    stream = exchange.removeprefix("sb.stream.")
    source = f"/streamboss/operations/{stream}"

    def build() -> pika.BasicProperties:
        # The agent passes the input's id as the parent; the inputs here have none.
        return headers.output_properties(stream, source, None)

    return build


# -- naive and spawn: BlockingConnection, one message at a time ----------------------------


class _Stop(Exception):
    pass


def _raise_stop(_signum: int, _frame: FrameType | None) -> None:
    raise _Stop


def blocking_relay(kind: str, url: str, queue: str, exchange: str, count: int,
                   prefetch: int) -> int:
    """``naive`` (confirm each publish) or ``spawn`` (run ``tr`` per message) relay."""
    connection = pika.BlockingConnection(parameters(url))
    channel = connection.channel()
    if kind == "naive":
        channel.confirm_delivery()
    channel.basic_qos(prefetch_count=prefetch)
    done = 0
    t_done = 0.0

    def on_message(ch: BlockingChannel, method: Basic.Deliver,
                   _properties: pika.BasicProperties, data: bytes) -> None:
        nonlocal done, t_done
        if kind == "spawn":
            data = subprocess.run(["tr", "a-z", "A-Z"], input=data, capture_output=True,
                                  check=True).stdout
        # With confirm_delivery this blocks until the broker confirms (raises on a nack).
        ch.basic_publish(exchange, "", data, PERSISTENT)
        ch.basic_ack(method.delivery_tag)
        done += 1
        if count and done >= count:
            t_done = time.monotonic()
            ch.stop_consuming()

    signal.signal(signal.SIGTERM, _raise_stop)
    t_consume = time.monotonic()
    channel.basic_consume(queue, on_message)
    try:
        channel.start_consuming()
    except _Stop:
        return 0
    connection.close()
    if count:
        _report(kind=kind, n=done, t_consume=t_consume, t_done=t_done)
    return 0


# -- the latency publisher -------------------------------------------------------------------


def publisher(url: str, exchange: str, rate: float, seconds: float) -> int:
    """Publish ``rate`` stamped messages a second for ``seconds`` seconds."""
    connection = pika.BlockingConnection(parameters(url))
    channel = connection.channel()
    total = round(rate * seconds)
    interval_ns = round(1e9 / rate)
    late_1ms = late_10ms = 0
    worst_ns = 0
    start = time.monotonic_ns() + 1_000_000
    for seq in range(total):
        target = start + seq * interval_ns
        now = time.monotonic_ns()
        if target > now:
            time.sleep((target - now) / 1e9)
        stamp = time.monotonic_ns()
        lateness = stamp - target
        worst_ns = max(worst_ns, lateness)
        if lateness > 1_000_000:
            late_1ms += 1
            if lateness > 10_000_000:
                late_10ms += 1
        channel.basic_publish(exchange, "", stamped_body(seq, stamp), PERSISTENT)
    connection.close()
    _report(kind="publish", sent=total, start_ns=start, late_over_1ms=late_1ms,
            late_over_10ms=late_10ms, worst_late_ms=worst_ns / 1e6)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("kind", choices=("plain", "plain-headers", "naive", "spawn", "publish"))
    parser.add_argument("--queue", help="input queue (relays)")
    parser.add_argument("--exchange", required=True, help="exchange to publish to")
    parser.add_argument("--count", type=int, default=0, help="exit after N acks (0: run on)")
    parser.add_argument("--prefetch", type=int, default=PREFETCH)
    parser.add_argument("--rate", type=float, default=500.0, help="publisher: messages/s")
    parser.add_argument("--seconds", type=float, default=11.0, help="publisher: duration")
    args = parser.parse_args(argv)
    url = broker_url()
    if args.kind == "publish":
        return publisher(url, args.exchange, args.rate, args.seconds)
    if not args.queue:
        parser.error("relays need --queue")
    if args.kind == "plain":
        return AsyncRelay(url, args.queue, args.exchange, args.count, args.prefetch).run()
    if args.kind == "plain-headers":
        return AsyncRelay(url, args.queue, args.exchange, args.count, args.prefetch,
                          agent_like_properties(args.exchange)).run()
    return blocking_relay(args.kind, url, args.queue, args.exchange, args.count, args.prefetch)


if __name__ == "__main__":
    sys.exit(main())
