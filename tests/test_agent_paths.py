"""Every failure path of the stream agent, one at a time, against the real broker.

Each test provokes one path (a failing program, a timeout, a broker nack of the
output, an object-store error, an exception inside the agent, an output nobody
receives, a dropped connection, a message that kills its agent) and asserts what
a user sees: where the message ended up, the headers that say why, how many times
the program ran, and that the other messages kept arriving.
"""

from __future__ import annotations

import collections
import hashlib
import json
import threading
import time
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx
import pytest

from streamboss.agent.headers import derived_id

from .conftest import AgentProcess, Message, broker_ports, wait_until

MANAGEMENT = "http://127.0.0.1:15672/api"
AUTH = ("guest", "guest")
# Small retry delays keep each test short; the backoff itself is still exercised.
QUICK_RETRY = 0.1


def dead_stream(operation: str) -> str:
    return f"{operation}.dead"


def definition(tmp_path: Path, **fields: Any) -> str:
    """A --definition file holding ``fields`` (the CLI has no flag for some of them)."""
    path = tmp_path / f"definition-{len(list(tmp_path.glob('definition-*')))}.json"
    path.write_text(json.dumps({"definition": fields}))
    return str(path)


def management(path: str) -> Any:
    response = httpx.get(f"{MANAGEMENT}{path}", auth=AUTH, timeout=5)
    response.raise_for_status()
    return response.json()


def close_connections_of(pid: int) -> list[str]:
    """Close every broker connection of process ``pid`` through the management API;
    return their names."""
    def connections() -> list[dict[str, Any]]:
        ports = broker_ports(pid)
        return [c for c in management("/connections") if c.get("peer_port") in ports]

    found = wait_until(connections, 15, f"the broker to list the connection of {pid}")
    for connection in found:
        assert connection["client_properties"]["connection_name"] == "streamboss-agent"
        httpx.delete(f"{MANAGEMENT}/connections/{quote(connection['name'], safe='')}",
                     auth=AUTH, headers={"X-Reason": "test closes the agent's connection"},
                     timeout=5).raise_for_status()
    return [c["name"] for c in found]


def parents(messages: list[Message]) -> collections.Counter[str]:
    return collections.Counter(m.parent for m in messages)


# -- retries ------------------------------------------------------------------

# Fails on the first two attempts at a body starting with "marked" (counted in a file
# per body, which survives the child), then answers; other bodies are answered at once.
MARKED_FAILS_TWICE = """
    import pathlib, sys
    data = sys.stdin.buffer.read()
    if data.startswith(b"marked"):
        counter = pathlib.Path({attempts!r}) / data.decode()
        attempt = int(counter.read_text()) + 1 if counter.exists() else 1
        counter.write_text(str(attempt))
        if attempt < 3:
            sys.exit(f"attempt {{attempt}} fails on purpose")
    sys.stdout.buffer.write(data.upper())
"""


def test_a_retry_waits_on_the_broker_not_in_front_of_other_messages(
        broker, streams, names, agent, script, tmp_path: Path) -> None:
    source, sink = streams("in", "out")
    operation = names("backoff")
    attempts = tmp_path / "attempts"
    attempts.mkdir()
    command = script("marked", MARKED_FAILS_TWICE.format(attempts=str(attempts)))
    out = broker.capture(sink)
    # The whole backlog is queued before the agent starts, so the healthy messages are
    # certainly behind the marked one; one child at a time, so a retry that slept in
    # the agent (or went back to the head of the queue) would come out first.
    broker.declare_operation_queue(operation, source)
    dead = broker.capture(dead_stream(operation))
    healthy = [f"healthy {i}".encode() for i in range(20)]
    ids = broker.publish(source, [b"marked message", *healthy])
    process = agent(operation, source, sink, "--exec", command, "--max-attempts", "3",
                    "--concurrency", "1", "--definition",
                    definition(tmp_path, retry_delay=0.3))
    got = out.collect(21)
    assert [m.parent for m in got[:20]] == ids[1:], "the healthy messages came first"
    assert (got[20].parent, got[20].body) == (ids[0], b"MARKED MESSAGE")
    assert (attempts / "marked message").read_text() == "3"
    assert out.collect_until_quiet(quiet=1.0) == []
    log = process.log()
    assert log.count("attempt 1 of 3 failed") == 1
    assert log.count("attempt 2 of 3 failed") == 1
    # the retries waited in delayed queues on the broker, one per backoff step
    assert broker.queue_depth(f"sb.retry.{operation}.300") == 0
    assert broker.queue_depth(f"sb.retry.{operation}.600") == 0
    assert dead.collect_until_quiet(quiet=0.2) == []
    assert broker.queue_depth(f"sb.dead.{operation}") == 0


