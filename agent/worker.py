"""The stream agent: one operation, from its queue through a program to its output stream.

Delivery is at-least-once: an input is acked only after the broker confirmed
the message that replaces it (its output, its dead letter, or a copy of it
republished to wait for a retry). Everything runs on one pika I/O loop;
``per-message`` children report back from their threads through
``add_callback_threadsafe``.

Attempts are counted where they survive the agent (see retry.py): a message
the broker redelivers because an agent died holding it is first moved to the
operation's solo queue, which each agent takes one message at a time from, so
a message that kills its agent uses up its own attempts and not its neighbours'.
"""

from __future__ import annotations

import io
import logging
import signal
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from types import FrameType
from typing import Any

import pika
from pika.adapters import select_connection
from pika.adapters.select_connection import IOLoop

from . import headers as hdr
from . import objects, retry
from .acks import Acker
from .broker import BrokerSession, Topology, max_size_refused
from .config import AgentConfig
from .delivery import Delivery
from .naming import (
    dead_queue,
    dead_stream,
    operation_queue,
    operation_queue_arguments,
    retry_queue,
    retry_queue_arguments,
    solo_queue,
    stream_exchange,
)
from .object_refs import ObjectStores
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
# An output nobody receives (no queue bound to the output stream) pauses the
# agent: long enough not to spin on a stream nobody reads, short enough to
# notice a consumer that comes back.
PAUSE_DELAY = 1.0
PAUSE_DELAY_MAX = 30.0
# A draining agent cancels its consumer once its window is full, so that no
# delivery is on its way when the cancel arrives (a quorum queue hands those back
# as failed, charging them an attempt); past this it cancels anyway.
CANCEL_WAIT = 0.5

# What a publish stands for, so its confirm (or return) settles the right thing.
OUTPUT, DEAD, COPY = "output", "dead letter", "copy"


# How long after a (re)connection solo deliveries wait for the main queue's first
# window to arrive and be sorted (see Agent._solo_open).
SOLO_SETTLE = 0.5


@dataclass(slots=True)
class Pending:
    """A publish waiting for its confirm, and the input it settles."""

    seq: int
    delivery: Delivery
    kind: str
    message_id: str | None


