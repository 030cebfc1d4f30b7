"""A publisher cannot forge the agent's log lines: ids and the program's stderr come
from messages, and a newline in them is written as an escape."""

from __future__ import annotations

from streamboss.agent.log_format import escape_controls

from .conftest import wait_until

FORGED = "2026-01-01 00:00:00,000 CRITICAL streamboss.agent.worker: FORGED"


def test_control_characters_are_escaped() -> None:
    assert escape_controls("a\nb\r\x1b[31m\u2028c\td") == "a\\nb\\r\\x1b[31m\\u2028c\\td"
    assert escape_controls("plain text, ünïcode") == "plain text, ünïcode"
    assert escape_controls("evil\u202egnp.exe") == "evil\\u202egnp.exe"


def test_an_id_and_stderr_from_a_message_stay_on_their_line(streams, names, agent,
                                                            broker) -> None:
    source, sink = streams("in", "out")
    operation = names("op")
    # The program echoes its input to stderr and fails: stderr is fed by the publisher.
    process = agent(operation, source, sink, "--shell", "--exec", "cat >&2; exit 1",
                    "--max-attempts", "1")
    dead = broker.capture(f"{operation}.dead")  # the agent declared the dead-letter stream
    broker.publish(source, [f"body\n{FORGED} in stderr\n".encode()],
                   ids=[f"id\n{FORGED} in the id"])
    dead.collect(1)
    wait_until(lambda: "dead-lettering" in process.log(), 30, "the dead-letter log line")
    lines = process.log().splitlines()
    assert not [line for line in lines if line.startswith(FORGED)], process.log()
    # Both made it to the log, on lines of the agent's own: the id escaped, each line
    # of stderr behind the operation's prefix.
    assert any("message id\\n" + FORGED in line for line in lines), process.log()
    assert any(line.endswith(f"stderr: {FORGED} in stderr") for line in lines), process.log()