@pytest.mark.parametrize("path", ["program failure", "timeout"])
def test_a_failing_attempt_is_dead_lettered_after_max_attempts(
        broker, streams, names, agent, tmp_path: Path, path: str) -> None:
    source, sink = streams("in", "out")
    operation = names("fails")
    runs = tmp_path / "runs"
    # "ok" bodies are answered; others fail by the path under test
    if path == "program failure":
        failing = "echo 'no can do' >&2; exit 5"
    else:
        failing = "echo 'about to hang' >&2; sleep 30"
    command = (f'body=$(cat); case "$body" in ok*) printf %s "$body";; '
               f'*) echo run >> {runs}; {failing};; esac')
    agent(operation, source, sink, "--shell", "--exec", command, "--max-attempts", "3",
          "--timeout", "0.5", "--definition", definition(tmp_path, retry_delay=QUICK_RETRY))
    out = broker.capture(sink)
    dead = broker.capture(dead_stream(operation))
    ids = broker.publish(source, [b"ok before", b"doomed", b"ok after"])
    [letter] = dead.collect(1)
    assert letter.parent == ids[1]
    assert letter.body == b"doomed"
    assert letter.header("sb-dead-path") == path
    assert letter.header("sb-dead-reason").startswith(f"{path}: ")
    assert letter.header("sb-dead-attempts") == 3
    assert letter.header("sb-dead-operation") == operation
    if path == "program failure":
        assert letter.header("sb-dead-exit-code") == 5
        assert "exited with code 5" in letter.header("sb-dead-reason")
        assert "no can do" in letter.header("sb-dead-stderr")
    else:
        assert "sb-dead-exit-code" not in letter.headers
        assert "timed out after 0.5s" in letter.header("sb-dead-reason")
        assert "about to hang" in letter.header("sb-dead-stderr")
    assert runs.read_text().splitlines() == ["run"] * 3
    assert sorted((m.parent, m.body) for m in out.collect(2)) == sorted(
        [(ids[0], b"ok before"), (ids[2], b"ok after")])
    assert out.collect_until_quiet(quiet=0.5) == []
    assert dead.collect_until_quiet(quiet=0.2) == []


# -- the broker refuses the output -------------------------------------------


def test_outputs_the_broker_nacks_are_dead_lettered(broker, streams, names, agent,
                                                    tmp_path: Path) -> None:
    source, sink = streams("in", "out")
    operation = names("nacked")
    agent(operation, source, sink, "--shell", "--exec", "tr a-z A-Z", "--concurrency", "1",
          "--max-attempts", "2", "--definition", definition(tmp_path, retry_delay=QUICK_RETRY))
    # The only queue on the output stream takes three messages, then the broker nacks
    # every publish to it (nothing else is bound, so a publish is not acked elsewhere).
    full = broker.channel.queue_declare("", exclusive=True, arguments={
        "x-max-length": 3, "x-overflow": "reject-publish"}).method.queue
    broker.channel.queue_bind(full, f"sb.stream.{sink}", routing_key="#")
    dead = broker.capture(dead_stream(operation))
    bodies = [f"message {i}".encode() for i in range(6)]
    ids = broker.publish(source, bodies)
    letters = dead.collect(3)
    assert sorted(m.parent for m in letters) == ids[3:]
    for letter in letters:
        assert letter.header("sb-dead-path") == "broker nack of the output"
        assert letter.header("sb-dead-reason").startswith("broker nack of the output: ")
        assert letter.header("sb-dead-attempts") == 2
        assert letter.body == bodies[ids.index(letter.parent)]
    assert dead.collect_until_quiet(quiet=0.5) == []
    landed = broker.queue(full).collect(3)
    assert [(m.parent, m.body) for m in landed] == [
        (ident, body.upper()) for ident, body in zip(ids[:3], bodies[:3], strict=True)]
    assert broker.queue_depth(f"sb.op.{operation}") == 0


