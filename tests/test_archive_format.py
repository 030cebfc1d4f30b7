"""Archive segment format and index, on file:// in a temp dir (no broker)."""

from __future__ import annotations

import datetime as dt
import decimal
import gzip
import os
import tracemalloc
from pathlib import Path

import pytest

from streamboss.agent import archive
from streamboss.agent.archive import (
    ArchiveIndex,
    NoArchiveError,
    Record,
    SegmentCorruptError,
    SegmentWriter,
)

BASE_TS = 1_700_000_000.0
STREAM = "orders"


def prefix_of(tmp_path: Path) -> str:
    return (tmp_path / "archive").as_uri()


def body_for(i: int) -> bytes:
    # Every byte value, rotated and cut to a varying length (some empty).
    all_bytes = bytes(range(256))
    rotated = all_bytes[i % 256:] + all_bytes[: i % 256]
    return (rotated * 3)[: (i * 37) % 700]


def headers_for(i: int) -> dict:
    return {
        "sb-id": f"id-{i:06d}",
        "sb-produced-at": "2023-11-14T22:13:20.000000Z",
        "n": i,
        "ratio": i / 7,
        "flag": i % 2 == 0,
        "none": None,
        "text": "héllo ✓ \x00 \n",
        "raw": bytes([i % 256, 0, 255]),
        "nested": {"a": i, "b": b"\x00\x01", "$b64": "not bytes"},
        "list": [1, "two", b"\xff"],
    }


def write_archive(prefix: str, records: list[Record], max_bytes: int) -> ArchiveIndex:
    index = ArchiveIndex.load(prefix, STREAM)
    writer = SegmentWriter()
    for record in records:
        writer.append(record)
        if writer.should_roll(max_bytes, 3600):
            index.add(writer.finish(prefix, STREAM, index.next_sequence))
            writer = SegmentWriter()
    if writer.count:
        index.add(writer.finish(prefix, STREAM, index.next_sequence))
    else:
        writer.close()
    return index


def test_round_trip_10000_records_across_segments(tmp_path):
    prefix = prefix_of(tmp_path)
    records = [Record(BASE_TS + i * 0.5, headers_for(i), body_for(i)) for i in range(10_000)]
    index = write_archive(prefix, records, max_bytes=400_000)
    assert len(index.segments) >= 5
    assert [s.sequence for s in index.segments] == list(range(len(index.segments)))
    assert sum(s.count for s in index.segments) == 10_000
    first = index.segments[0]
    assert first.url.endswith(f"/{STREAM}/segments/000000000000.sbseg.gz")
    assert first.first_id == "id-000000"
    assert index.segments[-1].last_id == "id-009999"
    assert first.first_ts == BASE_TS
    assert all(s.size == os.path.getsize(s.url[len("file://"):]) for s in index.segments)

    # The index reloads from the store identically.
    assert ArchiveIndex.load(prefix, STREAM).segments == index.segments

    got = list(archive.select(prefix, STREAM))
    assert len(got) == 10_000
    for i, record in enumerate(got):
        assert record.timestamp == BASE_TS + i * 0.5
        assert record.body == body_for(i)
        assert record.headers == headers_for(i)
    assert {type(r.headers["raw"]) for r in got} == {bytes}


def test_special_header_values(tmp_path):
    prefix = prefix_of(tmp_path)
    when = dt.datetime(2024, 1, 2, 3, 4, 5, tzinfo=dt.UTC)
    writer = SegmentWriter()
    writer.add(1.0, {b"key": b"v", "ts": when, "dec": decimal.Decimal("1.50"),
                     "tbl": {"$b64": b"\x01"}}, b"")
    writer.finish(prefix, STREAM, 0)
    (record,) = archive.iter_records(archive.segment_url(prefix, STREAM, 0))
    assert record.headers == {
        "key": b"v", "ts": "2024-01-02T03:04:05+00:00", "dec": decimal.Decimal("1.50"),
        "tbl": {"$b64": b"\x01"},
    }
    with pytest.raises(TypeError, match="cannot be archived"):
        SegmentWriter().add(1.0, {"x": object()}, b"")


def test_record_timestamp():
    assert archive.record_timestamp(
        {"sb-produced-at": "2023-11-14T22:13:20.500000Z"}, 5.0) == 1_700_000_000.5
    assert archive.record_timestamp({"sb-produced-at": b"2023-11-14T22:13:20Z"}, 5.0) == BASE_TS
    assert archive.record_timestamp({"sb-produced-at": "garbage"}, 5.0) == 5.0
    assert archive.record_timestamp(None, 5.0) == 5.0


