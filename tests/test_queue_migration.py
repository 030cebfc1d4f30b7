"""Operation queues of the previous release (classic, no arguments) are moved onto the
quorum queues of this one by the manager, without losing what they hold or what is
published meanwhile, resumed after a crash at any step; deleting an operation takes
its input, solo and retry queues with it and nothing of another operation."""

from __future__ import annotations

import collections
import threading
from typing import Any

import httpx
import pika
import pika.exceptions
import pytest

from streamboss.agent.naming import (
    dead_queue,
    operation_queue,
    operation_queue_arguments,
    retry_queue,
    retry_queue_arguments,
    solo_queue,
    stream_exchange,
)
from streamboss.manager.broker import Broker as ManagerBroker
from streamboss.manager.queue_migration import BATCH, migrate, migration_queues, pending

from .conftest import (
    BROKER_URL,
    Broker,
    ManagerPool,
    ManagerProcess,
    Message,
    agent_pids,
    free_port,
    wait_until,
)
from .module_manager import manager_names, module_manager  # noqa: F401 (fixtures)

MANAGEMENT = "http://127.0.0.1:15672/api"
# Bounds that keep a broken migration from hanging the suite; they are not speed claims.
MIGRATION_TIMEOUT = 90.0
# A topology refresh (10 s) plus a pass, with room: how long a retry may take to come.
RETRY_TIMEOUT = 60.0


# -- helpers -------------------------------------------------------------------------------


def queue_info(queue: str) -> dict[str, Any] | None:
    """The management API's view of ``queue`` (type, arguments), or None when it is gone."""
    response = httpx.get(f"{MANAGEMENT}/queues/%2F/{queue}", auth=("guest", "guest"), timeout=5)
    if response.status_code == 404:
        return None
    response.raise_for_status()
    return response.json()


def is_contract_queue(operation: str, queue: str) -> bool:
    info = queue_info(queue)
    return (info is not None and info["type"] == "quorum" and info["durable"]
            and info["arguments"] == operation_queue_arguments(operation))


def migrated(operation: str) -> bool:
    """``sb.op`` and ``sb.solo`` are the contract's quorum queues and no temporary is left."""
    return (is_contract_queue(operation, operation_queue(operation))
            and is_contract_queue(operation, solo_queue(operation))
            and all(queue_info(q) is None for q in migration_queues(operation)))


def declare(manager: ManagerProcess, names: Any, source: str | None = None,
            operation: str | None = None, policy: dict[str, Any] | None = None,
            ) -> tuple[str, str, str]:
    """A stream, a ``cat`` definition and an operation on them through the API; returns
    (input, operation, output). Nothing subscribes to the output, so no agent runs."""
    source = source or names("in")
    operation, sink = operation or names("op"), names("out")

    def post(path: str, body: dict[str, Any]) -> None:
        response = manager.api("POST", path, json=body)
        assert response.status_code in (200, 201), response.text

    post("/v1/streams", {"name": source})
    post("/v1/definitions", {"definition": {"exec": "cat", "name": "copy"}})
    post("/v1/operations", {"name": operation, "definition": "copy", "input": source,
                            "output": sink, "policy": policy or {}})
    return source, operation, sink


def connect() -> pika.BlockingConnection:
    params = pika.URLParameters(BROKER_URL)
    params.heartbeat = 0
    return pika.BlockingConnection(params)


def fill(queue: str, ids: list[str], exchange: str = "") -> None:
    """Publish one persistent message per id into ``queue`` (through ``exchange`` when
    given: then every queue bound to it gets them), in one transaction."""
    connection = connect()
    try:
        channel = connection.channel()
        channel.tx_select()
        for ident in ids:
            channel.basic_publish(exchange, "" if exchange else queue, body_of(ident),
                                  pika.BasicProperties(delivery_mode=2, message_id=ident,
                                                       headers={"sb-id": ident, "kept": "yes"}))
        channel.tx_commit()
    finally:
        connection.close()


def body_of(ident: str) -> bytes:
    return f"body of {ident}\n\x00\xff".encode("latin-1")


