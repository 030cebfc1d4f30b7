"""The rabbitmq role's permissions against the names the code really uses.

The role's vars/main.yml lists, per streamboss role, the kinds of name it may
configure, write and read; the role joins them into ^(kind|...)$ regexps, which
RabbitMQ matches (unanchored, PCRE) against exchange and queue names. Here the same
regexps are built and matched (Python's re agrees with PCRE on these patterns) against
what agent/naming.py and the manager produce for sample names: everything each role
does must be allowed, and names outside its part of streamboss's namespace refused.
A new name function in agent/naming.py that the manager's permissions do not cover
fails here. tests/appliance/test_ansible.py checks that a converged broker holds
exactly these regexps and probes them with real connections.
"""

from __future__ import annotations

import inspect
import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from streamboss.agent import naming
from streamboss.manager.queue_migration import migration_queues

from .conftest import ANSIBLE_DIR

VARS = ANSIBLE_DIR / "roles" / "rabbitmq" / "vars" / "main.yml"
ACTIONS = ("configure", "write", "read")
SERVER_NAMED = "amq.gen-JzTY20BRgKO-HjmUJj0wLg"
DEFAULT_EXCHANGE = "amq.default"
# Sample names: short, longest, with every punctuation naming allows.
OPERATIONS = ("resize", "a", "op.v2_x-1", "9" * 63)
STREAMS = ("images", "b", "raw.v1_in-2", "z" * 63)


def role_vars() -> dict[str, Any]:
    return yaml.safe_load(Path(VARS).read_text())


def regexps(role: str) -> dict[str, str]:
    """The role's three permission regexps, built the way tasks/credentials.yml does."""
    data = role_vars()
    names = data["rabbitmq_streamboss_names"]
    grants = data["rabbitmq_streamboss_permissions"][role]
    return {action: ("^(" + "|".join(names[k] for k in grants[action]) + ")$"
                     if grants[action] else "^$") for action in ACTIONS}


def allowed(role: str, action: str, name: str) -> bool:
    return re.search(regexps(role)[action], name) is not None


def agent_needs(op: str, source: str, sink: str) -> dict[str, set[str]]:
    """What an agent of ``op`` (input ``source``, output ``sink``) does (agent/worker.py,
    agent/broker.py), by RabbitMQ's permission rules."""
    dead_exchange = naming.stream_exchange(naming.dead_stream(op))
    queue, solo = naming.operation_queue(op), naming.solo_queue(op)
    dead, retry = naming.dead_queue(op), naming.retry_queue(op, 1000)
    return {
        # exchange.declare of its dead-letter stream; queue.declare of its four queues
        "configure": {dead_exchange, queue, solo, dead, retry},
        # its queues' dead-letter exchanges (sb.op/sb.solo: the dead stream; sb.retry:
        # the default exchange), queue.bind of sb.op and sb.dead, publishing its output,
        # its dead letters and (default exchange) retries and solo runs
        "write": {dead_exchange, DEFAULT_EXCHANGE, queue, dead,
                  naming.stream_exchange(sink)},
        # queue.bind's sources; consuming sb.op and sb.solo; declaring a queue with a
        # dead-letter exchange needs read on it
        "read": {naming.stream_exchange(source), dead_exchange, queue, solo, retry},
    }


def archiver_needs(stream: str) -> dict[str, set[str]]:
    """The archiver only consumes its stream's subscription (manager/archiver.py)."""
    return {"configure": set(), "write": set(), "read": {naming.archive_queue(stream)}}


def manager_needs(op: str, source: str, sink: str) -> dict[str, set[str]]:
    """What the manager does (manager/broker.py, queue_migration.py, dead_letters.py,
    streams_io.py, publisher.py)."""
    streams = {naming.stream_exchange(source), naming.stream_exchange(sink)}
    dead_exchange = naming.stream_exchange(naming.dead_stream(op))
    queue, solo = naming.operation_queue(op), naming.solo_queue(op)
    dead, archive = naming.dead_queue(op), naming.archive_queue(source)
    migrate, migrate_solo = migration_queues(op)
    return {
        "configure": {*streams, dead_exchange, queue, solo, dead, naming.retry_queue(op, 250),
                      archive, migrate, migrate_solo, SERVER_NAMED},
        "write": {*streams, dead_exchange, queue, dead, archive, migrate, migrate_solo,
                  SERVER_NAMED, DEFAULT_EXCHANGE},
        "read": {*streams, dead_exchange, queue, solo, dead, migrate, migrate_solo,
                 SERVER_NAMED},
    }


