"""Secrets stay where they belong.

- the state directory is 0700 and everything the manager writes in it 0600
  (the database and its WAL files, agents' definition, pid and log files);
- a definition's ``env`` values are masked in every API answer and in
  ``streamboss list``, while the agents the manager starts get the real values;
- a program an agent runs gets an allow-listed environment: none of the agent's
  credentials (token, AWS keys, broker URL), only the names the operator passes;
- it cannot read the agent's /proc/<pid>/environ (the agent is not dumpable),
  and it can run as another, unprivileged user.
"""

from __future__ import annotations

import json
import os
import pwd
import shutil
import stat
import subprocess
import tempfile
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import pytest

from streamboss.agent import isolation
from streamboss.agent.isolation import ChildIsolation, IsolationError
from streamboss.agent.naming import archive_queue
from streamboss.manager.dispatch_local import LocalDispatcher
from streamboss.manager.model import MASKED, Definition, Operation
from streamboss.manager.store import Store

from .conftest import (
    MANAGER,
    PYTHON,
    AgentProcess,
    ManagerProcess,
    agent_pids,
    free_port,
    run_cli,
    wait_until,
)
from .module_manager import manager_names, module_manager  # noqa: F401 (fixtures)
from .requirements import require

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


# -- what a program sees of its agent ---------------------------------------------------

AGENT_SECRETS = {
    "STREAMBOSS_TOKEN": "manager-token-5b1f",
    "AWS_ACCESS_KEY_ID": "AKIAEXAMPLEKEY4711",
    "AWS_SECRET_ACCESS_KEY": "aws-secret-9c2e",
    "AWS_SESSION_TOKEN": "aws-session-77aa",
    "UNRELATED_SECRET": "unrelated-3d3d",
}
# Prints the program's whole environment, NUL-free, one NAME=value per line.
PRINT_ENV = (f"{PYTHON} -c \"import os,sys; sys.stdout.write(''.join(f'{{k}}={{v}}\\n' "
             "for k, v in sorted(os.environ.items())))\"")


def environment(body: bytes) -> dict[str, str]:
    return dict(line.split("=", 1) for line in body.decode().splitlines() if "=" in line)


def test_the_child_environment_is_an_allow_list() -> None:
    agent_env = {**AGENT_SECRETS, "STREAMBOSS_BROKER_URL": "amqp://u:brokerpw@h/%2F",
                 "PATH": "/usr/bin:/bin", "HOME": "/home/agent", "LANG": "C.UTF-8",
                 "LC_TIME": "de_DE.UTF-8", "TZ": "UTC", "PASSED": "yes", "PYTHONPATH": "/x"}
    env = isolation.child_env({"SECRET": SECRET_VALUE}, ChildIsolation(("PASSED",)),
                              agent_env)
    assert env == {"PATH": "/usr/bin:/bin", "HOME": "/home/agent", "LANG": "C.UTF-8",
                   "LC_TIME": "de_DE.UTF-8", "TZ": "UTC", "PASSED": "yes",
                   "PYTHONUNBUFFERED": "1", "SECRET": SECRET_VALUE}
    # No PATH at all: the system default, so a program is still found.
    assert isolation.child_env({}, ChildIsolation(), {})["PATH"] == os.defpath
    user = isolation.ChildUser("worker", 1234, 1234, "/var/empty")
    as_user = isolation.child_env({}, ChildIsolation(user=user), agent_env)
    assert (as_user["HOME"], as_user["USER"], as_user["LOGNAME"]) == (
        "/var/empty", "worker", "worker")


@pytest.mark.parametrize("value, refused", [
    ("STREAMBOSS_TOKEN", "STREAMBOSS_TOKEN holds a credential"),
    ("A, AWS_SECRET_ACCESS_KEY", "AWS_SECRET_ACCESS_KEY holds a credential"),
    (["STREAMBOSS_BROKER_URL"], "STREAMBOSS_BROKER_URL holds a credential"),
    ("A=B", "'A=B' is not an environment variable name"),
    (5, "pass_env must be a list"),
])
def test_credentials_cannot_be_passed_through(value: object, refused: str) -> None:
    with pytest.raises(IsolationError) as error:
        isolation.parse_pass_env(value)
    assert refused in str(error.value)


