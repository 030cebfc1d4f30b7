"""An output larger than the broker accepts never stops the agent.

RabbitMQ refuses a message over its ``max_message_size`` by closing the
publisher's channel (406). The agent learns the limit from that refusal,
reconnects, and from then on stores such outputs in the object store when one
is configured, else dead-letters their inputs with the reason.

These tests lower the broker's limit for their own duration (``rabbitmqctl
eval``: new channels read it) and restore it afterwards.
"""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import stream_exchange

LIMIT = 2 * 1024 * 1024
BIG = 3 * 1024 * 1024


def dead_stream(operation: str) -> str:
    return f"{operation}.dead"


def _rabbitmqctl_eval(expression: str) -> str:
    return subprocess.run(["rabbitmqctl", "eval", expression], capture_output=True, text=True,
                          check=True, timeout=60).stdout.strip()


@pytest.fixture
def small_broker_limit() -> Iterator[int]:
    previous = _rabbitmqctl_eval("application:get_env(rabbit, max_message_size).")
    value = previous.removeprefix("{ok,").removesuffix("}")
    _rabbitmqctl_eval(f"application:set_env(rabbit, max_message_size, {LIMIT}).")
    try:
        yield LIMIT
    finally:
        restore = value if value.isdigit() else "134217728"
        _rabbitmqctl_eval(f"application:set_env(rabbit, max_message_size, {restore}).")


BIG_WRITER = f"""
    import sys
    for line in sys.stdin:
        if line.startswith("big"):
            sys.stdout.write("x" * {BIG} + "\\n")
        else:
            sys.stdout.write(line.upper())
"""


def test_too_large_output_without_a_store_is_dead_lettered_and_the_agent_lives_on(
        small_broker_limit, broker, streams, names, agent, script) -> None:
    source, sink = streams("in", "out")
    operation = names("toolarge")
    writer = script("bigwriter", BIG_WRITER)
    process = agent(operation, source, sink, "--exec", writer, "--max-attempts", "3")
    out = broker.capture(sink)
    dead = broker.capture(dead_stream(operation))
    ids = broker.publish(source, [b"small one", b"big one", b"small two"])
    [letter] = dead.collect(1)
    assert letter.parent == ids[1]
    assert letter.header("sb-dead-path") == "output too large"
    assert f"over the broker's limit of {LIMIT} bytes" in letter.header("sb-dead-reason")
    assert letter.header("sb-dead-attempts") <= 3
    assert sorted(m.body for m in out.collect(2)) == [b"SMALL ONE", b"SMALL TWO"]
    # the refusal closed the agent's channel; it learned the limit and carried on
    assert process.proc.poll() is None
    assert f"the broker takes messages up to {LIMIT} bytes" in process.log()
    broker.publish(source, [b"small three"])
    assert [m.body for m in out.collect(1)] == [b"SMALL THREE"]
    assert out.collect_until_quiet(quiet=0.5) == []


def test_too_large_service_output_goes_to_the_object_store(
        small_broker_limit, broker, streams, names, agent, script, tmp_path: Path) -> None:
    source, sink = streams("in", "out")
    operation = names("bigservice")
    store = tmp_path / "objects"
    store.mkdir()
    writer = script("bigservice", BIG_WRITER)
    process = agent(operation, source, sink, "--mode", "service", "--exec", writer,
                    # above the output: only the broker's limit sends it to the store
                    "--output-threshold", str(64 * 1024 * 1024),
                    env={"STREAMBOSS_OBJECT_STORE": store.as_uri()})
    out = broker.capture(sink)
    dead = broker.capture(dead_stream(operation))
    ids = broker.publish(source, [b"small", b"big", b"after"])
    got = {m.parent: m for m in out.collect(3)}
    # line framing: each record is a line, its newline not part of the message
    assert got[ids[0]].body == b"SMALL"
    assert got[ids[2]].body == b"AFTER"
    reference = got[ids[1]]
    url = reference.header("sb-object-url")
    assert reference.body == url.encode()
    assert reference.header("sb-object-size") == BIG
    stored = Path(url.removeprefix("file://"))
    assert stored.read_bytes() == b"x" * BIG
    assert dead.collect_until_quiet(quiet=0.5) == []
    assert process.proc.poll() is None


def test_a_standalone_agent_declares_its_dead_letter_queue(broker, streams, names,
                                                           agent) -> None:
    source, sink = streams("in", "out")
    operation = names("keeps")
    agent(operation, source, sink, "--exec", "false", "--max-attempts", "1")
    assert broker.queue_depth(f"sb.dead.{operation}") == 0
    assert broker.exchange_exists(stream_exchange(dead_stream(operation)))
    broker.capture(sink)
    broker.publish(source, [b"doomed"])
    # nobody consumes the dead-letter stream, yet the dead letter is kept
    letters = broker.queue(f"sb.dead.{operation}").collect(1)
    assert letters[0].body == b"doomed"
    assert letters[0].header("sb-dead-path") == "program failure"
