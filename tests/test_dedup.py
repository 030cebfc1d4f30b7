"""Duplicates you can remove: the bounded memory of ids (agent/dedup.py) that
`consume --dedup`, archive readers and replay share. consume and replay run
against the real broker (replay through a real manager and archiver); the
archive reader on file:// segments."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import httpx
import pika
import pytest

from streamboss.agent import archive
from streamboss.agent.archive import ArchiveIndex, Record, SegmentWriter
from streamboss.agent.dedup import DEFAULT_WINDOW, SeenIds

from .conftest import PYTHON, Broker, ManagerProcess, stream_exchange, wait_until
from .module_manager import manager_names, module_manager  # noqa: F401 (fixtures)

STREAM = "orders"


# -- the memory of ids ---------------------------------------------------------------


def test_an_id_is_a_duplicate_while_among_the_last_n_distinct_ones() -> None:
    seen = SeenIds(3)
    assert [seen.first_time(i) for i in ["a", "b", "a", "c", "b"]] == \
        [True, True, False, True, False]
    assert seen.first_time("d")  # a is forgotten now: the last three are b, c, d
    assert seen.first_time("a")
    assert not seen.first_time("d")
    assert len(seen) == 3


def test_messages_without_an_id_are_always_new_and_window_0_remembers_nothing() -> None:
    seen = SeenIds(3)
    assert all(seen.first_time(None) for _ in range(3))
    assert seen.first_time("") and seen.first_time("")
    nothing = SeenIds(0)
    assert nothing.first_time("a") and nothing.first_time("a")
    with pytest.raises(ValueError, match="window of -1"):
        SeenIds(-1)
    assert DEFAULT_WINDOW == 100_000  # what replay has always remembered


# -- archive readers -------------------------------------------------------------------


def write_segments(prefix: str, segments: list[list[Record]]) -> None:
    index = ArchiveIndex.load(prefix, STREAM)
    for records in segments:
        writer = SegmentWriter()
        for record in records:
            writer.append(record)
        index.add(writer.finish(prefix, STREAM, index.next_sequence))


def record(n: int, ident: str | None, message_id: str | None = None) -> Record:
    headers = {"n": n} if ident is None else {"sb-id": ident, "n": n}
    properties = {"message_id": message_id} if message_id else {}
    return Record(1_700_000_000.0 + n, headers, f"body {n}".encode(), properties)


def test_archive_readers_give_each_id_once_across_segments(tmp_path: Path) -> None:
    prefix = (tmp_path / "archive").as_uri()
    # An archiver that lost its connection after storing the first segment stores
    # the redelivered messages again in the next one, right after.
    write_segments(prefix, [
        [record(0, "a"), record(1, "b"), record(2, None), record(3, None, "m-1")],
        [record(4, "a"), record(5, "b"), record(6, None), record(7, None, "m-1"),
         record(8, "c"), record(9, "c"), record(10, None, "m-2")],
    ])
    got = [r.headers["n"] for r in archive.select(prefix, STREAM)]
    # Duplicates by sb-id, and by message-id where there is no sb-id, are skipped;
    # records without any id are all given.
    assert got == [0, 1, 2, 3, 6, 8, 10]
    assert [r.headers["n"] for r in archive.select(prefix, STREAM, dedup_window=0)] == \
        list(range(11))
    stored = [r.headers["n"] for s in ArchiveIndex.load(prefix, STREAM).segments
              for r in archive.iter_records(s.url)]
    assert stored == list(range(11))  # the segments themselves keep what was delivered
    # The window is of distinct ids: with room for one, each id is forgotten at the
    # next, so only the "c" right after "c" is skipped.
    assert [r.headers["n"] for r in archive.select(prefix, STREAM, dedup_window=1)] == \
        [0, 1, 2, 3, 4, 5, 6, 7, 8, 10]


def test_replay_publishes_an_id_the_archive_holds_twice_once(
        manager: ManagerProcess, broker: Broker, names) -> None:
    stream, target = names("twice"), names("once")
    manager.ok("create-stream", stream)
    manager.ok("create-stream", target)
    manager.ok("archive-stream", stream, "--segment-seconds", "0.5")
    # The redelivery an archiver gets after a lost connection, as the archive sees it.
    ids = ["r-0", "r-1", "r-2", "r-1", "r-0", "r-3"]
    broker.publish(stream, [i.encode() for i in ids], ids=ids)
    wait_until(lambda: sum(s.count for s in ArchiveIndex.load(
        f"file://{manager.state_dir / 'archive'}", stream).segments) == 6, 60, "6 archived")
    out = broker.capture(target)
    result = manager.cli("replay", stream, "--to", target)
    assert result.returncode == 0, result.stderr
    assert "replayed 4 message(s)" in result.stderr
    assert [m.header("sb-id") for m in out.collect(4)] == ["r-0", "r-1", "r-2", "r-3"]
    assert out.collect_until_quiet(quiet=1.0) == []


# -- consume --dedup ---------------------------------------------------------------------


def wait_for_consumer(stream: str, consumer: subprocess.Popen) -> None:
    """Wait until `consume` has bound its server-named queue to ``stream``."""
    url = f"http://127.0.0.1:15672/api/exchanges/%2F/{stream_exchange(stream)}/bindings/source"

    def bound() -> bool:
        assert consumer.poll() is None, consumer.stderr.read() if consumer.stderr else ""
        bindings = httpx.get(url, auth=("guest", "guest"), timeout=5).json()
        return any(b["destination"].startswith("amq.gen") for b in bindings)

    wait_until(bound, 30, f"consume to bind its queue to {stream}", interval=0.1)


def test_consume_dedup_drops_ids_seen_among_the_last_n(broker: Broker, broker_url: str,
                                                       names) -> None:
    stream = broker.create_stream(names("dups"))
    consumer = subprocess.Popen(
        [PYTHON, "-m", "streamboss.manager", "consume", stream, "--dedup", "3", "--count",
         "9", "--timeout", "60", "-o", "json"], stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True,
        env={**os.environ, "STREAMBOSS_BROKER_URL": broker_url})
    try:
        wait_for_consumer(stream, consumer)
        channel = broker.publisher
        # (sb-id, AMQP message-id): an id is sb-id, else message-id; some have neither.
        sent = [("m1", None), ("m2", None), ("m1", None), (None, "p1"), (None, None),
                (None, None), ("m2", None), (None, "p1"), ("m4", None), ("m5", None),
                ("m1", None), ("last", None)]
        for n, (sb_id, message_id) in enumerate(sent):
            headers = {"n": n, **({"sb-id": sb_id} if sb_id else {})}
            channel.basic_publish(stream_exchange(stream), "", f"b{n}".encode(),
                                  pika.BasicProperties(headers=headers,
                                                       message_id=message_id))
        stdout, stderr = consumer.communicate(timeout=90)
    finally:
        if consumer.poll() is None:
            consumer.kill()
            consumer.wait()
    assert consumer.returncode == 0, stderr
    shown = [json.loads(line)["headers"]["n"] for line in stdout.splitlines()]
    # Remembering 3 distinct ids: m1 m2 (m1 dropped) p1, two without ids, (m2 dropped,
    # p1 dropped) m4 m5, then m1 again: forgotten by then. --count counts shown ones.
    assert shown == [0, 1, 3, 4, 5, 8, 9, 10, 11]


def test_consume_help_says_what_dedup_does() -> None:
    result = subprocess.run([PYTHON, "-m", "streamboss.manager", "consume", "--help"],
                            capture_output=True, text=True, timeout=60)
    text = " ".join(result.stdout.split())
    assert "--dedup N Drop a message whose id (sb-id, else its AMQP message-id) is among " \
           "the last N distinct ids shown" in text