def test_pass_through_names_from_the_environment_or_the_file() -> None:
    assert isolation.parse_pass_env(" B,A,,A ") == ("A", "B")
    assert isolation.parse_pass_env(["X"]) == ("X",)
    assert isolation.parse_pass_env(None) == ()


def test_a_child_gets_its_definitions_env_and_none_of_the_agents_secrets(
        streams, names, agent, broker, broker_url: str, tmp_path: Path) -> None:
    source, sink = streams("in", "out")
    definition = tmp_path / "definition.json"
    definition.write_text(json.dumps({"exec": PRINT_ENV, "env": {"SECRET": SECRET_VALUE}}))
    capture = broker.capture(sink)
    agent(names("op"), source, sink, "--definition", str(definition), env={
        **AGENT_SECRETS, "STREAMBOSS_PASS_ENV": "PASSED_THROUGH",
        "PASSED_THROUGH": "passed-value", "NOT_PASSED": "not-passed-value"})
    broker.publish(source, [b"x"])
    [output] = capture.collect(1)
    seen = environment(output.body)
    assert seen["SECRET"] == SECRET_VALUE
    assert seen["PASSED_THROUGH"] == "passed-value"
    assert seen["PYTHONUNBUFFERED"] == "1"
    assert "NOT_PASSED" not in seen
    text = output.body.decode()
    password = urlsplit(broker_url).password
    for name, value in AGENT_SECRETS.items():
        assert name not in seen and value not in text, name
    assert "STREAMBOSS_BROKER_URL" not in seen and broker_url not in text
    assert not any(k.startswith(("STREAMBOSS_", "AWS_")) for k in seen), sorted(seen)
    if password:
        assert f":{password}@" not in text


def test_a_service_child_gets_the_allow_list_too(streams, names, agent, broker,
                                                 tmp_path: Path, script) -> None:
    source, sink = streams("in", "out")
    command = script("names", """
        import os, sys
        for line in sys.stdin:
            sys.stdout.write(",".join(sorted(os.environ)) + "\\n")
    """)
    capture = broker.capture(sink)
    agent(names("op"), source, sink, "--mode", "service", "--exec", command,
          env=AGENT_SECRETS)
    broker.publish(source, [b"x"])
    [output] = capture.collect(1)
    seen = set(output.body.decode().strip().split(","))
    assert not seen & {*AGENT_SECRETS, "STREAMBOSS_BROKER_URL"}, seen
    assert "PATH" in seen


def test_a_pass_through_credential_is_refused_at_start(streams, names, agent) -> None:
    source, sink = streams("in", "out")
    process = agent(names("op"), source, sink, "--exec", "cat", ready=False,
                    env={"STREAMBOSS_PASS_ENV": "HOME,AWS_SECRET_ACCESS_KEY"})
    assert process.proc.wait(timeout=30) == 2
    lines = process.log().strip().splitlines()
    assert len(lines) == 1, lines
    assert "AWS_SECRET_ACCESS_KEY holds a credential" in lines[0]


# -- the agent's memory and environ, other users ----------------------------------------

# Run with --shell, so $PPID is the agent: tries to read the agent's environ and
# prints EACCES or READ, and the program's uid. Shell tools only: a program running
# as another user may not reach this checkout's Python.
READ_AGENT_ENVIRON = ("if cat /proc/$PPID/environ 2>&1 >/dev/null | grep -q 'Permission denied'; "
                      "then echo EACCES $(id -u); else echo READ $(id -u); fi")
# Prints the program's uid, gid, supplementary groups (comma-separated), HOME and
# its effective, permitted and ambient capabilities and no_new_privs flag.
WHO_AM_I = ("echo \"$(id -u) $(id -g) [$(grep '^Groups:' /proc/self/status | cut -f2 | "
            "tr -d ' ')] $HOME $(grep -E '^(CapEff|CapPrm|CapAmb|NoNewPrivs):' "
            "/proc/self/status | cut -f2 | tr '\\n' ' ')\"")