# -- the object store fails --------------------------------------------------

HUNDRED_BYTES = "import sys; sys.stdin.buffer.read(); sys.stdout.buffer.write(b'x' * 100)"


def test_an_object_store_that_cannot_be_written_dead_letters_the_input(
        broker, streams, names, agent, script, tmp_path: Path) -> None:
    source, sink = streams("in", "out")
    operation = names("nostore")
    runs = tmp_path / "runs"
    command = script("hundred", f"""
        import sys
        sys.stdin.buffer.read()
        with open({str(runs)!r}, "a") as runs:
            runs.write("run\\n")
        sys.stdout.buffer.write(b"x" * 100)
    """)
    # a directory under a regular file can never be made
    blocker = tmp_path / "afile"
    blocker.write_text("a file, not a directory")
    agent(operation, source, sink, "--exec", command, "--output-threshold", "10",
          "--max-attempts", "2", "--definition", definition(tmp_path, retry_delay=QUICK_RETRY),
          env={"STREAMBOSS_OBJECT_STORE": f"file://{blocker}/sub"})
    out = broker.capture(sink)
    dead = broker.capture(dead_stream(operation))
    ids = broker.publish(source, [b"input"])
    [letter] = dead.collect(1)
    assert letter.parent == ids[0]
    assert letter.body == b"input"
    assert letter.header("sb-dead-path") == "object-store error"
    assert letter.header("sb-dead-reason").startswith(
        "object-store error: cannot store a 100-byte output")
    assert letter.header("sb-dead-attempts") == 2
    assert runs.read_text().splitlines() == ["run", "run"]
    assert out.collect_until_quiet(quiet=0.5) == []


@pytest.mark.parametrize("mode", ["per-message", "service"])
def test_a_large_output_goes_to_the_object_store_in_both_modes(
        broker, streams, names, agent, script, tmp_path: Path, mode: str) -> None:
    source, sink = streams("in", "out")
    operation = names("store")
    objects_dir = tmp_path / "objects"
    if mode == "service":
        command = script("hundreds", """
            import sys
            for line in sys.stdin:
                print("x" * 100)
        """)
    else:
        command = script("hundred", HUNDRED_BYTES)
    agent(operation, source, sink, "--mode", mode, "--exec", command,
          "--output-threshold", "10", env={"STREAMBOSS_OBJECT_STORE": f"file://{objects_dir}"})
    out = broker.capture(sink)
    dead = broker.capture(dead_stream(operation))
    ids = broker.publish(source, [b"input"])
    [claim] = out.collect(1)
    assert claim.parent == ids[0]
    url = claim.header("sb-object-url")
    assert url.startswith(f"file://{objects_dir}/")
    assert claim.body == url.encode()
    stored = Path(url.removeprefix("file://")).read_bytes()
    assert stored == b"x" * 100
    assert claim.header("sb-object-size") == 100
    assert claim.header("sb-object-sha256") == hashlib.sha256(stored).hexdigest()
    assert claim.header("sb-object-content-type") == "application/octet-stream"
    assert dead.collect_until_quiet(quiet=0.5) == []


# -- the agent raises --------------------------------------------------------


def inject_spawn_fault(tmp_path: Path) -> dict[str, str]:
    """Environment for an agent whose every attempt to start a child raises
    RuntimeError: an exception of the agent's own, on the path a bug would take
    (sitecustomize runs before the agent imports its runners)."""
    site = tmp_path / "inject"
    site.mkdir(exist_ok=True)
    (site / "sitecustomize.py").write_text(
        "import streamboss.agent.process as process\n"
        "def spawn(*args, **kwargs):\n"
        "    raise RuntimeError('injected fault')\n"
        "process.spawn = spawn\n")
    return {"PYTHONPATH": str(site)}


