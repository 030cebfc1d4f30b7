"""Moving an operation's queues of another kind onto the queues this release declares.

Why this exists: the previous release declared ``sb.op.<op>`` as a classic
durable queue without arguments; this one counts deliveries on the broker and
so needs a quorum queue with ``naming.operation_queue_arguments``. RabbitMQ
cannot change a queue's type or arguments in place (a redeclare with other
arguments is refused with 406), and deleting the queue would drop its backlog.
So the manager moves what it holds into a new queue of the same name, through a
temporary quorum queue, while publishers go on publishing:

Phase 1 (the queue in the way still exists):

1. declare the temporary queue ``sb.migrate.<op>`` (``sb.migrate-solo.<op>``
   for the solo queue) with the new arguments, not bound;
2. move as many messages as the old queue held at the start into it (the old
   queue is still bound, so what arrives meanwhile stays behind them, in order);
3. bind the temporary queue to the input stream, then unbind the old one (in
   between, a message published goes to both: a duplicate, never a loss);
4. move the rest until the old queue has had nothing for ``IDLE`` seconds, and
   delete it only if it is empty and unused (moving again if something came
   back, e.g. a message routed just before the unbind).

Phase 2 (the temporary queue exists):

5. declare the queue with the new arguments (an agent of this release may have
   done so already, which is fine);
6. move as many messages as the temporary queue holds into it, still unbound;
7. bind the new queue, unbind the temporary one (duplicates, as in 3.);
8. move the rest, and delete the temporary queue once it is empty and has had
   nothing for ``IDLE`` seconds since it was unbound.

Each move consumes from the source and publishes each message, unchanged
(body, properties, headers; only the source's own ``x-delivery-count`` is
dropped, the new queue counts its own deliveries), to the target through the
default exchange, ``mandatory``, in a transaction of up to ``BATCH`` messages:
``tx.commit-ok`` is RabbitMQ's word that the batch is in the target queue (and
on disk), the same promise as publisher confirms, in one round trip per batch.
Only then are the source's deliveries acked. A crash before the commit loses the
uncommitted publishes and requeues their sources: nothing moved twice; a crash
between commit and ack leaves at most one batch in both queues (duplicates).

Every step is decided from what the broker shows (which queue exists, of which
kind), never from memory, so a manager killed at any step leaves a state the
next one finishes: a leftover temporary queue means phase 2 is due.

What it does not do: run while something consumes the old queue (an agent of
the previous release would lose its unacked messages when the queue is
deleted). It refuses with one line naming the consumers to stop, and the
reconciler keeps the operation's own agents at zero until the move is done.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass
from typing import Any

import pika
import pika.exceptions
from pika.adapters.blocking_connection import BlockingChannel

from streamboss.agent.headers import DELIVERY_COUNT
from streamboss.agent.naming import (
    operation_queue,
    operation_queue_arguments,
    solo_queue,
    stream_exchange,
)
from streamboss.agent.tls import connection_parameters

from .broker import Broker, BrokerUnavailable, passive_declare

log = logging.getLogger(__name__)

MIGRATION_PREFIX = "sb.migrate."
# Another prefix, not "sb.migrate.solo.", which operation "solo.x" would share.
SOLO_MIGRATION_PREFIX = "sb.migrate-solo."
# Messages per transaction: one commit round trip per batch keeps a move at
# thousands of messages a second, and a crash duplicates at most one batch.
BATCH = 500
# Seconds without a delivery after which a queue nothing routes to is taken as
# empty. Far longer than a message routed just before an unbind takes to land.
IDLE = 0.5
# Attempts to empty and delete an unbound queue that something keeps filling
# (a publisher naming the queue itself) before giving up with an explanation.
ROUNDS = 5
# What a queue of unknown type (the management API is away) is called in messages.
UNKNOWN = "unknown"


class MigrationBlocked(RuntimeError):
    """A migration that cannot go on now; the message is one line that says what to do."""


@dataclass(frozen=True)
class QueueMove:
    """One queue of an operation to bring to this release's declaration.

    ``found`` is the type of the queue in the way ("classic", "quorum", or
    "unknown" without the management API), or None when only a temporary queue
    is left (phase 2 is due).
    """

    operation: str
    queue: str
    temporary: str
    arguments: dict[str, Any]
    bound_to: str | None
    found: str | None


def migration_queues(operation: str) -> tuple[str, str]:
    """The temporary queues of ``operation``'s input and solo queues (deleted with it)."""
    return MIGRATION_PREFIX + operation, SOLO_MIGRATION_PREFIX + operation


