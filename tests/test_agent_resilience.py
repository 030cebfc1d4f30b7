"""At-least-once under kill -9, a dropped broker connection, and SIGTERM mid-stream."""

from __future__ import annotations

import collections
import re
import subprocess
import time
from pathlib import Path

import pytest

from .conftest import broker_ports

# A service that takes a little time per record, so a stream of a few thousand
# is still flowing when the test interferes with it.
SLOW_UPPER = """
    import sys, time
    for line in sys.stdin:
        time.sleep({delay})
        sys.stdout.write(line.upper())
"""


def assert_all_arrived(ids: list[str], outputs: list, bodies: list[bytes]) -> None:
    expected = {ident: body.upper() for ident, body in zip(ids, bodies, strict=True)}
    got: dict[str, bytes] = {}
    for message in outputs:
        assert message.parent in expected, f"output for an unknown input {message.parent!r}"
        assert message.body == expected[message.parent]
        got[message.parent] = message.body
    missing = set(expected) - set(got)
    assert not missing, f"{len(missing)} input(s) never produced output, e.g. {sorted(missing)[:5]}"


def collect_parents(capture, ids: list[str], outputs: list, timeout: float = 120.0) -> list:
    """Add outputs to ``outputs`` until every input id has been seen as an sb-parent."""
    wanted = set(ids) - {m.parent for m in outputs}
    deadline = time.monotonic() + timeout
    while wanted and time.monotonic() < deadline:
        batch = capture.collect_until_quiet(quiet=5.0, limit=len(wanted),
                                            timeout=max(1.0, deadline - time.monotonic()))
        outputs += batch
        wanted -= {m.parent for m in batch}
        if not batch:
            break
    return outputs


@pytest.mark.slow
def test_kill_9_twice_loses_nothing(broker, streams, names, agent, script) -> None:
    source, sink = streams("in", "out")
    operation = names("kill9")
    command = script("slow", SLOW_UPPER.format(delay=0.001))
    options = ("--mode", "service", "--exec", command, "--prefetch", "100")
    out = broker.capture(sink)
    # the whole backlog is queued before the first agent starts, so it is mid-stream
    # whenever it is killed
    broker.declare_operation_queue(operation, source)
    total = 5000
    bodies = [f"message {i} of the stream".encode() for i in range(total)]
    ids = broker.publish(source, bodies)
    first = agent(operation, source, sink, *options)

    outputs = out.collect(1000)
    first.kill9()
    # the broker took back the killed agent's unacked window: the stream was mid-flight
    assert broker.queue_depth(f"sb.op.{operation}") > 0

    second = agent(operation, source, sink, *options)
    outputs += out.collect(1000)
    second.kill9()
    assert broker.queue_depth(f"sb.op.{operation}") > 0

    agent(operation, source, sink, *options)
    collect_parents(out, ids, outputs)
    assert_all_arrived(ids, outputs, bodies)
    duplicates = sum(n - 1 for n in collections.Counter(m.parent for m in outputs).values())
    # at-least-once: a kill between publish and ack may repeat part of one window per kill
    assert duplicates <= 2 * 100, f"{duplicates} duplicates for two kills of a 100-window"


def rabbitmqctl(*args: str) -> str:
    return subprocess.run(["rabbitmqctl", "-q", *args], capture_output=True, text=True,
                          timeout=120, check=True).stdout


def agent_connections(pid: int) -> list[str]:
    """The broker's connection pids (what close_connection takes) for process ``pid``."""
    ports = broker_ports(pid)
    assert ports, f"agent {pid} has no connection to the broker"
    found = []
    for line in rabbitmqctl("list_connections", "pid", "peer_port",
                            "client_properties").splitlines():
        fields = line.split("\t")
        if len(fields) >= 3 and fields[1].isdigit() and int(fields[1]) in ports:
            assert "streamboss-agent" in fields[2]
            found.append(fields[0])
    return found


