"""Failing programs, timeouts, unframeable bodies and crashing services.

A message the agent gives up on lands on ``<operation>.dead`` with headers that
say why; a crashed service child is restarted and loses nothing.
"""

from __future__ import annotations

from pathlib import Path

from .conftest import PYTHON


def dead_stream(operation: str) -> str:
    return f"{operation}.dead"


def test_failing_program_is_dead_lettered_after_its_attempts(broker, streams, names, agent,
                                                             tmp_path: Path) -> None:
    source, sink = streams("in", "out")
    operation = names("fail")
    runs = tmp_path / "runs.txt"
    command = f"echo ran >> {runs}; echo 'cannot frobnicate the input' >&2; exit 3"
    agent(operation, source, sink, "--shell", "--exec", command, "--max-attempts", "2")
    out = broker.capture(sink)
    dead = broker.capture(dead_stream(operation))
    ids = broker.publish(source, [b"poison \x00\xff body"], headers={"x-user": "kept"})
    [letter] = dead.collect(1)
    assert letter.body == b"poison \x00\xff body"
    assert letter.header("sb-dead-exit-code") == 3
    assert letter.header("sb-dead-attempts") == 2
    assert "exited with code 3" in letter.header("sb-dead-reason")
    assert "cannot frobnicate the input" in letter.header("sb-dead-stderr")
    assert letter.header("sb-dead-operation") == operation
    assert letter.header("sb-parent") == ids[0]
    assert letter.header("sb-stream") == dead_stream(operation)
    assert letter.header("x-user") == "kept"
    assert runs.read_text().splitlines() == ["ran", "ran"]
    assert out.collect_until_quiet(quiet=1.0) == []
    assert dead.collect_until_quiet(quiet=0.5) == []


def test_good_messages_pass_while_bad_ones_die(broker, streams, names, agent, script) -> None:
    source, sink = streams("in", "out")
    operation = names("mixed")
    picky = script("picky", """
        import sys
        data = sys.stdin.buffer.read()
        if data.startswith(b"bad"):
            sys.exit("refusing " + data.decode())
        sys.stdout.buffer.write(data.upper())
    """)
    process = agent(operation, source, sink, "--exec", picky, "--max-attempts", "3")
    out = broker.capture(sink)
    dead = broker.capture(dead_stream(operation))
    bodies = [b"good 1", b"bad 2", b"good 3", b"bad 4", b"good 5"]
    ids = broker.publish(source, bodies)
    assert {m.parent: m.body for m in out.collect(3)} == {
        ids[0]: b"GOOD 1", ids[2]: b"GOOD 3", ids[4]: b"GOOD 5"}
    letters = {m.parent: m for m in dead.collect(2)}
    assert set(letters) == {ids[1], ids[3]}
    assert "refusing bad 4" in letters[ids[3]].header("sb-dead-stderr")
    assert letters[ids[3]].header("sb-dead-exit-code") == 1
    assert letters[ids[3]].header("sb-dead-attempts") == 3
    # the agent carries on and has settled every input
    assert process.terminate() == 0
    assert broker.queue_depth(f"sb.op.{operation}") == 0


def test_flaky_program_succeeds_on_retry(broker, streams, names, agent, script,
                                         tmp_path: Path) -> None:
    source, sink = streams("in", "out")
    operation = names("flaky")
    marker = tmp_path / "failed-once"
    flaky = script("flaky", f"""
        import pathlib, sys
        marker = pathlib.Path({str(marker)!r})
        if not marker.exists():
            marker.touch()
            sys.exit(1)
        sys.stdout.write(sys.stdin.read()[::-1])
    """)
    agent(operation, source, sink, "--exec", flaky, "--max-attempts", "2")
    out = broker.capture(sink)
    dead = broker.capture(dead_stream(operation))
    ids = broker.publish(source, [b"second time lucky"])
    assert [(m.parent, m.body) for m in out.collect(1)] == [(ids[0], b"ykcul emit dnoces")]
    assert dead.collect_until_quiet(quiet=1.0) == []


def test_timeout_is_dead_lettered_without_exit_code(broker, streams, names, agent) -> None:
    source, sink = streams("in", "out")
    operation = names("slow")
    process = agent(operation, source, sink, "--shell", "--exec",
                    "echo 'about to sleep' >&2; sleep 30", "--timeout", "0.5",
                    "--max-attempts", "2")
    out = broker.capture(sink)
    dead = broker.capture(dead_stream(operation))
    ids = broker.publish(source, [b"never answered"])
    [letter] = dead.collect(1)
    assert letter.parent == ids[0]
    assert letter.body == b"never answered"
    assert "timed out" in letter.header("sb-dead-reason")
    assert "sb-dead-exit-code" not in letter.headers
    assert letter.header("sb-dead-attempts") == 2
    assert "about to sleep" in letter.header("sb-dead-stderr")
    assert out.collect_until_quiet(quiet=0.5) == []
    assert process.proc.poll() is None


def test_service_timeout_is_dead_lettered(broker, streams, names, agent, script) -> None:
    source, sink = streams("in", "out")
    operation = names("svcslow")
    hang = script("hang", """
        import sys, time
        for line in sys.stdin:
            if "hang" in line:
                time.sleep(60)
            print(line.strip().upper())
    """)
    agent(operation, source, sink, "--mode", "service", "--exec", hang,
          "--timeout", "0.5", "--max-attempts", "1")
    out = broker.capture(sink)
    dead = broker.capture(dead_stream(operation))
    ids = broker.publish(source, [b"first", b"hang here", b"third"])
    [letter] = dead.collect(1)
    assert letter.parent == ids[1]
    assert "timed out" in letter.header("sb-dead-reason")
    assert "sb-dead-exit-code" not in letter.headers
    assert letter.header("sb-dead-attempts") == 1
    assert {m.parent: m.body for m in out.collect(2)} == {ids[0]: b"FIRST", ids[2]: b"THIRD"}