NOBODY = "nobody"


def setpriv_as(user: str) -> list[str]:
    """The command prefix that runs a program as ``user`` (its group, no others)."""
    entry = pwd.getpwnam(user)
    return ["setpriv", f"--reuid={entry.pw_uid}", f"--regid={entry.pw_gid}", "--clear-groups"]


def need_setpriv() -> None:
    require(os.geteuid() == 0, "needs root (to start the agent as another user)")
    require(shutil.which("setpriv"), "needs setpriv (apt-get install util-linux)")
    require(_user_exists(NOBODY), "needs the user nobody")
    runs = subprocess.run([*setpriv_as(NOBODY), PYTHON, "-c", "import streamboss.agent"],
                          capture_output=True, cwd="/", timeout=60)
    require(runs.returncode == 0, f"needs {PYTHON} and this checkout readable by nobody "
            f"({runs.stderr.decode(errors='replace').strip()[-200:]})")


def _user_exists(name: str) -> bool:
    try:
        pwd.getpwnam(name)
    except KeyError:
        return False
    return True


@pytest.fixture
def agent_as(agent):
    """``agent_as(prefix, op, input, output, *options, env=...)``: an agent whose command
    line starts with ``prefix`` (e.g. setpriv), run from / so any user may."""

    def start(prefix: list[str], *args: str, **kwargs: object) -> AgentProcess:
        return agent(*args, prefix=prefix, **kwargs)

    return start


def test_a_child_of_the_same_user_cannot_read_the_agents_environ(
        streams, names, agent_as, broker) -> None:
    need_setpriv()
    source, sink = streams("in", "out")
    capture = broker.capture(sink)
    process = agent_as(setpriv_as(NOBODY), names("op"), source, sink, "--shell", "--exec",
                       READ_AGENT_ENVIRON)
    broker.publish(source, [b"x"])
    [output] = capture.collect(1)
    # Same uid as the agent: only the agent being non-dumpable keeps it out ...
    assert output.body.decode().split() == ["EACCES", str(pwd.getpwnam(NOBODY).pw_uid)]
    # ... which is why the kernel gave its /proc files to root.
    assert Path(f"/proc/{process.pid}/environ").stat().st_uid == 0


def run_as_child_user(streams, names, agent, broker, program: str) -> str:
    """What ``program`` (a shell command) prints for one message, run by an agent with
    STREAMBOSS_CHILD_USER=nobody."""
    source, sink = streams("in", "out")
    capture = broker.capture(sink)
    agent(names("op"), source, sink, "--shell", "--exec", program,
          env={"STREAMBOSS_CHILD_USER": NOBODY})
    broker.publish(source, [b"x"])
    [output] = capture.collect(1)
    return output.body.decode()


def test_children_run_as_the_child_user(streams, names, agent, broker) -> None:
    require(os.geteuid() == 0, "needs root (to start programs as another user)")
    require(_user_exists(NOBODY), "needs the user nobody")
    entry = pwd.getpwnam(NOBODY)
    uid, gid, groups, home, effective, permitted, ambient, _ = run_as_child_user(
        streams, names, agent, broker, WHO_AM_I).split()
    assert (int(uid), int(gid), groups, home) == (entry.pw_uid, entry.pw_gid, "[]",
                                                  entry.pw_dir)
    assert (int(effective, 16), int(permitted, 16), int(ambient, 16)) == (0, 0, 0)


def test_a_child_user_cannot_read_the_agents_environ(streams, names, agent, broker) -> None:
    require(os.geteuid() == 0, "needs root (to start programs as another user)")
    require(_user_exists(NOBODY), "needs the user nobody")
    output = run_as_child_user(streams, names, agent, broker, READ_AGENT_ENVIRON)
    assert output.split()[0] == "EACCES"


