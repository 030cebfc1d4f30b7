"""`streamboss dead list|show|requeue|purge` and `/v1/dead` through a real manager and
the real broker.

The dead letters are published straight to the stream `<operation>.dead`, shaped as
the wire contract says agents make them (sb-dead-* headers plus the input's own),
and one as the broker's delivery-limit backstop makes it (only an x-death entry),
so these tests do not depend on an agent failing. The operations have `--max 0`:
no agent ever takes what a requeue puts back.
"""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path
from typing import Any

import pika
import pytest

from streamboss.manager import dead_letters

from .conftest import Broker, ManagerProcess, op_queue, stream_exchange, wait_until
from .module_manager import manager_names, module_manager  # noqa: F401 (fixtures)

PRODUCED = "2026-03-01T12:00:00.000000Z"
BACKSTOP_TIME = dt.datetime(2026, 2, 1, 8, 30, 0)


def dead_queue(operation: str) -> str:
    return f"sb.dead.{operation}"


def one_line_error(result: Any) -> str:
    assert result.returncode == 2, (result.returncode, result.stdout, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.stderr
    return lines[0]


@pytest.fixture
def operation(manager: ManagerProcess, broker: Broker, names, tmp_path: Path) -> str:
    """A declared operation that never runs an agent, its dead-letter queue declared."""
    source, sink, name = names("in"), names("out"), names("op")
    definition = tmp_path / "cat.json"
    definition.write_text(json.dumps({"definition": {"name": name, "exec": "cat"}}))
    manager.ok("create-stream", source)
    manager.ok("define-process", str(definition))
    manager.ok("create-operation", name, name, source, sink, "--max", "0")
    wait_until(lambda: broker.queue_depth(dead_queue(name)) is not None, 30,
               f"the manager to declare {dead_queue(name)}")
    return name


def agent_letter(operation: str, ident: str, body: bytes, path: str, reason: str,
                 exit_code: int | None = None) -> tuple[bytes, pika.BasicProperties]:
    """A dead letter as an agent publishes it: the input's headers (an earlier retry
    left sb-attempts, sb-retry-reason and the broker's x-death on it) plus sb-dead-*."""
    headers: dict[str, Any] = {
        "sb-id": ident, "sb-produced-at": PRODUCED, "customer": "acme",
        "sb-attempts": 2, "sb-retry-reason": reason,
        "x-death": [{"count": 1, "reason": "expired", "queue": f"sb.retry.{operation}.1000",
                     "time": BACKSTOP_TIME, "exchange": "", "routing-keys": ["x"]}],
        "x-first-death-reason": "expired",
        "sb-dead-reason": reason, "sb-dead-path": path, "sb-dead-attempts": 3,
        "sb-dead-operation": operation, "sb-dead-stderr": "boom\n",
    }
    if exit_code is not None:
        headers["sb-dead-exit-code"] = exit_code
    return body, pika.BasicProperties(delivery_mode=2, message_id=ident, headers=headers,
                                      content_type="text/plain", correlation_id=f"c-{ident}")


def backstop_letter(operation: str, ident: str) -> tuple[bytes, pika.BasicProperties]:
    """What the quorum queue's x-delivery-limit makes: the input as it was, plus x-death."""
    headers = {"sb-id": ident, "x-death": [
        {"count": 1, "reason": "delivery_limit", "queue": op_queue(operation),
         "time": BACKSTOP_TIME, "exchange": "sb.stream.x", "routing-keys": [""]}]}
    return b"killer", pika.BasicProperties(delivery_mode=2, headers=headers)


def publish_dead(broker: Broker, operation: str,
                 letters: list[tuple[bytes, pika.BasicProperties]]) -> None:
    for body, properties in letters:
        broker.publisher.basic_publish(stream_exchange(f"{operation}.dead"), "", body,
                                       properties)


def five_letters(broker: Broker, operation: str) -> list[str]:
    """Publish d-0 .. d-4 (three program failures, a timeout, a backstop); their ids."""
    failed = "program failure: exited with code 3"
    publish_dead(broker, operation, [
        agent_letter(operation, "d-0", b"first", "program failure", failed, 3),
        agent_letter(operation, "d-1", b"second", "timeout", "timeout: no answer in 60 s"),
        backstop_letter(operation, "d-2"),
        agent_letter(operation, "d-3", bytes(range(256)), "program failure", failed, 3),
        agent_letter(operation, "d-4", b"red \x1b[31m alert", "program failure", failed, 3),
    ])
    return [f"d-{n}" for n in range(5)]


def show_json(manager: ManagerProcess, operation: str, count: int) -> dict[str, Any]:
    return json.loads(manager.ok("dead", "show", operation, "--count", str(count),
                                 "-o", "json"))


# -- list ------------------------------------------------------------------------------


def test_list_counts_dead_letters_by_path_and_reason(manager: ManagerProcess, broker: Broker,
                                                     operation: str) -> None:
    five_letters(broker, operation)
    [entry] = json.loads(manager.ok("dead", "list", operation, "-o", "json"))
    assert entry["operation"] == operation and entry["queue"] == dead_queue(operation)
    assert entry["count"] == 5 and entry["scanned"] == 5
    assert entry["paths"] == {"program failure": 3, "timeout": 1, "agent crash or kill": 1}
    reasons = {r["reason"]: r["count"] for r in entry["reasons"]}
    assert reasons == {"program failure: exited with code 3": 3,
                       "timeout: no answer in 60 s": 1,
                       "agent crash or kill (broker delivery limit)": 1}
    assert entry["oldest"] == PRODUCED  # the first in the queue, an agent's letter

    everything = json.loads(manager.ok("dead", "list", "-o", "json"))
    assert operation in {e["operation"] for e in everything}
    table = manager.ok("dead", "list", operation)
    assert table.splitlines()[0].split() == ["OPERATION", "DEAD", "OLDEST", "PATHS"]
    assert f"{operation}  5" in table
    assert "program failure 3, timeout 1, agent crash or kill 1" in table
    assert broker.queue_depth(dead_queue(operation)) == 5  # listing consumed nothing


def test_the_oldest_backstop_letter_is_dated_by_its_x_death(
        manager: ManagerProcess, broker: Broker, operation: str) -> None:
    publish_dead(broker, operation, [backstop_letter(operation, "b-0")])
    [entry] = json.loads(manager.ok("dead", "list", operation, "-o", "json"))
    assert entry["oldest"] == "2026-02-01T08:30:00Z"
    [letter] = show_json(manager, operation, 1)["messages"]
    assert letter["path"] == "agent crash or kill"
    assert letter["reason"] == "agent crash or kill (broker delivery limit)"
    assert letter["attempts"] is None and letter["id"] == "b-0"


def test_an_operation_without_dead_letters_has_none(manager: ManagerProcess,
                                                    operation: str) -> None:
    [entry] = json.loads(manager.ok("dead", "list", operation, "-o", "json"))
    assert (entry["count"], entry["oldest"], entry["paths"]) == (0, None, {})
    assert json.loads(manager.ok("dead", "show", operation, "-o", "json"))["messages"] == []


def test_no_dead_letter_queue_yet_means_no_dead_letters(broker_url: str, names) -> None:
    # The manager declares sb.dead.OP on its next pass; until then there is nothing to read.
    missing = names("undeclared")
    assert dead_letters.summaries(broker_url, [missing])[0]["count"] == 0
    assert dead_letters.show(broker_url, missing, 5)["messages"] == []
    assert dead_letters.requeue(broker_url, missing)["requeued"] == 0
    assert dead_letters.purge(broker_url, missing) == 0


# -- show ------------------------------------------------------------------------------


def test_show_leaves_the_dead_letters_in_place_and_in_order(
        manager: ManagerProcess, broker: Broker, operation: str) -> None:
    ids = five_letters(broker, operation)
    first = show_json(manager, operation, 2)
    assert first["count"] == 5
    assert [m["id"] for m in first["messages"]] == ids[:2]
    assert [m["position"] for m in first["messages"]] == [1, 2]
    assert broker.queue_depth(dead_queue(operation)) == 5

    letters = show_json(manager, operation, 10)["messages"]
    assert [m["id"] for m in letters] == ids  # the same order again: nothing moved
    d0 = letters[0]
    assert d0["body"] == "first" and d0["body_size"] == 5 and not d0["body_truncated"]
    assert (d0["path"], d0["reason"]) == ("program failure",
                                          "program failure: exited with code 3")
    assert (d0["attempts"], d0["exit_code"], d0["dead_at"]) == (3, 3, PRODUCED)
    assert d0["headers"]["sb-dead-stderr"] == "boom\n"
    assert d0["headers"]["customer"] == "acme"
    assert d0["properties"]["correlation_id"] == "c-d-0"
    assert letters[1]["exit_code"] is None
    assert letters[3]["body_base64"] and "body" not in letters[3]  # not UTF-8
    assert broker.queue_depth(dead_queue(operation)) == 5


def test_show_as_text_escapes_what_could_drive_the_terminal(
        manager: ManagerProcess, broker: Broker, operation: str) -> None:
    five_letters(broker, operation)
    text = manager.ok("dead", "show", operation, "--count", "5")
    assert text.startswith(f"5 dead letter(s) of {operation} in {dead_queue(operation)}")
    assert "#1  id d-0" in text and "   program failure: exited with code 3" in text
    assert "attempts 3, exit code 3" in text
    assert "     first" in text
    assert "body (256 bytes, binary: -o json gives it as body_base64)" in text
    assert "red \\x1b[31m alert" in text and "\x1b" not in text
    assert "   stderr (sb-dead-stderr):\n     boom\n" in text


# -- requeue -----------------------------------------------------------------------------


def test_requeue_moves_exactly_n_back_with_attempts_reset_and_ids_kept(
        manager: ManagerProcess, broker: Broker, operation: str) -> None:
    ids = five_letters(broker, operation)
    result = json.loads(manager.ok("dead", "requeue", operation, "--count", "2", "-o",
                                   "json"))
    assert result == {"operation": operation, "queue": dead_queue(operation),
                      "to": op_queue(operation), "requeued": 2, "left": 3}
    inputs = broker.queue(op_queue(operation))
    back = inputs.collect(2)
    assert inputs.collect_until_quiet(quiet=1.0) == []
    assert [m.header("sb-id") for m in back] == ids[:2]
    assert [m.body for m in back] == [b"first", b"second"]
    for message in back:
        left = set(message.headers)
        assert not {h for h in left if h.startswith("sb-dead-")}
        assert not left & {"sb-attempts", "sb-retry-reason", "x-death",
                           "x-first-death-reason"}
        assert message.header("customer") == "acme"
        assert message.header("sb-produced-at") == PRODUCED
        assert message.properties.message_id == message.header("sb-id")
        assert message.properties.content_type == "text/plain"
        assert message.properties.correlation_id == f"c-{message.header('sb-id')}"
        assert message.properties.delivery_mode == 2
    assert [m["id"] for m in show_json(manager, operation, 10)["messages"]] == ids[2:]

    text = manager.ok("dead", "requeue", operation)
    assert text.strip() == (f"requeued 3 dead letter(s) of {operation} into "
                            f"{op_queue(operation)}; 0 left in {dead_queue(operation)}")
    rest = inputs.collect(3)
    assert [m.header("sb-id") for m in rest] == ids[2:]
    assert "x-death" not in rest[0].headers  # the backstop's broker header is gone too
    assert broker.queue_depth(dead_queue(operation)) == 0


def test_requeue_into_a_missing_input_queue_moves_nothing(broker: Broker, broker_url: str,
                                                          names) -> None:
    # A dead-letter queue whose operation's input queue does not exist (yet, or any more).
    name = names("orphan")
    broker.create_stream(f"{name}.dead")
    broker.channel.queue_declare(dead_queue(name), durable=True)
    try:
        broker.channel.queue_bind(dead_queue(name), stream_exchange(f"{name}.dead"), "#")
        publish_dead(broker, name, [backstop_letter(name, "o-0"),
                                    backstop_letter(name, "o-1")])
        with pytest.raises(dead_letters.RequeueError,
                           match=f"queue sb.op.{name} does not exist"):
            dead_letters.requeue(broker_url, name)
        assert broker.queue_depth(dead_queue(name)) == 2
        assert [m["id"] for m in dead_letters.show(broker_url, name, 5)["messages"]] == \
            ["o-0", "o-1"]
    finally:
        broker.channel.queue_delete(dead_queue(name))


# -- purge -------------------------------------------------------------------------------


def test_purge_asks_unless_yes_and_says_how_many(manager: ManagerProcess, broker: Broker,
                                                 operation: str) -> None:
    five_letters(broker, operation)
    line = one_line_error(manager.cli("dead", "purge", operation))
    assert "pass --yes" in line and "5 dead letter(s)" in line
    assert broker.queue_depth(dead_queue(operation)) == 5
    assert manager.ok("dead", "purge", operation, "--yes").strip() == \
        f"purged 5 dead letter(s) of {operation}"
    assert broker.queue_depth(dead_queue(operation)) == 0
    assert json.loads(manager.ok("dead", "purge", operation, "--yes", "-o", "json")) == \
        {"operation": operation, "queue": dead_queue(operation), "purged": 0}
    nothing = manager.cli("dead", "purge", operation)
    assert nothing.returncode == 0 and "no dead letters" in nothing.stderr


def test_dead_letters_outlive_their_operation_until_purged(manager: ManagerProcess,
                                                           broker: Broker,
                                                           operation: str) -> None:
    """Deleting an operation keeps a dead-letter queue that holds letters; the verbs
    still reach it, so they are never stranded."""
    five_letters(broker, operation)
    wait_until(lambda: broker.queue_depth(dead_queue(operation)) == 5, 30, "5 dead letters")
    manager.ok("delete-operation", operation)
    wait_until(lambda: manager.api("GET", "/v1/operations").json() == [] or all(
        op["name"] != operation for op in manager.api("GET", "/v1/operations").json()), 30,
        "the operation gone")
    assert show_json(manager, operation, 5)["count"] == 5
    assert manager.ok("dead", "purge", operation, "--yes").strip() == \
        f"purged 5 dead letter(s) of {operation}"


# -- bad input and the API ---------------------------------------------------------------


@pytest.mark.parametrize("verb", [["list"], ["show"], ["requeue"], ["purge", "--yes"]])
def test_an_unknown_operation_is_one_line_and_exit_2(manager: ManagerProcess, names,
                                                     verb: list[str]) -> None:
    missing = names("missing")
    line = one_line_error(manager.cli("dead", verb[0], missing, *verb[1:]))
    assert f"operation {missing!r} does not exist" in line
    # Not a name at all: no queue could be left behind under it, and none is looked for.
    bad = "Ünïcode-" + "x" * 300
    line = one_line_error(manager.cli("dead", verb[0], bad, *verb[1:]))
    assert "does not exist" in line


def test_the_api_serves_the_same_under_v1_dead(manager: ManagerProcess, broker: Broker,
                                               operation: str, names) -> None:
    ids = five_letters(broker, operation)
    listed = manager.api("GET", "/v1/dead")
    assert listed.status_code == 200
    assert {e["operation"]: e["count"] for e in listed.json()}[operation] == 5
    shown = manager.api("GET", f"/v1/dead/{operation}", params={"count": 3})
    assert [m["id"] for m in shown.json()["messages"]] == ids[:3]
    assert manager.api("GET", f"/v1/dead/{operation}", params={"count": 0}).status_code == 422
    moved = manager.api("POST", f"/v1/dead/{operation}/requeue", params={"count": 1})
    assert moved.status_code == 200 and moved.json()["requeued"] == 1
    purged = manager.api("DELETE", f"/v1/dead/{operation}")
    assert purged.status_code == 200 and purged.json()["purged"] == 4
    missing = names("missing")
    for method, path in (("GET", f"/v1/dead/{missing}"), ("DELETE", f"/v1/dead/{missing}"),
                         ("POST", f"/v1/dead/{missing}/requeue")):
        response = manager.api(method, path)
        assert response.status_code == 404, (method, response.text)
    assert manager.api("GET", "/v1/dead", params={"operation": missing}).status_code == 404
    assert "/v1/dead/{operation}/requeue" in manager.api("GET", "/openapi.json").json()["paths"]


def test_a_requeued_agent_dead_letter_is_the_input_again(broker: Broker, broker_url: str,
                                                         streams, names, agent) -> None:
    """An agent's dead letter has an id of its own (the input's is in sb-parent); the
    requeued copy takes the input's id back, so what it yields has the ids it would
    have had the first time."""
    source, sink = streams("in", "out")
    name = names("again")
    agent(name, source, sink, "--exec", "false", "--max-attempts", "1")
    broker.capture(sink)
    letters = broker.capture(f"{name}.dead")
    [ident] = broker.publish(source, [b"doomed"])
    [first] = letters.collect(1)
    assert first.parent == ident and first.header("sb-id") != ident
    # the letter the agent keeps in sb.dead.<op> goes back to the input queue ...
    assert dead_letters.requeue(broker_url, name)["requeued"] == 1
    # ... and fails again as the same input: same parent, same derived letter id
    [second] = letters.collect(1)
    assert second.parent == ident
    assert second.header("sb-id") == first.header("sb-id")