def test_newline_body_in_line_framing_is_dead_lettered(broker, streams, names, agent,
                                                       script) -> None:
    source, sink = streams("in", "out")
    operation = names("lines")
    process = agent(operation, source, sink, "--mode", "service", "--framing", "line",
                    "--exec", script("upper", """
        import sys
        for line in sys.stdin:
            sys.stdout.write(line.upper())
    """))
    out = broker.capture(sink)
    dead = broker.capture(dead_stream(operation))
    ids = broker.publish(source, [b"before", b"two\nlines", b"after"])
    [letter] = dead.collect(1)
    assert letter.parent == ids[1]
    assert letter.body == b"two\nlines"
    assert "newline" in letter.header("sb-dead-reason")
    assert letter.header("sb-dead-operation") == operation
    # the refused body never reached the program, so the others are answered correctly
    assert [(m.parent, m.body) for m in out.collect(2)] == [(ids[0], b"BEFORE"),
                                                             (ids[2], b"AFTER")]
    assert out.collect_until_quiet(quiet=0.5) == []
    assert process.log().count("started service process") == 1


def test_service_child_crash_is_restarted_and_nothing_lost(broker, streams, names, agent,
                                                           script, tmp_path: Path) -> None:
    source, sink = streams("in", "out")
    operation = names("crash")
    marker = tmp_path / "crashed-once"
    crashy = script("crashy", f"""
        import os, pathlib, sys
        marker = pathlib.Path({str(marker)!r})
        for line in sys.stdin:
            if "CRASH" in line and not marker.exists():
                marker.touch()
                sys.stderr.write("crashing on purpose\\n")
                os._exit(7)
            sys.stdout.write(line.lower())
    """)
    process = agent(operation, source, sink, "--mode", "service", "--exec", crashy,
                    "--prefetch", "50")
    out = broker.capture(sink)
    dead = broker.capture(dead_stream(operation))
    bodies = [f"Record {i}".encode() for i in range(300)]
    bodies[120] = b"Record 120 CRASH"
    ids = broker.publish(source, bodies)
    got = out.collect(300)
    assert marker.exists()
    # every record exactly once; the unanswered ones were fed to the new child in order,
    # the one it crashed on waited out its retry delay on the broker and came last
    assert [m.parent for m in got] == ids[:120] + ids[121:] + [ids[120]]
    assert [m.body for m in got] == [b.lower() for b in bodies[:120] + bodies[121:]
                                     + [bodies[120]]]
    assert out.collect_until_quiet(quiet=0.5) == []
    assert dead.collect_until_quiet(quiet=0.1) == []
    assert process.log().count("started service process") == 2
    assert "exited with code 7" in process.log()
    assert "crashing on purpose" in process.log()


def test_record_that_always_crashes_the_service_is_dead_lettered(broker, streams, names,
                                                                 agent, script) -> None:
    source, sink = streams("in", "out")
    operation = names("poison")
    crashy = script("poison", """
        import sys
        for line in sys.stdin:
            if "poison" in line:
                sys.exit("choked on " + line.strip())
            print(line.strip()[::-1])
    """)
    process = agent(operation, source, sink, "--mode", "service", "--exec", crashy,
                    "--max-attempts", "3")
    out = broker.capture(sink)
    dead = broker.capture(dead_stream(operation))
    ids = broker.publish(source, [b"abc", b"poison pill", b"def", b"ghi"])
    [letter] = dead.collect(1)
    assert letter.parent == ids[1]
    assert letter.header("sb-dead-attempts") == 3
    assert letter.header("sb-dead-exit-code") == 1
    assert "choked on poison pill" in letter.header("sb-dead-stderr")
    assert letter.header("sb-dead-reason") == "program failure: service process exited " \
                                              "with code 1"
    assert letter.header("sb-dead-path") == "program failure"
    assert [(m.parent, m.body) for m in out.collect(3)] == [
        (ids[0], b"cba"), (ids[2], b"fed"), (ids[3], b"ihg")]
    # three children tried the poison (each attempt after a retry delay), a fourth is
    # started after the last one died
    process.wait_log("started service process", count=4)
    assert process.log().count("attempt 1 of 3 failed") == 1
    assert process.log().count("attempt 2 of 3 failed") == 1


def test_program_stderr_goes_to_the_log_not_the_stream(broker, streams, names, agent) -> None:
    source, sink = streams("in", "out")
    process = agent(names("noisy"), source, sink, "--shell", "--exec",
                    "echo 'diagnostic chatter' >&2; tr a-z A-Z")
    out = broker.capture(sink)
    broker.publish(source, [b"quiet"])
    assert [m.body for m in out.collect(1)] == [b"QUIET"]
    process.wait_log("diagnostic chatter")


def test_per_message_killed_by_signal(broker, streams, names, agent) -> None:
    source, sink = streams("in", "out")
    operation = names("sig")
    agent(operation, source, sink, "--exec", f"{PYTHON} -c \"import os; os.abort()\"",
          "--max-attempts", "1")
    dead = broker.capture(dead_stream(operation))
    ids = broker.publish(source, [b"x"])
    [letter] = dead.collect(1)
    assert letter.parent == ids[0]
    assert "SIGABRT" in letter.header("sb-dead-reason")