def test_time_window_selects_exactly_the_window_in_order(tmp_path):
    prefix = prefix_of(tmp_path)
    # Mostly rising timestamps, with a few stragglers from a slow producer clock.
    times = [BASE_TS + i for i in range(2_000)]
    for i in range(50, 2_000, 97):
        times[i] -= 400
    records = [Record(t, {"sb-id": f"id-{i}"}, i.to_bytes(4, "big"))
               for i, t in enumerate(times)]
    index = write_archive(prefix, records, max_bytes=5_000)
    assert len(index.segments) > 10

    for lo, hi in [(BASE_TS + 300, BASE_TS + 700), (None, BASE_TS + 10),
                   (BASE_TS + 1_990, None), (BASE_TS + 5, BASE_TS + 5)]:
        expected = [r for r in records
                    if (lo is None or r.timestamp >= lo) and (hi is None or r.timestamp < hi)]
        assert list(archive.select(prefix, STREAM, lo, hi)) == expected

    # Only overlapping segments are read.
    narrow = index.segments_for(BASE_TS + 1_500, BASE_TS + 1_501)
    assert 0 < len(narrow) < len(index.segments)


def test_inverted_window_is_an_error(tmp_path):
    prefix = prefix_of(tmp_path)
    write_archive(prefix, [Record(BASE_TS, {}, b"x")], 1_000)
    with pytest.raises(ValueError, match="--from is after --until"):
        archive.select(prefix, STREAM, BASE_TS + 10, BASE_TS)


def test_stream_without_archive_is_an_error(tmp_path):
    prefix = prefix_of(tmp_path)
    assert ArchiveIndex.load(prefix, STREAM).segments == []
    with pytest.raises(NoArchiveError, match="'orders' has no archive"):
        archive.select(prefix, STREAM)


@pytest.mark.parametrize("damage", ["truncate", "cut-in-record", "flip"])
def test_damaged_segment_is_a_clear_error(tmp_path, damage):
    prefix = prefix_of(tmp_path)
    records = [Record(BASE_TS + i, {"sb-id": str(i)}, os.urandom(200)) for i in range(500)]
    index = write_archive(prefix, records, max_bytes=10**9)
    url = index.segments[0].url
    path = Path(url[len("file://"):])
    data = path.read_bytes()
    if damage == "truncate":
        path.write_bytes(data[: len(data) // 2])
    elif damage == "cut-in-record":
        # A complete gzip stream whose records end mid-body.
        plain = gzip.decompress(data)
        path.write_bytes(gzip.compress(plain[:-10]))
    else:
        path.write_bytes(data[:500] + bytes(b ^ 0xFF for b in data[500:520]) + data[520:])
    with pytest.raises(SegmentCorruptError, match="truncated or corrupt") as info:
        list(archive.select(prefix, STREAM))
    assert url in str(info.value)


def test_writer_rolls_by_age_and_refuses_misuse(tmp_path):
    writer = SegmentWriter()
    assert not writer.should_roll(1, 0)
    writer.add(BASE_TS, {}, b"a")
    assert writer.opened_at is not None
    assert not writer.should_roll(10**9, 60, now=writer.opened_at + 59)
    assert writer.should_roll(10**9, 60, now=writer.opened_at + 60)
    writer.close()
    with pytest.raises(ValueError, match="already finished"):
        writer.add(BASE_TS, {}, b"b")
    with pytest.raises(ValueError, match="empty segment"):
        SegmentWriter().finish(prefix_of(tmp_path), STREAM, 0)
    index = write_archive(prefix_of(tmp_path), [Record(BASE_TS, {}, b"x")], 100)
    with pytest.raises(ValueError, match="not after"):
        index.add(index.segments[0])


def test_writer_and_reader_memory_stay_bounded(tmp_path):
    prefix = prefix_of(tmp_path)
    body_size = 4096
    total = 30 * 1024 * 1024
    count = total // body_size
    tracemalloc.start()
    try:
        writer = SegmentWriter(compresslevel=1)
        for i in range(count):
            writer.add(BASE_TS + i, {"sb-id": f"id-{i}"}, os.urandom(body_size))
        info = writer.finish(prefix, STREAM, 0)
        _, write_peak = tracemalloc.get_traced_memory()
        tracemalloc.reset_peak()
        seen = 0
        for record in archive.iter_records(info.url):
            seen += len(record.body)
        _, read_peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert info.count == count and seen == total
    assert info.size > total  # random bodies do not compress: the data really went to disk
    print(f'write peak {write_peak}, read peak {read_peak}')
    assert write_peak < total / 10, write_peak
    assert read_peak < total / 10, read_peak