def old_queue(operation: str, source: str, ids: list[str], bound: bool = True) -> None:
    """Put ``sb.op.<operation>`` back the previous release's way: a classic durable queue
    with no arguments, bound to the input, holding ``ids``; and no solo queue."""
    connection = connect()
    try:
        channel = connection.channel()
        channel.queue_delete(operation_queue(operation))
        channel.queue_delete(solo_queue(operation))
        channel.queue_declare(operation_queue(operation), durable=True)
        if bound:
            channel.queue_bind(operation_queue(operation), stream_exchange(source), "#")
    finally:
        connection.close()
    fill(operation_queue(operation), ids)


def drain(broker: Broker, queue: str) -> list[Message]:
    """Everything ``queue`` holds (consumed and acked)."""
    return broker.queue(queue).collect_until_quiet(quiet=2.0)


def check_moved(messages: list[Message], ids: list[str]) -> None:
    """Each of ``ids`` is there once, body, message id and headers intact."""
    counts = collections.Counter(m.header("sb-id") for m in messages)
    missing = [i for i in ids if counts[i] == 0]
    twice = [i for i in ids if counts[i] > 1]
    assert not missing and not twice, f"missing {missing[:5]}, twice {twice[:5]}"
    for message in messages:
        ident = message.header("sb-id")
        if ident in ids:
            assert message.body == body_of(ident)
            assert message.properties.message_id == ident
            assert message.header("kept") == "yes"
            assert "x-delivery-count" not in message.headers


def delete_queues(*queues: str) -> None:
    connection = connect()
    try:
        for queue in queues:
            connection.channel().queue_delete(queue)
    finally:
        connection.close()


class Publisher:
    """Publishes to a stream, each message confirmed, on a thread of its own until
    stopped; ``confirmed`` lists the ids the broker took."""

    def __init__(self, stream: str) -> None:
        self.stream = stream
        self.confirmed: list[str] = []
        self._stop = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name=f"publish-{stream}",
                                        daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            connection = connect()
            channel = connection.channel()
            channel.confirm_delivery()
            index = 0
            while not self._stop.is_set():
                ident = f"live-{index}"
                channel.basic_publish(stream_exchange(self.stream), "", ident.encode(),
                                      pika.BasicProperties(delivery_mode=2,
                                                           headers={"sb-id": ident}))
                self.confirmed.append(ident)
                index += 1
            connection.close()
        except BaseException as exc:
            self._error = exc

    def stop(self) -> list[str]:
        self._stop.set()
        self._thread.join(timeout=30)
        assert self._error is None, f"publisher failed: {self._error!r}"
        return self.confirmed


# -- upgrading a manager -------------------------------------------------------------------


@pytest.mark.slow
def test_upgrade_moves_a_classic_queue_to_quorum_while_publishers_publish(
        managers: ManagerPool, broker: Broker) -> None:
    first = managers.start()
    source, operation, _sink = declare(first, managers.name)
    first.stop()
    # What the previous release left: a classic queue with a backlog, and dead letters.
    backlog = [f"old-{i}" for i in range(1000)]
    old_queue(operation, source, backlog)
    fill(dead_queue(operation), ["dead-1", "dead-2", "dead-3"],
         exchange=stream_exchange(f"{operation}.dead"))
    assert queue_info(operation_queue(operation))["type"] == "classic"

    publisher = Publisher(source)
    try:
        wait_until(lambda: len(publisher.confirmed) >= 50, 30, "the publisher to be publishing")
        upgraded = managers.new(state_dir=first.state_dir).start()
        wait_until(lambda: migrated(operation), MIGRATION_TIMEOUT,
                   f"{operation}'s queues migrated\n{upgraded.log()}")
        after = len(publisher.confirmed)  # and publishing goes on into the new queue
        wait_until(lambda: len(publisher.confirmed) >= after + 50, 30, "more messages")
    finally:
        live = publisher.stop()
        delete_queues(*migration_queues(operation))

    messages = drain(broker, operation_queue(operation))
    check_moved([m for m in messages if m.header("sb-id") in set(backlog)], backlog)
    seen = {m.header("sb-id") for m in messages}
    lost = [ident for ident in live if ident not in seen]
    assert not lost, f"{len(lost)} of {len(live)} messages published meanwhile lost: {lost[:5]}"
    assert seen <= set(backlog) | set(live)
    assert broker.queue_depth(dead_queue(operation)) == 3
    assert upgraded.status()["reconciler_error"] is None
    assert "moving what it holds" in upgraded.log()


