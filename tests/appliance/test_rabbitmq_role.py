"""The broker the rabbitmq role made, in use: the session's private node restarted from the
files the role wrote (never the shared broker), reached the way the stream roles reach
it (amqps://, the role's CA, each role's own generated password).

The real manager, stream agent and archiver do their whole jobs with their own users
(topology, management API, transforms, retries, dead letters, archive segments); each
user is refused outside its names (probes); nothing listens without TLS or off loopback.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pika
import pika.exceptions
import pytest

from streamboss.agent import naming
from streamboss.agent.broker import CONNECT_ERRORS, explain_close
from streamboss.agent.tls import BROKER_CA_ENV, connection_parameters, management_verify
from streamboss.manager.broker import Broker as ManagerBroker
from streamboss.manager.streams_io import publish
from tests.conftest import wait_until
from tests.requirements import require

from .conftest import RoleBroker

pytestmark = pytest.mark.appliance

MANAGER, AGENT, ARCHIVER = "streamboss-manager", "streamboss-agent", "streamboss-archiver"
READY = 30.0


@pytest.fixture
def with_ca(role_broker: RoleBroker, monkeypatch: pytest.MonkeyPatch) -> RoleBroker:
    monkeypatch.setenv(BROKER_CA_ENV, str(role_broker.ca))
    return role_broker


@pytest.fixture
def topology(with_ca: RoleBroker) -> Iterator[dict[str, str]]:
    """Streams in/out, an operation between them and an archive of the input, declared by
    the manager's user; all deleted afterwards."""
    run = uuid.uuid4().hex[:8]
    names = {"input": f"t-in-{run}", "output": f"t-out-{run}", "operation": f"t-op-{run}"}
    manager = ManagerBroker(with_ca.url(MANAGER), with_ca.management_url)
    try:
        manager.ensure_stream(names["input"])
        manager.ensure_stream(names["output"])
        manager.ensure_operation(names["operation"], names["input"])
        manager.ensure_archive(names["input"])
        yield names
    finally:
        manager.delete_operation(names["operation"], naming.dead_queue(names["operation"]))
        manager.channel().queue_delete(naming.archive_queue(names["input"]))
        for stream in (names["input"], names["output"]):
            manager.delete_stream(stream)
        manager.close()


def connect(url: str) -> pika.BlockingConnection:
    parameters = connection_parameters(url)
    parameters.connection_attempts = 1
    parameters.socket_timeout = 5
    return pika.BlockingConnection(parameters)


def attempt(url: str, action: Callable[[Any], Any]) -> int | None:
    """Run ``action(channel)`` as the URL's user; the broker's refusal code, or None."""
    connection = connect(url)
    try:
        channel = connection.channel()
        action(channel)
        return None
    except pika.exceptions.ChannelClosedByBroker as exc:
        return exc.reply_code
    finally:
        if connection.is_open:
            connection.close()


# -- listeners and certificates ------------------------------------------------------------


def listening_sockets() -> list[tuple[str, int, int]]:
    """Every listening TCP socket on the machine: (address, port, pid), from ss."""
    result = subprocess.run(["ss", "-H", "-ltnp"], capture_output=True, text=True, timeout=30,
                            check=True)
    found = []
    for line in result.stdout.splitlines():
        fields = line.split()
        address, _, port = fields[3].rpartition(":")
        for pid in re.findall(r"pid=(\d+)", line):
            found.append((address, int(port), int(pid)))
    return found


def test_the_broker_listens_with_tls_only_and_on_loopback(role_broker):
    """What the node's process really listens on (ss): AMQPS, the management API's HTTPS
    and Erlang distribution, all on 127.0.0.1 (the test's rabbitmq_listen_address; the
    distribution's always), and nothing else: no plain AMQP, no plain HTTP."""
    require(shutil.which("ss") is not None, "needs ss (iproute2)")
    sockets = listening_sockets()
    (pid,) = {pid for _, port, pid in sockets if port == role_broker.amqps_port}
    ours = {(address, port) for address, port, owner in sockets if owner == pid}
    assert ours == {("127.0.0.1", role_broker.amqps_port),
                    ("127.0.0.1", role_broker.management_port),
                    ("127.0.0.1", role_broker.node.dist_port)}, ours


def test_a_client_verifies_the_certificate_the_role_made(role_broker, monkeypatch):
    url = role_broker.url(MANAGER)
    with pytest.raises(CONNECT_ERRORS) as caught:  # no CA: the system's CAs do not know it
        connect(url)
    assert "does not verify" in explain_close(caught.value, url, opening=True)
    monkeypatch.setenv(BROKER_CA_ENV, str(role_broker.ca))
    with pytest.raises(CONNECT_ERRORS):  # the certificate names localhost, not 127.0.0.1
        connect(role_broker.url(MANAGER, host="127.0.0.1"))
    connect(url).close()
    # Plain AMQP to the TLS port gets no AMQP answer.
    plain = url.replace("amqps://", "amqp://")
    monkeypatch.delenv(BROKER_CA_ENV)
    with pytest.raises(CONNECT_ERRORS):
        connect(plain)