# Records marked "gated" wait for a file to appear, so a window of them is
# certainly in flight (delivered, unacked) when the test cuts the connection.
GATED_SERVICE = """
    import os, sys, time
    for line in sys.stdin:
        while "gated" in line and not os.path.exists({gate!r}):
            time.sleep(0.01)
        sys.stdout.write(line.upper())
"""
GATED_PER_MESSAGE = (
    'body=$(cat); case "$body" in *gated*) while [ ! -e {gate} ]; do sleep 0.01; done;; esac; '
    'printf %s "$body" | tr a-z A-Z'
)


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["service", "per-message"])
def test_broker_closing_the_connection_is_survived(broker, streams, names, agent, script,
                                                   tmp_path: Path, mode: str) -> None:
    source, sink = streams("in", "out")
    operation = names("reconnect")
    gate = tmp_path / "gate"
    if mode == "service":
        command = ["--exec", script("gated", GATED_SERVICE.format(gate=str(gate)))]
    else:
        command = ["--shell", "--exec", GATED_PER_MESSAGE.format(gate=gate)]
    process = agent(operation, source, sink, "--mode", mode, "--prefetch", "20",
                    "--concurrency", "2", *command)
    out = broker.capture(sink)
    bodies = [f"line {i}".encode() for i in range(100)] + \
        [f"line {i} gated".encode() for i in range(100, 400)]
    ids = broker.publish(source, bodies)
    outputs = out.collect(100)
    [connection] = agent_connections(process.pid)
    rabbitmqctl("close_connection", connection, "test closes the agent's connection")
    process.wait_log("reconnected")
    # the gated records the agent held were handed back, not acked: those it held came
    # back counted as delivered once, so the new connection moved them to run alone
    # (one at a time: the solo window is 1); the new window holds at most 20 + 1
    held = broker.queue_depth(f"sb.op.{operation}") + broker.queue_depth(f"sb.solo.{operation}")
    assert held >= 300 - 20 - 1
    gate.touch()
    collect_parents(out, ids, outputs)
    assert_all_arrived(ids, outputs, bodies)
    assert process.proc.poll() is None
    # consuming again on a new connection, and it still drains cleanly
    assert agent_connections(process.pid) not in ([], [connection])
    assert process.terminate() == 0
    assert broker.queue_depth(f"sb.op.{operation}") == 0
    # the answers the old connection could not publish were dropped, not sent twice
    duplicates = sum(n - 1 for n in collections.Counter(m.parent for m in outputs).values())
    assert duplicates == 0


# SLOW_UPPER that also notes every record it is given, to tell what reached the program.
SEEING_UPPER = """
    import sys, time
    seen = open({seen!r}, "a")
    for line in sys.stdin:
        seen.write(line.rstrip("\\n") + "\\n")
        seen.flush()
        time.sleep({delay})
        sys.stdout.write(line.upper())
"""


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["service", "per-message"])
def test_sigterm_drains_the_window_and_requeues_nothing(broker, streams, names, agent, script,
                                                        tmp_path: Path, mode: str) -> None:
    source, sink = streams("in", "out")
    operation = names("drain")
    seen_file = tmp_path / "seen.txt"
    command = script("slow", SEEING_UPPER.format(seen=str(seen_file), delay=0.005))
    out = broker.capture(sink)
    broker.declare_operation_queue(operation, source)
    total = 2000 if mode == "service" else 600
    bodies = [f"busy {i}".encode() for i in range(total)]
    ids = broker.publish(source, bodies)
    process = agent(operation, source, sink, "--mode", mode, "--exec", command,
                    "--prefetch", "40", "--concurrency", "2")
    outputs = out.collect(100)

    assert process.terminate() == 0
    log = process.log()
    in_flight = re.search(r"SIGTERM received; draining (\d+) in-flight", log)
    assert in_flight and int(in_flight[1]) > 0, log
    assert "drained; exiting" in log
    assert "returning" not in log  # the drain finished within its timeout

    outputs += out.collect_until_quiet(quiet=1.0)
    parents = collections.Counter(m.parent for m in outputs)
    assert not [p for p, n in parents.items() if n > 1], "duplicate outputs after a drain"
    assert all(m.body == bodies[ids.index(m.parent)].upper() for m in outputs)
    # everything the program was given was answered and published: no work thrown away
    assert sorted(seen_file.read_text().splitlines()) == sorted(m.body.lower().decode()
                                                                 for m in outputs)
    queue = f"sb.op.{operation}"
    depth = broker.queue_depth(queue)
    assert depth > 0, "the stream was not busy when SIGTERM arrived"
    assert len(outputs) + depth == total

    # what is left in the queue is exactly what produced no output
    rest = broker.queue(queue).collect(depth)
    left = {m.header("sb-id") for m in rest}
    assert len(left) == depth
    # nothing the agent was handed went back to the queue (not even deliveries
    # that crossed its Basic.Cancel on the wire)
    assert not [m for m in rest if m.redelivered], "SIGTERM requeued messages"
    assert left | set(parents) == set(ids)
    assert not left & set(parents)


@pytest.mark.slow
def test_sigterm_on_a_fast_busy_stream_requeues_nothing(broker, streams, names, agent) -> None:
    """Deliveries that cross the agent's Basic.Cancel on the wire are handled, not requeued.

    With a fast program and a small window the broker is sending new messages at
    the very moment the agent cancels, which is when a client library that rejects
    late deliveries would hand them back.
    """
    source, sink = streams("in", "out")
    operation = names("fastdrain")
    out = broker.capture(sink)
    broker.declare_operation_queue(operation, source)
    total = 20_000
    broker.publish(source, [f"m{i}".encode() for i in range(total)])
    process = agent(operation, source, sink, "--mode", "service", "--exec", "cat",
                    "--prefetch", "20")
    out.collect(200)
    assert process.terminate() == 0
    outputs = out.collect_until_quiet(quiet=1.0)
    queue = f"sb.op.{operation}"
    depth = broker.queue_depth(queue)
    assert depth > 0, "the stream was not busy when SIGTERM arrived"
    assert 200 + len(outputs) + depth == total
    rest = broker.queue(queue).collect(depth)
    assert not [m for m in rest if m.redelivered], "SIGTERM requeued messages"
