"""Fixtures for the stream-agent tests: the real RabbitMQ, unique names, agent processes.

Nothing here mocks the broker. Every test gets names of its own, creates the
streams it needs, binds its capture queues *before* it publishes, and leaves no
exchange, operation queue or agent process behind.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pika
import pika.exceptions
import pytest

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

    # topology

    def create_stream(self, name: str) -> str:
        exchange = stream_exchange(name)
        self.channel.exchange_declare(exchange, exchange_type="topic", durable=True)
        self._exchanges.add(exchange)
        return name

    def forget_operation(self, operation: str) -> None:
        """Delete what an agent of ``operation`` declares, at teardown."""
        self._queues.add(op_queue(operation))
        self._exchanges.add(stream_exchange(f"{operation}.dead"))

    def declare_operation_queue(self, operation: str, source: str) -> None:
        """Create ``sb.op.<operation>`` the way the agent does (and the manager will), so a
        backlog can be published before any agent runs."""
        self.forget_operation(operation)
        self.channel.queue_declare(op_queue(operation), durable=True)
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
        try:
            frame = channel.queue_declare(queue, passive=True)
        except pika.exceptions.ChannelClosedByBroker as exc:
            if exc.reply_code == 404:
                return None
            raise
        channel.close()
        return frame.method.message_count

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
            for queue in sorted(self._queues):
                channel.queue_delete(queue)
            for exchange in sorted(self._exchanges):
                channel.exchange_delete(exchange)
        with contextlib.suppress(Exception):
            self.connection.close()


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
    inodes: set[str] = set()
    with contextlib.suppress(OSError):
        for fd in os.listdir(f"/proc/{pid}/fd"):
            with contextlib.suppress(OSError):
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
                if target.startswith("socket:["):
                    inodes.add(target[8:-1])
    ports: set[int] = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(OSError), open(table) as handle:
            next(handle)
            for line in handle:
                fields = line.split()
                local, remote, state, inode = fields[1], fields[2], fields[3], fields[9]
                if inode in inodes and state == "01" and int(remote.rsplit(":", 1)[1], 16) \
                        == BROKER_PORT:
                    ports.add(int(local.rsplit(":", 1)[1], 16))
    return ports


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
    leaves the operation and stream names to a ``--config`` file. Every agent is
    killed (with its children) at teardown, and the operation's queue and
    dead-letter stream are deleted.
    """
    started: list[AgentProcess] = []

    def start(operation: str, source: str, sink: str, *options: str, ready: bool = True,
              env: dict[str, str] | None = None, name_flags: bool = True) -> AgentProcess:
        broker.forget_operation(operation)
        name_args = ["--operation", operation, "--input", source, "--output", sink]
        argv = [PYTHON, "-m", "streamboss.agent", *(name_args if name_flags else []), *options]
        process_env = {**os.environ, "STREAMBOSS_BROKER_URL": broker_url, **(env or {})}
        log_path = tmp_path / f"agent-{operation}-{len(started)}.log"
        process = AgentProcess(argv, process_env, log_path, tmp_path)
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