def test_guest_and_wrong_passwords_are_refused(with_ca):
    for url in (f"amqps://guest:guest@localhost:{with_ca.amqps_port}/%2F",
                f"amqps://guest:guest@localhost:{with_ca.amqps_port}/streamboss",
                with_ca.url(AGENT).replace(with_ca.password(AGENT), "wrong")):
        with pytest.raises(pika.exceptions.ProbableAuthenticationError):
            connect(url)


# -- each role does its job with its own user ------------------------------------------------


def test_the_manager_user_reads_demand_from_the_management_api_over_https(with_ca, topology):
    manager = ManagerBroker(with_ca.url(MANAGER), with_ca.management_url)
    try:
        assert manager.management_available()
        queues = {s.queue for s in manager.subscribers(topology["input"])}
        assert queues == {naming.operation_queue(topology["operation"]),
                          naming.archive_queue(topology["input"])}
        listing = manager.queue_listing()
        assert listing is not None and naming.solo_queue(topology["operation"]) in listing
        assert manager.server_version() is not None
    finally:
        manager.close()
    # The management tag sees its own vhost only: the default vhost is not its own.
    verify = management_verify()
    auth = (MANAGER, with_ca.password(MANAGER))
    assert httpx.get(f"{with_ca.management_url}/api/queues/%2F", auth=auth,
                     verify=verify).status_code in (401, 403)
    assert httpx.get(f"{with_ca.management_url}/api/users", auth=auth,
                     verify=verify).status_code in (401, 403), "not an administrator"
    for user in (AGENT, ARCHIVER):
        response = httpx.get(f"{with_ca.management_url}/api/overview",
                             auth=(user, with_ca.password(user)), verify=verify)
        assert response.status_code == 401, user
    # And the API is not served without TLS.
    with pytest.raises(httpx.HTTPError):
        httpx.get(f"http://localhost:{with_ca.management_port}/api/overview", auth=auth)


FAIL_ON_FAIL = ("import sys; body = sys.stdin.read(); "
                "sys.exit(1) if body == 'fail' else sys.stdout.write(body.upper())")


def test_an_agent_and_an_archiver_do_their_jobs_with_only_their_own_users(
        with_ca, topology, tmp_path):
    """The agent declares its queues (and a retry queue), consumes, publishes outputs,
    retries and dead-letters; the archiver drains the archive subscription into
    segments: each with its own user's URL and the role's CA, nothing else."""
    definition = tmp_path / "definition.json"
    definition.write_text(json.dumps({"exec": [sys.executable, "-c", FAIL_ON_FAIL],
                                      "max_attempts": 2, "retry_delay": 0.2}))
    store = tmp_path / "archive"
    base_env = {**os.environ, BROKER_CA_ENV: str(with_ca.ca)}
    base_env.pop("STREAMBOSS_BROKER_URL", None)
    agent_log, archiver_log = tmp_path / "agent.log", tmp_path / "archiver.log"
    operation, source, sink = topology["operation"], topology["input"], topology["output"]
    with agent_log.open("ab") as log:
        agent = subprocess.Popen(
            [sys.executable, "-m", "streamboss.agent", "--operation", operation,
             "--input", source, "--output", sink, "--definition", str(definition)],
            env={**base_env, "STREAMBOSS_BROKER_URL": with_ca.url(AGENT)},
            stdout=log, stderr=log, stdin=subprocess.DEVNULL)
    with archiver_log.open("ab") as log:
        archiver = subprocess.Popen(
            [sys.executable, "-m", "streamboss.manager.archiver", "--stream", source,
             "--store", f"file://{store}", "--segment-seconds", "0.3"],
            env={**base_env, "STREAMBOSS_BROKER_URL": with_ca.url(ARCHIVER)},
            stdout=log, stderr=log, stdin=subprocess.DEVNULL)
    manager = ManagerBroker(with_ca.url(MANAGER), with_ca.management_url)
    connection = connect(with_ca.url(MANAGER))
    try:
        wait_until(lambda: (manager.queue_state(naming.operation_queue(operation))
                            or ManagerQueue()).consumers >= 1, READY,
                   f"the agent consuming\n{agent_log.read_text()}")
        channel = connection.channel()
        # The output stream, followed the way `streamboss consume` does (amq.gen-*).
        capture = channel.queue_declare("", exclusive=True).method.queue
        channel.queue_bind(capture, naming.stream_exchange(sink), "#")
        assert publish(with_ca.url(MANAGER), source, [b"hello", b"fail", b"tls"]) == 3
        bodies = []
        deadline = time.monotonic() + READY
        while len(bodies) < 2 and time.monotonic() < deadline:
            method, _props, body = channel.basic_get(capture, auto_ack=True)
            if method is None:
                time.sleep(0.1)
                continue
            bodies.append(body)
        assert sorted(bodies) == [b"HELLO", b"TLS"], agent_log.read_text()
        dead = naming.dead_queue(operation)
        wait_until(lambda: (manager.queue_state(dead) or ManagerQueue()).messages == 1, READY,
                   f"the dead letter\n{agent_log.read_text()}")
        method, properties, body = channel.basic_get(dead, auto_ack=True)
        assert body == b"fail" and properties.headers["sb-dead-attempts"] == 2
        assert manager.retry_queues(operation), "the agent declared its retry queue"
        wait_until(lambda: any((store / source / "segments").glob("*.sbseg.gz")), READY,
                   f"an archive segment\n{archiver_log.read_text()}")
    finally:
        if connection.is_open:
            connection.close()
        manager.close()
        codes = []
        for process in (agent, archiver):
            process.send_signal(signal.SIGTERM)
            codes.append(process.wait(60))
    assert codes == [0, 0], agent_log.read_text() + archiver_log.read_text()
    assert (store / source / "index.jsonl").exists()
    for log_file in (agent_log, archiver_log):
        text = log_file.read_text()
        # A whole-word 403: message ids are hex and may hold the digits.
        assert "ACCESS_REFUSED" not in text and not re.search(r"\b403\b", text), text
        assert with_ca.password(AGENT) not in text and with_ca.password(ARCHIVER) not in text


