"""Replay: publish a time window of a stream's archive back onto a stream.

Records go out in their archived order with their original headers (``sb-id``
included) and basic properties, plus ``sb-replayed-from`` naming the archived
stream; a duplicate the archive holds (at-least-once delivery into it) goes out
once, as ``archive.select`` skips an id given within its last 100,000.
Everything that can be wrong with a request (times, window, archive, target
stream) is found before the first message is published.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterator
from dataclasses import dataclass

import pika

from streamboss.agent import archive, objects
from streamboss.agent.archive import ArchiveError, ArchiveIndex, Record
from streamboss.agent.headers import PERSISTENT, REPLAYED_FROM


class ReplayError(ValueError):
    """A replay that cannot be done; the message says why and what to do."""


def parse_time(value: str, option: str) -> float:
    """Epoch seconds of an RFC 3339 time (``2026-11-23T20:00:00Z``); a bare date is midnight UTC.

    Raises:
        ReplayError: naming the option and the expected form.
    """
    text = value.strip()
    try:
        parsed = dt.datetime.fromisoformat(text.replace("z", "Z"))
    except ValueError:
        raise ReplayError(f"{option} {value!r} is not an RFC 3339 time: use e.g. "
                          "2026-11-23T20:00:00Z or 2026-11-23T21:00:00+01:00") from None
    if parsed.tzinfo is None:
        if "T" in text.upper() or " " in text:
            raise ReplayError(f"{option} {value!r} has no UTC offset: add Z or +HH:MM "
                              "(RFC 3339), e.g. 2026-11-23T20:00:00Z")
        parsed = parsed.replace(tzinfo=dt.UTC)
    return parsed.timestamp()


def check_window(from_ts: float | None, until_ts: float | None) -> None:
    """Raises: ReplayError when ``--from`` is not before ``--until``."""
    if from_ts is not None and until_ts is not None and from_ts >= until_ts:
        raise ReplayError("--from must be before --until: the window "
                          f"{_show(from_ts)} .. {_show(until_ts)} selects nothing")


def _show(ts: float) -> str:
    return dt.datetime.fromtimestamp(ts, dt.UTC).isoformat().replace("+00:00", "Z")


@dataclass
class Selection:
    """What a replay will publish: the records and an upper bound of their number."""

    records: Iterator[Record]
    estimate: int
    segments: int


def select(store: str, stream: str, from_ts: float | None, until_ts: float | None,
           endpoint_url: str | None = None) -> Selection:
    """Find ``stream``'s archive under ``store`` and the segments of the window; the
    records come each id once (see ``archive.select``).

    Raises:
        ReplayError: no archive, or the store cannot be read.
    """
    check_window(from_ts, until_ts)
    try:
        index = ArchiveIndex.load(store, stream, endpoint_url=endpoint_url)
        records = archive.select(store, stream, from_ts, until_ts, endpoint_url=endpoint_url,
                                 index=index)
    except archive.NoArchiveError:
        raise ReplayError(f"stream {stream!r} has no archive under {store}: archive it with "
                          f"`streamboss archive-stream {stream}` (or pass --store where its "
                          "archive lives)") from None
    except (ArchiveError, objects.ObjectStoreError) as exc:
        raise ReplayError(str(exc)) from None
    segments = index.segments_for(from_ts, until_ts)
    return Selection(records, sum(s.count for s in segments), len(segments))


def to_message(record: Record, source_stream: str) -> tuple[bytes, pika.BasicProperties]:
    """The message a record becomes on replay."""
    headers = dict(record.headers)
    headers[REPLAYED_FROM] = source_stream
    properties = dict(record.properties)
    properties.setdefault("delivery_mode", PERSISTENT)
    return record.body, pika.BasicProperties(headers=headers, **properties)
