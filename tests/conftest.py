"""Fixtures for the stream-agent tests: the real RabbitMQ, unique names, agent processes.

Nothing here mocks the broker. Every test gets names of its own, creates the
streams it needs, binds its capture queues *before* it publishes, and leaves no
exchange, operation queue or agent process behind.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

import httpx
import pika
import pika.exceptions
import pytest

from streamboss.agent.naming import operation_queue_arguments
from streamboss.manager import api_token
from streamboss.manager.broker import passive_declare
from tools.chaos import chain as chaos_chain

BROKER_URL = os.environ.get("STREAMBOSS_TEST_BROKER_URL",
                            "amqp://guest:guest@127.0.0.1:5672/%2F")
BROKER_PORT = 5672
PYTHON = sys.executable
# Bounds that keep a broken agent from hanging the suite; they are not speed claims.
COLLECT_TIMEOUT = 60.0
READY_TIMEOUT = 30.0


def stream_exchange(stream: str) -> str:
    return f"sb.stream.{stream}"


def op_queue(operation: str) -> str:
    return f"sb.op.{operation}"


def operation_queues(operation: str) -> list[str]:
    """Every queue an agent of ``operation`` may declare: input, solo, dead, retries."""
    queues = [op_queue(operation), f"sb.solo.{operation}", f"sb.dead.{operation}"]
    with contextlib.suppress(httpx.HTTPError, ValueError):
        listed = httpx.get("http://127.0.0.1:15672/api/queues/%2F?columns=name",
                           auth=("guest", "guest"), timeout=5).json()
        prefix = f"sb.retry.{operation}."
        queues += [q["name"] for q in listed
                   if q["name"].startswith(prefix) and q["name"][len(prefix):].isdigit()]
    return queues


# -- names ---------------------------------------------------------------------


@pytest.fixture
def names() -> Iterator[Any]:
    """``names("in")`` -> ``"in-1a2b3c4d"``: valid, unique per call."""
    run = uuid.uuid4().hex[:8]
    counter = iter(range(1_000_000))

    def make(prefix: str) -> str:
        return f"t-{prefix}-{run}-{next(counter)}"

    yield make


# -- broker --------------------------------------------------------------------


@dataclass
class Message:
    body: bytes
    properties: pika.BasicProperties
    redelivered: bool
    routing_key: str

    @property
    def headers(self) -> dict[str, Any]:
        return dict(self.properties.headers or {})

    def header(self, name: str) -> Any:
        value = self.headers.get(name)
        return value.decode() if isinstance(value, bytes) else value

    @property
    def parent(self) -> str | None:
        return self.header("sb-parent")


class Capture:
    """An exclusive queue bound to a stream (or an existing queue), read on demand."""

    def __init__(self, connection: pika.BlockingConnection, queue: str) -> None:
        self.queue = queue
        self._connection = connection

    def collect(self, count: int, timeout: float = COLLECT_TIMEOUT) -> list[Message]:
        """Exactly ``count`` messages, or fail saying how many arrived."""
        got = self._drain(count, timeout, quiet=None)
        if len(got) < count:
            raise AssertionError(f"expected {count} message(s) on {self.queue}, got {len(got)} "
                                 f"in {timeout:g}s: {[m.body[:60] for m in got][:10]}")
        return got

    def collect_until_quiet(self, quiet: float = 1.5, limit: int = 1_000_000,
                            timeout: float = COLLECT_TIMEOUT) -> list[Message]:
        """Everything that arrives until nothing has for ``quiet`` seconds."""
        return self._drain(limit, timeout, quiet=quiet)

    def _drain(self, count: int, timeout: float, quiet: float | None) -> list[Message]:
        got: list[Message] = []
        if count <= 0:
            return got
        channel = self._connection.channel()
        channel.basic_qos(prefetch_count=500)
        deadline = time.monotonic() + timeout
        last = time.monotonic()
        try:
            for method, props, body in channel.consume(self.queue, inactivity_timeout=0.2):
                now = time.monotonic()
                if method is not None:
                    got.append(Message(body, props, method.redelivered, method.routing_key))
                    channel.basic_ack(method.delivery_tag)
                    last = now
                    if len(got) >= count:
                        break
                if now > deadline or (quiet is not None and now - last > quiet):
                    break
        finally:
            # Unacked messages already pushed to us go back to the queue.
            channel.cancel()
            channel.close()
        return got


class Broker:
    """Test-side broker helper on one blocking connection; cleans up after the test."""

    def __init__(self, url: str) -> None:
        params = pika.URLParameters(url)
        params.heartbeat = 0  # tests block for long stretches between broker calls
        params.client_properties = {"connection_name": "streamboss-tests"}
        self.connection = pika.BlockingConnection(params)
        self.channel = self.connection.channel()
        self.publisher = self.connection.channel()
        self.publisher.confirm_delivery()
        self._exchanges: set[str] = set()
        self._queues: set[str] = set()
        self._operations: set[str] = set()

    # topology

    def create_stream(self, name: str) -> str:
        exchange = stream_exchange(name)
        self.channel.exchange_declare(exchange, exchange_type="topic", durable=True)
        self._exchanges.add(exchange)
        return name

    def forget_operation(self, operation: str) -> None:
        """Delete what an agent of ``operation`` declares, at teardown."""
        self._operations.add(operation)
        self._exchanges.add(stream_exchange(f"{operation}.dead"))

    def declare_operation_queue(self, operation: str, source: str) -> None:
        """Create ``sb.op.<operation>`` the way the agent does (and the manager will), so a
        backlog can be published before any agent runs."""
        self.forget_operation(operation)
        self.channel.exchange_declare(stream_exchange(f"{operation}.dead"), "topic",
                                      durable=True)
        self.channel.queue_declare(op_queue(operation), durable=True,
                                   arguments=operation_queue_arguments(operation))
        self.channel.queue_bind(op_queue(operation), stream_exchange(source), routing_key="#")

    def exchange_exists(self, exchange: str) -> bool:
        channel = self.connection.channel()
        try:
            channel.exchange_declare(exchange, exchange_type="topic", passive=True)
        except pika.exceptions.ChannelClosedByBroker as exc:
            if exc.reply_code == 404:
                return False
            raise
        channel.close()
        return True

    def queue_depth(self, queue: str) -> int | None:
        """Ready messages in ``queue``; ``None`` when it does not exist."""
        channel = self.connection.channel()
        state = passive_declare(channel, queue)
        if state is None:
            return None
        channel.close()
        return state.messages

    def queue_consumers(self, queue: str) -> int:
        channel = self.connection.channel()
        frame = channel.queue_declare(queue, passive=True)
        channel.close()
        return frame.method.consumer_count

    def capture(self, stream: str) -> Capture:
        """Bind a fresh exclusive queue to ``stream``; call this before publishing."""
        # exclusive: gone with our connection; not auto-delete, which would drop it
        # as soon as one collect() cancels its consumer
        frame = self.channel.queue_declare("", exclusive=True)
        queue = frame.method.queue
        self.channel.queue_bind(queue, stream_exchange(stream), routing_key="#")
        return Capture(self.connection, queue)

    def forget_queue(self, name: str) -> None:
        """Delete the queue ``name`` when the test ends (one a process of the test declared)."""
        self._queues.add(name)

    def queue(self, name: str) -> Capture:
        """Consume an existing queue (an operation's, after its agent exited)."""
        return Capture(self.connection, name)

    # data

    def publish(self, stream: str, bodies: list[bytes], ids: list[str] | None = None,
                headers: dict[str, Any] | None = None, use_sb_id: bool = True,
                routing_key: str = "") -> list[str]:
        """Publish persistent messages with ``sb-id`` headers; return their ids."""
        run = uuid.uuid4().hex[:8]
        ids = ids or [f"in-{run}-{i}" for i in range(len(bodies))]
        for ident, body in zip(ids, bodies, strict=True):
            message_headers = dict(headers or {})
            if use_sb_id:
                message_headers["sb-id"] = ident
            props = pika.BasicProperties(
                delivery_mode=2, message_id=ident, headers=message_headers,
                content_type="application/octet-stream",
            )
            self.publisher.basic_publish(stream_exchange(stream), routing_key, body, props)
        return ids

    def close(self) -> None:
        with contextlib.suppress(Exception):
            if not self.connection.is_open:
                self.connection = pika.BlockingConnection(pika.URLParameters(BROKER_URL))
            channel = self.connection.channel()
            for operation in sorted(self._operations):
                self._queues.update(operation_queues(operation))
            for queue in sorted(self._queues):
                channel.queue_delete(queue)
            for exchange in sorted(self._exchanges):
                channel.exchange_delete(exchange)
        with contextlib.suppress(Exception):
            self.connection.close()


# -- the session needs the broker ----------------------------------------------------

MANAGEMENT_PORT = 15672
# A broker that is restarting answers within seconds; one that is absent never does.
BROKER_CHECK_SECONDS = 5.0


def broker_problem(url: str) -> str | None:
    """Why the tests cannot use the broker at ``url`` and its management API, in one
    line with the fix; None when both answer."""
    parts = urlsplit(url)
    host, port = parts.hostname or "127.0.0.1", parts.port or BROKER_PORT
    try:
        socket.create_connection((host, port), timeout=2).close()
    except OSError as exc:
        return (f"RabbitMQ is not listening on {host}:{port} ({exc.strerror or exc}): start "
                "it with `rabbitmq-server -detached`")
    user = unquote(parts.username or "guest")
    overview = f"http://{host}:{MANAGEMENT_PORT}/api/overview"
    try:
        code = httpx.get(overview, auth=(user, unquote(parts.password or "guest")),
                         timeout=5).status_code
    except httpx.HTTPError as exc:
        return (f"RabbitMQ's management API does not answer at {overview} "
                f"({type(exc).__name__}): enable it with "
                "`rabbitmq-plugins enable rabbitmq_management`")
    if code != 200:
        return (f"RabbitMQ's management API answered {code} to {user} at {overview}: give "
                f"the user the management tag (`rabbitmqctl set_user_tags {user} "
                "administrator`)")
    return None


def pytest_configure(config: pytest.Config) -> None:
    """Stop at once, in one line, when the broker or its management API is missing:
    without them most tests would each wait out their own timeout instead. (Here
    rather than at session start, where pytest would print the line twice.)"""
    if config.option.collectonly or config.option.help or config.option.version:
        return
    deadline = time.monotonic() + BROKER_CHECK_SECONDS
    while (problem := broker_problem(BROKER_URL)) is not None and time.monotonic() < deadline:
        time.sleep(0.5)
    if problem is not None:
        pytest.exit(f"cannot run the tests: {problem}", returncode=pytest.ExitCode.INTERRUPTED)


def _broker_up() -> bool:
    try:
        socket.create_connection(("127.0.0.1", BROKER_PORT), timeout=1).close()
    except OSError:
        return False
    return True


@pytest.fixture(scope="session")
def broker_url() -> str:
    if not _broker_up():
        pytest.fail(f"RabbitMQ is not listening on 127.0.0.1:{BROKER_PORT}; "
                    "start it with `rabbitmq-server -detached`", pytrace=False)
    return BROKER_URL


@pytest.fixture
def broker(broker_url: str) -> Iterator[Broker]:
    helper = Broker(broker_url)
    try:
        yield helper
    finally:
        helper.close()


@pytest.fixture
def streams(broker: Broker, names: Any) -> Any:
    """``streams("in", "out")`` -> two freshly created stream names."""

    def make(*prefixes: str) -> list[str]:
        return [broker.create_stream(names(prefix)) for prefix in prefixes]

    return make


# -- agent processes -----------------------------------------------------------


def _children(pid: int) -> dict[int, int]:
    """pid -> parent pid for every process on the machine."""
    table: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as handle:
                stat = handle.read()
        except OSError:
            continue
        # the command name may hold spaces and parentheses: split after the last ')'
        fields = stat.rsplit(")", 1)[1].split()
        table[int(entry)] = int(fields[1])
    return table


def descendants(pid: int) -> list[int]:
    table = _children(pid)
    found: list[int] = []
    frontier = [pid]
    while frontier:
        parent = frontier.pop()
        for child, ppid in table.items():
            if ppid == parent:
                found.append(child)
                frontier.append(child)
    return found


def broker_ports(pid: int) -> set[int]:
    """Local TCP ports of ``pid``'s established connections to the broker port."""
    return chaos_chain.broker_ports(pid, BROKER_PORT)


class AgentProcess:
    """One ``stream-agent`` subprocess; its stderr (the log) goes to a file."""

    def __init__(self, argv: list[str], env: dict[str, str], log_path: Path, cwd: Path) -> None:
        self.argv = argv
        self.log_path = log_path
        self._log = open(log_path, "ab")  # noqa: SIM115 - closed in cleanup()
        self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=self._log,
                                     stderr=self._log, env=env, cwd=cwd)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_ready(self, timeout: float = READY_TIMEOUT) -> AgentProcess:
        """Wait for the agent's first "consuming" log line (its queue is then bound)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if ": consuming " in self.log():
                return self
            if self.proc.poll() is not None:
                raise AssertionError(f"agent exited with {self.proc.returncode}:\n{self.log()}")
            time.sleep(0.05)
        raise AssertionError(f"agent not consuming after {timeout:g}s:\n{self.log()}")

    def wait_log(self, text: str, count: int = 1, timeout: float = READY_TIMEOUT) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.log().count(text) >= count:
                return
            time.sleep(0.05)
        raise AssertionError(f"{text!r} not logged {count} time(s):\n{self.log()}")

    def terminate(self, timeout: float = 60.0) -> int:
        """SIGTERM and wait; return the exit code."""
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout=timeout)

    def kill9(self) -> None:
        """SIGKILL the agent and every process it started (they would otherwise linger)."""
        family = descendants(self.pid)
        for pid in [self.pid, *family]:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        self.proc.wait(timeout=30)

    def cleanup(self) -> None:
        if self.proc.poll() is None:
            self.kill9()
        self._log.close()


@pytest.fixture
def agent(broker: Broker, broker_url: str, tmp_path: Path) -> Iterator[Any]:
    """``agent(op, input, output, "--exec", CMD, ...)`` -> a started AgentProcess.

    It waits until the agent consumes unless ``ready=False``; ``name_flags=False``
    leaves the operation and stream names to a ``--config`` file; ``prefix`` starts
    the command line (e.g. setpriv, to run it as another user; it then runs from /,
    which any user may enter). Every agent is killed (with its children) at
    teardown, and the operation's queue and dead-letter stream are deleted.
    """
    started: list[AgentProcess] = []

    def start(operation: str, source: str, sink: str, *options: str, ready: bool = True,
              env: dict[str, str] | None = None, name_flags: bool = True,
              prefix: list[str] | None = None) -> AgentProcess:
        broker.forget_operation(operation)
        name_args = ["--operation", operation, "--input", source, "--output", sink]
        argv = [*(prefix or []), PYTHON, "-m", "streamboss.agent",
                *(name_args if name_flags else []), *options]
        process_env = {**os.environ, "STREAMBOSS_BROKER_URL": broker_url, **(env or {})}
        log_path = tmp_path / f"agent-{operation}-{len(started)}.log"
        process = AgentProcess(argv, process_env, log_path, Path("/") if prefix else tmp_path)
        started.append(process)
        if ready:
            process.wait_ready()
        return process

    try:
        yield start
    finally:
        for process in started:
            process.cleanup()


@pytest.fixture
def script(tmp_path: Path) -> Any:
    """``script("name", SOURCE)`` -> a command line running that Python source unbuffered."""

    def write(name: str, source: str) -> str:
        path = tmp_path / f"{name}.py"
        path.write_text(textwrap.dedent(source))
        return f"{PYTHON} -u {path}"

    return write


def run_cli(argv: list[str], env: dict[str, str] | None = None,
            timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
    """Run a command line to completion with text stdout/stderr."""
    return subprocess.run(argv, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})}, stdin=subprocess.DEVNULL)


# -- the stream manager --------------------------------------------------------

ROOT = Path(__file__).resolve().parent.parent
TOOLS = ROOT / "tools"
MANAGER = [PYTHON, "-m", "streamboss.manager"]
# Bounds that keep a broken manager from hanging the suite; they are not speed claims.
MANAGER_START_TIMEOUT = 30.0
MANAGER_STOP_TIMEOUT = 60.0


def free_port() -> int:
    """A TCP port nobody listens on right now (closed again, so also an unreachable one)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _proc_state(pid: int) -> tuple[str, int] | None:
    """(state letter, parent pid) of ``pid``, or None when it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as handle:
            fields = handle.read().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return fields[0], int(fields[1])


def agent_pids(operation: str) -> set[int]:
    """Live ``streamboss.agent`` processes running ``--operation operation``.

    Zombies do not count, nor a child an agent has forked but not yet exec'd (it
    briefly carries its parent's command line).
    """
    wanted = operation.encode()
    found: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as handle:
                argv = handle.read().split(b"\0")
        except OSError:
            continue
        if b"streamboss.agent" not in argv:
            continue
        if not any(argv[i] == b"--operation" and argv[i + 1] == wanted
                   for i in range(len(argv) - 1)):
            continue
        state = _proc_state(int(entry))
        if state is None or state[0] == "Z":
            continue
        found[int(entry)] = state[1]
    return {pid for pid, parent in found.items() if parent not in found}


def pids_with_argument(argument: str) -> set[int]:
    """Live processes with ``argument`` somewhere in one of their arguments."""
    needle = argument.encode()
    found: set[int] = set()
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as handle:
                argv = handle.read().split(b"\0")
        except OSError:
            continue
        if any(needle in arg for arg in argv):
            state = _proc_state(int(entry))
            if state is not None and state[0] != "Z":
                found.add(int(entry))
    return found


def archiver_stream(pid: int) -> str | None:
    """The ``--stream`` of archiver ``pid``, or None when it is not an archiver (any more)."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as handle:
            argv = handle.read().decode(errors="replace").split("\0")
    except OSError:
        return None
    if "streamboss.manager.archiver" not in argv or "--stream" not in argv:
        return None
    position = argv.index("--stream") + 1
    return argv[position] if position < len(argv) else None


