"""Scaling counts the messages agents hold, not only the waiting ones.

A message delivered to an agent and not yet acknowledged is work not done. The
backlog that scaling uses is ready + unacknowledged of ``sb.op.OP`` and
``sb.solo.OP``, so agents busy with messages are not scaled in while they work.
The pure part (:func:`operation_backlog` and ``decide``) is tested on numbers; a
real manager shows it with an operation whose agents hold messages for a while.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import quote

import httpx

from streamboss.manager.broker import QueueCounts, QueueState
from streamboss.manager.model import ScalingPolicy
from streamboss.manager.reconciler import operation_backlog
from streamboss.manager.scaling import ScaleState, decide

from .conftest import ManagerPool, op_queue, wait_until

# Bounds that keep a broken manager from hanging the test; not speed claims. The
# management API's figures are a few seconds old, so waits on them are generous.
SETTLE_TIMEOUT = 90.0
MANAGEMENT_URL = "http://127.0.0.1:15672"


def listed(ready: int | None, unacked: int | None) -> QueueCounts:
    """A queue as the management API lists it (a few seconds old)."""
    return QueueCounts(ready, unacked, 1, 0.0, 0.0)


def now(ready: int, consumers: int) -> QueueState:
    """A queue as a passive declare finds it (exact)."""
    return QueueState(ready, consumers)


def test_the_backlog_is_ready_plus_unacked_of_the_input_and_solo_queues() -> None:
    fresh = {"sb.op.x": now(2, 3), "sb.solo.x": now(1, 3)}
    listing = {"sb.op.x": listed(2, 6), "sb.solo.x": listed(1, 1), "sb.op.y": listed(50, 50)}
    assert operation_backlog("x", fresh, listing) == (10, 7)


def test_a_solo_queue_not_declared_yet_counts_zero() -> None:
    assert operation_backlog("x", {"sb.op.x": now(0, 1), "sb.solo.x": None},
                             {"sb.op.x": listed(0, 3)}) == (3, 3)


def test_without_consumers_nothing_is_in_flight_whatever_the_listing_says() -> None:
    # The listing can lag far behind on a loaded broker: a queue nobody consumes holds
    # nothing unacknowledged, and its ready count is the passive declare's.
    assert operation_backlog("x", {"sb.op.x": now(0, 0)},
                             {"sb.op.x": listed(5508, 200)}) == (0, 0)
    assert operation_backlog("x", {"sb.op.x": now(7, 0)}, None) == (7, 0)


def test_messages_taken_since_the_listing_still_count() -> None:
    # The agents just took all four: none ready now, the listing still says ready.
    assert operation_backlog("x", {"sb.op.x": now(0, 2)}, {"sb.op.x": listed(4, 0)}) == (4, 0)
    # Published since the listing: the fresh ready count is the larger.
    assert operation_backlog("x", {"sb.op.x": now(9, 2)}, {"sb.op.x": listed(4, 3)}) == (12, 3)


def test_no_figures_for_a_consumed_queue_is_unknown_not_zero() -> None:
    # The management API away, or no figures yet for a queue this new.
    assert operation_backlog("x", {"sb.op.x": now(3, 1)}, None) == (3, None)
    assert operation_backlog("x", {"sb.op.x": now(3, 1)}, {"sb.op.x": listed(None, None)}) \
        == (3, None)


def test_agents_holding_messages_are_not_scaled_in_until_they_are_done() -> None:
    policy = ScalingPolicy(min=0, max=4, target_backlog_per_agent=2, scale_out_cooldown=0,
                           scale_in_cooldown=0)
    state = ScaleState()

    def pass_at(at: float, ready: int, unacked: int) -> int:
        backlog, _ = operation_backlog("x", {"sb.op.x": now(ready, 3)},
                                       {"sb.op.x": listed(ready, unacked)})
        return decide(policy, state, True, backlog, at)

    assert pass_at(0, ready=6, unacked=0) == 3
    # The three agents took all six: nothing waits, six are being worked on.
    assert pass_at(10, ready=0, unacked=6) == 3
    assert pass_at(20, ready=0, unacked=5) == 3
    # Four are done: two agents' worth of work is left.
    assert pass_at(30, ready=0, unacked=2) == 1
    assert pass_at(40, ready=0, unacked=0) == 1


# -- a real manager ---------------------------------------------------------------------


def listed_ready(queue: str) -> int | None:
    """Ready messages of ``queue`` as the management API counts them (None: no figures)."""
    response = httpx.get(f"{MANAGEMENT_URL}/api/queues/%2F/{quote(queue, safe='')}",
                         auth=("guest", "guest"), timeout=10)
    return response.json().get("messages_ready") if response.status_code == 200 else None


# Long enough for the management API to publish fresh figures (every 5 s, later on a
# loaded broker) while every message is still held: in CI a 10 s hold once ended
# before its figures showed any unacknowledged message.
HOLD_SECONDS = 20
MESSAGES = 4


def test_agents_holding_unacked_messages_are_not_scaled_in_while_they_work(
        managers: ManagerPool, broker, follow) -> None:
    manager = managers.start()
    source, operation = managers.name("in"), managers.name("slow")
    output = managers.name("out")
    assert manager.api("POST", "/v1/streams", json={"name": source}).status_code == 201
    # Each message holds its agent for a while before the output (and the ack) comes.
    definition = manager.api("POST", "/v1/definitions", json={
        "exec": f"sleep {HOLD_SECONDS}; cat", "shell": True, "concurrency": MESSAGES,
        "timeout": 120, "name": managers.name("sleeper")})
    assert definition.status_code == 201, definition.text
    created = manager.api("POST", "/v1/operations", json={
        "name": operation, "definition": str(definition.json()["id"]), "input": source,
        "output": output, "policy": {"min": 0, "max": 2, "target_backlog_per_agent": 2,
                                     "scale_out_cooldown": 0, "scale_in_cooldown": 0,
                                     "idle_seconds": 600}})
    assert created.status_code == 201, created.text
    broker.publish(source, [f"m{i}".encode() for i in range(MESSAGES)])
    manager.wait_status(operation, lambda s: s["backlog"] == MESSAGES, SETTLE_TIMEOUT,
                        "the published messages in the backlog")
    # The management API has no figures for a queue's first ten seconds or so; wait for
    # them, so that the agents' unacknowledged messages are seen counted as such.
    wait_until(lambda: listed_ready(op_queue(operation)) == MESSAGES, SETTLE_TIMEOUT,
               "the management API's figures for the operation's queue")

    follower = follow(output)  # wanted from now on: two agents for four messages
    manager.wait_status(operation, lambda s: s["running"] == 2, SETTLE_TIMEOUT,
                        "two agents")
    samples: list[dict[str, Any]] = []

    def done() -> bool:
        # Only while all of them are in flight: the first outputs (and acks) make the
        # backlog smaller, and fewer agents are then rightly enough.
        entry = manager.op_status(operation)
        if follower.messages:
            return True
        if entry is not None:
            samples.append(entry)
        return False

    wait_until(done, SETTLE_TIMEOUT + HOLD_SECONDS, "the first output", interval=0.2)
    follower.wait_for(MESSAGES, SETTLE_TIMEOUT)
    # Nothing was ready once the agents had taken the messages; before, that meant a
    # backlog of 0 and a scale-in to one agent in the middle of the work.
    assert samples, "no status seen while the messages were in flight"
    seen = [(s["desired"], s["running"], s["draining"], s["backlog"], s["in_flight"])
            for s in samples]
    assert all(s["desired"] == 2 and s["draining"] == 0 for s in samples), seen
    assert all(s["backlog"] == MESSAGES for s in samples), seen
    assert any((s["in_flight"] or 0) > 0 for s in samples), seen
    # Once acknowledged, the work is done and the agents go back to the minimum.
    entry = manager.wait_status(operation, lambda s: s["desired"] == 1 and s["backlog"] == 0,
                                SETTLE_TIMEOUT, "one agent once the messages are acked")
    assert entry["in_flight"] == 0
    assert sorted(m.body for m in follower.messages) == [f"m{i}".encode()
                                                         for i in range(MESSAGES)]
