"""Demand and scaling, observed the way a user would: ``status``, the agent processes on
the machine, and the messages that arrive. A real manager, real agents, the real broker."""

from __future__ import annotations

import json
import os
import signal
import time
import uuid
from pathlib import Path
from urllib.parse import quote

import httpx
import pika
import pytest

from .conftest import (
    ManagerProcess,
    StreamFollower,
    agent_pids,
    stream_exchange,
    wait_until,
)
from .module_manager import manager_names, module_manager  # noqa: F401 (fixtures)

# What the issue promises: an agent within 2 s of a consumer attaching.
WAKE_PROMISE = 2.0
IDLE_SECONDS = 2.0
# Gone "idle_seconds after the last consumer leaves": the idle period, a reconciler pass
# or two and the agent's drain.
GONE_AFTER_LEAVING = IDLE_SECONDS + 3.0
# Bounds that keep a broken manager from hanging the suite; they are not speed claims.
SETTLE_TIMEOUT = 20.0
BACKLOG = 20_000
# The management API's counters trail the queue by a few seconds (more on a busy machine).
STATISTICS_TIMEOUT = 60.0


def define(manager: ManagerProcess, tmp_path: Path, name: str, body: dict) -> str:
    path = tmp_path / f"{name}.json"
    path.write_text(json.dumps({"definition": {**body, "name": name}}))
    return manager.ok("define-process", str(path)).strip()


def status_json(manager: ManagerProcess, operation: str) -> dict:
    """The operation's entry in ``streamboss status -o json``."""
    document = json.loads(manager.ok("status", "-o", "json"))
    [entry] = [e for e in document["operations"] if e["name"] == operation]
    return entry


def test_no_agent_until_consumed_then_one_within_2s_then_none_when_idle(
        manager: ManagerProcess, names, follow, tmp_path: Path) -> None:
    source, sink, operation = names("in"), names("out"), names("upper")
    manager.ok("create-stream", source)
    definition = define(manager, tmp_path, "upper", {"exec": "tr a-z A-Z"})
    manager.ok("create-operation", operation, definition, source, sink,
               "--idle-seconds", str(IDLE_SECONDS))
    manager.ok("publish", source, "waiting for you")

    # Unwanted: several reconciler passes go by and nothing runs; the queue keeps the input.
    manager.wait_status(operation, lambda s: s["backlog"] == 1, SETTLE_TIMEOUT,
                        "the published message in the backlog")
    time.sleep(2.5)
    entry = status_json(manager, operation)
    assert (entry["wanted"], entry["desired"], entry["running"]) == (False, 0, 0)
    assert entry["backlog"] == 1
    assert agent_pids(operation) == set()
    assert manager.pid_files(operation) == []

    # A consumer attaches: the first status poll that shows an agent is within 2 s.
    follower = follow(sink)
    woke = manager.wait_status(operation, lambda s: s["running"] >= 1, SETTLE_TIMEOUT,
                               "an agent after the consumer attached")
    waited = time.monotonic() - follower.attached_at
    print(f"first agent {waited:.2f}s after the consumer attached")
    assert waited < WAKE_PROMISE, f"first agent after {waited:.2f}s"
    assert woke["wanted"] is True and woke["desired"] == 1
    assert len(agent_pids(operation)) == 1
    [pid_file] = manager.pid_files(operation)
    assert int(pid_file.read_text()) in agent_pids(operation)
    # The message that waited while nobody listened arrives, transformed.
    [message] = follower.wait_for(1)
    assert message.body == b"WAITING FOR YOU"

    # The last consumer leaves: the agent stays warm for a moment, then it is gone.
    left = follower.leave()
    assert len(agent_pids(operation)) == 1
    wait_until(lambda: not agent_pids(operation), GONE_AFTER_LEAVING + 10,
               "the agent to exit after the consumer left")
    gone_after = time.monotonic() - left
    print(f"agents gone {gone_after:.2f}s after the consumer left")
    assert gone_after < GONE_AFTER_LEAVING, f"agents gone {gone_after:.2f}s after leaving"
    assert gone_after > 0.5, "scaled to zero at once, not after idle_seconds"
    entry = status_json(manager, operation)
    assert (entry["wanted"], entry["desired"], entry["running"]) == (False, 0, 0)
    wait_until(lambda: manager.pid_files(operation) == [], SETTLE_TIMEOUT,
               "the exited agent's pid file to go")