def archiver_pids(stream: str) -> set[int]:
    """Live archiver processes of ``stream``."""
    return {pid for pid in pids_with_argument("streamboss.manager.archiver")
            if archiver_stream(pid) == stream}


def wait_until(predicate: Any, timeout: float, what: str, interval: float = 0.05) -> Any:
    """Poll ``predicate`` until it returns something truthy; fail saying ``what`` after
    ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        result = predicate()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g}s waiting for {what}")
        time.sleep(interval)


class ManagerProcess:
    """A real ``streamboss manager`` subprocess with its own state directory and port."""

    def __init__(self, state_dir: Path, port: int, broker_url: str, log_path: Path,
                 host: str = "127.0.0.1", token: str | None = None) -> None:
        self.state_dir = state_dir
        self.port = port
        self.host = host
        self.broker_url = broker_url
        self.log_path = log_path
        self.token = token
        self.url = f"http://127.0.0.1:{port}"
        # Extra environment for the manager (and so for its agents and archivers).
        self.extra_env: dict[str, str] = {}
        # What starts it: `streamboss`, or a stand-in that runs the same manager
        # differently (tests/inert_manager.py starts no processes).
        self.command: list[str] = list(MANAGER)
        # More `streamboss manager` options (e.g. --management-url).
        self.manager_args: list[str] = []
        self.proc: subprocess.Popen[bytes] | None = None
        self._log: Any = None

    # life

    def env(self, **extra: str) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("STREAMBOSS_")}
        env["STREAMBOSS_BROKER_URL"] = self.broker_url
        env["STREAMBOSS_URL"] = self.url
        # The pointer a manager leaves for the CLI to its generated token (per port, in
        # the user's state directory) stays in the test's directory.
        env["XDG_STATE_HOME"] = str(self.state_dir.parent / "xdg-state")
        if self.token:
            env["STREAMBOSS_TOKEN"] = self.token
        env.update(self.extra_env)
        env.update(extra)
        return env

    def start(self, wait: bool = True) -> ManagerProcess:
        assert self.proc is None or self.proc.poll() is not None, "already running"
        if self._log is not None:
            self._log.close()
        self._log = open(self.log_path, "ab")  # noqa: SIM115 - closed in close()
        argv = [*self.command, "manager", "--port", str(self.port), "--state-dir",
                str(self.state_dir), "--host", self.host, *self.manager_args]
        self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=self._log,
                                     stderr=self._log, env=self.env(),
                                     cwd=self.state_dir.parent)
        if wait:
            self.wait_healthy()
        return self

    def wait_healthy(self, timeout: float = MANAGER_START_TIMEOUT) -> None:
        def healthy() -> bool:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise AssertionError(f"manager exited with {self.proc.returncode}:\n{self.log()}")
            try:
                return httpx.get(f"{self.url}/v1/health", timeout=1).status_code == 200
            except httpx.HTTPError:
                return False

        wait_until(healthy, timeout, f"the manager on port {self.port}\n{self.log()}", 0.1)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = MANAGER_STOP_TIMEOUT) -> int:
        """Send ``sig`` and wait for the manager to exit; return its exit code."""
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        return self.proc.wait(timeout=timeout)

    def kill9(self) -> None:
        """SIGKILL the manager alone: its agents live on as orphans."""
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait(timeout=30)

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def close(self) -> None:
        if self._log is not None:
            self._log.close()
            self._log = None

    # talking to it

    def cli(self, *args: str, env: dict[str, str] | None = None,
            timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
        """``streamboss ARGS`` against this manager (and the test broker)."""
        return subprocess.run([*MANAGER, *args], capture_output=True, text=True,
                              timeout=timeout, env={**self.env(), **(env or {})},
                              stdin=subprocess.DEVNULL)

    def ok(self, *args: str, env: dict[str, str] | None = None) -> str:
        """``cli`` that must succeed; returns stdout."""
        result = self.cli(*args, env=env)
        assert result.returncode == 0, (args, result.returncode, result.stderr)
        return result.stdout

    def tool(self, script: str, *args: str, env: dict[str, str] | None = None,
             input: str | None = None,
             timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
        """One of the seed's ``tools/`` shims, run the way a person runs it."""
        return subprocess.run([PYTHON, str(TOOLS / script), *args], capture_output=True,
                              text=True, timeout=timeout, input=input,
                              env={**self.env(), **(env or {})}, cwd=TOOLS)

    def bearer(self) -> str | None:
        """The token the manager wants: the test's, or the one it generated (read from its
        state directory once it has started)."""
        return self.token or api_token.read(self.state_dir)

    def headers(self) -> dict[str, str]:
        token = self.bearer()
        return {"Authorization": f"Bearer {token}"} if token else {}

    def api(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        headers = {**self.headers(), **kwargs.pop("headers", {})}
        return httpx.request(method, f"{self.url}{path}", headers=headers, timeout=30,
                             **kwargs)

    def declarations(self) -> dict[str, Any]:
        """What ``streamboss list -o json`` prints."""
        return json.loads(self.ok("list", "-o", "json"))

    def status(self) -> dict[str, Any]:
        """``GET /v1/status`` (the same document ``status -o json`` prints)."""
        response = self.api("GET", "/v1/status")
        assert response.status_code == 200, response.text
        return response.json()

    def op_status(self, operation: str) -> dict[str, Any] | None:
        for entry in self.status()["operations"]:
            if entry["name"] == operation:
                return entry
        return None

    def wait_status(self, operation: str, predicate: Any, timeout: float,
                    what: str) -> dict[str, Any]:
        def check() -> dict[str, Any] | None:
            entry = self.op_status(operation)
            return entry if entry is not None and predicate(entry) else None

        try:
            return wait_until(check, timeout, f"{operation}: {what}")
        except AssertionError as exc:
            raise AssertionError(f"{exc}; last status {self.op_status(operation)}") from None

    def pid_files(self, operation: str) -> list[Path]:
        return sorted((self.state_dir / "agents").glob(f"{operation}.*.pid"))


class ManagerPool:
    """Starts managers and cleans up after them: every manager is stopped with SIGTERM
    (it drains its agents), leftover agents of its state directories are killed, and
    every exchange and queue of the names handed out or declared is deleted."""

    def __init__(self, broker_url: str, base: Path) -> None:
        self.broker_url = broker_url
        self.base = base
        self.managers: list[ManagerProcess] = []
        self._names: set[str] = set()
        self._run = uuid.uuid4().hex[:8]
        self._counter = iter(range(1_000_000))

    def name(self, prefix: str) -> str:
        """A valid, unique stream or operation name, deleted from the broker at the end."""
        made = f"m-{prefix}-{self._run}-{next(self._counter)}"
        self._names.add(made)
        return made

    def new(self, state_dir: Path | None = None, port: int | None = None,
            host: str = "127.0.0.1", token: str | None = None) -> ManagerProcess:
        """A manager, not started yet."""
        index = len(self.managers)
        state_dir = state_dir or self.base / f"state-{index}"
        manager = ManagerProcess(state_dir, port or free_port(), self.broker_url,
                                 self.base / f"manager-{index}.log", host, token)
        self.managers.append(manager)
        return manager

    def start(self, **kwargs: Any) -> ManagerProcess:
        return self.new(**kwargs).start()

    def _remember_declarations(self, manager: ManagerProcess) -> None:
        with contextlib.suppress(Exception):
            for stream in manager.api("GET", "/v1/streams").json():
                self._names.add(stream["name"])
            for archive in manager.api("GET", "/v1/archives").json():
                self._names.add(archive["stream"])
            for op in manager.api("GET", "/v1/operations").json():
                self._names.update((op["name"], op["input"], op["output"]))

    def close(self) -> None:
        for manager in self.managers:
            if manager.running():
                self._remember_declarations(manager)
                with contextlib.suppress(Exception):
                    manager.stop(signal.SIGTERM)
                if manager.running():
                    manager.kill9()
            manager.close()
        # Agents (and archivers) of a manager that was killed, or did not drain them:
        # kill them and whatever they started.
        for manager in self.managers:
            pids = pids_with_argument(str(manager.state_dir / "agents") + os.sep)
            pids |= {pid for pid in pids_with_argument("streamboss.manager.archiver")
                     if archiver_stream(pid) in self._names}
            for pid in pids:
                for victim in [pid, *descendants(pid)]:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(victim, signal.SIGKILL)
        self._delete_broker_objects()

    def _delete_broker_objects(self) -> None:
        connection = pika.BlockingConnection(pika.URLParameters(self.broker_url))
        try:
            channel = connection.channel()
            for name in sorted(self._names):
                for kind, target in (*(("queue", q) for q in operation_queues(name)),
                                     ("queue", f"sb.sub.archive.{name}"),
                                     ("exchange", stream_exchange(name)),
                                     ("exchange", stream_exchange(f"{name}.dead"))):
                    try:
                        if kind == "queue":
                            channel.queue_delete(target)
                        else:
                            channel.exchange_delete(target)
                    except pika.exceptions.ChannelClosedByBroker:
                        channel = connection.channel()
        finally:
            with contextlib.suppress(Exception):
                connection.close()


@pytest.fixture
def managers(broker_url: str, tmp_path: Path) -> Iterator[ManagerPool]:
    """``managers.start()`` -> a running manager of this test; all stopped at teardown."""
    pool = ManagerPool(broker_url, tmp_path)
    try:
        yield pool
    finally:
        pool.close()


@pytest.fixture(scope="module")
def module_managers(broker_url: str, tmp_path_factory: pytest.TempPathFactory
                    ) -> Iterator[ManagerPool]:
    """A ManagerPool shared by a test module (one manager, one free port per module)."""
    pool = ManagerPool(broker_url, tmp_path_factory.mktemp("managers"))
    try:
        yield pool
    finally:
        pool.close()


class StreamFollower:
    """A consumer of a stream in this test process, on a thread of its own: the manager
    sees it as demand from the moment it attaches until it leaves."""

    def __init__(self, broker_url: str, stream: str, prefetch: int = 1000) -> None:
        self.stream = stream
        self.messages: list[Message] = []
        self.attached_at = 0.0
        self.left_at = 0.0
        self._url = broker_url
        self._prefetch = prefetch
        self._ready = threading.Event()
        self._stop = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name=f"follow-{stream}", daemon=True)
        self._thread.start()
        if not self._ready.wait(READY_TIMEOUT):
            raise AssertionError(f"could not attach a consumer to {stream}")
        if self._error is not None:
            raise self._error

    def _run(self) -> None:
        connection = None
        try:
            connection = pika.BlockingConnection(pika.URLParameters(self._url))
            channel = connection.channel()
            channel.basic_qos(prefetch_count=self._prefetch)
            # From here on the manager may see us (an exclusive queue counts as a consumer).
            self.attached_at = time.monotonic()
            queue = channel.queue_declare("", exclusive=True).method.queue
            channel.queue_bind(queue, stream_exchange(self.stream), routing_key="#")
            channel.basic_consume(queue, self._on_message)
            self._ready.set()
            while not self._stop.is_set():
                connection.process_data_events(time_limit=0.05)
        except BaseException as exc:
            self._error = exc
            self._ready.set()
        finally:
            if connection is not None and connection.is_open:
                with contextlib.suppress(Exception):
                    connection.close()
            self.left_at = time.monotonic()

    def _on_message(self, channel: Any, method: Any, properties: Any, body: bytes) -> None:
        self.messages.append(Message(body, properties, method.redelivered, method.routing_key))
        channel.basic_ack(method.delivery_tag)

    def wait_for(self, count: int, timeout: float = COLLECT_TIMEOUT) -> list[Message]:
        """At least ``count`` messages, or fail saying how many arrived."""
        deadline = time.monotonic() + timeout
        while len(self.messages) < count and time.monotonic() < deadline:
            if self._error is not None:
                raise AssertionError(f"consumer of {self.stream} failed: {self._error!r}")
            time.sleep(0.05)
        if len(self.messages) < count:
            raise AssertionError(f"expected {count} message(s) on {self.stream}, got "
                                 f"{len(self.messages)} in {timeout:g}s")
        return list(self.messages)

    def leave(self) -> float:
        """Close the connection (the queue goes with it); return when that happened."""
        self._stop.set()
        self._thread.join(timeout=30)
        return self.left_at