def test_an_exception_inside_the_agent_is_dead_lettered_and_the_agent_lives(
        broker, streams, names, agent, tmp_path: Path) -> None:
    source, sink = streams("in", "out")
    operation = names("raises")
    process = agent(operation, source, sink, "--exec", "cat", "--max-attempts", "3",
                    "--definition", definition(tmp_path, retry_delay=QUICK_RETRY),
                    env=inject_spawn_fault(tmp_path))
    out = broker.capture(sink)
    dead = broker.capture(dead_stream(operation))
    ids = broker.publish(source, [b"innocent"])
    [letter] = dead.collect(1)
    assert letter.parent == ids[0]
    assert letter.body == b"innocent"
    assert letter.header("sb-dead-path") == "unexpected exception"
    assert "RuntimeError: injected fault" in letter.header("sb-dead-reason")
    assert letter.header("sb-dead-attempts") == 3
    assert out.collect_until_quiet(quiet=0.5) == []
    assert process.proc.poll() is None
    log = process.log()
    assert log.count("agent error while running a message") == 3
    assert log.count("Traceback (most recent call last)") == 3
    assert process.terminate() == 0
    assert broker.queue_depth(f"sb.op.{operation}") == 0


def test_a_service_child_that_cannot_start_does_not_hold_messages(
        broker, streams, names, agent, tmp_path: Path) -> None:
    source, sink = streams("in", "out")
    operation = names("svcraises")
    process = agent(operation, source, sink, "--mode", "service", "--exec", "cat",
                    "--max-attempts", "2", "--definition",
                    definition(tmp_path, retry_delay=QUICK_RETRY),
                    env=inject_spawn_fault(tmp_path))
    broker.capture(sink)
    dead = broker.capture(dead_stream(operation))
    ids = broker.publish(source, [b"innocent"])
    [letter] = dead.collect(1)
    assert letter.parent == ids[0]
    assert letter.header("sb-dead-path") == "unexpected exception"
    assert "RuntimeError: injected fault" in letter.header("sb-dead-reason")
    assert letter.header("sb-dead-attempts") == 2
    assert process.proc.poll() is None


def test_an_environment_exec_cannot_carry_is_refused_at_start(streams, names, agent,
                                                             tmp_path: Path) -> None:
    source, sink = streams("in", "out")
    process = agent(names("nulenv"), source, sink, "--exec", "cat", "--definition",
                    definition(tmp_path, env={"X": "a\u0000b"}), ready=False)
    assert process.proc.wait(timeout=30) == 2
    [line] = process.log().strip().splitlines()
    assert "'env' entry 'X' cannot be passed to a program" in line


# -- outputs nobody receives -------------------------------------------------


def test_outputs_nobody_receives_keep_their_inputs_uncharged(broker, streams, names, agent,
                                                            script) -> None:
    source, sink = streams("in", "out")
    operation = names("unheard")
    # max_attempts 1: an input charged an attempt for its returned output would be
    # dead-lettered the next time round
    process = agent(operation, source, sink, "--shell", "--exec", "tr a-z A-Z",
                    "--max-attempts", "1")
    dead = broker.capture(dead_stream(operation))
    bodies = [f"message {i}".encode() for i in range(10)]
    ids = broker.publish(source, bodies)
    # (twice: after its first pause the agent took the inputs again)
    process.wait_log("pausing", count=2)
    # Nothing acked away: every input is in the input queue, ready or held unacked by
    # the paused agent. Each output was returned and its input put back; an input
    # acked with its output would never come out below.
    assert broker.queue_depth(f"sb.dead.{operation}") == 0
    out = broker.capture(sink)
    got = out.collect(10, timeout=45)
    got += out.collect_until_quiet(quiet=1.0)
    # each output id once: a repeat would be a duplicate the broker happened to return
    unique = {m.header("sb-id"): m for m in got}
    assert sorted((m.parent, m.body) for m in unique.values()) == sorted(
        (ident, body.upper()) for ident, body in zip(ids, bodies, strict=True))
    assert dead.collect_until_quiet(quiet=0.2) == []
    assert broker.queue_depth(f"sb.dead.{operation}") == 0
    assert process.proc.poll() is None