def _copy_headers(delivery: Delivery, attempts: int) -> dict[str, Any]:
    """The input's headers for a republished copy: the broker's own removed, the
    attempts used so far recorded."""
    headers = {k: v for k, v in (delivery.properties.headers or {}).items()
               if k not in hdr.BROKER_HEADERS}
    headers[hdr.ATTEMPTS] = attempts
    return headers


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
        self.queue = operation_queue(config.operation)
        self.solo = solo_queue(config.operation)
        self.max_message_size = config.max_message_size
        self.epoch = 0
        self.exit_code = EXIT_OK
        self._ever_ready = False
        self._draining = False
        self._cancelled = False
        self._stopping = False
        self._reconnect_delay = RECONNECT_DELAY
        self._drain_timer: object | None = None
        self._confirms: deque[Pending] = deque()
        self._returned: set[str] = set()
        self._paused = False
        # Deliveries that arrived while paused: held unacked (the broker stops at the
        # window), run on resume.
        self._held: deque[Delivery] = deque()
        # Deliveries being moved to the solo queue (tags), and solo deliveries waiting
        # for those moves to settle: a solo message may be the one that kills its
        # agent, and a move still unconfirmed when it does would charge a bystander
        # again, every time, until its attempts ran out (seen in a chaos run).
        self._moving: set[int] = set()
        self._solo_waiting: deque[Delivery] = deque()
        # Closed for a moment after each (re)connection: the main queue's first window
        # arrives meanwhile, and those charged by the last agent's death are moved
        # before a solo message (perhaps that killer) runs.
        self._solo_open = False
        self._pause_delay = PAUSE_DELAY
        self._resume_timer: object | None = None
        self._cancel_timer: object | None = None
        self._writer: ThreadPoolExecutor | None = None
        topology = Topology(
            required=((stream_exchange(config.input), "input stream"),
                      (self.output_exchange, "output stream")),
            declared=(self.dead_exchange,),
            queue=self.queue,
            bind_to=stream_exchange(config.input),
            queue_arguments=operation_queue_arguments(config.operation),
            solo_queue=self.solo,
            kept=((dead_queue(config.operation), self.dead_exchange),),
        )
        self.session = BrokerSession(
            config.broker_url, self.ioloop, topology, config.window,
            on_ready=self._on_ready, on_message=self._on_message,
            on_confirm=self._on_confirm, on_lost=self._on_lost,
            on_cancelled=self._on_cancelled, on_solo_message=self._on_solo_message,
            on_return=self._on_return, on_refused=self._on_refused,
        )
        self.acker = Acker(self.ioloop, self.session.ack, self._check_drained)
        definition = config.definition
        self.runner: Runner
        if definition.mode == "service":
            self.runner = ServiceRunner(definition, self, self.label)
        else:
            self.runner = PerMessageRunner(
                definition, config.concurrency, self, self.label,
                ObjectStores.configured(config.object_store, config.object_allow))

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
            if self._writer is not None:
                self._writer.shutdown(wait=False, cancel_futures=True)
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
        self._cancel_resume()
        self._resume()
        # Acks wait until the cancel is through: each ack would let the broker send
        # one more delivery, and one on its way when the cancel lands comes back to
        # the queue as a failed delivery. With the window full, none is on its way.
        self.acker.hold()
        self._cancel_timer = self.ioloop.call_later(CANCEL_WAIT, self._cancel_consumers)
        self.session.queue_depth(self.queue, self._on_drain_depth)

    def _on_drain_depth(self, ready: int) -> None:
        if ready == 0 or self.acker.outstanding >= self.config.window:
            self._cancel_consumers()

    def _cancel_consumers(self) -> None:
        if self._cancel_timer is None:
            return  # cancelled already
        self.ioloop.remove_timeout(self._cancel_timer)
        self._cancel_timer = None
        self.session.cancel()

    def _on_cancelled(self) -> None:
        if self._draining:
            self._cancelled = True
            self.acker.release()
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
        self._solo_open = False
        epoch = self.epoch
        self.ioloop.call_later(SOLO_SETTLE, lambda: self._open_solo(epoch))
        if not self._ever_ready:
            self._ever_ready = True
            # Before start(): should it raise, pika closes the connection, and the
            # agent, having been ready, reconnects rather than hangs half started.
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
        self._returned.clear()
        self._cancel_resume()
        if self._cancel_timer is not None:
            self.ioloop.remove_timeout(self._cancel_timer)
            self._cancel_timer = None
        self._paused = False
        self._held.clear()
        self._moving.clear()
        self._solo_waiting.clear()
        if not (fatal or self._stopping):
            # Work handed in under the old connection is the broker's again.
            self.runner.reset()
        self.after_connection_lost(reason, fatal)

    def _on_refused(self, reason: BaseException) -> None:
        limit = max_size_refused(reason)
        if limit is not None and limit < self.max_message_size:
            log.warning("%s: the broker takes messages up to %d bytes; larger outputs now go "
                        "to the object store or the dead-letter stream", self.label, limit)
            self.max_message_size = limit

    def _on_message(self, tag: int, properties: pika.BasicProperties, body: bytes) -> None:
        self._receive(tag, properties, body, solo=False)

    def _on_solo_message(self, tag: int, properties: pika.BasicProperties, body: bytes) -> None:
        self._receive(tag, properties, body, solo=True)

    def _receive(self, tag: int, properties: pika.BasicProperties, body: bytes,
                 solo: bool) -> None:
        self.acker.received(tag)
        if self._cancel_timer is not None and self.acker.outstanding >= self.config.window:
            self._cancel_consumers()
        used, crashed = retry.attempts_used(properties)
        delivery = Delivery(tag, self.epoch, body, properties, hdr.message_id(properties),
                            used + crashed + 1, solo)
        if crashed and not solo:
            # An agent died (or lost its connection) holding this message: it may be
            # the cause, or a bystander. Run it alone to find out.
            log.info("%s: message %s was delivered %d time(s) without an outcome; it runs "
                     "alone next (%s)", self.label, delivery.parent or f"#{tag}", crashed,
                     self.solo)
            self._moving.add(tag)
            self._republish(delivery, self.solo, used + crashed)
            return
        max_attempts = self.config.definition.max_attempts
        if delivery.attempt > max_attempts:
            if crashed:
                self._dead_letter(delivery, retry.AGENT_DIED,
                                  f"{crashed} deliveries ended without an outcome (the agent "
                                  "was killed or lost its connection while running it)",
                                  None, "", attempts=delivery.attempt - 1)
            else:
                self._dead_letter(delivery, retry.BAD_INPUT,
                                  f"its {hdr.ATTEMPTS} header says {used} attempts were used "
                                  f"already (max_attempts is {max_attempts})", None, "",
                                  attempts=used)
            return
        if solo and (self._moving or not self._solo_open):
            self._solo_waiting.append(delivery)
            return
        self._run(delivery)

    def _run(self, delivery: Delivery) -> None:
        if self._paused:
            self._held.append(delivery)
            return
        self.runner.submit(delivery)

    def _moved(self, tag: int) -> None:
        """A move to the solo queue settled; once none is left, the solo deliveries run
        (on a later loop turn than the acks' flush, so those acks go out first)."""
        self._moving.discard(tag)
        if not self._moving and self._solo_waiting:
            self.ioloop.call_later(0, self._run_solo_waiting)

    def _open_solo(self, epoch: int) -> None:
        if epoch != self.epoch:
            return
        self._solo_open = True
        if not self._moving and self._solo_waiting:
            self._run_solo_waiting()

    def _run_solo_waiting(self) -> None:
        if self._moving or not self._solo_open:
            return
        self.acker.flush()  # the moves' acks, before anything runs
        waiting, self._solo_waiting = self._solo_waiting, deque()
        for delivery in waiting:
            if not self._stale(delivery):
                self._run(delivery)

    def _on_return(self, properties: pika.BasicProperties, reply: str) -> None:
        # The confirm of the same publish follows; it settles the input.
        if properties.message_id:
            self._returned.add(properties.message_id)
        log.debug("%s: broker returned a message: %s", self.label, reply)

    def _on_confirm(self, seq: int, multiple: bool, ack: bool) -> None:
        confirms = self._confirms
        if multiple:
            while confirms and confirms[0].seq <= seq:
                self._settle(confirms.popleft(), ack)
        elif confirms and confirms[0].seq == seq:
            self._settle(confirms.popleft(), ack)
        else:
            for index, pending in enumerate(confirms):
                if pending.seq == seq:
                    del confirms[index]
                    self._settle(pending, ack)
                    break

    def _settle(self, pending: Pending, ack: bool) -> None:
        delivery = pending.delivery
        moving = delivery.tag in self._moving
        returned = pending.message_id is not None and pending.message_id in self._returned
        if returned:
            self._returned.discard(pending.message_id)  # type: ignore[arg-type]
        if ack and not returned:
            if pending.kind == OUTPUT:
                self._pause_delay = PAUSE_DELAY
            self.acker.acked(delivery.tag)
        elif pending.kind == OUTPUT and returned:
            # Nobody receives the output stream: keep the input (the queue keeps the
            # backlog) without charging it an attempt, and stop taking more for a while.
            self._republish(delivery, self.queue, delivery.attempt - 1)
            self._pause()
        elif pending.kind == OUTPUT:
            self.fail(delivery, retry.OUTPUT_NACKED, "the broker refused the output message",
                      None, "")
        else:
            # A dead letter or a copy the broker would not take: hand the input back.
            # Its delivery count grows, so this too ends (in the solo queue, then dead).
            log.warning("%s: broker %s a %s; returning its input to the queue", self.label,
                        "returned" if returned else "refused", pending.kind)
            self.session.nack(delivery.tag, requeue=True)
            self.acker.rejected(delivery.tag)
        if moving:
            # After the ack is scheduled: the solo deliveries run after it went out.
            self._moved(delivery.tag)

    def _pause(self) -> None:
        """Stop running new deliveries for a while; they wait unacked in the window.

        Not a ``basic.cancel``: a quorum queue hands back the deliveries that cross a
        cancel as failed ones, which would charge innocent messages an attempt.
        """
        if self._paused or self._draining:
            return
        self._paused = True
        log.warning("%s: no queue is bound to stream %r, so its outputs would be lost; "
                    "pausing for %.0fs (the input queue keeps the backlog)", self.label,
                    self.config.output, self._pause_delay)
        self._resume_timer = self.ioloop.call_later(self._pause_delay, self._resume)
        self._pause_delay = min(self._pause_delay * 2, PAUSE_DELAY_MAX)

    def _resume(self) -> None:
        self._resume_timer = None
        self._paused = False
        held, self._held = self._held, deque()
        for delivery in held:
            self.runner.submit(delivery)

    def _cancel_resume(self) -> None:
        if self._resume_timer is not None:
            self.ioloop.remove_timeout(self._resume_timer)
            self._resume_timer = None

    # -- publishing -----------------------------------------------------------

    def _stale(self, delivery: Delivery) -> bool:
        return delivery.epoch != self.epoch or not self.session.is_open

    def _publish(self, delivery: Delivery, kind: str, exchange: str, body: bytes,
                 props: pika.BasicProperties, routing_key: str = "") -> None:
        seq = self.session.publish(exchange, body, props, routing_key)
        self._confirms.append(Pending(seq, delivery, kind, props.message_id))

    def _republish(self, delivery: Delivery, queue: str, attempts: int,
                   retry_reason: str | None = None, expiration_ms: int | None = None) -> None:
        """Put a copy of ``delivery`` into ``queue`` carrying ``attempts``; the input
        is acked once the copy is confirmed."""
        source = delivery.properties
        headers = _copy_headers(delivery, attempts)
        if retry_reason is not None:
            headers[hdr.RETRY_REASON] = retry_reason
        props = pika.BasicProperties(
            content_type=source.content_type, content_encoding=source.content_encoding,
            delivery_mode=hdr.PERSISTENT, priority=source.priority,
            correlation_id=source.correlation_id, reply_to=source.reply_to,
            # An input without an id gets one, so its outputs keep their ids on retry.
            message_id=source.message_id or delivery.parent or hdr.new_id(),
            timestamp=source.timestamp, type=source.type, app_id=source.app_id,
            headers=headers,
            expiration=str(expiration_ms) if expiration_ms is not None else None,
        )
        self._publish(delivery, COPY, "", delivery.body, props, routing_key=queue)

    # -- runner outcomes (Outcomes protocol) ----------------------------------

    def emit(self, delivery: Delivery, body: bytes) -> None:
        if self._stale(delivery):
            return
        if not body:
            self.acker.acked(delivery.tag)
            return
        store, size = self.config.object_store, len(body)
        if store and (size > self.config.output_threshold or size > self.max_message_size):
            self._store_output(delivery, body, store)
            return
        if size > self.max_message_size:
            self._dead_letter(delivery, retry.OUTPUT_TOO_LARGE,
                              f"the output of {size} bytes is over the broker's limit of "
                              f"{self.max_message_size} bytes (max_message_size); configure an "
                              "object store to pass large outputs by reference", None, "")
            return
        self._publish_output(delivery, body, None)

    def _publish_output(self, delivery: Delivery, body: bytes,
                        extra: dict[str, Any] | None) -> None:
        parent = delivery.parent
        props = hdr.output_properties(
            self.config.output, self.source, parent, extra,
            ident=hdr.derived_id(self.config.operation, parent, 0) if parent else None)
        self._publish(delivery, OUTPUT, self.output_exchange, body, props)

    def _store_output(self, delivery: Delivery, body: bytes, store: str) -> None:
        """Write a large output to the object store off the loop thread, then publish
        a reference to it."""
        if self._writer is None:
            self._writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="object-writer")
        name = hdr.derived_id(self.config.operation, delivery.parent, 0) \
            if delivery.parent else hdr.new_id()
        url = f"{store.rstrip('/')}/{self.label}/{name}"

        def write() -> None:
            try:
                # BytesIO shares the bytes until written to: no copy of a large output.
                info = objects.put(url, io.BytesIO(body), "application/octet-stream")
            except Exception as exc:
                path = retry.OBJECT_STORE if isinstance(exc, objects.ObjectStoreError) \
                    else retry.UNEXPECTED
                error = str(exc) or type(exc).__name__
                self.ioloop.add_callback_threadsafe(lambda: self.fail(
                    delivery, path, f"cannot store a {len(body)}-byte output: {error}",
                    None, ""))
                return
            self.ioloop.add_callback_threadsafe(lambda: self._publish_reference(delivery, info))

        self._writer.submit(write)

    def _publish_reference(self, delivery: Delivery, info: objects.ObjectInfo) -> None:
        if self._stale(delivery):
            return
        self._publish_output(delivery, info.url.encode(), {
            hdr.OBJECT_URL: info.url, hdr.OBJECT_SIZE: info.size,
            hdr.OBJECT_SHA256: info.sha256, hdr.OBJECT_CONTENT_TYPE: info.content_type})

    def fail(self, delivery: Delivery, path: str, detail: str, exit_code: int | None,
             stderr: str) -> None:
        if self._stale(delivery):
            return
        definition = self.config.definition
        if delivery.attempt >= definition.max_attempts:
            self._dead_letter(delivery, path, detail, exit_code, stderr)
            return
        queue_ms, expiration_ms = retry.retry_delay(definition.retry_delay, delivery.attempt)
        queue = retry_queue(self.config.operation, queue_ms)
        log.info("%s: attempt %d of %d failed (%s: %s); retrying in %.1fs", self.label,
                 delivery.attempt, definition.max_attempts, path, detail, expiration_ms / 1000)

        def publish() -> None:
            if not self._stale(delivery):
                self._republish(delivery, queue, delivery.attempt, f"{path}: {detail}",
                                expiration_ms)

        self.session.ensure_queue(queue, retry_queue_arguments(self.config.operation), publish)

    def dead_letter(self, delivery: Delivery, path: str, detail: str, exit_code: int | None,
                    stderr: str) -> None:
        self._dead_letter(delivery, path, detail, exit_code, stderr)

    def _dead_letter(self, delivery: Delivery, path: str, detail: str, exit_code: int | None,
                     stderr: str, attempts: int | None = None) -> None:
        if self._stale(delivery):
            return
        attempts = delivery.attempt if attempts is None else attempts
        reason = f"{path}: {detail}"
        log.warning("%s: dead-lettering message %s after %d attempt(s): %s", self.label,
                    delivery.parent or f"#{delivery.tag}", attempts, reason)
        extra = {k: v for k, v in (delivery.properties.headers or {}).items()
                 if k not in hdr.BROKER_HEADERS and k != hdr.ATTEMPTS}
        extra.update({
            hdr.DEAD_REASON: reason,
            hdr.DEAD_PATH: path,
            hdr.DEAD_ATTEMPTS: attempts,
            hdr.DEAD_OPERATION: self.config.operation,
            hdr.DEAD_STDERR: stderr,
        })
        if exit_code is not None:
            extra[hdr.DEAD_EXIT_CODE] = exit_code
        parent = delivery.parent
        props = hdr.output_properties(
            self.dead_name, self.source, parent, extra, delivery.properties.content_type,
            ident=hdr.derived_id(self.config.operation, parent, "dead") if parent else None)
        self._publish(delivery, DEAD, self.dead_exchange, delivery.body, props)