def pending(broker: Broker, operation: str, input_stream: str) -> list[QueueMove]:
    """The queues of ``operation`` that are not (yet) as this release declares them.

    A queue counts when it exists with another type or other arguments, or when
    its temporary queue is still there (a migration was interrupted). Asked of
    the management API (a passive declare of a missing queue is logged as an
    error by the broker, every time); without it, over AMQP, where only what a
    redeclare refuses is seen.

    Raises:
        BrokerUnavailable: the broker cannot be reached.
    """
    arguments = operation_queue_arguments(operation)
    temporary, solo_temporary = migration_queues(operation)
    moves = []
    for queue, temp, bound_to in (
            (operation_queue(operation), temporary, stream_exchange(input_stream)),
            (solo_queue(operation), solo_temporary, None)):
        try:
            declared = broker.queue_declaration(queue)
            found = None if declared is None or declared.matches(arguments) else declared.type
            left = broker.queue_declaration(temp) is not None
        except BrokerUnavailable:
            found = (None if broker.queue_state(queue) is None
                     or broker.declare_queue(queue, arguments) else UNKNOWN)
            left = broker.queue_state(temp) is not None
        if found is not None or left:
            moves.append(QueueMove(operation, queue, temp, arguments, bound_to, found))
    return moves


def migrate(broker: Broker, moves: list[QueueMove]) -> int:
    """Carry out ``moves`` (from :func:`pending`) on a connection of their own.

    Returns:
        how many messages were moved (counting both phases).

    Raises:
        MigrationBlocked: it cannot go on now (consumers on the old queue, a
            broker refusal); one line saying what to do. Nothing is lost: the next
            call picks up where this one stopped.
        BrokerUnavailable: the broker cannot be reached.
    """
    moved = 0
    try:
        session = _Session(broker.url, broker.vhost)
    except pika.exceptions.AMQPError as exc:
        raise BrokerUnavailable(f"cannot open a connection to migrate queues: {exc!r}") from None
    try:
        for move in moves:
            count = 0
            if move.found is not None:
                log.info("%s is a %s queue, not the quorum queue this release declares; moving "
                         "what it holds through %s", move.queue, move.found, move.temporary)
                count += _phase_one(session, move)
            count += _phase_two(session, move)
            log.info("%s is a quorum queue now; %d message(s) moved", move.queue, count)
            moved += count
    except pika.exceptions.ChannelClosedByBroker as exc:
        raise MigrationBlocked(refused(moves[0].operation, session.step, exc)) from None
    except pika.exceptions.AMQPConnectionError as exc:
        raise BrokerUnavailable(f"lost the broker while migrating queues of operation "
                                f"{moves[0].operation} ({exc!r}); it resumes when the broker "
                                "is back") from None
    finally:
        session.close()
    return moved


def refused(operation: str, step: str, exc: pika.exceptions.ChannelClosedByBroker) -> str:
    """One line for a broker refusal during a migration, naming what to do."""
    text = str(exc.reply_text)
    if exc.reply_code == 403:
        fix = ("give the manager's broker user configure, write and read permissions on "
               "sb.* queues (`rabbitmqctl set_permissions`)")
    elif "feature flag" in text:  # a broker upgraded from 3.7 has quorum queues off
        fix = "enable quorum queues on the broker: `rabbitmqctl enable_feature_flag all`"
    else:
        fix = "fix that; the manager tries again on its next pass"
    return (f"operation {operation}: migrating its queues to quorum queues stopped at "
            f"{step}: the broker said {exc.reply_code} {text}; {fix}")