class ManagerQueue:
    """An absent queue's state: nothing in it, nobody on it."""

    messages = 0
    consumers = 0


# -- probes: each user outside its names ---------------------------------------------------


def test_probes_each_user_is_refused_outside_its_names(with_ca, topology):
    source, operation = topology["input"], topology["operation"]
    other = "t-other-op"
    agent, archiver, manager = with_ca.url(AGENT), with_ca.url(ARCHIVER), with_ca.url(MANAGER)
    refused = {
        "agent declares an unrelated queue": attempt(
            agent, lambda ch: ch.queue_declare("evil.queue", durable=True)),
        "agent declares a server-named queue": attempt(
            agent, lambda ch: ch.queue_declare("", exclusive=True)),
        "agent declares a stream": attempt(
            agent, lambda ch: ch.exchange_declare("sb.stream.t-new", "topic", durable=True)),
        "agent deletes the input stream": attempt(
            agent, lambda ch: ch.exchange_delete(naming.stream_exchange(source))),
        "agent declares an archive subscription": attempt(
            agent, lambda ch: ch.queue_declare(naming.archive_queue(source), durable=True)),
        "agent reads the archive subscription": attempt(
            agent, lambda ch: ch.basic_get(naming.archive_queue(source))),
        "agent reads dead letters": attempt(
            agent, lambda ch: ch.basic_get(naming.dead_queue(operation))),
        "archiver reads an operation's queue": attempt(
            archiver, lambda ch: ch.basic_get(naming.operation_queue(operation))),
        "archiver declares its own subscription": attempt(
            archiver, lambda ch: ch.queue_declare(naming.archive_queue(source), durable=True)),
        "archiver publishes to a stream": attempt(
            archiver, lambda ch: (ch.confirm_delivery(),
                                  ch.basic_publish(naming.stream_exchange(source), "", b"x"))),
        "archiver publishes into a queue by name": attempt(
            archiver, lambda ch: (ch.confirm_delivery(),
                                  ch.basic_publish("", naming.operation_queue(operation), b"x"))),
        "manager declares an unrelated queue": attempt(
            manager, lambda ch: ch.queue_declare("evil.queue", durable=True)),
        "manager declares an unrelated exchange": attempt(
            manager, lambda ch: ch.exchange_declare("evil", "fanout")),
        "manager publishes to amq.topic": attempt(
            manager, lambda ch: (ch.confirm_delivery(), ch.basic_publish("amq.topic", "", b"x"))),
    }
    allowed = [what for what, code in refused.items() if code is None]
    assert allowed == [], f"allowed: {allowed}"
    assert {code for code in refused.values() if code is not None} == {403}
    # What each may do still works (the probes did not just break the connection).
    assert attempt(agent, lambda ch: ch.queue_declare(naming.solo_queue(other), durable=True,
                                                      arguments=naming.operation_queue_arguments(
                                                          other))) is None
    assert attempt(manager, lambda ch: ch.queue_delete(naming.solo_queue(other))) is None
    assert attempt(archiver, lambda ch: ch.basic_get(naming.archive_queue(source))) is None