NEEDS = {"agent": agent_needs, "manager": manager_needs}


SAMPLES = list(zip(OPERATIONS, STREAMS, STREAMS[1:] + STREAMS[:1], strict=True))


@pytest.mark.parametrize("role", ["agent", "manager"])
@pytest.mark.parametrize(("op", "source", "sink"), SAMPLES)
def test_each_role_may_do_what_its_code_does(role, op, source, sink):
    for action, names in NEEDS[role](op, source, sink).items():
        refused = sorted(n for n in names if not allowed(role, action, n))
        assert refused == [], f"{role} needs {action} on {refused}"


@pytest.mark.parametrize("stream", STREAMS)
def test_the_archiver_may_consume_its_subscription_and_nothing_else(stream):
    for action, names in archiver_needs(stream).items():
        assert all(allowed("archiver", action, n) for n in names)
    assert regexps("archiver")["configure"] == "^$" and regexps("archiver")["write"] == "^$"


FOREIGN = ("evil.queue", "sb", "sb.", "sb.op.", "sb.other.x", "amq.direct", "amq.topic",
           "amq.gen", "sb.op.UPPER", "sb.op.-x", "sbxop.x", "sb.op.x y", "xsb.op.x",
           "sb.op.x\nsb.other", "sb.sub.other.x", "sb.consumer-timeout.x", "sb.retry.x.",
           "sb.retry.x.5s")


@pytest.mark.parametrize("role", ["agent", "archiver", "manager"])
def test_names_outside_streamboss_are_refused_for_every_action(role):
    for name in FOREIGN:
        for action in ACTIONS:
            assert not allowed(role, action, name), f"{role} may {action} {name!r}"


def test_an_agent_cannot_create_streams_archives_or_queues_of_the_manager():
    forbidden = {
        # streams are the manager's (an agent only checks them passively)
        "configure": ["sb.stream.images", "sb.sub.archive.images", "sb.migrate.resize",
                      SERVER_NAMED, DEFAULT_EXCHANGE],
        # it never binds archives or publishes into them except by name (below)
        "write": ["sb.sub.archive.images", "sb.solo.resize", "sb.migrate.resize"],
        # dead letters are for operators (the manager's dead verbs), archives for archivers
        "read": ["sb.dead.resize", "sb.sub.archive.images", SERVER_NAMED],
    }
    for action, names in forbidden.items():
        for name in names:
            assert not allowed("agent", action, name), f"agent may {action} {name}"


def test_the_archiver_cannot_touch_operations_or_streams():
    for name in ("sb.op.resize", "sb.solo.resize", "sb.dead.resize", "sb.stream.images",
                 "sb.retry.resize.1000", SERVER_NAMED, DEFAULT_EXCHANGE):
        for action in ACTIONS:
            assert not allowed("archiver", action, name), f"archiver may {action} {name}"


def test_every_name_naming_py_makes_is_covered_by_the_managers_permissions():
    """A queue or exchange name function added to agent/naming.py must be given to the
    manager (which declares everything) in the role's vars, or this fails."""
    made = []
    for name, function in inspect.getmembers(naming, inspect.isfunction):
        if function.__module__ != naming.__name__ or not name.endswith(("_queue", "_exchange")):
            continue
        if name.endswith("_arguments"):
            continue
        parameters = inspect.signature(function).parameters
        args = ["resize" if p != "delay_ms" else 1500 for p in parameters]
        made.append((name, function(*args)))
    assert {n for n, _ in made} >= {"stream_exchange", "operation_queue", "solo_queue",
                                    "retry_queue", "dead_queue", "archive_queue"}
    for function, value in made:
        assert allowed("manager", "configure", value), (function, value)


def test_the_manager_has_the_management_api_but_no_administrator_or_monitoring_tag():
    data = role_vars()["rabbitmq_streamboss_permissions"]
    assert data["manager"]["tags"] == ["management", "policymaker"]
    assert data["agent"]["tags"] == [] and data["archiver"]["tags"] == []


def test_every_kind_of_name_is_anchored_and_used():
    data = role_vars()
    kinds = data["rabbitmq_streamboss_names"]
    used = {k for grants in data["rabbitmq_streamboss_permissions"].values()
            for action in ACTIONS for k in grants[action]}
    assert used == set(kinds)
    for kind, pattern in kinds.items():
        assert "^" not in pattern and "$" not in pattern, kind
        assert re.compile(pattern)