# -- a dropped connection ----------------------------------------------------


def test_work_queued_under_a_lost_connection_is_not_run_twice(broker, streams, names, agent,
                                                              tmp_path: Path) -> None:
    source, sink = streams("in", "out")
    operation = names("dropped")
    runs = tmp_path / "runs"
    command = f'body=$(cat); echo "$body" >> {runs}; sleep 0.3; printf %s "$body"'
    process = agent(operation, source, sink, "--shell", "--exec", command,
                    "--concurrency", "2", "--prefetch", "40")
    out = broker.capture(sink)
    dead = broker.capture(dead_stream(operation))
    bodies = [f"message {i}".encode() for i in range(40)]
    ids = broker.publish(source, bodies)
    # the whole window is with the agent, two children at work, the rest queued in it
    wait_until(lambda: runs.exists() and len(runs.read_text().splitlines()) >= 4, 30,
               "four program runs")
    close_connections_of(process.pid)
    process.wait_log("reconnected")
    got = out.collect_until_quiet(quiet=3.0, timeout=60)
    counts = parents(got)
    assert set(counts) == set(ids), f"{len(set(ids) - set(counts))} output(s) missing"
    # only the children running when the connection went may run again
    ran = collections.Counter(runs.read_text().splitlines())
    assert set(ran) == {b.decode() for b in bodies}
    print(f"runs {sum(ran.values())}, duplicate outputs {sum(counts.values()) - len(counts)}")
    assert sum(ran.values()) <= 40 + 2, f"{sum(ran.values()) - 40} repeated runs: {ran}"
    # an answer computed for a delivery of the old connection was dropped, not published
    assert sum(counts.values()) - len(counts) <= sum(ran.values()) - 40
    assert dead.collect_until_quiet(quiet=0.2) == []
    assert process.proc.poll() is None


# -- deterministic ids -------------------------------------------------------


@pytest.mark.parametrize("mode", ["per-message", "service"])
def test_a_repeated_input_yields_the_same_output_id(broker, streams, names, agent, mode: str,
                                                    ) -> None:
    source, sink = streams("in", "out")
    operation = names("ids")
    options = ["--exec", "tr a-z A-Z"] if mode == "per-message" else \
        ["--shell", "--exec", "stdbuf -oL tr a-z A-Z"]
    agent(operation, source, sink, "--mode", mode, *options)
    out = broker.capture(sink)
    broker.publish(source, [b"same", b"same"], ids=["in-repeated", "in-repeated"])
    broker.publish(source, [b"same"], ids=["in-other"])
    got = out.collect(3)
    by_parent: dict[str, set[str]] = collections.defaultdict(set)
    for message in got:
        assert message.body == b"SAME"
        by_parent[message.parent].add(message.header("sb-id"))
        assert message.header("cloudEvents:id") == message.header("sb-id")
    [repeated], [other] = by_parent["in-repeated"], by_parent["in-other"]
    assert parents(got) == {"in-repeated": 2, "in-other": 1}
    assert repeated != other
    assert repeated not in ("in-repeated", "in-other")
    assert repeated == derived_id(operation, "in-repeated", 0)


def test_a_repeated_dead_letter_has_the_same_id(broker, streams, names, agent) -> None:
    source, sink = streams("in", "out")
    operation = names("deadids")
    agent(operation, source, sink, "--shell", "--exec", "exit 1", "--max-attempts", "1")
    dead = broker.capture(dead_stream(operation))
    broker.publish(source, [b"doomed", b"doomed"], ids=["in-doomed", "in-doomed"])
    letters = dead.collect(2)
    assert [m.parent for m in letters] == ["in-doomed", "in-doomed"]
    assert letters[0].header("sb-id") == letters[1].header("sb-id")
    assert letters[0].header("sb-id") == derived_id(operation, "in-doomed", "dead")
    assert letters[0].header("sb-id") != derived_id(operation, "in-doomed", 0)