@pytest.mark.slow
def test_a_manager_killed_mid_migration_is_finished_by_the_next(
        managers: ManagerPool, broker: Broker) -> None:
    first = managers.start()
    source, operation, _sink = declare(first, managers.name)
    first.stop()
    backlog = [f"old-{i}" for i in range(20_000)]
    old_queue(operation, source, backlog)
    temporary = migration_queues(operation)[0]

    try:
        crashed = managers.new(state_dir=first.state_dir).start(wait=False)
        wait_until(lambda: queue_info(temporary) is not None, MIGRATION_TIMEOUT,
                   f"{temporary} to appear\n{crashed.log()}", interval=0.01)
        crashed.kill9()
        old, temp = queue_info(operation_queue(operation)), queue_info(temporary)
        # The kill came mid-move: something is still on its way.
        assert temp is not None and (old is None or old["type"] == "classic")

        resumed = managers.new(state_dir=first.state_dir).start()
        wait_until(lambda: migrated(operation), MIGRATION_TIMEOUT,
                   f"{operation}'s queues migrated\n{resumed.log()}")
    finally:
        delete_queues(*migration_queues(operation))
    messages = drain(broker, operation_queue(operation))
    counts = collections.Counter(m.header("sb-id") for m in messages)
    assert set(counts) == set(backlog)
    # At most the one batch committed but not yet acked when the manager died.
    assert sum(counts.values()) - len(backlog) <= BATCH


# -- interrupted migrations, leftovers, consumers ------------------------------------------


@pytest.mark.parametrize("left", ["temporary only", "old and temporary", "new and temporary"])
def test_a_leftover_temporary_queue_is_finished(manager: ManagerProcess, names: Any,
                                                broker: Broker, left: str) -> None:
    """The states a crash leaves (the manager re-reads them from the broker): the old queue
    deleted before the new one was declared; the old one still there with the temporary;
    the new one declared and bound, the temporary not emptied yet."""
    source = broker.create_stream(names("in"))
    operation = names("op")
    temporary = migration_queues(operation)[0]
    waiting = [f"temp-{i}" for i in range(300)]
    elsewhere = [f"queue-{i}" for i in range(200)]
    connection = connect()
    channel = connection.channel()
    channel.queue_declare(temporary, durable=True, arguments=operation_queue_arguments(operation))
    channel.queue_bind(temporary, stream_exchange(source), "#")
    connection.close()
    try:
        fill(temporary, waiting)
        if left == "old and temporary":
            old_queue(operation, source, elsewhere, bound=False)
        elif left == "new and temporary":
            connection = connect()
            channel = connection.channel()
            channel.queue_declare(operation_queue(operation), durable=True,
                                  arguments=operation_queue_arguments(operation))
            channel.queue_bind(operation_queue(operation), stream_exchange(source), "#")
            connection.close()
            fill(operation_queue(operation), elsewhere)
        else:
            elsewhere = []
        declare(manager, names, source=source, operation=operation)
        wait_until(lambda: migrated(operation), MIGRATION_TIMEOUT,
                   f"{operation}'s queues migrated\n{manager.log()}")
        messages = drain(broker, operation_queue(operation))
        check_moved(messages, waiting + elsewhere)
    finally:
        delete_queues(*migration_queues(operation))


def test_an_old_queue_with_consumers_waits_for_them_and_holds_the_agents(
        manager: ManagerProcess, names: Any, broker: Broker, follow: Any) -> None:
    """An agent of the previous release still reading the old queue: its unacked messages
    would go with the queue, so the manager says what to stop, keeps the operation's own
    agents at zero (the operation is wanted) and migrates once the consumer is gone."""
    source = broker.create_stream(names("in"))
    operation = names("op")
    backlog = [f"old-{i}" for i in range(10)]
    old_queue(operation, source, backlog)
    reader = connect()
    channel = reader.channel()
    channel.basic_qos(prefetch_count=1)
    held: list[str] = []
    channel.basic_consume(operation_queue(operation),
                          lambda _c, _m, _p, body: held.append(body.decode("latin-1")))
    wait_until(lambda: reader.process_data_events(0.05) or held, 30, "the old consumer's message")
    try:
        _source, _operation, sink = declare(manager, names, source=source, operation=operation,
                                            policy={"idle_seconds": 0})
        follower = follow(sink)
        error = wait_until(lambda: manager.status()["reconciler_error"], RETRY_TIMEOUT,
                           "the manager to say why it cannot migrate")
        assert operation_queue(operation) in error and "1 consumer(s)" in error
        assert "rabbitmqctl list_consumers" in error
        status = manager.wait_status(operation, lambda s: s["wanted"], RETRY_TIMEOUT,
                                     "wanted")
        assert status["desired"] == 0 and not agent_pids(operation)
        assert queue_info(operation_queue(operation))["type"] == "classic"
        follower.leave()
        manager.wait_status(operation, lambda s: not s["wanted"], RETRY_TIMEOUT, "unwanted")
    finally:
        reader.close()  # the unacked message goes back to the old queue
    wait_until(lambda: migrated(operation), RETRY_TIMEOUT,
               f"{operation}'s queues migrated\n{manager.log()}")
    wait_until(lambda: manager.status()["reconciler_error"] is None, RETRY_TIMEOUT,
               "the error to clear")
    check_moved(drain(broker, operation_queue(operation)), backlog)