def consumers_line(queue: str, consumers: int, vhost: str) -> str:
    """One line for an old queue that something still consumes."""
    return (f"{queue} is a queue of the previous release and {consumers} consumer(s) still "
            f"read it (agents of the previous release?): stop them (`rabbitmqctl "
            f"list_consumers -p {vhost}` shows them) and the manager moves it to a quorum "
            "queue; until then this operation's agents stay stopped")


def _phase_one(session: _Session, move: QueueMove) -> int:
    """Empty the queue in the way into the temporary queue and delete it."""
    state = session.state(move.queue)
    if state is None:
        return 0
    if state[1]:
        raise MigrationBlocked(consumers_line(move.queue, state[1], session.vhost))
    session.declare(move.temporary, move.arguments)
    moved = 0
    if move.bound_to is not None:
        moved += session.move(move.queue, move.temporary, limit=state[0])
        session.bind(move.temporary, move.bound_to)
        session.unbind(move.queue, move.bound_to)
    for _ in range(ROUNDS):
        moved += session.move(move.queue, move.temporary)
        if session.delete_drained(move.queue, move.found):
            return moved
    raise MigrationBlocked(
        f"{move.queue} keeps receiving messages though it is no longer bound (something "
        f"publishes to it by name): stop that publisher and the manager finishes moving it")


def _phase_two(session: _Session, move: QueueMove) -> int:
    """Declare the queue anew and empty the temporary queue into it."""
    if session.state(move.temporary) is None:
        return 0
    if not session.declare(move.queue, move.arguments, refused_ok=True):
        raise MigrationBlocked(
            f"{move.queue} was declared again the previous release's way while its messages "
            f"waited in {move.temporary} (an agent of the previous release is still running): "
            "stop it; the manager then finishes the move")
    moved = 0
    if move.bound_to is not None:
        state = session.state(move.temporary)
        moved += session.move(move.temporary, move.queue, limit=state[0] if state else 0)
        session.bind(move.queue, move.bound_to)
        session.unbind(move.temporary, move.bound_to)
    for _ in range(ROUNDS):
        moved += session.move(move.temporary, move.queue)
        if session.delete_drained(move.temporary, "quorum"):
            return moved
    raise MigrationBlocked(
        f"{move.temporary} keeps receiving messages though it is no longer bound (something "
        f"publishes to it by name): stop that publisher and the manager finishes moving it")