def test_an_agent_with_capabilities_but_not_root_runs_children_as_the_child_user(
        streams, names, agent_as, broker) -> None:
    """The stream_agent role's way: the agent's own user plus CAP_SETUID, CAP_SETGID and
    CAP_KILL as ambient capabilities (systemd AmbientCapabilities=); its children keep
    none of them."""
    need_setpriv()
    require(_user_exists("daemon"), "needs the user daemon")
    child = pwd.getpwnam(NOBODY)
    caps = "+setuid,+setgid,+kill"
    prefix = [*setpriv_as("daemon"), f"--inh-caps={caps}",
              f"--ambient-caps={caps}"]
    source, sink = streams("in", "out")
    capture = broker.capture(sink)
    agent_as(prefix, names("op"), source, sink, "--shell", "--exec", WHO_AM_I,
             env={"STREAMBOSS_CHILD_USER": NOBODY})
    broker.publish(source, [b"x"])
    [output] = capture.collect(1)
    uid, _, groups, _, effective, permitted, ambient, no_new_privs = \
        output.body.decode().split()
    assert (int(uid), groups) == (child.pw_uid, "[]")
    assert (int(effective, 16), int(permitted, 16), int(ambient, 16)) == (0, 0, 0)
    assert no_new_privs == "1"


@pytest.mark.parametrize("user, env_prefix, refused", [
    ("no-such-user-4711", [], "no such user: create it"),
    ("root", [], "is root: name an unprivileged user"),
    ("daemon", "nobody", "cannot start programs as another user"),
])
def test_a_child_user_the_agent_cannot_use_is_refused_at_start(
        streams, names, agent_as, user: str, env_prefix: object, refused: str) -> None:
    if env_prefix == "nobody":
        need_setpriv()
        prefix = setpriv_as(NOBODY)
    else:
        prefix = []
    source, sink = streams("in", "out")
    process = agent_as(prefix, names("op"), source, sink, "--exec", "cat", ready=False,
                       env={"STREAMBOSS_CHILD_USER": user})
    assert process.proc.wait(timeout=30) == 2
    lines = process.log().strip().splitlines()
    assert len(lines) == 1, lines
    assert f"STREAMBOSS_CHILD_USER {user!r}" in lines[0] and refused in lines[0], lines[0]


def test_the_manager_is_not_dumpable_either(tmp_path: Path, broker_url: str) -> None:
    need_setpriv()
    # pytest's own temporary directories are root's alone: nobody needs one it can reach.
    state = Path(tempfile.mkdtemp(prefix="streamboss-nobody-", dir="/tmp"))
    nobody = pwd.getpwnam(NOBODY)
    os.chown(state, nobody.pw_uid, nobody.pw_gid)
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("STREAMBOSS_")}
    env["STREAMBOSS_BROKER_URL"] = broker_url
    log = tmp_path / "manager.log"
    with log.open("ab") as handle:
        manager = subprocess.Popen(
            [*setpriv_as(NOBODY), PYTHON, "-m", "streamboss.manager", "manager", "--port",
             str(port), "--state-dir", str(state)], stdout=handle, stderr=handle,
            stdin=subprocess.DEVNULL, env=env, cwd="/")
    try:
        wait_until(lambda: manager.poll() is not None or _answers(port), 30,
                   "the manager's API")
        assert manager.poll() is None, log.read_text()
        # Running as nobody, yet its /proc files are root's: the kernel's mark of a
        # non-dumpable process, which nobody's other processes cannot read or trace.
        assert Path(f"/proc/{manager.pid}/environ").stat().st_uid == 0
        assert Path(f"/proc/{manager.pid}/status").read_text().count(
            f"Uid:\t{nobody.pw_uid}") == 1
    finally:
        manager.terminate()
        manager.wait(timeout=60)
        shutil.rmtree(state, ignore_errors=True)


def _answers(port: int) -> bool:
    try:
        return httpx.get(f"http://127.0.0.1:{port}/v1/health", timeout=1).status_code == 200
    except httpx.HTTPError:
        return False