def test_a_chain_wakes_backwards_from_one_consumer(manager: ManagerProcess, names, follow,
                                                   tmp_path: Path) -> None:
    streams = [names(f"s{i}") for i in range(4)]
    manager.ok("create-stream", streams[0])
    operations = []
    for i, mark in enumerate("abc"):
        definition = define(manager, tmp_path, f"mark-{mark}", {"exec": f"sed -e s/^/{mark}:/"})
        operation = names(f"op{i}")
        manager.ok("create-operation", operation, definition, streams[i], streams[i + 1],
                   "--idle-seconds", str(IDLE_SECONDS))
        operations.append(operation)
    # Nobody reads the end of the chain: nothing runs anywhere along it.
    for operation in operations:
        manager.wait_status(operation, lambda s: s["desired"] == 0, SETTLE_TIMEOUT,
                            "declared and idle")
    time.sleep(1.5)
    assert all(not agent_pids(op) for op in operations)

    follower = follow(streams[-1])
    for operation in operations:
        entry = manager.wait_status(operation, lambda s: s["running"] >= 1, SETTLE_TIMEOUT,
                                    "an agent once the last stream has a consumer")
        assert entry["wanted"] is True
    assert all(len(agent_pids(op)) == 1 for op in operations)

    manager.ok("publish", streams[0], "hello")
    [message] = follower.wait_for(1)
    assert message.body == b"c:b:a:hello"
    assert message.header("sb-stream") == streams[-1]
    time.sleep(0.5)
    assert len(follower.messages) == 1

    follower.leave()
    wait_until(lambda: all(not agent_pids(op) for op in operations),
               GONE_AFTER_LEAVING + 10, "the whole chain to go idle")


def publish_backlog(broker_url: str, stream: str, count: int) -> set[str]:
    """``count`` persistent messages with unique ``sb-id`` headers; returns the ids.
    (No confirms: the caller waits for the queue to hold them all.)"""
    run = uuid.uuid4().hex[:8]
    ids = [f"backlog-{run}-{i}" for i in range(count)]
    connection = pika.BlockingConnection(pika.URLParameters(broker_url))
    try:
        channel = connection.channel()
        for ident in ids:
            channel.basic_publish(stream_exchange(stream), "", f"line {ident}".encode(),
                                  pika.BasicProperties(delivery_mode=2, message_id=ident,
                                                       headers={"sb-id": ident}))
    finally:
        connection.close()
    return set(ids)


def queue_statistics(queue: str) -> dict:
    """The broker's message counters for ``queue`` (management API, a few seconds behind)."""
    response = httpx.get(f"http://127.0.0.1:15672/api/queues/{quote('/', safe='')}/{queue}",
                         auth=("guest", "guest"), timeout=5)
    assert response.status_code == 200, response.text
    return response.json().get("message_stats") or {}