# -- the dead-letter queue ---------------------------------------------------


def test_a_standalone_agent_keeps_its_dead_letters(broker, streams, names, agent) -> None:
    source, sink = streams("in", "out")
    operation = names("keeps")
    agent(operation, source, sink, "--shell", "--exec", "exit 9", "--max-attempts", "1")
    # declared by the agent itself: nobody else ever touched it
    assert broker.queue_depth(f"sb.dead.{operation}") == 0
    ids = broker.publish(source, [b"doomed"])
    wait_until(lambda: broker.queue_depth(f"sb.dead.{operation}") == 1, 30,
               "the dead letter to be kept")
    [letter] = broker.queue(f"sb.dead.{operation}").collect(1)
    assert letter.parent == ids[0]
    assert letter.header("sb-dead-path") == "program failure"
    assert letter.header("sb-dead-exit-code") == 9


# -- a message that kills its agent ------------------------------------------


class Supervisor:
    """Restarts an agent whenever it exits, as a dispatcher or systemd would."""

    def __init__(self, first: AgentProcess, start: Any, restarts: int) -> None:
        self._start = start
        self._restarts = restarts
        self.processes: list[AgentProcess] = [first]
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            current = self.processes[-1]
            if current.proc.poll() is not None:
                if len(self.processes) > self._restarts:
                    return
                self.processes.append(self._start())
            time.sleep(0.05)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    @property
    def restarts(self) -> int:
        return len(self.processes) - 1


def test_a_message_that_kills_its_agent_is_dead_lettered(broker, streams, names, agent,
                                                         tmp_path: Path) -> None:
    source, sink = streams("in", "out")
    operation = names("poison")
    runs = tmp_path / "runs"
    # the program's parent is the agent: a message that kills it, as the OOM killer
    # would on a huge input
    command = (f'body=$(cat); case "$body" in *POISON*) echo run >> {runs}; kill -9 $PPID;; '
               f'*) printf %s "$body" | tr a-z A-Z;; esac')
    options = ("--shell", "--exec", command, "--max-attempts", "3", "--concurrency", "2")
    first = agent(operation, source, sink, *options)
    out = broker.capture(sink)
    dead = broker.capture(dead_stream(operation))
    supervisor = Supervisor(first, lambda: agent(operation, source, sink, *options,
                                                 ready=False), restarts=10)
    try:
        bodies = [f"message {i}".encode() for i in range(30)]
        bodies[15] = b"message 15 POISON"
        ids = broker.publish(source, bodies)
        [letter] = dead.collect(1)
        healthy = dict(zip(ids[:15] + ids[16:], bodies[:15] + bodies[16:], strict=True))
        got: list[Message] = []
        deadline = time.monotonic() + 60
        while set(healthy) - {m.parent for m in got} and time.monotonic() < deadline:
            got += out.collect_until_quiet(quiet=1.0, timeout=5)
        got += out.collect_until_quiet(quiet=1.0)
    finally:
        supervisor.stop()
    assert letter.parent == ids[15]
    assert letter.body == b"message 15 POISON"
    assert letter.header("sb-dead-path") == "agent crash or kill"
    assert letter.header("sb-dead-reason").startswith("agent crash or kill: ")
    assert 1 <= letter.header("sb-dead-attempts") <= 3
    assert len(runs.read_text().splitlines()) <= 3
    counts = parents(got)
    assert set(counts) == set(healthy), f"missing: {sorted(set(healthy) - set(counts))}"
    assert all(m.body == healthy[m.parent].upper() for m in got)
    duplicates = sum(counts.values()) - len(counts)
    print(f"poison runs {len(runs.read_text().splitlines())}, agent restarts "
          f"{supervisor.restarts}, duplicate outputs {duplicates}")
    assert dead.collect_until_quiet(quiet=0.5) == []
    assert supervisor.processes[-1].proc.poll() is None