@pytest.fixture
def follow(broker_url: str) -> Iterator[Any]:
    """``follow(stream)`` -> a StreamFollower attached now; all leave at teardown."""
    started: list[StreamFollower] = []

    def attach(stream: str, prefetch: int = 1000) -> StreamFollower:
        follower = StreamFollower(broker_url, stream, prefetch)
        started.append(follower)
        return follower

    try:
        yield attach
    finally:
        for follower in started:
            follower.leave()


# -- object storage ------------------------------------------------------------

MOTO_ENV = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
            "AWS_DEFAULT_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true"}


@dataclass
class MotoServer:
    """A moto S3 server on loopback, for subprocesses (agents, archivers, the CLI)."""

    endpoint: str

    @property
    def env(self) -> dict[str, str]:
        return {**MOTO_ENV, "STREAMBOSS_S3_ENDPOINT_URL": self.endpoint}

    def client(self) -> Any:
        import boto3

        return boto3.client("s3", endpoint_url=self.endpoint, region_name="us-east-1",
                            aws_access_key_id="testing", aws_secret_access_key="testing")

    def bucket(self, prefix: str = "bucket") -> str:
        """A new, empty bucket."""
        name = f"{prefix}-{uuid.uuid4().hex[:12]}"
        self.client().create_bucket(Bucket=name)
        return name


@pytest.fixture(scope="session")
def moto_server() -> Iterator[MotoServer]:
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    try:
        yield MotoServer(f"http://127.0.0.1:{port}")
    finally:
        server.stop()
