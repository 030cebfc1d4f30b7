"""The declaration store under many threads: the API's handlers and the reconciler at once.

In process, the store alone shows the rule: a transaction that is still open (its
topology on the broker not yet answered) is invisible to every other thread, and
rolled back it leaves nothing. Through a real manager's HTTP API, many clients at
once create and delete streams and operations: no call fails with a server error,
and what is declared in the end is exactly what the clients left.
"""

from __future__ import annotations

import threading
from collections import Counter
from pathlib import Path
from typing import Any

import httpx
import pytest

from streamboss.manager.store import Store

from .conftest import ManagerPool, ManagerProcess, op_queue, stream_exchange, wait_until

SEED = {"definition": {"exec": "cat", "application": "x", "name": "cat"}}
THREADS = 8
ROUNDS = 25
# Bounds that keep a broken manager from hanging the test; not speed claims.
SETTLE_TIMEOUT = 60.0


@pytest.fixture
def store(tmp_path: Path) -> Any:
    opened = Store(tmp_path / "state")
    yield opened
    opened.close()


def in_thread(action: Any) -> Any:
    """Run ``action`` on a thread of its own (as the reconciler does); return its result."""
    result: dict[str, Any] = {}

    def run() -> None:
        try:
            result["value"] = action()
        except BaseException as exc:  # handed to the caller
            result["error"] = exc

    thread = threading.Thread(target=run)
    thread.start()
    thread.join(timeout=30)
    if "error" in result:
        raise result["error"]
    return result["value"]


def test_an_operation_whose_topology_is_pending_is_invisible_then_gone(store: Store) -> None:
    store.create_stream("in")
    store.define_process(SEED)
    inside = threading.Event()
    release = threading.Event()
    outcome: dict[str, BaseException] = {}

    def topology() -> None:
        # The API applies the broker topology here, inside the transaction.
        inside.set()
        release.wait(30)
        raise RuntimeError("PRECONDITION_FAILED: the broker refuses the queue")

    def create() -> None:
        try:
            store.create_operation("op", "cat", "in", "out", before_commit=topology)
        except RuntimeError as exc:
            outcome["error"] = exc

    writer = threading.Thread(target=create)
    writer.start()
    try:
        assert inside.wait(30)
        # What the reconciler's thread (and a listing) reads meanwhile: committed rows only,
        # at once, without waiting for the open transaction.
        seen = in_thread(lambda: ([op.name for op in store.operations()],
                                  store.get_operation("op"),
                                  [s.name for s in store.streams()]))
        assert seen == ([], None, ["in"])
        # Another writer queues behind the open transaction instead of failing.
        queued = threading.Thread(target=lambda: store.create_stream("later"))
        queued.start()
    finally:
        release.set()
        writer.join(timeout=30)
    queued.join(timeout=30)
    assert "error" in outcome
    assert store.get_operation("op") is None
    assert [s.name for s in store.streams()] == ["in", "later"]