class _Session:
    """The migration's own connection: a control channel for declares, binds and
    deletes, and fresh channels for each move."""

    def __init__(self, url: str, vhost: str) -> None:
        self.url = url
        self.vhost = vhost
        # The step in progress, for the one line that explains a refusal.
        self.step = "connecting"
        self._connection = self._open()
        self._control = self._connection.channel()

    def _open(self) -> pika.BlockingConnection:
        params = connection_parameters(self.url)
        params.client_properties = {"connection_name": "streamboss-manager-migration"}
        return pika.BlockingConnection(params)

    def close(self) -> None:
        if self._connection.is_open:
            with contextlib.suppress(pika.exceptions.AMQPError):
                self._connection.close()

    def _channel(self) -> BlockingChannel:
        if not self._control.is_open:
            if not self._connection.is_open:
                self._connection = self._open()
            self._control = self._connection.channel()
        return self._control

    def state(self, queue: str) -> tuple[int, int] | None:
        """(ready messages, consumers) of ``queue``; None when it does not exist."""
        self.step = f"looking at {queue}"
        state = passive_declare(self._channel(), queue)
        return None if state is None else (state.messages, state.consumers)

    def declare(self, queue: str, arguments: dict[str, Any], refused_ok: bool = False) -> bool:
        """Declare ``queue``; False when one with other arguments is there (406) and
        ``refused_ok``, else that refusal is raised."""
        self.step = f"declaring {queue}"
        try:
            self._channel().queue_declare(queue, durable=True, arguments=arguments)
        except pika.exceptions.ChannelClosedByBroker as exc:
            if exc.reply_code != 406 or not refused_ok:
                raise
            return False
        return True

    def bind(self, queue: str, exchange: str) -> None:
        self.step = f"binding {queue} to {exchange}"
        self._channel().queue_bind(queue, exchange, "#")

    def unbind(self, queue: str, exchange: str) -> None:
        self.step = f"unbinding {queue} from {exchange}"
        self._channel().queue_unbind(queue, exchange, "#")

    def delete_drained(self, queue: str, kind: str | None) -> bool:
        """Delete ``queue`` if it is empty and unused; False when a message is there.

        A classic queue is deleted with if-empty and if-unused, so the broker
        itself refuses when something arrived since the move. Quorum queues do
        not support those flags: they are checked first, which is as safe for a
        queue nothing is bound to any more (see ``IDLE``).

        Raises:
            MigrationBlocked: something consumes from it.
        """
        self.step = f"deleting {queue}"
        if kind != "quorum":
            try:
                self._channel().queue_delete(queue, if_empty=True, if_unused=True)
                return True
            except pika.exceptions.ChannelClosedByBroker as exc:
                if exc.reply_code != 406:  # not empty, or in use: see which below
                    raise
            except pika.exceptions.ConnectionClosedByBroker as exc:
                # 540: a quorum queue after all (the management API could not say);
                # the broker closed the connection over the flags.
                if exc.reply_code != 540:
                    raise
                self._connection = self._open()
                self._control = self._connection.channel()
                return self.delete_drained(queue, "quorum")
        state = self.state(queue)
        if state is None:
            return True
        if state[1]:
            raise MigrationBlocked(consumers_line(queue, state[1], self.vhost))
        if state[0]:
            return False
        self.step = f"deleting {queue}"
        self._channel().queue_delete(queue)
        return True

    def move(self, source: str, target: str, limit: int | None = None) -> int:
        """Move messages from ``source`` to ``target``: ``limit`` of them, or (None)
        until ``source`` has delivered nothing for ``IDLE`` seconds.

        Returns:
            how many were moved (committed into ``target`` and acked in ``source``).
        """
        if limit == 0:
            return 0
        self.step = f"moving messages from {source} to {target}"
        consume = self._connection.channel()
        publish = self._connection.channel()
        returned: list[bytes] = []
        moved = waiting = 0
        last_tag = 0
        try:
            consume.basic_qos(prefetch_count=BATCH if limit is None else min(BATCH, limit))
            publish.tx_select()
            publish.add_on_return_callback(lambda _ch, _m, _p, body: returned.append(body))
            for method, properties, body in consume.consume(source, inactivity_timeout=IDLE):
                if method is not None:
                    if properties.headers:
                        # The source's count of unfinished deliveries (our own, if a
                        # move was interrupted); the target keeps its own count.
                        properties.headers.pop(DELIVERY_COUNT, None)
                    publish.basic_publish("", target, body, properties, mandatory=True)
                    last_tag = method.delivery_tag
                    waiting += 1
                done = method is None or (limit is not None and moved + waiting >= limit)
                if waiting and (done or waiting >= BATCH):
                    publish.tx_commit()
                    # A basic.return comes before commit-ok; this hands it to us.
                    self._connection.process_data_events(0)
                    if returned:
                        raise MigrationBlocked(
                            f"{target} refused {len(returned)} message(s) moved into it (it "
                            f"was deleted meanwhile?); they stay in {source}; the manager "
                            "tries again on its next pass")
                    consume.basic_ack(last_tag, multiple=True)
                    moved += waiting
                    waiting = 0
                if done:
                    break
        finally:
            # Deliveries not acked (prefetched beyond ``limit``, or an uncommitted
            # batch) go back to the source, in their places.
            for channel in (consume, publish):
                if channel.is_open:
                    with contextlib.suppress(pika.exceptions.AMQPError):
                        channel.close()
        if moved:
            log.info("moved %d message(s) from %s to %s", moved, source, target)
        return moved

