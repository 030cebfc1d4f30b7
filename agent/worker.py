"""The stream agent: one operation, from its queue through a program to its output stream.

Delivery is at-least-once: an input is acked only after the broker confirmed
the message that replaces it (its output, or its dead letter). Everything runs
on one pika I/O loop; ``per-message`` children report back from their threads
through ``add_callback_threadsafe``.
"""

from __future__ import annotations

import logging
import signal
from collections import deque
from types import FrameType
from typing import Any

import pika
from pika.adapters import select_connection
from pika.adapters.select_connection import IOLoop

from . import headers as hdr
from .acks import Acker
from .broker import BrokerSession, Topology
from .config import AgentConfig
from .delivery import Delivery
from .naming import dead_stream, operation_queue, stream_exchange
from .reconnect import RECONNECT_DELAY, Reconnecting
from .runners import Runner
from .runners.per_message import PerMessageRunner
from .runners.service import ServiceRunner

log = logging.getLogger(__name__)

# select() reports a pipe whose writer has gone as readable; epoll reports
# only POLLHUP, which pika's loop does not dispatch, so a dead child would go
# unnoticed. The agent watches a handful of descriptors, where select is cheap.
select_connection.SELECT_TYPE = "select"

EXIT_OK = 0
EXIT_INTERRUPTED = 130


