"""Secrets stay where they belong.

- the state directory is 0700 and everything the manager writes in it 0600
  (the database and its WAL files, agents' definition, pid and log files);
- a definition's ``env`` values are masked in every API answer and in
  ``streamboss list``, while the agents the manager starts get the real values;
"""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest

from streamboss.manager.dispatch_local import LocalDispatcher
from streamboss.manager.model import MASKED, Definition, Operation
from streamboss.manager.store import Store

from .conftest import ManagerProcess, agent_pids, wait_until
from .module_manager import manager_names, module_manager  # noqa: F401 (fixtures)

SECRET_VALUE = "s3cr3t-xyz-4711"


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


# -- the state directory ------------------------------------------------------------


def test_a_new_state_directory_and_database_are_private(tmp_path: Path) -> None:
    state = tmp_path / "state"
    store = Store(state)
    try:
        store.create_stream("words")
        store.define_process({"exec": "cat", "name": "c", "env": {"K": SECRET_VALUE}})
        assert mode(state) == 0o700
        db = state / "streamboss.db"
        # WAL mode: the -wal and -shm files exist while a connection is open.
        for path in (db, db.with_name(db.name + "-wal"), db.with_name(db.name + "-shm")):
            assert path.exists(), path
            assert mode(path) == 0o600, (path, oct(mode(path)))
    finally:
        store.close()


def test_an_existing_state_directory_and_database_are_tightened(tmp_path: Path) -> None:
    state = tmp_path / "state"
    Store(state).close()
    os.chmod(state, 0o755)
    for name in ("streamboss.db", "streamboss.db-wal", "streamboss.db-shm"):
        path = state / name
        path.touch()
        os.chmod(path, 0o644)
    store = Store(state)
    try:
        assert mode(state) == 0o700
        for name in ("streamboss.db", "streamboss.db-wal", "streamboss.db-shm"):
            assert mode(state / name) == 0o600, name
    finally:
        store.close()


def test_files_are_created_private_whatever_the_umask(tmp_path: Path) -> None:
    previous = os.umask(0o000)
    try:
        store = Store(tmp_path / "state")
        store.create_stream("s")
        store.close()
    finally:
        os.umask(previous)
    assert mode(tmp_path / "state") == 0o700
    for path in (tmp_path / "state").iterdir():
        assert mode(path) & 0o077 == 0, (path, oct(mode(path)))


def test_the_local_dispatchers_agent_files_are_private(tmp_path: Path, broker_url: str) -> None:
    state = tmp_path / "state"
    (state / "logs").mkdir(parents=True)
    os.chmod(state / "logs", 0o755)
    (state / "logs" / "op.log").write_text("older log\n")
    os.chmod(state / "logs" / "op.log", 0o644)
    dispatcher = LocalDispatcher(state, broker_url)
    definition = Definition(1, "d", 1, {"exec": "cat", "env": {"K": SECRET_VALUE}}, "")
    # Streams that do not exist: the agent starts, writes its log and exits 2.
    operation = Operation("op", 1, "secrets-nowhere-in", "secrets-nowhere-out")
    try:
        dispatcher.scale(operation, definition, 1)
        written = [state / "agents" / "op.definition.json", state / "logs" / "op.log",
                   *sorted((state / "agents").glob("op.*.pid"))]
        assert len(written) == 3, written
        for directory in (state, state / "agents", state / "logs"):
            assert mode(directory) == 0o700, directory
        for path in written:
            assert mode(path) == 0o600, (path, oct(mode(path)))
        # The agent's file holds the real value: it is what the agent runs.
        body = json.loads((state / "agents" / "op.definition.json").read_text())
        assert body["definition"]["env"] == {"K": SECRET_VALUE}
    finally:
        dispatcher.stop_all(timeout=10)


# -- env values masked in every view ----------------------------------------------------


def test_env_values_are_masked_in_the_api_and_list(manager: ManagerProcess, names) -> None:
    source, sink, op = names("in"), names("out"), names("op")
    name = names("def")
    definition = {"exec": "cat", "name": name, "env": {"API_KEY": SECRET_VALUE, "MODE": "x"}}
    created = manager.api("POST", "/v1/definitions", json=definition)
    assert created.status_code == 201, created.text
    assert created.json()["definition"]["env"] == {"API_KEY": MASKED, "MODE": MASKED}
    ident = created.json()["id"]
    manager.ok("create-stream", source)
    made = manager.api("POST", "/v1/operations",
                       json={"name": op, "definition": str(ident), "input": source,
                             "output": sink})
    assert made.status_code == 201, made.text

    answers = {path: manager.api("GET", path) for path in (
        "/v1/definitions", f"/v1/definitions/{ident}", f"/v1/definitions/{name}",
        "/v1/operations", "/v1/status", "/v1/streams",
        "/v1/archives", "/v1/graph", "/openapi.json")}
    for path, answer in answers.items():
        assert SECRET_VALUE not in answer.text, path
    listed = manager.api("GET", f"/v1/definitions/{ident}").json()
    assert listed["definition"]["env"] == {"API_KEY": MASKED, "MODE": MASKED}
    assert listed["definition"]["exec"] == "cat"

    for args in (("list",), ("list", "definitions"), ("list", "-o", "json"),
                 ("list", "definitions", "-o", "json"), ("status",), ("status", "-o", "json")):
        result = manager.cli(*args)
        assert result.returncode == 0, (args, result.stderr)
        assert SECRET_VALUE not in result.stdout + result.stderr, args
    shown = json.loads(manager.ok("list", "definitions", "-o", "json"))
    assert {"API_KEY": MASKED, "MODE": MASKED} in [d["definition"].get("env") for d in shown]


def test_the_store_keeps_the_real_values_for_the_agents(tmp_path: Path) -> None:
    store = Store(tmp_path / "state")
    try:
        made = store.define_process({"exec": "cat", "name": "c", "env": {"K": SECRET_VALUE}})
        assert store.get_definition("c").body["env"] == {"K": SECRET_VALUE}
        assert made.to_dict()["definition"]["env"] == {"K": MASKED}
        assert SECRET_VALUE not in repr(made)
    finally:
        store.close()


@pytest.mark.slow
def test_an_agent_started_by_the_manager_gets_the_real_value(manager: ManagerProcess, names,
                                                               follow) -> None:
    source, sink, op = names("in"), names("out"), names("op")
    name = names("def")
    created = manager.api("POST", "/v1/definitions", json={
        "exec": "printenv SECRET", "name": name, "env": {"SECRET": SECRET_VALUE}})
    assert created.status_code == 201, created.text
    manager.ok("create-stream", source)
    manager.ok("create-operation", op, str(created.json()["id"]), source, sink, "--min", "1")
    outputs = follow(sink)
    wait_until(lambda: agent_pids(op), 30, f"an agent of {op}")
    manager.ok("publish", source, "anything")
    assert [m.body for m in outputs.wait_for(1, timeout=60)] == [f"{SECRET_VALUE}\n".encode()]