def test_child_settings_come_from_the_environment_else_the_config_file(monkeypatch) -> None:
    monkeypatch.delenv(isolation.PASS_ENV_ENV, raising=False)
    monkeypatch.delenv(isolation.CHILD_USER_ENV, raising=False)
    assert isolation.child_isolation({}) == ChildIsolation()
    from_file = isolation.child_isolation({"pass_env": ["B", "A"]})
    assert from_file.pass_env == ("A", "B") and from_file.user is None
    monkeypatch.setenv(isolation.PASS_ENV_ENV, "C")
    assert isolation.child_isolation({"pass_env": ["B"]}).pass_env == ("C",)
    with pytest.raises(IsolationError, match="child_user must be a user name"):
        isolation.child_isolation({"child_user": 5})
    if os.geteuid() == 0 and _user_exists(NOBODY):
        user = isolation.child_isolation({"child_user": NOBODY}).user
        assert user is not None and user.uid == pwd.getpwnam(NOBODY).pw_uid


def test_the_archiver_is_not_dumpable_either(streams, broker, broker_url: str) -> None:
    """The archiver holds the broker URL in its environment, beside agents whose
    programs may run as the same user."""
    need_setpriv()
    [stream] = streams("archived")
    queue = archive_queue(stream)
    broker.forget_queue(queue)
    # As the manager declares it for an archive (manager/broker.py).
    channel = broker.connection.channel()
    channel.queue_declare(queue, durable=True)
    channel.queue_bind(queue, f"sb.stream.{stream}", "#")
    channel.close()
    store = Path(tempfile.mkdtemp(prefix="streamboss-nobody-", dir="/tmp"))
    nobody = pwd.getpwnam(NOBODY)
    os.chown(store, nobody.pw_uid, nobody.pw_gid)
    env = {k: v for k, v in os.environ.items() if not k.startswith("STREAMBOSS_")}
    env["STREAMBOSS_BROKER_URL"] = broker_url
    archiver = subprocess.Popen(
        [*setpriv_as(NOBODY), PYTHON, "-m", "streamboss.manager.archiver", "--stream", stream,
         "--store", f"file://{store}"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        stdin=subprocess.DEVNULL, env=env, cwd="/")
    try:
        wait_until(lambda: archiver.poll() is not None or (
            broker.queue_depth(queue) is not None and broker.queue_consumers(queue) == 1),
                   30, "the archiver's consumer")
        assert archiver.poll() is None, archiver.stderr.read() if archiver.stderr else ""
        assert Path(f"/proc/{archiver.pid}/status").read_text().count(
            f"Uid:\t{nobody.pw_uid}") == 1
        assert Path(f"/proc/{archiver.pid}/environ").stat().st_uid == 0
    finally:
        archiver.terminate()
        archiver.wait(timeout=60)
        shutil.rmtree(store, ignore_errors=True)


def test_the_manager_refuses_to_pass_a_credential_to_programs(tmp_path, broker_url: str) -> None:
    """Refused by the manager at start, not by each agent it would start and restart."""
    result = run_cli([*MANAGER, "manager", "--port", str(free_port()),
                      "--state-dir", str(tmp_path / "state")],
                     env={"STREAMBOSS_BROKER_URL": broker_url,
                          "STREAMBOSS_PASS_ENV": "LC_PAPER,AWS_SECRET_ACCESS_KEY"},
                     timeout=30)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 2 and len(lines) == 1, result.stderr
    assert "AWS_SECRET_ACCESS_KEY" in lines[0] and "credential" in lines[0]
    assert not (tmp_path / "state").exists()


def test_a_root_manager_without_a_child_user_says_what_its_programs_can_read(
        tmp_path, broker_url: str) -> None:
    require(os.geteuid() == 0, "needs root")
    log = tmp_path / "manager.log"
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("STREAMBOSS_")}
    env["STREAMBOSS_BROKER_URL"] = broker_url
    with log.open("ab") as handle:
        manager = subprocess.Popen(
            [*MANAGER, "manager", "--port", str(port), "--state-dir", str(tmp_path / "state")],
            stdout=handle, stderr=handle, stdin=subprocess.DEVNULL, env=env)
    try:
        wait_until(lambda: manager.poll() is not None or _answers(port), 30, "the manager's API")
        assert manager.poll() is None, log.read_text()
    finally:
        manager.terminate()
        manager.wait(timeout=60)
    warnings = [line for line in log.read_text().splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1 and "STREAMBOSS_CHILD_USER" in warnings[0], log.read_text()