@pytest.mark.slow
def test_a_backlog_scales_out_to_max_and_back_in_without_losing_anything(
        manager: ManagerProcess, names, follow, broker_url: str, tmp_path: Path) -> None:
    source, sink, operation = names("in"), names("out"), names("relay")
    manager.ok("create-stream", source)
    definition = define(manager, tmp_path, "relay", {"exec": "cat", "mode": "service"})
    manager.ok("create-operation", operation, definition, source, sink, "--max", "3",
               "--target-backlog", "1000", "--scale-out-cooldown", "1",
               "--scale-in-cooldown", "2", "--idle-seconds", str(IDLE_SECONDS))

    published = publish_backlog(broker_url, source, BACKLOG)
    manager.wait_status(operation, lambda s: s["backlog"] == BACKLOG, SETTLE_TIMEOUT,
                        f"{BACKLOG} messages waiting in the operation's queue")
    entry = status_json(manager, operation)
    assert (entry["wanted"], entry["running"]) == (False, 0)
    assert agent_pids(operation) == set()

    follower: StreamFollower = follow(sink)
    most_running = most_processes = 0
    deadline = time.monotonic() + 120
    while len(follower.messages) < BACKLOG and time.monotonic() < deadline:
        entry = manager.op_status(operation)
        most_running = max(most_running, entry["running"])
        most_processes = max(most_processes, len(agent_pids(operation)))
        time.sleep(0.1)
    follower.wait_for(BACKLOG, timeout=1)
    assert most_running == 3, f"expected the policy's max of 3 agents, saw {most_running}"
    assert most_processes <= 3, f"{most_processes} agent processes for a max of 3"

    # Drained while still wanted: back to one agent, after the scale-in cooldown.
    entry = manager.wait_status(operation, lambda s: s["running"] == 1 and s["draining"] == 0,
                                SETTLE_TIMEOUT, "one agent once the backlog drained")
    assert (entry["wanted"], entry["desired"], entry["backlog"]) == (True, 1, 0)
    wait_until(lambda: len(agent_pids(operation)) == 1, SETTLE_TIMEOUT,
               "the scaled-in agents to exit")
    time.sleep(1.5)  # anything requeued by the scale-in would show up by now

    parents = [m.parent for m in follower.messages]
    assert len(set(parents)) == BACKLOG and set(parents) == published, "inputs missing"
    assert len(parents) == BACKLOG, f"{len(parents) - BACKLOG} duplicate output(s)"
    assert {m.body for m in follower.messages[:3]} <= {f"line {p}".encode() for p in published}
    # The broker's own count: once its statistics show every input acked, none of them
    # was handed back and delivered again.
    stats: dict = {}
    deadline = time.monotonic() + STATISTICS_TIMEOUT
    while stats.get("ack", 0) < BACKLOG and time.monotonic() < deadline:
        time.sleep(0.5)
        stats = queue_statistics(f"sb.op.{operation}")
    assert stats.get("ack", 0) >= BACKLOG, f"statistics did not catch up: {stats}"
    assert stats.get("redeliver", 0) == 0, stats

    left = follower.leave()
    wait_until(lambda: not agent_pids(operation), GONE_AFTER_LEAVING + 10,
               "every agent to exit after the consumer left")
    assert time.monotonic() - left < GONE_AFTER_LEAVING
    entry = status_json(manager, operation)
    assert (entry["desired"], entry["running"], entry["backlog"]) == (0, 0, 0)


def test_a_crashed_agent_is_replaced_and_nothing_is_lost(manager: ManagerProcess, names, follow,
                                                         tmp_path: Path) -> None:
    source, sink, operation = names("in"), names("out"), names("crashy")
    manager.ok("create-stream", source)
    definition = define(manager, tmp_path, "crashy", {"exec": "tr a-z A-Z"})
    manager.ok("create-operation", operation, definition, source, sink)
    follower = follow(sink)
    manager.wait_status(operation, lambda s: s["running"] == 1, SETTLE_TIMEOUT,
                        "an agent for the consumer")
    [first] = agent_pids(operation)
    os.kill(first, signal.SIGKILL)
    # Published while no agent runs: the operation's queue keeps it for the replacement.
    manager.ok("publish", source, "after the crash")
    wait_until(lambda: agent_pids(operation) - {first}, SETTLE_TIMEOUT,
               "a new agent after the crash")
    entry = manager.wait_status(operation, lambda s: s["restarts"] >= 1, SETTLE_TIMEOUT,
                                "the crash counted in status")
    assert entry["running"] == 1 and len(agent_pids(operation)) == 1
    [message] = follower.wait_for(1)
    assert message.body == b"AFTER THE CRASH"
