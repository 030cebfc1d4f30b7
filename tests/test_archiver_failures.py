"""The archiver never acks a message whose segment was not stored, whatever the failure.

In process, against the real broker and a ``file://`` store: storing a segment
raises an exception nobody foresaw (a RuntimeError inside the upload), and the
archiver reports it in one line and exits 1, with every message of that segment
(and of any segment after it) still in the archive's subscription.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from streamboss.agent.archive import ArchiveIndex, SegmentWriter
from streamboss.agent.naming import archive_queue
from streamboss.manager.archiver import EXIT_FAILED, Archiver, ArchiverConfig

from .conftest import stream_exchange, wait_until

# Bounds that keep a hung archiver from hanging the suite; not speed claims.
RUN_TIMEOUT = 60.0
SEGMENT_RECORDS = 10


@pytest.fixture
def subscription(broker, streams) -> Iterator[str]:
    """A stream with its archive subscription, as the manager declares it."""
    (stream,) = streams("archived")
    queue = archive_queue(stream)
    broker.channel.queue_declare(queue, durable=True)
    broker.channel.queue_bind(queue, stream_exchange(stream), routing_key="#")
    try:
        yield stream
    finally:
        broker.channel.queue_delete(queue)


def run_archiver(archiver: Archiver) -> tuple[int, bool]:
    """Run ``archiver`` on this thread (it sets signal handlers); return its exit code
    and whether it had to be stopped from outside because it hung."""
    hung = threading.Event()

    def stop_if_hung() -> None:
        hung.set()
        archiver.ioloop.add_callback_threadsafe(archiver._finish)

    guard = threading.Timer(RUN_TIMEOUT, stop_if_hung)
    guard.start()
    try:
        code = archiver.run()
    finally:
        guard.cancel()
    return code, hung.is_set()


def failing_on(calls: set[int], monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Make the ``n``-th segment upload (1-based, for n in ``calls``) raise RuntimeError."""
    real = SegmentWriter.finish
    seen: list[int] = []

    def finish(self: SegmentWriter, *args: Any, **kwargs: Any) -> Any:
        seen.append(len(seen) + 1)
        if len(seen) in calls:
            raise RuntimeError("the upload library tripped over itself")
        return real(self, *args, **kwargs)

    monkeypatch.setattr(SegmentWriter, "finish", finish)
    return seen


def test_an_unexpected_exception_while_storing_acks_nothing_and_exits(
        subscription: str, broker, broker_url: str, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    stream = subscription
    store = f"file://{tmp_path / 'archive'}"
    broker.publish(stream, [f"m{i}".encode() for i in range(3 * SEGMENT_RECORDS)])
    wait_until(lambda: broker.queue_depth(archive_queue(stream)) == 3 * SEGMENT_RECORDS,
               RUN_TIMEOUT, "the messages in the subscription")
    # The first segment is stored; the second hits the unexpected exception.
    uploads = failing_on({2}, monkeypatch)
    archiver = Archiver(ArchiverConfig(broker_url, stream, store, segment_bytes=1 << 30,
                                       segment_seconds=3600,
                                       segment_records=SEGMENT_RECORDS))
    code, hung = run_archiver(archiver)

    assert not hung, "the archiver did not exit after the failed segment"
    assert code == EXIT_FAILED
    assert uploads[:2] == [1, 2]
    error = capsys.readouterr().err.strip().splitlines()
    assert error == [f"archiver: error: cannot store a segment of {stream!r}: RuntimeError: "
                     "the upload library tripped over itself"], error
    # Only the stored segment was acked; the failed one and any after it wait for the
    # next archiver (they come back once this archiver's connection is gone).
    wait_until(lambda: broker.queue_depth(archive_queue(stream)) == 2 * SEGMENT_RECORDS,
               RUN_TIMEOUT, "the unstored segments' messages back in the subscription")
    index = ArchiveIndex.load(store, stream)
    assert [entry.count for entry in index.segments] == [SEGMENT_RECORDS]
    left = broker.queue(archive_queue(stream)).collect(2 * SEGMENT_RECORDS)
    assert sorted(m.body for m in left) == sorted(f"m{i}".encode()
                                                  for i in range(SEGMENT_RECORDS,
                                                                 3 * SEGMENT_RECORDS))


def test_a_failure_on_the_first_segment_acks_nothing(
        subscription: str, broker, broker_url: str, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    stream = subscription
    store = f"file://{tmp_path / 'archive'}"
    broker.publish(stream, [f"m{i}".encode() for i in range(SEGMENT_RECORDS)])
    wait_until(lambda: broker.queue_depth(archive_queue(stream)) == SEGMENT_RECORDS,
               RUN_TIMEOUT, "the messages in the subscription")
    failing_on({1}, monkeypatch)
    code, hung = run_archiver(Archiver(ArchiverConfig(
        broker_url, stream, store, segment_bytes=1 << 30, segment_seconds=3600,
        segment_records=SEGMENT_RECORDS)))
    assert (code, hung) == (EXIT_FAILED, False)
    wait_until(lambda: broker.queue_depth(archive_queue(stream)) == SEGMENT_RECORDS,
               RUN_TIMEOUT, "every message back in the subscription")
    assert ArchiveIndex.load(store, stream).segments == []