def test_many_threads_write_and_read_without_errors(store: Store) -> None:
    store.create_stream("src")
    store.define_process(SEED)
    errors: list[BaseException] = []

    def work(worker: int) -> None:
        try:
            for index in range(ROUNDS):
                out = f"out-{worker}-{index}"
                store.create_operation(f"op-{worker}-{index}", "cat", "src", out)
                store.operations()
                if index % 2:
                    store.delete_operation(f"op-{worker}-{index}")
                    store.delete_stream(out)
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(w,)) for w in range(THREADS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert errors == []
    expected = {f"op-{w}-{i}" for w in range(THREADS) for i in range(0, ROUNDS, 2)}
    assert {op.name for op in store.operations()} == expected


# -- through the HTTP API of a running manager ------------------------------------------


class Client:
    """One API client on a thread; counts every status code it got."""

    def __init__(self, manager: ManagerProcess) -> None:
        self.http = httpx.Client(base_url=manager.url, headers=manager.headers(), timeout=60)
        self.codes: Counter[int] = Counter()
        self.failures: list[str] = []

    def call(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        response = self.http.request(method, path, **kwargs)
        self.codes[response.status_code] += 1
        if response.status_code >= 500:
            self.failures.append(f"{method} {path}: {response.status_code} {response.text}")
        return response


def test_concurrent_api_writes_never_fail_and_end_consistent(managers: ManagerPool,
                                                              broker) -> None:
    manager = managers.start()
    source = managers.name("src")
    setup = Client(manager)
    assert setup.call("POST", "/v1/streams", json={"name": source}).status_code == 201
    definition = setup.call("POST", "/v1/definitions", json=SEED).json()["id"]
    plan = [[(managers.name(f"o{w}"), managers.name(f"s{w}")) for _ in range(ROUNDS)]
            for w in range(THREADS)]
    clients = [Client(manager) for _ in range(THREADS)]
    stop = threading.Event()
    watcher = Client(manager)

    # Every round declares a stream, every third also an operation on it (each
    # operation is three queues on the broker, two of them quorum queues: enough
    # of them to race, not so many that the shared test broker crawls). Odd rounds
    # delete what they declared; every fifth even round deletes its stream with
    # --force, operation and all.
    def has_op(index: int) -> bool:
        return index % 3 == 0

    def kept(index: int) -> bool:
        return index % 2 == 0 and index % 5 != 4

    def work(client: Client, rounds: list[tuple[str, str]]) -> None:
        for index, (operation, stream) in enumerate(rounds):
            client.call("POST", "/v1/streams", json={"name": stream})
            if has_op(index):
                client.call("POST", "/v1/operations", json={
                    "name": operation, "definition": str(definition), "input": source,
                    "output": stream})
            client.call("GET", "/v1/operations")
            if index % 2:
                if has_op(index):
                    client.call("DELETE", f"/v1/operations/{operation}")
                client.call("DELETE", f"/v1/streams/{stream}")
            elif index % 5 == 4:
                client.call("DELETE", f"/v1/streams/{stream}", params={"force": "true"})

    def watch() -> None:
        while not stop.is_set():
            watcher.call("GET", "/v1/status")
            watcher.call("GET", "/v1/streams")

    threads = [threading.Thread(target=work, args=(client, rounds))
               for client, rounds in zip(clients, plan, strict=True)]
    observer = threading.Thread(target=watch)
    observer.start()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=600)
    stop.set()
    observer.join(timeout=60)

    failures = [f for c in [*clients, watcher] for f in c.failures]
    assert failures == [], failures[:5]
    codes = sum((c.codes for c in clients), Counter())
    assert set(codes) <= {200, 201}, codes
    made_ops = {op for rounds in plan for i, (op, _) in enumerate(rounds) if has_op(i)}
    kept_ops = {op for rounds in plan for i, (op, _) in enumerate(rounds)
                if has_op(i) and kept(i)}
    kept_streams = {s for rounds in plan for i, (_, s) in enumerate(rounds) if kept(i)}
    kept_streams.add(source)
    gone_streams = {s for rounds in plan for _, s in rounds} - kept_streams
    listed = setup.call("GET", "/v1/operations").json()
    assert {op["name"] for op in listed} == kept_ops
    assert {s["name"] for s in setup.call("GET", "/v1/streams").json()} == kept_streams
    # The broker follows: declared topology exists, deleted topology goes (the
    # reconciler retires a deleted operation's queues once it has no agents).
    for stream in sorted(kept_streams):
        assert broker.exchange_exists(stream_exchange(stream)), stream
    for stream in sorted(gone_streams):
        assert not broker.exchange_exists(stream_exchange(stream)), stream
    for operation in sorted(kept_ops):
        assert broker.queue_depth(op_queue(operation)) is not None, operation
    wait_until(lambda: all(broker.queue_depth(op_queue(op)) is None
                           for op in made_ops - kept_ops),
               SETTLE_TIMEOUT, "the deleted operations' queues to go")
    # Leave no quorum queues behind: the manager retires what is deleted through it.
    for operation in sorted(kept_ops):
        assert setup.call("DELETE", f"/v1/operations/{operation}").status_code == 200
    wait_until(lambda: all(broker.queue_depth(op_queue(op)) is None for op in kept_ops),
               SETTLE_TIMEOUT, "the remaining operations' queues to go")


def test_a_declaration_the_broker_refuses_is_never_seen(managers: ManagerPool,
                                                        broker) -> None:
    manager = managers.start()
    client = Client(manager)
    source, output, operation = (managers.name("in"), managers.name("out"),
                                 managers.name("refused"))
    assert client.call("POST", "/v1/streams", json={"name": source}).status_code == 201
    definition = client.call("POST", "/v1/definitions", json=SEED).json()["id"]
    # Another connection's exclusive queue already has the operation's queue name:
    # the broker refuses the manager's declare (405 RESOURCE_LOCKED) for as long as
    # that connection lives.
    broker.channel.queue_declare(op_queue(operation), exclusive=True)
    stop = threading.Event()
    sightings: list[str] = []
    watcher = Client(manager)

    def watch() -> None:
        while not stop.is_set():
            if operation in watcher.call("GET", "/v1/operations").text:
                sightings.append("listing")
            if operation in watcher.call("GET", "/v1/status").text:
                sightings.append("reconciler status")
            if manager.pid_files(operation):
                sightings.append("agent started")

    observer = threading.Thread(target=watch)
    observer.start()
    try:
        for _ in range(20):
            response = client.call("POST", "/v1/operations", json={
                "name": operation, "definition": str(definition), "input": source,
                "output": output, "policy": {"min": 1}})
            assert response.status_code == 409, response.text
            assert "refused" in response.json()["detail"], response.text
    finally:
        stop.set()
        observer.join(timeout=60)
    assert sightings == []
    assert watcher.failures == []
    assert operation not in client.call("GET", "/v1/operations").text
    # The output stream the operation would have created went with it.
    assert output not in {s["name"] for s in client.call("GET", "/v1/streams").json()}
