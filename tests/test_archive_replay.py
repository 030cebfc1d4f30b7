"""Archives and replay through a real manager: `archive-stream` drains a stream into
segments, `replay` publishes a time window of them back, in order and with their ids.
Real RabbitMQ, real archiver processes, file:// stores (S3 is in test_s3_server.py)."""

from __future__ import annotations

import datetime as dt
import json
import os
import signal
from pathlib import Path

import pika

from streamboss.agent import archive

from .conftest import (
    Broker,
    ManagerProcess,
    agent_pids,
    archiver_pids,
    stream_exchange,
    wait_until,
)
from .module_manager import manager_names, module_manager  # noqa: F401 (fixtures)

# 2026-01-01T00:00:00Z; every test message n is produced at BASE + n * STEP.
BASE = dt.datetime(2026, 1, 1, tzinfo=dt.UTC).timestamp()
STEP = 0.01
# Bounds that keep a broken archiver from hanging the suite; they are not speed claims.
ARCHIVE_TIMEOUT = 60.0


def rfc3339(ts: float) -> str:
    return dt.datetime.fromtimestamp(ts, dt.UTC).isoformat().replace("+00:00", "Z")


def publish_numbered(broker: Broker, stream: str, numbers: range, run: str) -> None:
    """Messages ``n`` with body ``message n``, id ``run-n`` and produced-at BASE + n*STEP."""
    channel = broker.connection.channel()
    channel.confirm_delivery()
    for n in numbers:
        headers = {"sb-id": f"{run}-{n}", "sb-produced-at": rfc3339(BASE + n * STEP),
                   "n": n}
        channel.basic_publish(stream_exchange(stream), "", f"message {n}".encode(),
                              pika.BasicProperties(delivery_mode=2, headers=headers,
                                                   content_type="text/plain"))
    channel.close()


def archive_prefix(manager: ManagerProcess) -> str:
    return f"file://{manager.state_dir / 'archive'}"


def archived(manager: ManagerProcess, stream: str) -> list[archive.SegmentInfo]:
    return archive.ArchiveIndex.load(archive_prefix(manager), stream).segments


def archived_count(manager: ManagerProcess, stream: str) -> int:
    return sum(segment.count for segment in archived(manager, stream))


def archive_entry(manager: ManagerProcess, stream: str) -> dict | None:
    for entry in manager.status()["archives"]:
        if entry["stream"] == stream:
            return entry
    return None


def one_line_error(result) -> str:
    assert result.returncode != 0, result
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.stderr
    return lines[0]


def test_archiving_10000_messages_and_replaying_a_window_gives_exactly_that_window(
        manager: ManagerProcess, broker: Broker, names) -> None:
    stream, target = names("orders"), names("orders-again")
    manager.ok("create-stream", stream)
    manager.ok("create-stream", target)
    # Small segments, so the window starts and ends inside segments.
    manager.ok("archive-stream", stream, "--segment-mb", "0.1", "--segment-seconds", "1")
    publish_numbered(broker, stream, range(10_000), "w")
    wait_until(lambda: archived_count(manager, stream) == 10_000, ARCHIVE_TIMEOUT,
               "10,000 archived messages")
    segments = archived(manager, stream)
    assert len(segments) >= 5
    assert all(segment.url.endswith(".sbseg.gz") for segment in segments)

    out = broker.capture(target)
    result = manager.cli("replay", stream, "--from", rfc3339(BASE + 2000 * STEP),
                         "--until", rfc3339(BASE + 7000 * STEP), "--to", target)
    assert result.returncode == 0, result.stderr
    assert f"replayed 5000 message(s) from the archive of {stream} onto {target}" \
        in result.stderr
    got = out.collect(5000)
    assert out.collect_until_quiet(quiet=1.0) == []
    assert [m.header("sb-id") for m in got] == [f"w-{n}" for n in range(2000, 7000)]
    assert [m.body for m in got] == [f"message {n}".encode() for n in range(2000, 7000)]
    first = got[0]
    assert first.header("n") == 2000
    assert first.header("sb-replayed-from") == stream
    assert first.properties.content_type == "text/plain"
    assert first.properties.delivery_mode == 2


def test_the_seed_shims_archive_a_stream_and_play_it_back_onto_itself(
        manager: ManagerProcess, broker: Broker, names) -> None:
    stream = names("events")
    manager.ok("create-stream", stream)
    shim = manager.tool("archive_stream.py", stream, "--segment-seconds", "0.5")
    assert shim.returncode == 0, shim.stderr
    publish_numbered(broker, stream, range(20), "self")
    wait_until(lambda: archived_count(manager, stream) == 20, ARCHIVE_TIMEOUT, "20 archived")
    manager.ok("stop-archive", stream)  # or the replay would be archived again
    out = broker.capture(stream)
    result = manager.tool("stream_archive.py", stream, "--rate", "200")
    assert result.returncode == 0, result.stderr
    got = out.collect(20)
    assert [m.header("sb-id") for m in got] == [f"self-{n}" for n in range(20)]


