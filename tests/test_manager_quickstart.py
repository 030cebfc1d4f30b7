"""The seed's quickstart against a real manager process and the real broker, through the
``tools/`` shims and the ``streamboss`` CLI."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import httpx

from .conftest import (
    PYTHON,
    TOOLS,
    ManagerProcess,
    agent_pids,
    op_queue,
    stream_exchange,
    wait_until,
)
from .module_manager import manager_names, module_manager  # noqa: F401 (fixtures)

SEED = {"definition": {"exec": "tr [a-z] [A-Z]", "application": "x", "name": "upper"}}
# Generous bounds for a loaded 2-core machine; none of them is a speed claim.
WAKE_TIMEOUT = 20.0
CONSUME_TIMEOUT = 30.0


def consumer(manager: ManagerProcess, *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen([PYTHON, str(TOOLS / "consume.py"), *args], cwd=TOOLS,
                            env=manager.env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            stdin=subprocess.DEVNULL, text=True)


def finish(process: subprocess.Popen[str], timeout: float = CONSUME_TIMEOUT) -> tuple[str, str]:
    try:
        return process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        out, err = process.communicate()
        raise AssertionError(f"consumer did not finish in {timeout:g}s; printed {out!r}, "
                             f"{err!r}") from None


def test_seed_quickstart_through_the_tools_shims(manager: ManagerProcess, names,
                                                 tmp_path: Path) -> None:
    mystream, outputstream, operation = names("mystream"), names("outputstream"), \
        names("my-operation")

    created = manager.tool("create_stream.py", mystream)
    assert created.returncode == 0, created.stderr
    assert created.stdout.strip() == f"stream {mystream} created"

    # The seed registers its definition with a plain POST.
    response = httpx.post(f"{manager.url}/api/process_definition/", json=SEED, timeout=30,
                          headers=manager.headers())
    assert response.status_code == 200, response.text
    registered = response.json()
    assert registered["name"] == "upper" and isinstance(registered["id"], int)

    result = manager.tool("create_operation.py", operation, str(registered["id"]), mystream,
                          outputstream)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"operation {operation}: {mystream} -> {outputstream}"
    declared = {op["name"]: op for op in manager.declarations()["operations"]}
    assert declared[operation]["definition_id"] == registered["id"]
    assert outputstream in {s["name"] for s in manager.declarations()["streams"]}

    following = consumer(manager, outputstream, "--count", "1")
    try:
        # The consumer makes the operation wanted: wait for its agent before publishing.
        manager.wait_status(operation, lambda s: s["running"] >= 1, WAKE_TIMEOUT,
                            "an agent once consume.py attached")
        published = manager.tool("publish.py", mystream, "hello world")
        assert published.returncode == 0, published.stderr
        out, err = finish(following)
    finally:
        if following.poll() is None:
            following.kill()
            following.wait()
    assert following.returncode == 0, err
    assert out == "HELLO WORLD\n"


def test_define_process_prints_the_id_and_json(manager: ManagerProcess, names,
                                               tmp_path: Path) -> None:
    definition = tmp_path / "upper.json"
    definition.write_text(json.dumps(SEED))
    before = {d["id"] for d in manager.declarations()["definitions"]}

    plain = manager.ok("define-process", str(definition))
    assert plain.strip().isdigit(), plain
    as_json = json.loads(manager.ok("define-process", "-o", "json", str(definition)))
    piped = subprocess.run([PYTHON, "-m", "streamboss.manager", "define-process", "-"],
                           input=json.dumps(SEED), capture_output=True, text=True,
                           env=manager.env(), timeout=60)
    assert piped.returncode == 0, piped.stderr

    ids = [int(plain), as_json["id"], int(piped.stdout)]
    assert as_json["name"] == "upper"
    assert as_json["definition"]["exec"] == "tr [a-z] [A-Z]"
    assert len(set(ids)) == 3 and not set(ids) & before
    listed = {d["id"]: d for d in manager.declarations()["definitions"]}
    versions = [listed[i]["version"] for i in ids]
    assert versions == sorted(versions) and len(set(versions)) == 3
    assert all(listed[i]["name"] == "upper" for i in ids)

    # An operation may name the definition: the newest version is used.
    source = names("in")
    manager.ok("create-stream", source)
    op = json.loads(manager.ok("create-operation", "-o", "json", names("op"), "upper", source,
                               names("out")))
    assert op["definition_id"] == max(listed)


def test_the_api_and_the_cli_agree(manager: ManagerProcess, names) -> None:
    stream = names("api")
    response = manager.api("POST", "/v1/streams", json={"name": stream})
    assert response.status_code == 201 and response.json()["created"] is True
    again = manager.cli("create-stream", stream)
    assert again.returncode == 0 and "already exists" in again.stdout
    assert stream in {s["name"] for s in json.loads(manager.ok("list", "streams", "-o",
                                                                "json"))}
    spec = manager.api("GET", "/openapi.json").json()
    assert "/v1/streams" in spec["paths"] and "/v1/operations" in spec["paths"]


def test_delete_operation_drains_its_agents_and_removes_its_queues(
        manager: ManagerProcess, names, follow, broker) -> None:
    source, sink, operation = names("in"), names("out"), names("op")
    manager.ok("create-stream", source)
    definition = manager.api("POST", "/api/process_definition/", json=SEED).json()["id"]
    manager.ok("create-operation", operation, str(definition), source, sink)
    follower = follow(sink)
    manager.wait_status(operation, lambda s: s["running"] >= 1, WAKE_TIMEOUT, "an agent")
    wait_until(lambda: agent_pids(operation), WAKE_TIMEOUT, "the agent process")
    assert broker.queue_depth(f"sb.dead.{operation}") == 0
    manager.ok("publish", source, "last words")
    assert follower.wait_for(1)[0].body == b"LAST WORDS"

    assert manager.ok("delete-operation", operation).strip() == f"operation {operation} deleted"
    assert operation not in {o["name"] for o in manager.declarations()["operations"]}
    wait_until(lambda: not agent_pids(operation), WAKE_TIMEOUT, "its agent to stop")
    wait_until(lambda: broker.queue_depth(op_queue(operation)) is None, WAKE_TIMEOUT,
               "its queue to go")
    # Nothing was dead-lettered, so its dead-letter queue and stream go too.
    wait_until(lambda: broker.queue_depth(f"sb.dead.{operation}") is None
               and not broker.exchange_exists(stream_exchange(f"{operation}.dead")),
               WAKE_TIMEOUT, "its empty dead-letter queue and stream to go")
    # The streams stay: they are declarations of their own.
    assert {source, sink} <= {s["name"] for s in manager.declarations()["streams"]}
    assert broker.exchange_exists(stream_exchange(sink))
