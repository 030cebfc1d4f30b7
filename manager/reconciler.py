"""The reconciler: make the broker and the agents match the declarations.

About once a second it reads the declarations and the broker (which queues
are bound to each stream, their depth and consumers), works out which
operations are wanted, decides agent counts with each operation's scaling
policy and applies them through the dispatcher. Every step is idempotent, so
a pass interrupted by a crash is completed by the next one.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import asdict, dataclass
from typing import Any, Protocol

from streamboss.agent.naming import (
    SUBSCRIPTION_PREFIX,
    archive_queue,
    dead_queue,
    operation_queue,
    solo_queue,
)

from .broker import Broker, BrokerUnavailable, QueueCounts, QueueState, Subscriber
from .dispatch_local import archiver_pool
from .model import Archive, Definition, Operation
from .queue_migration import MigrationBlocked, migrate, migration_queues, pending
from .scaling import ScaleState, decide
from .store import Store

log = logging.getLogger(__name__)

INTERVAL = 1.0
# The management API answers with figures a few seconds old, has none for a queue's
# first ten seconds or so, and on a loaded broker now and then none at all (a
# timeout, a queue's figures missing from one answer). A queue's last figures stand
# in for this long: the passive declare's consumer count still bounds them. So
# does an operation's last backlog while its unacknowledged part is unknown.
LISTING_MEMORY = 30.0
# Declares are idempotent but cost round trips; re-assert them this often, and
# at once after any declaration changes or the broker comes back.
TOPOLOGY_REFRESH = 10.0


class Dispatcher(Protocol):
    def scale(self, operation: Operation, definition: Definition, count: int) -> None: ...
    def run_archiver(self, archive: Archive, run: bool) -> None: ...
    def status(self, operation: str) -> dict[str, int]: ...
    def forget(self, operation: str) -> None: ...
    def reap(self) -> None: ...
    # End of a pass: what it observed, by operation (the AWS dispatcher turns it
    # into its stack config and scaling metrics; the local one needs nothing).
    def report(self, statuses: dict[str, OperationStatus]) -> None: ...


@dataclass
class OperationStatus:
    name: str
    input: str
    output: str
    wanted: bool
    desired: int
    running: int
    draining: int
    restarts: int
    # Messages the operation still has to finish: waiting (ready) plus delivered to
    # its agents and not yet acknowledged, in sb.op.OP and sb.solo.OP. Scaling uses
    # this, so agents holding work are not scaled away while they work.
    backlog: int
    dead_lettered: int
    rate_in: float | None
    rate_out: float | None
    # The unacknowledged part of ``backlog``; None when the management API could
    # not say (then ``backlog`` is the ready messages alone).
    in_flight: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class ArchiveStatus:
    stream: str
    store: str
    active: bool
    running: int
    restarts: int
    # Messages waiting in the archive's subscription (not yet in a segment);
    # None once a stopped archive's subscription is gone.
    backlog: int | None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def wanted_operations(operations: list[Operation],
                      subscribers: dict[str, list[Subscriber]]) -> set[str]:
    """Operations whose output has a subscriber: a consumer, a named durable
    subscription, or a wanted downstream operation (so chains wake backwards)."""
    by_name = {op.name: op for op in operations}

    def demand(sub: Subscriber) -> bool:
        # Another operation's queue is demand only while that operation is wanted.
        if sub.operation is not None and sub.operation in by_name:
            return False
        return sub.consumers > 0 or sub.queue.startswith(SUBSCRIPTION_PREFIX)

    wanted = {op.name for op in operations
              if any(demand(sub) for sub in subscribers.get(op.output, []))}
    # Spread upstream until nothing changes: terminates on any graph, cycles included,
    # and the answer does not depend on the order the bindings are listed in.
    changed = True
    while changed:
        changed = False
        for op in operations:
            if op.name not in wanted and any(
                    sub.operation in wanted for sub in subscribers.get(op.output, [])):
                wanted.add(op.name)
                changed = True
    return wanted


def operation_backlog(operation: str, now: dict[str, QueueState | None],
                      listing: dict[str, QueueCounts] | None) -> tuple[int, int | None]:
    """(backlog, in flight) of ``operation``: what it still has to finish, and the
    part of it delivered to agents and not yet acknowledged (None: unknown).

    The backlog is ready plus unacknowledged messages of ``sb.op.OP`` and of
    ``sb.solo.OP`` (absent until an agent first needs it: 0). A message an agent
    holds is work not done: counting only the ready ones would scale in the
    agents holding it while they work on it.

    ``now`` is each queue's passive declare (exact, this instant: ready messages
    and consumers; None when the queue does not exist); ``listing`` the management
    API's figures, the only source of unacknowledged counts, a few seconds old and
    on a loaded broker sometimes much older. The fresh figures bound the stale
    ones: a queue without consumers holds nothing unacknowledged (a closed
    channel's unacked messages go back to ready; an agent cancels its consumers
    only to drain on SIGTERM, and finishes what it holds whatever is counted), so
    only its ready count counts; with consumers, the unacknowledged figure is
    added to the larger of the two ready counts, so messages the agents took
    since the listing's figures (gone from ready, not yet counted as
    unacknowledged) still count.
    """
    backlog, in_flight, known = 0, 0, True
    for queue in (operation_queue(operation), solo_queue(operation)):
        fresh = now.get(queue)
        if fresh is None:
            continue
        if fresh.consumers == 0:
            backlog += fresh.messages
            continue
        listed = listing.get(queue) if listing is not None else None
        if listed is None or listed.ready is None or listed.unacked is None:
            backlog += fresh.messages
            known = False
            continue
        backlog += max(fresh.messages, listed.ready) + listed.unacked
        in_flight += listed.unacked
    return backlog, in_flight if known else None


class Reconciler:
    """Runs passes on a thread until stopped; :meth:`wake` runs one now."""

    def __init__(self, store: Store, broker: Broker, dispatcher: Dispatcher,
                 interval: float = INTERVAL) -> None:
        self.store = store
        self.broker = broker
        self.dispatcher = dispatcher
        self.interval = interval
        self.states: dict[str, ScaleState] = {}
        self.status: dict[str, OperationStatus] = {}
        self.archive_status: dict[str, ArchiveStatus] = {}
        self.last_error: str | None = None
        self.management = True
        self._topology_at = float("-inf")
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._retiring: set[str] = set()
        # Operations deleted through the API, handed over by its threads: one created
        # and deleted between two passes was never seen by a pass, yet its queues
        # were declared (by the API) and must go.
        self._deleted: set[str] = set()
        self._deleted_lock = threading.Lock()
        # Each queue's last figures from the management API and when they came, and
        # each operation's last backlog whose unacknowledged part was known.
        self._listed: dict[str, tuple[float, QueueCounts]] = {}
        self._known_backlog: dict[str, tuple[float, int]] = {}
        # Operations whose queues are of another kind (the previous release's) and not
        # migrated yet: held at zero agents. The value is the one line that says why it
        # cannot go on, or None while it can.
        self.held: dict[str, str | None] = {}

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="reconciler", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=30)

    def retire(self, operations: list[str]) -> None:
        """Delete the queues of these deleted operations once their agents are gone
        (on the next passes; harmless for one declared again meanwhile)."""
        with self._deleted_lock:
            self._deleted.update(operations)

    def wake(self, topology_changed: bool = True) -> None:
        if topology_changed:
            self._topology_at = float("-inf")
        self._wake.set()

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                self.run_pass()
                self.last_error = "; ".join(filter(None, self.held.values())) or None
            except BrokerUnavailable as exc:
                if self.last_error != str(exc):
                    log.error("%s", exc)
                self.last_error = str(exc)
                self._topology_at = float("-inf")
            except Exception as exc:  # keep reconciling; the next pass may repair it
                log.exception("reconciler pass failed")
                self.last_error = f"{type(exc).__name__}: {exc}"
                self._topology_at = float("-inf")
                self.broker.reset()
            self._wake.wait(self.interval)
            self._wake.clear()

    def run_pass(self, now: float | None = None) -> None:
        """One reconciliation: topology, demand, scale."""
        with self._lock:
            now = time.monotonic() if now is None else now
            operations = self.store.operations()
            if now - self._topology_at >= TOPOLOGY_REFRESH:
                self._apply_topology(operations)
                self._topology_at = now
            else:  # a migration interrupted by a race goes on now; a blocked one waits
                for op in operations:
                    if op.name in self.held and self.held[op.name] is None:
                        self._ensure_operation(op)
            subscribers = self._observe(operations)
            wanted = (wanted_operations(operations, subscribers) if self.management
                      else {op.name for op in operations})
            self.dispatcher.reap()
            # One management call for every queue's figures, not one per operation.
            listing = self._remembered(
                self.broker.queue_listing() if self.management else None, now)
            status: dict[str, OperationStatus] = {}
            for op in operations:
                definition = self.store.get_definition(str(op.definition_id))
                if definition is None:
                    continue
                backlog, in_flight = self._backlog(op.name, listing, now)
                state = self.states.setdefault(op.name, ScaleState())
                count = decide(op.policy, state, op.name in wanted, backlog, now)
                if op.name in self.held:
                    count = 0
                self.dispatcher.scale(op, definition, count)
                dead = self.broker.queue_state(dead_queue(op.name))
                agents = self.dispatcher.status(op.name)
                counts = listing.get(operation_queue(op.name)) if listing else None
                status[op.name] = OperationStatus(
                    op.name, op.input, op.output, op.name in wanted, count,
                    agents["running"], agents["draining"], agents["restarts"], backlog,
                    dead.messages if dead else 0,
                    counts.rate_in if counts else None, counts.rate_out if counts else None,
                    in_flight)
            names = {op.name for op in operations}
            for gone in set(self.states) - names:
                del self.states[gone]
                self._known_backlog.pop(gone, None)
                self.dispatcher.forget(gone)
                self._retiring.add(gone)
            with self._deleted_lock:
                self._retiring |= self._deleted
                self._deleted.clear()
            self._retire(names)
            self.status = status
            self.dispatcher.report(status)
            self.archive_status = {a.stream: self._run_archive(a)
                                   for a in self.store.archives()}

    def _remembered(self, listing: dict[str, QueueCounts] | None, now: float,
                    ) -> dict[str, QueueCounts] | None:
        """``listing`` with each queue it has no figures for given its last ones, if
        they are at most LISTING_MEMORY seconds old; None when nothing is known."""
        for name, counts in (listing or {}).items():
            if counts.ready is not None and counts.unacked is not None:
                self._listed[name] = (now, counts)
        for name in [n for n, (at, _) in self._listed.items() if now - at > LISTING_MEMORY]:
            del self._listed[name]
        merged = dict(listing or {})
        for name, (_at, counts) in self._listed.items():
            current = merged.get(name)
            if current is None or current.ready is None or current.unacked is None:
                merged[name] = counts
        return merged if merged or listing is not None else None

    def _backlog(self, operation: str, listing: dict[str, QueueCounts] | None, now: float,
                 ) -> tuple[int, int | None]:
        """See :func:`operation_backlog`; this adds the passive declares, and while
        the unacknowledged part is unknown (a queue's first seconds, before the
        management API has figures for it; the API away) keeps the backlog at
        least at its last known value for LISTING_MEMORY seconds: the messages
        agents took meanwhile are no longer ready but still being worked on."""
        fresh = {queue: self.broker.queue_state(queue)
                 for queue in (operation_queue(operation), solo_queue(operation))}
        backlog, in_flight = operation_backlog(operation, fresh, listing)
        if in_flight is not None:
            self._known_backlog[operation] = (now, backlog)
            return backlog, in_flight
        last = self._known_backlog.get(operation)
        if last is not None and now - last[0] <= LISTING_MEMORY:
            backlog = max(backlog, last[1])
        return backlog, None

    def _run_archive(self, archive: Archive) -> ArchiveStatus:
        """An active archive has one archiver. A stopped one is unbound, drained of
        what it already holds, and then its subscription is deleted."""
        queue = self.broker.queue_state(archive_queue(archive.stream))
        pool = archiver_pool(archive.stream)
        if archive.active:
            self.dispatcher.run_archiver(archive, True)
        elif queue is None:
            self.dispatcher.run_archiver(archive, False)
        else:
            self.broker.unbind_archive(archive.stream)
            # Waiting messages keep (or bring back) an archiver until they are stored;
            # SIGTERM makes it store the open segment before it exits.
            self.dispatcher.run_archiver(archive, queue.messages > 0)
            agents = self.dispatcher.status(pool)
            if (queue.messages == 0 and queue.consumers == 0 and agents["running"] == 0
                    and agents["draining"] == 0 and self.broker.delete_archive(archive.stream)):
                queue = None
        agents = self.dispatcher.status(pool)
        return ArchiveStatus(archive.stream, archive.store, archive.active, agents["running"],
                             agents["restarts"], None if queue is None else queue.messages)

    def _retire(self, declared: set[str]) -> None:
        """Delete a deleted operation's queue once its agents are gone: an agent
        still draining would declare the queue again on reconnect. Its retry queues
        and any migration's temporary queues go with it."""
        for name in set(self.held) - declared:
            del self.held[name]
        for name in list(self._retiring):
            if name in declared:
                self._retiring.discard(name)
                continue
            agents = self.dispatcher.status(name)
            if (agents["running"] == 0 and agents["draining"] == 0
                    and self.broker.delete_operation(name, dead_queue(name),
                                                     also=migration_queues(name))):
                self._retiring.discard(name)

    def _apply_topology(self, operations: list[Operation]) -> None:
        self._ensure_streams()
        for op in operations:
            self._ensure_operation(op)
        for archive in self.store.archives():
            if archive.active:
                self.broker.ensure_archive(archive.stream)

    def _ensure_operation(self, op: Operation) -> None:
        """Declare ``op``'s queues, first moving those declared otherwise (by the
        previous release) onto queues of this release's kind: see
        :mod:`.queue_migration`. Until that is done the operation is held at zero
        agents, which the old queue would refuse anyway."""
        moves = pending(self.broker, op.name, op.input)
        if moves:
            self.held.setdefault(op.name, None)
            # The temporary queue dead-letters where the new one will.
            self.broker.ensure_dead_queue(op.name, dead_queue(op.name))
            try:
                migrate(self.broker, moves)
            except MigrationBlocked as exc:
                if self.held.get(op.name) != str(exc):
                    log.warning("%s", exc)
                self.held[op.name] = str(exc)
                return
        if self.broker.ensure_operation(op.name, op.input):
            self.held.pop(op.name, None)
        else:  # declared otherwise since pending() looked: migrate on the next pass
            self.held.setdefault(op.name, None)

    def _ensure_streams(self) -> None:
        """Declare every stream's exchange, from a list that may go stale meanwhile: a
        stream deleted after it was read would be declared again here, behind its
        deletion. Read again after declaring, and delete those gone since (the API
        deletes the exchange again after its commit, so one of the two always comes
        after the other's declare)."""
        listed = [stream.name for stream in self.store.streams()]
        for name in listed:
            self.broker.ensure_stream(name)
        declared = {stream.name for stream in self.store.streams()}
        for name in listed:
            if name not in declared:
                self.broker.delete_stream(name)

    def _observe(self, operations: list[Operation]) -> dict[str, list[Subscriber]]:
        outputs = {op.output for op in operations}
        try:
            return {stream: self.broker.subscribers(stream) for stream in outputs}
        except BrokerUnavailable as exc:
            if self.management:
                log.warning("%s; until then every operation counts as wanted", exc)
            self.management = False
            return {}
        finally:
            if not self.management and self.broker.management_available():
                self.management = True