def test_killing_the_archiver_mid_segment_loses_nothing(
        manager: ManagerProcess, broker: Broker, names) -> None:
    stream = names("payments")
    manager.ok("create-stream", stream)
    # Segments that never roll on their own: everything stays in the open one.
    manager.ok("archive-stream", stream, "--segment-seconds", "3600")
    [first] = wait_until(lambda: archiver_pids(stream), 30, "the archiver")
    publish_numbered(broker, stream, range(3000), "k")
    queue = f"sb.sub.archive.{stream}"

    def all_delivered() -> bool:
        frame = broker.channel.queue_declare(queue, passive=True)
        return frame.method.message_count == 0
    wait_until(all_delivered, 30, "the archiver to hold all 3,000 messages")
    os.kill(first, signal.SIGKILL)
    assert archived(manager, stream) == []  # the open segment was never stored

    publish_numbered(broker, stream, range(3000, 5000), "k")
    wait_until(lambda: archiver_pids(stream) - {first}, 30, "a new archiver")
    manager.ok("stop-archive", stream)  # the archiver stores its open segment, then exits
    wait_until(lambda: (archive_entry(manager, stream) or {}).get("backlog", 0) is None, 60,
               "the stopped archive's subscription to be drained and deleted")
    assert not archiver_pids(stream)
    records = list(archive.select(archive_prefix(manager), stream))
    assert [r.headers["sb-id"] for r in records] == [f"k-{n}" for n in range(5000)]
    [entry] = [a for a in manager.declarations()["archives"] if a["stream"] == stream]
    assert entry["active"] is False


def test_an_archive_keeps_the_operations_that_feed_its_stream_running(
        manager: ManagerProcess, broker: Broker, names, tmp_path: Path) -> None:
    source, sink, operation = names("raw"), names("upper"), names("shout")
    definition = tmp_path / "upper.json"
    definition.write_text(json.dumps({"definition": {"name": operation,
                                                     "exec": "tr a-z A-Z"}}))
    manager.ok("create-stream", source)
    manager.ok("define-process", str(definition))
    manager.ok("create-operation", operation, operation, source, sink, "--idle-seconds", "1")
    manager.wait_status(operation, lambda e: not e["wanted"] and e["running"] == 0, 20,
                        "unwanted without subscribers")
    manager.ok("archive-stream", sink, "--segment-seconds", "0.5")
    manager.wait_status(operation, lambda e: e["wanted"] and e["running"] >= 1, 20,
                        "wanted once its output is archived")
    publish_numbered(broker, source, range(10), "d")
    wait_until(lambda: archived_count(manager, sink) == 10, ARCHIVE_TIMEOUT, "10 archived")
    records = list(archive.select(archive_prefix(manager), sink))
    assert sorted(r.body for r in records) == sorted(f"MESSAGE {n}".encode() for n in range(10))
    manager.ok("stop-archive", sink)
    manager.wait_status(operation, lambda e: not e["wanted"], 20, "unwanted again")
    wait_until(lambda: not agent_pids(operation), 20, "its agents gone")


def test_list_shows_archives_and_their_state(manager: ManagerProcess, names) -> None:
    stream = names("listed")
    manager.ok("create-stream", stream)
    manager.ok("archive-stream", stream)
    again = manager.ok("archive-stream", stream)
    assert "(already)" in again
    table = manager.ok("list", "archives")
    assert stream in table and "active" in table
    manager.ok("stop-archive", stream)
    [entry] = [a for a in json.loads(manager.ok("list", "archives", "-o", "json"))
               if a["stream"] == stream]
    assert entry["active"] is False and entry["store"] == archive_prefix(manager)


# -- bad input: one line, non-zero exit, nothing published --------------------------------


def test_archive_stream_of_an_unknown_stream_is_refused(manager: ManagerProcess,
                                                         names) -> None:
    missing = names("missing")
    line = one_line_error(manager.cli("archive-stream", missing))
    assert f"stream {missing!r} does not exist" in line
    assert not any(a["stream"] == missing for a in manager.declarations()["archives"])


def test_archive_stream_to_an_unusable_store_writes_nothing(manager: ManagerProcess,
                                                             names) -> None:
    stream = names("nowhere")
    manager.ok("create-stream", stream)
    line = one_line_error(manager.cli("archive-stream", stream, "--store", "ftp://host/x"))
    assert "unsupported URL scheme 'ftp'" in line
    line = one_line_error(manager.cli("archive-stream", stream, "--store", "file://relative"))
    assert "absolute path" in line
    assert not any(a["stream"] == stream for a in manager.declarations()["archives"])


def test_bad_replays_publish_nothing(manager: ManagerProcess, broker: Broker, names) -> None:
    stream, target, never = names("src"), names("dst"), names("never")
    for name in (stream, target, never):
        manager.ok("create-stream", name)
    manager.ok("archive-stream", stream, "--segment-seconds", "0.5")
    publish_numbered(broker, stream, range(5), "b")
    wait_until(lambda: archived_count(manager, stream) == 5, ARCHIVE_TIMEOUT, "5 archived")
    out = broker.capture(target)
    late, early = rfc3339(BASE + 10), rfc3339(BASE)

    inverted = one_line_error(manager.cli("replay", stream, "--from", late, "--until", early,
                                          "--to", target))
    assert "--from must be before --until" in inverted
    not_a_time = one_line_error(manager.cli("replay", stream, "--from", "yesterday",
                                            "--to", target))
    assert "--from 'yesterday' is not an RFC 3339 time" in not_a_time
    no_offset = one_line_error(manager.cli("replay", stream, "--until", "2026-01-01T00:00:00",
                                           "--to", target))
    assert "no UTC offset" in no_offset
    no_archive = one_line_error(manager.cli("replay", never, "--to", target))
    assert f"stream {never!r} has never been archived" in no_archive
    empty_store = one_line_error(manager.cli("replay", stream, "--to", target, "--store",
                                             f"file://{manager.state_dir / 'empty'}"))
    assert "has no archive under" in empty_store
    unknown_target = names("unknown")
    no_target = one_line_error(manager.cli("replay", stream, "--to", unknown_target))
    assert f"stream {unknown_target!r} does not exist" in no_target
    assert out.collect_until_quiet(quiet=1.0) == []