class Agent(Reconnecting):
    """Runs one operation until SIGTERM/SIGINT (drain, exit 0) or a fatal error (exit 2)."""

    def __init__(self, config: AgentConfig) -> None:
        self.config = config
        self.ioloop = IOLoop()
        self.label = config.operation
        self.program = "stream-agent"
        self.source = f"/streamboss/operations/{config.operation}"
        self.output_exchange = stream_exchange(config.output)
        self.dead_name = dead_stream(config.operation)
        self.dead_exchange = stream_exchange(self.dead_name)
        self.epoch = 0
        self.exit_code = EXIT_OK
        self._ever_ready = False
        self._draining = False
        self._cancelled = False
        self._stopping = False
        self._reconnect_delay = RECONNECT_DELAY
        self._drain_timer: object | None = None
        self._confirms: deque[tuple[int, Delivery]] = deque()
        topology = Topology(
            required=((stream_exchange(config.input), "input stream"),
                      (self.output_exchange, "output stream")),
            declared=(self.dead_exchange,),
            queue=operation_queue(config.operation),
            bind_to=stream_exchange(config.input),
        )
        self.session = BrokerSession(
            config.broker_url, self.ioloop, topology, config.window,
            on_ready=self._on_ready, on_message=self._on_message,
            on_confirm=self._on_confirm, on_lost=self._on_lost,
            on_cancelled=self._on_cancelled,
        )
        self.acker = Acker(self.ioloop, self.session.ack, self._check_drained)
        definition = config.definition
        self.runner: Runner
        if definition.mode == "service":
            self.runner = ServiceRunner(definition, self, self.label)
        else:
            self.runner = PerMessageRunner(definition, config.concurrency, self, self.label,
                                           config.object_store, config.output_threshold)

    # -- run ----------------------------------------------------------------

    def run(self) -> int:
        """Connect, consume until told to stop, return the process exit code."""
        previous = {sig: signal.signal(sig, self._on_signal)
                    for sig in (signal.SIGTERM, signal.SIGINT)}
        try:
            self.session.connect()
            self.ioloop.start()
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            self.runner.stop()
            self.ioloop.close()
        return self.exit_code

    def _on_signal(self, signum: int, _frame: FrameType | None) -> None:
        # Runs between bytecodes of the loop thread: only hand the work to the loop.
        self.ioloop.add_callback_threadsafe(lambda: self.begin_shutdown(signum))

    def begin_shutdown(self, signum: int = signal.SIGTERM) -> None:
        """First signal: stop consuming and drain. Second: leave now (the broker requeues)."""
        if self._draining:
            log.warning("%s: second signal; stopping without draining", self.label)
            self.exit_code = EXIT_INTERRUPTED
            self._finish()
            return
        self._draining = True
        log.info("%s: %s received; draining %d in-flight message(s)", self.label,
                 signal.Signals(signum).name, self.acker.outstanding)
        if not self.session.is_open:
            self._finish()
            return
        self._drain_timer = self.ioloop.call_later(self.config.drain_timeout, self._drain_expired)
        self.session.cancel()

    def _on_cancelled(self) -> None:
        if self._draining:
            self._cancelled = True
            self._check_drained()

    def _check_drained(self) -> None:
        if self._draining and self._cancelled and self.acker.outstanding == 0 \
                and not self._confirms:
            log.info("%s: drained; exiting", self.label)
            self._finish()

    def _drain_expired(self) -> None:
        self._drain_timer = None
        log.warning("%s: drain took longer than %.0fs; returning %d message(s) to the queue",
                    self.label, self.config.drain_timeout, self.acker.outstanding)
        self._finish()

    def _before_close(self) -> None:
        self.runner.stop()

    # -- broker events --------------------------------------------------------

    def _on_ready(self) -> None:
        self._reconnect_delay = RECONNECT_DELAY
        if not self._ever_ready:
            self._ever_ready = True
            self.runner.start()
            log.info("%s: consuming %s -> %s (%s, window %d)", self.label, self.config.input,
                     self.config.output, self.config.definition.mode, self.config.window)
        else:
            log.info("%s: reconnected", self.label)
        if self._draining:
            self._cancelled = True
            self._finish()

    def _on_lost(self, reason: str, fatal: bool) -> None:
        self.epoch += 1
        self.acker.reset()
        self._confirms.clear()
        self.after_connection_lost(reason, fatal)

    def _on_message(self, tag: int, properties: pika.BasicProperties, body: bytes) -> None:
        self.acker.received(tag)
        self.runner.submit(Delivery(tag, self.epoch, body, properties, hdr.message_id(properties)))

    def _on_confirm(self, seq: int, multiple: bool, ack: bool) -> None:
        confirms = self._confirms
        if multiple:
            while confirms and confirms[0][0] <= seq:
                self._settle(confirms.popleft()[1], ack)
        elif confirms and confirms[0][0] == seq:
            self._settle(confirms.popleft()[1], ack)
        else:
            for index, (pending_seq, delivery) in enumerate(confirms):
                if pending_seq == seq:
                    del confirms[index]
                    self._settle(delivery, ack)
                    break

    def _settle(self, delivery: Delivery, ack: bool) -> None:
        if ack:
            self.acker.acked(delivery.tag)
        else:
            # The broker could not take the output; let the input be tried again.
            log.warning("%s: broker refused an output message; requeueing its input", self.label)
            self.requeue(delivery)

    # -- runner outcomes (Outcomes protocol) ----------------------------------

    def emit(self, delivery: Delivery, body: bytes,
             headers: dict[str, Any] | None = None) -> None:
        if delivery.epoch != self.epoch or not self.session.is_open:
            return
        if not body:
            self.acker.acked(delivery.tag)
            return
        props = hdr.output_properties(self.config.output, self.source, delivery.parent,
                                      headers)
        seq = self.session.publish(self.output_exchange, body, props)
        self._confirms.append((seq, delivery))

    def requeue(self, delivery: Delivery) -> None:
        if delivery.epoch != self.epoch or not self.session.is_open:
            return
        self.session.nack(delivery.tag, requeue=True)
        self.acker.rejected(delivery.tag)

    def dead_letter(self, delivery: Delivery, reason: str, exit_code: int | None,
                    stderr: str) -> None:
        if delivery.epoch != self.epoch or not self.session.is_open:
            return
        log.warning("%s: dead-lettering message %s after %d attempt(s): %s", self.label,
                    delivery.parent or f"#{delivery.tag}", delivery.attempts, reason)
        extra = dict(delivery.properties.headers or {})
        extra.update({
            hdr.DEAD_REASON: reason,
            hdr.DEAD_ATTEMPTS: delivery.attempts,
            hdr.DEAD_OPERATION: self.config.operation,
            hdr.DEAD_STDERR: stderr,
        })
        if exit_code is not None:
            extra[hdr.DEAD_EXIT_CODE] = exit_code
        props = hdr.output_properties(self.dead_name, self.source, delivery.parent, extra,
                                      delivery.properties.content_type)
        seq = self.session.publish(self.dead_exchange, delivery.body, props)
        self._confirms.append((seq, delivery))