@pytest.mark.parametrize("kind", ["classic", "quorum"])
def test_without_the_management_api_a_queue_that_refuses_the_arguments_is_migrated(
        broker: Broker, names: Any, kind: str) -> None:
    """Only a redeclare can tell then: its refusal is enough, the move needs AMQP alone
    (a quorum queue of other arguments refuses the classic delete flags, then is checked
    and deleted)."""
    source = broker.create_stream(names("in"))
    operation = names("op")
    broker.forget_operation(operation)
    backlog = [f"old-{i}" for i in range(100)]
    if kind == "classic":
        old_queue(operation, source, backlog)
    else:
        connection = connect()
        other = {**operation_queue_arguments(operation), "x-dead-letter-exchange": "elsewhere"}
        connection.channel().queue_declare(operation_queue(operation), durable=True,
                                           arguments=other)
        connection.close()
        fill(operation_queue(operation), backlog)
    away = ManagerBroker(BROKER_URL, management_url=f"http://127.0.0.1:{free_port()}")
    try:
        moves = pending(away, operation, source)
        assert [(m.queue, m.found) for m in moves] == [(operation_queue(operation), "unknown")]
        away.ensure_dead_queue(operation, dead_queue(operation))
        assert migrate(away, moves) == 2 * len(backlog)  # into the temporary queue and out
        assert away.ensure_operation(operation, source)
        assert pending(away, operation, source) == []
    finally:
        away.close()
        delete_queues(*migration_queues(operation), dead_queue(operation))
    assert migrated(operation)
    check_moved(drain(broker, operation_queue(operation)), backlog)


# -- deleting an operation -----------------------------------------------------------------


def test_delete_operation_removes_its_queues_and_no_other_operations(
        manager: ManagerProcess, names: Any, broker: Broker) -> None:
    source = broker.create_stream(names("in"))
    operation = names("op")
    extension = f"{operation}.x"  # sb.retry.<operation>.x.<ms> must survive <operation>
    declare(manager, names, source=source, operation=operation)
    declare(manager, names, source=source, operation=extension)
    connection = connect()
    channel = connection.channel()
    mine = [retry_queue(operation, 1000), retry_queue(operation, 64000)]
    theirs = [retry_queue(extension, 1000)]
    for name in mine:
        channel.queue_declare(name, durable=True, arguments=retry_queue_arguments(operation))
    for name in theirs:
        channel.queue_declare(name, durable=True, arguments=retry_queue_arguments(extension))
    connection.close()
    fill(operation_queue(extension), ["keep-1"])
    fill(theirs[0], ["keep-2"])
    try:
        wait_until(lambda: migrated(operation) and migrated(extension), MIGRATION_TIMEOUT,
                   "both operations' queues")
        response = manager.api("DELETE", f"/v1/operations/{operation}")
        assert response.status_code == 200, response.text
        gone = [operation_queue(operation), solo_queue(operation), dead_queue(operation), *mine]
        wait_until(lambda: all(queue_info(q) is None for q in gone), RETRY_TIMEOUT,
                   f"{gone} deleted\n{manager.log()}")
        assert not broker.exchange_exists(stream_exchange(f"{operation}.dead"))
        for queue in (operation_queue(extension), solo_queue(extension), dead_queue(extension),
                      *theirs):
            assert queue_info(queue) is not None, queue
        assert broker.queue_depth(operation_queue(extension)) == 1
        assert broker.queue_depth(theirs[0]) == 1
    finally:
        delete_queues(*mine, *theirs)
