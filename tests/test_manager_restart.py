"""Restarting the manager keeps every declaration and leaves exactly the right agents:
after a clean stop (SIGTERM, Ctrl-C) and after ``kill -9`` with its agents orphaned."""

from __future__ import annotations

import signal
import time

import pytest

from .conftest import ManagerPool, ManagerProcess, agent_pids, wait_until

AGENTS = 2
# Bounds that keep a broken manager from hanging the suite; they are not speed claims.
SETTLE_TIMEOUT = 30.0
# How long the count must hold once it is right: a few reconciler passes.
HOLD = 2.0


def declare(manager: ManagerProcess, names) -> tuple[str, str, str]:
    """A stream, two versions of a definition, a two-operation chain (the second one
    tuned) and a spare stream, through the API; returns (input, operation, output) of the
    operation that will run."""
    source, middle, sink = names("in"), names("mid"), names("out")
    first, second = names("first"), names("second")

    def post(path: str, body: dict) -> dict:
        response = manager.api("POST", path, json=body)
        assert response.status_code in (200, 201), response.text
        return response.json()

    post("/v1/streams", {"name": source})
    post("/v1/definitions", {"definition": {"exec": "tr a-z A-Z", "name": "upper"}})
    newest = post("/v1/definitions", {"exec": "tr a-z A-Z", "name": "upper"})["id"]
    post("/v1/operations", {"name": first, "definition": "upper", "input": source,
                            "output": middle, "policy": {"min": AGENTS, "idle_seconds": 600}})
    post("/v1/operations", {"name": second, "definition": str(newest), "input": middle,
                            "output": sink, "policy": {"max": 2, "target_backlog_per_agent": 50,
                                                       "scale_in_cooldown": 7}})
    post("/v1/streams", {"name": names("spare")})
    return source, first, middle


def watch(operation: str, until: float) -> tuple[int, set[int]]:
    """Sample the operation's agent processes until ``until``; return the most seen at
    once and the last set."""
    most, current = 0, agent_pids(operation)
    while time.monotonic() < until:
        current = agent_pids(operation)
        most = max(most, len(current))
        time.sleep(0.05)
    return most, current


def settle(operation: str, expected: int, gone: set[int] = frozenset()) -> set[int]:
    """Wait until exactly ``expected`` agents run (none of ``gone``), sampling all the while
    that there are never more; then check the count holds."""
    most = 0

    def right() -> set[int] | None:
        nonlocal most
        current = agent_pids(operation)
        most = max(most, len(current))
        return current if len(current) == expected and not current & gone else None

    wait_until(right, SETTLE_TIMEOUT, f"exactly {expected} agents of {operation}")
    held_most, final = watch(operation, time.monotonic() + HOLD)
    assert max(most, held_most) <= expected, f"saw {max(most, held_most)} agents at once"
    assert len(final) == expected
    return final


@pytest.mark.slow
@pytest.mark.parametrize("stop_signal", [signal.SIGTERM, signal.SIGINT],
                         ids=["SIGTERM", "SIGINT"])
def test_a_clean_restart_keeps_declarations_and_one_set_of_agents(
        managers: ManagerPool, follow, stop_signal: int) -> None:
    manager = managers.start()
    _source, operation, middle = declare(manager, managers.name)
    follow(middle)  # keeps the first operation wanted throughout
    before_pids = settle(operation, AGENTS)
    declared = manager.declarations()

    code = manager.stop(stop_signal)
    # Either is a clean stop.
    assert code == 0, f"manager exited with {code}:\n{manager.log()}"
    # A clean stop drains and stops every agent it started: none is left behind.
    assert agent_pids(operation) == set(), "agents outlived the manager"
    assert manager.pid_files(operation) == []

    manager.start()
    assert manager.declarations() == declared
    after_pids = settle(operation, AGENTS, gone=before_pids)
    entry = manager.op_status(operation)
    assert (entry["desired"], entry["running"]) == (AGENTS, AGENTS)
    assert {int(p.read_text()) for p in manager.pid_files(operation)} == after_pids


@pytest.mark.slow
def test_after_kill_9_the_orphaned_agents_are_replaced_not_doubled(
        managers: ManagerPool, follow) -> None:
    manager = managers.start()
    source, operation, middle = declare(manager, managers.name)
    follower = follow(middle)
    orphans = settle(operation, AGENTS)
    declared = manager.declarations()

    manager.kill9()
    time.sleep(1.0)
    assert agent_pids(operation) == orphans, "the agents should outlive a killed manager"
    # They keep working while no manager runs.
    manager.ok("publish", source, "still here")
    [message] = follower.wait_for(1)
    assert message.body == b"STILL HERE"

    manager.start(wait=False)
    most, _ = watch(operation, time.monotonic() + 1.0)  # while it starts up
    manager.wait_healthy()
    assert manager.declarations() == declared
    replaced = settle(operation, AGENTS, gone=orphans)
    assert most <= AGENTS
    entry = manager.op_status(operation)
    assert (entry["desired"], entry["running"]) == (AGENTS, AGENTS)
    assert {int(p.read_text()) for p in manager.pid_files(operation)} == replaced
    # The new set works too.
    manager.ok("publish", source, "and again")
    assert follower.wait_for(2)[1].body == b"AND AGAIN"
