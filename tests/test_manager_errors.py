"""Bad input to the ``streamboss`` CLI: one line on stderr, a non-zero exit, and nothing
changed (``list -o json`` is the same before and after, and nothing new on the broker)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from .conftest import (
    ManagerProcess,
    agent_pids,
    free_port,
    op_queue,
    stream_exchange,
    wait_until,
)
from .module_manager import manager_names, module_manager  # noqa: F401 (fixtures)

SEED = {"definition": {"exec": "tr [a-z] [A-Z]", "application": "x", "name": "upper"}}
# The documented exit status of a refused command.
EXIT_ERROR = 2


@pytest.fixture(scope="module")
def definition_id(manager: ManagerProcess, tmp_path_factory: pytest.TempPathFactory) -> str:
    path = tmp_path_factory.mktemp("definitions") / "upper.json"
    path.write_text(json.dumps(SEED))
    return manager.ok("define-process", str(path)).strip()


def refused(result, *words: str) -> str:
    """The command failed with one line on stderr that holds every one of ``words``."""
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, f"expected a one-line error, got:\n{result.stderr}"
    assert "Traceback" not in result.stderr
    assert result.returncode == EXIT_ERROR, (result.returncode, result.stderr)
    assert result.stdout == ""
    line = lines[0]
    assert line.startswith("streamboss") and ": error: " in line, line
    for word in words:
        assert word in line, f"{word!r} not in {line!r}"
    return line


@contextmanager
def unchanged(manager: ManagerProcess) -> Iterator[None]:
    before = manager.declarations()
    yield
    assert manager.declarations() == before


def test_an_invalid_stream_name(manager: ManagerProcess, broker) -> None:
    with unchanged(manager):
        line = refused(manager.cli("create-stream", "Bad Name"), "'Bad Name'", "invalid",
                       "a-z")
    assert "\n" not in line
    assert not broker.exchange_exists(stream_exchange("Bad Name"))


def test_the_seed_shim_reports_the_same(manager: ManagerProcess) -> None:
    with unchanged(manager):
        result = manager.tool("create_stream.py", "Bad Name")
        lines = result.stderr.strip().splitlines()
        assert result.returncode == EXIT_ERROR and len(lines) == 1, result.stderr
        assert lines[0].startswith("create_stream.py: error: ") and "'Bad Name'" in lines[0]


def test_an_unknown_definition(manager: ManagerProcess, names, broker) -> None:
    source, sink, operation = names("in"), names("out"), names("op")
    manager.ok("create-stream", source)
    with unchanged(manager):
        refused(manager.cli("create-operation", operation, "no-such-definition", source, sink),
                "'no-such-definition' does not exist", "define-process")
        refused(manager.cli("create-operation", operation, "987654", source, sink),
                "'987654' does not exist")
    # Not even the output stream or the operation's queue appeared on the broker.
    assert not broker.exchange_exists(stream_exchange(sink))
    assert broker.queue_depth(op_queue(operation)) is None


def test_an_unknown_input_stream(manager: ManagerProcess, names, definition_id: str,
                                 broker) -> None:
    source, sink, operation = names("missing"), names("out"), names("op")
    with unchanged(manager):
        refused(manager.cli("create-operation", operation, definition_id, source, sink),
                f"input stream '{source}' does not exist", f"create-stream {source}")
    assert not broker.exchange_exists(stream_exchange(sink))
    assert broker.queue_depth(op_queue(operation)) is None


def test_a_cycle_is_spelled_out(manager: ManagerProcess, names, definition_id: str,
                                broker) -> None:
    a, b, ab, ba = names("a"), names("b"), names("ab"), names("ba")
    manager.ok("create-stream", a)
    manager.ok("create-operation", ab, definition_id, a, b)
    with unchanged(manager):
        refused(manager.cli("create-operation", ba, definition_id, b, a),
                f"operation '{ba}' would make a cycle: {b} -[{ba}]-> {a} -[{ab}]-> {b}")
    assert broker.queue_depth(op_queue(ba)) is None


def test_deleting_a_stream_in_use(manager: ManagerProcess, names, definition_id: str,
                                  broker) -> None:
    source, sink, other = names("in"), names("out"), names("other")
    first, second = names("first"), names("second")
    manager.ok("create-stream", source)
    manager.ok("create-operation", first, definition_id, source, sink)
    manager.ok("create-operation", second, definition_id, sink, other)
    with unchanged(manager):
        refused(manager.cli("delete-stream", sink), f"'{sink}' is used by operation(s) "
                f"{first}, {second}", "--force")
    assert broker.exchange_exists(stream_exchange(sink))

    forced = manager.cli("delete-stream", sink, "--force")
    assert forced.returncode == 0, forced.stderr
    assert forced.stdout.strip() == f"stream {sink} deleted with operation(s) {first}, {second}"
    after = manager.declarations()
    assert sink not in {s["name"] for s in after["streams"]}
    assert {source, other} <= {s["name"] for s in after["streams"]}
    assert not {first, second} & {o["name"] for o in after["operations"]}
    assert not broker.exchange_exists(stream_exchange(sink))
    # The operations' queues go with them once the reconciler has seen them off.
    wait_until(lambda: broker.queue_depth(op_queue(first)) is None
               and broker.queue_depth(op_queue(second)) is None, 15,
               "the deleted operations' queues to go")
    assert not agent_pids(first) and not agent_pids(second)


@pytest.mark.parametrize("text, words", [
    ("{not json", ["is not valid JSON"]),
    ("", ["is not valid JSON"]),
    (json.dumps({"definition": {"application": "x", "name": "upper"}}), ["missing 'exec'"]),
    (json.dumps({"definition": {"exec": "cat", "name": "x", "retries": 3}}),
     ["unknown field", "retries"]),
    (json.dumps(["exec", "cat"]), ["must be a JSON object", "exec"]),
], ids=["invalid-json", "empty", "missing-exec", "unknown-field", "not-an-object"])
def test_a_malformed_definition_file(manager: ManagerProcess, tmp_path: Path, text: str,
                                     words: list[str]) -> None:
    path = tmp_path / "bad.json"
    path.write_text(text)
    with unchanged(manager):
        refused(manager.cli("define-process", str(path)), *words)


def test_a_malformed_definition_through_the_seed_call(manager: ManagerProcess) -> None:
    with unchanged(manager):
        response = manager.api("POST", "/api/process_definition/",
                               json={"definition": {"application": "x", "name": "upper"}})
    assert response.status_code == 400
    assert "missing 'exec'" in response.json()["detail"]


@pytest.mark.parametrize("argv", [
    ["list"], ["create-stream", "fine-name"],
], ids=["list", "create-stream"])
def test_an_unreachable_manager(manager: ManagerProcess, argv: list[str]) -> None:
    url = f"http://127.0.0.1:{free_port()}"
    with unchanged(manager):
        refused(manager.cli(*argv, env={"STREAMBOSS_URL": url}),
                f"cannot reach the manager at {url}", "STREAMBOSS_URL")


@pytest.mark.parametrize("command", ["streamboss", "publish.py"])
def test_an_unreachable_broker_keeps_the_password_secret(manager: ManagerProcess, names,
                                                         command: str) -> None:
    stream = names("s")
    manager.ok("create-stream", stream)
    url = f"amqp://guest:pa55-w0rd-x9@127.0.0.1:{free_port()}/%2F"
    env = {"STREAMBOSS_BROKER_URL": url}
    with unchanged(manager):
        if command == "streamboss":
            result = manager.cli("publish", stream, "hello", env=env)
        else:
            result = manager.tool("publish.py", stream, "hello", env=env)
        lines = result.stderr.strip().splitlines()
        assert result.returncode == EXIT_ERROR and len(lines) == 1, result.stderr
        assert "cannot reach the broker" in lines[0] and "STREAMBOSS_BROKER_URL" in lines[0]
        assert "pa55-w0rd-x9" not in result.stderr + result.stdout


def test_publish_to_a_stream_that_does_not_exist(manager: ManagerProcess, names,
                                                 broker) -> None:
    stream = names("nowhere")
    with unchanged(manager):
        refused(manager.cli("publish", stream, "hello"), f"stream '{stream}' does not exist",
                f"create-stream {stream}")
        refused(manager.cli("consume", stream, "--timeout", "1"),
                f"stream '{stream}' does not exist")
    assert not broker.exchange_exists(stream_exchange(stream))


def test_unknown_names_to_delete(manager: ManagerProcess, names) -> None:
    with unchanged(manager):
        refused(manager.cli("delete-stream", names("ghost")), "does not exist")
        refused(manager.cli("delete-operation", names("ghost")), "does not exist")
        refused(manager.cli("delete-process", "ghost-definition"), "does not exist")


def test_a_bad_scaling_policy(manager: ManagerProcess, names, definition_id: str) -> None:
    source = names("in")
    manager.ok("create-stream", source)
    with unchanged(manager):
        refused(manager.cli("create-operation", names("op"), definition_id, source,
                            names("out"), "--min", "3", "--max", "2"), "min (3) is above max (2)")
        refused(manager.cli("create-operation", names("op"), definition_id, source,
                            names("out"), "--target-backlog", "0"),
                "target_backlog_per_agent", "greater than or equal to 1")
