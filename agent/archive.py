"""Archive segments and their index: the on-storage format of a stream's archive.

A pure library, no broker code. The archiver feeds received messages to a
:class:`SegmentWriter`, rolls it by size or age, uploads it with
:meth:`SegmentWriter.finish` (acking the messages only after that returns) and
records it in the stream's :class:`ArchiveIndex`; a replay calls :func:`select`,
which skips a record whose id it has already given within the last
``dedup.DEFAULT_WINDOW`` ids (delivery into an archive is at-least-once).

Layout under an archive prefix (``file:///abs/dir`` or ``s3://bucket/prefix``)::

    {prefix}/{stream}/segments/{sequence:012d}.sbseg.gz
    {prefix}/{stream}/index.jsonl

Segment format
--------------
A segment is one gzip stream holding records back to back, in arrival order.
Each record is framed binary-safely as::

    uint32 big-endian  length of the header JSON
    bytes              UTF-8 JSON {"t": <timestamp float>, "h": {<headers>}}
                       (plus "p": {<other basic properties>} when any are set)
    uint32 big-endian  length of the body
    bytes              the body, verbatim

Header values that JSON cannot carry are encoded as follows (nested values
recursively), and :func:`decode_header_value` reverses it:

- ``str``, ``int``, ``float``, ``bool``, ``None``: themselves.
- ``bytes`` / ``bytearray``: ``{"$b64": "<base64>"}``, decoded back to ``bytes``.
- nested tables (``dict``): ``{"$table": {...}}``, decoded back to a ``dict``
  (keys become ``str``; the wrapper keeps a table that itself has a ``$b64`` key
  from being mistaken for bytes).
- ``list`` / ``tuple``: a JSON array, decoded to a ``list``.
- ``decimal.Decimal`` (AMQP decimals): ``{"$decimal": "<str>"}``, decoded back
  to ``Decimal``.
- ``datetime`` / ``date`` (AMQP timestamps): the ISO 8601 string; it is decoded
  as that *string*, not as a datetime (one-way, by design: a string is what a
  replayed message can carry everywhere).
- anything else: ``TypeError`` when the record is appended.

Index format
------------
``index.jsonl`` holds one JSON object per segment (the fields of
:class:`SegmentInfo`), in sequence order. It is small and rewritten whole on
each :meth:`ArchiveIndex.add`; one archiver writes a stream's index at a time.
"""

from __future__ import annotations

import base64
import contextlib
import datetime as _dt
import decimal
import gzip
import io
import json
import os
import struct
import tempfile
import time
import zlib
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass, fields
from typing import IO, Any, NamedTuple

from . import naming, objects
from .dedup import DEFAULT_WINDOW, SeenIds
from .headers import ID, PRODUCED_AT

SEGMENT_SUFFIX = ".sbseg.gz"
SEGMENT_CONTENT_TYPE = "application/gzip"
INDEX_NAME = "index.jsonl"
INDEX_CONTENT_TYPE = "application/x-ndjson"
# Header JSON larger than this is treated as corruption, not allocated.
MAX_HEADER_JSON = 64 * 1024 * 1024
# Chunk size for uploads: keeps finish() memory small (S3 raises it to 5 MiB parts).
UPLOAD_CHUNK_SIZE = 1024 * 1024
_LENGTH = struct.Struct(">I")
_MAX_FRAME = 0xFFFFFFFF
_READ_CHUNK = 1024 * 1024

HeaderValue = str | int | float | bool | None | bytes | list[Any] | dict[str, Any]


class Record(NamedTuple):
    """One archived message.

    Attributes:
        timestamp: epoch seconds (``sb-produced-at``, else arrival time).
        headers: the message headers, decoded as described in the module docs.
        body: the message body, verbatim.
        properties: the other AMQP basic properties that were set
            (``content_type``, ``message_id``, ...), by their pika names.
    """

    timestamp: float
    headers: dict[str, Any]
    body: bytes
    properties: dict[str, Any] = {}  # noqa: RUF012 - NamedTuple defaults are never mutated


class ArchiveError(Exception):
    """A problem with an archive: the message is one actionable line."""


class SegmentCorruptError(ArchiveError):
    """A segment is truncated or corrupt; the message names its URL."""

    def __init__(self, message: str, url: str) -> None:
        super().__init__(message)
        self.url = url


class NoArchiveError(ArchiveError):
    """The stream has no archive (no index, or an empty one) under the prefix."""


# ---------------------------------------------------------------- header encoding


def encode_header_value(value: Any) -> Any:
    """A JSON-serialisable form of one header value (see the module docs).

    Raises:
        TypeError: for a value of a type the format does not carry.
    """
    if value is None or isinstance(value, str | bool | int | float):
        return value
    if isinstance(value, bytes | bytearray | memoryview):
        return {"$b64": base64.b64encode(bytes(value)).decode("ascii")}
    if isinstance(value, Mapping):
        return {"$table": encode_headers(value)}
    if isinstance(value, list | tuple):
        return [encode_header_value(item) for item in value]
    if isinstance(value, decimal.Decimal):
        return {"$decimal": str(value)}
    if isinstance(value, _dt.datetime | _dt.date):
        return value.isoformat()
    raise TypeError(f"header value of type {type(value).__name__} cannot be archived")


def encode_headers(headers: Mapping[Any, Any]) -> dict[str, Any]:
    """Encode a header table; ``bytes`` keys are decoded as UTF-8."""
    out: dict[str, Any] = {}
    for key, value in headers.items():
        name = key.decode("utf-8", "replace") if isinstance(key, bytes) else str(key)
        out[name] = encode_header_value(value)
    return out


def decode_header_value(value: Any) -> Any:
    """Reverse :func:`encode_header_value` (datetimes stay ISO strings)."""
    if isinstance(value, list):
        return [decode_header_value(item) for item in value]
    if isinstance(value, dict):
        if len(value) == 1:
            if "$b64" in value:
                return base64.b64decode(value["$b64"], validate=True)
            if "$table" in value:
                return decode_headers(value["$table"])
            if "$decimal" in value:
                return decimal.Decimal(value["$decimal"])
        # Not written by this module; keep it as a plain table.
        return decode_headers(value)
    return value


def decode_headers(headers: Mapping[str, Any]) -> dict[str, Any]:
    """Reverse :func:`encode_headers`."""
    return {key: decode_header_value(value) for key, value in headers.items()}


def record_timestamp(headers: Mapping[str, Any] | None, arrival: float) -> float:
    """The archive timestamp of a message: its ``sb-produced-at``, else ``arrival``.

    ``sb-produced-at`` may be an RFC 3339 string (as streamboss writes it, in
    ``str`` or ``bytes``), a number of epoch seconds, or a ``datetime`` (naive
    means UTC); anything unparseable falls back to ``arrival``.
    """
    value = headers.get(PRODUCED_AT) if headers else None
    if isinstance(value, bytes):
        value = value.decode("utf-8", "replace")
    if isinstance(value, bool) or value is None:
        return float(arrival)
    if isinstance(value, int | float):
        return float(value)
    if isinstance(value, str):
        try:
            value = _dt.datetime.fromisoformat(value.strip())
        except ValueError:
            return float(arrival)
    if isinstance(value, _dt.datetime):
        if value.tzinfo is None:
            value = value.replace(tzinfo=_dt.UTC)
        return value.timestamp()
    return float(arrival)


def _id_of(headers: Mapping[str, Any]) -> str | None:
    value = headers.get(ID)
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    return None if value is None else str(value)


# ---------------------------------------------------------------- URLs


def _join(prefix: str, *parts: str) -> str:
    return "/".join([prefix.rstrip("/"), *parts])


def segment_url(prefix: str, stream: str, sequence: int) -> str:
    """The URL of segment ``sequence`` of ``stream`` under ``prefix``."""
    naming.check_name("stream", stream)
    if sequence < 0:
        raise ValueError(f"segment sequence must be >= 0, not {sequence}")
    return _join(prefix, stream, "segments", f"{sequence:012d}{SEGMENT_SUFFIX}")


def index_url(prefix: str, stream: str) -> str:
    """The URL of the index of ``stream`` under ``prefix``."""
    naming.check_name("stream", stream)
    return _join(prefix, stream, INDEX_NAME)


# ---------------------------------------------------------------- index entries


@dataclass(frozen=True)
class SegmentInfo:
    """One uploaded segment, as recorded in the index.

    Attributes:
        url: the segment object's URL.
        sequence: its position in the stream's archive (0, 1, 2, ...).
        count: number of records.
        first_ts / last_ts: timestamps of the first and last record.
        first_id / last_id: ``sb-id`` of the first and last record, if any.
        size: compressed size of the object in bytes.
        min_ts / max_ts: smallest and largest record timestamp (they differ from
            first/last when producers' clocks disagree); window selection uses these.
        uncompressed_size: bytes of framed records before compression.
        sha256: hex digest of the object, as stored.
    """

    url: str
    sequence: int
    count: int
    first_ts: float
    last_ts: float
    first_id: str | None
    last_id: str | None
    size: int
    min_ts: float | None = None
    max_ts: float | None = None
    uncompressed_size: int = 0
    sha256: str = ""

    @property
    def low_ts(self) -> float:
        """The earliest record timestamp in the segment."""
        return self.first_ts if self.min_ts is None else self.min_ts

    @property
    def high_ts(self) -> float:
        """The latest record timestamp in the segment."""
        return self.last_ts if self.max_ts is None else self.max_ts

    def to_json(self) -> str:
        """One index line (without the newline)."""
        return json.dumps(asdict(self), separators=(",", ":"), sort_keys=True)

    @classmethod
    def from_json(cls, line: str) -> SegmentInfo:
        """Parse one index line; unknown fields are ignored (newer writers).

        Raises:
            ValueError / KeyError / TypeError: when the line is not an entry.
        """
        data = json.loads(line)
        if not isinstance(data, dict):
            raise ValueError("an index line must be a JSON object")
        known = {f.name for f in fields(cls)}
        return cls(**{key: value for key, value in data.items() if key in known})


# ---------------------------------------------------------------- writer


class SegmentWriter:
    """Collects records, in order, into a gzip-compressed temporary file.

    Nothing but the current record is held in memory; the segment grows on
    local disk (``tempfile``, removed when the writer is finished or closed).

    Example::

        writer = SegmentWriter()
        writer.append(Record(ts, headers, body))
        if writer.should_roll(64 * 2**20, 300):
            info = writer.finish(prefix, "orders", index.next_sequence)
            index.add(info)   # then ack the messages
    """

    def __init__(self, *, compresslevel: int = 6, tmp_dir: str | None = None) -> None:
        # Lives as long as the writer; close() / finish() remove it.
        self._raw: IO[bytes] = tempfile.TemporaryFile(  # noqa: SIM115
            prefix="sbseg-", dir=tmp_dir
        )
        self._gzip = gzip.GzipFile(
            filename="", mode="wb", fileobj=self._raw, compresslevel=compresslevel, mtime=0
        )
        self._closed = False
        self.count = 0
        self.first_ts: float | None = None
        self.last_ts: float | None = None
        self.min_ts: float | None = None
        self.max_ts: float | None = None
        self.first_id: str | None = None
        self.last_id: str | None = None
        self.uncompressed_size = 0
        self.opened_at: float | None = None
        self._final_size = 0

    # -- adding

    def append(self, record: Record) -> None:
        """Add one record after the previous ones.

        Raises:
            TypeError: a header value the format cannot carry.
            ValueError: the writer is finished, or a frame exceeds 4 GiB.
        """
        if self._closed:
            raise ValueError("this segment writer is already finished or closed")
        timestamp = float(record.timestamp)
        meta: dict[str, Any] = {"t": timestamp, "h": encode_headers(record.headers)}
        if record.properties:
            meta["p"] = encode_headers(record.properties)
        header = json.dumps(meta, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
        body = bytes(record.body)
        if len(header) > MAX_HEADER_JSON or len(body) > _MAX_FRAME:
            raise ValueError("record too large for a segment frame")
        self._gzip.write(_LENGTH.pack(len(header)))
        self._gzip.write(header)
        self._gzip.write(_LENGTH.pack(len(body)))
        self._gzip.write(body)
        self.uncompressed_size += 2 * _LENGTH.size + len(header) + len(body)

        ident = _id_of(record.headers)
        if self.count == 0:
            self.opened_at = time.time()
            self.first_ts = timestamp
            self.first_id = ident
            self.min_ts = self.max_ts = timestamp
        else:
            self.min_ts = min(timestamp, self.min_ts if self.min_ts is not None else timestamp)
            self.max_ts = max(timestamp, self.max_ts if self.max_ts is not None else timestamp)
        self.last_ts = timestamp
        self.last_id = ident
        self.count += 1

    def add(self, timestamp: float, headers: Mapping[str, Any], body: bytes) -> None:
        """Shorthand for ``append(Record(timestamp, headers, body))``."""
        self.append(Record(timestamp, dict(headers), body))

    # -- state

    @property
    def compressed_size(self) -> int:
        """Compressed bytes on disk so far (exact once finished; gzip buffers a little)."""
        return self._raw.tell() if not self._raw.closed else self._final_size

    def should_roll(
        self, max_bytes: int, max_age_s: float, now: float | None = None
    ) -> bool:
        """Whether the segment should be finished now.

        True when it holds at least one record and either its uncompressed size
        has reached ``max_bytes`` or ``max_age_s`` seconds have passed (by
        ``now``, default :func:`time.time`) since its first record was appended.
        Size is measured uncompressed: deterministic, and an upper bound for the
        object's size.
        """
        if self.count == 0:
            return False
        if self.uncompressed_size >= max_bytes:
            return True
        now = time.time() if now is None else now
        return self.opened_at is not None and now - self.opened_at >= max_age_s

    # -- finishing

    def finish(
        self,
        store_url_prefix: str,
        stream: str,
        sequence: int,
        *,
        endpoint_url: str | None = None,
    ) -> SegmentInfo:
        """Complete the gzip stream, fsync it, upload it and return its index entry.

        When this returns the segment is durable in the store (``objects.put``
        fsyncs and renames a ``file://`` object; an ``s3://`` upload is complete),
        so the caller may ack the records' messages. The temporary file is
        removed whether or not the upload succeeds; on failure the caller keeps
        its messages unacked and rebuilds the segment.

        Raises:
            ValueError: the writer is empty, finished or closed; a bad stream name.
            ObjectStoreError: the upload failed.
            OSError: the local temporary file could not be completed.
        """
        if self._closed:
            raise ValueError("this segment writer is already finished or closed")
        if self.count == 0:
            raise ValueError("an empty segment cannot be finished; append records first")
        url = segment_url(store_url_prefix, stream, sequence)
        try:
            self._gzip.close()
            self._raw.flush()
            os.fsync(self._raw.fileno())
            self._final_size = self._raw.tell()
            self._raw.seek(0)
            stored = objects.put(
                url, self._raw, SEGMENT_CONTENT_TYPE,
                endpoint_url=endpoint_url, chunk_size=UPLOAD_CHUNK_SIZE,
            )
        finally:
            self.close()
        assert self.first_ts is not None and self.last_ts is not None
        return SegmentInfo(
            url=stored.url,
            sequence=sequence,
            count=self.count,
            first_ts=self.first_ts,
            last_ts=self.last_ts,
            first_id=self.first_id,
            last_id=self.last_id,
            size=stored.size,
            min_ts=self.min_ts,
            max_ts=self.max_ts,
            uncompressed_size=self.uncompressed_size,
            sha256=stored.sha256,
        )

    def close(self) -> None:
        """Discard the segment (if unfinished) and remove the temporary file."""
        if self._closed:
            return
        self._closed = True
        with contextlib.suppress(Exception):
            self._gzip.close()
        if not self._raw.closed:
            with contextlib.suppress(OSError):
                self._final_size = self._raw.seek(0, os.SEEK_END)
            self._raw.close()

    def __enter__(self) -> SegmentWriter:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


# ---------------------------------------------------------------- reader


def _read_exact(stream: IO[bytes], size: int) -> bytes:
    """Up to ``size`` bytes (fewer only at EOF), read in bounded chunks so a
    corrupt length never makes one huge allocation up front."""
    parts = []
    got = 0
    while got < size:
        chunk = stream.read(min(size - got, _READ_CHUNK))
        if not chunk:
            break
        parts.append(chunk)
        got += len(chunk)
    return parts[0] if len(parts) == 1 else b"".join(parts)


def iter_records(url: str, *, endpoint_url: str | None = None) -> Iterator[Record]:
    """Stream the records of one segment, in order.

    Raises:
        SegmentCorruptError: the segment is truncated (in the gzip stream or
            mid-record) or corrupt (bad gzip data or checksum, bad framing).
        ObjectStoreError: the object cannot be opened or read.
    """
    position = 0

    def corrupt(reason: str) -> SegmentCorruptError:
        return SegmentCorruptError(
            f"{url}: segment is truncated or corrupt after record {position}: {reason}", url
        )

    with contextlib.closing(objects.open_read(url, endpoint_url=endpoint_url)) as body, \
            gzip.GzipFile(fileobj=body, mode="rb") as stream:
        while True:
            try:
                prefix = _read_exact(stream, _LENGTH.size)
                if not prefix:
                    return
                if len(prefix) < _LENGTH.size:
                    raise corrupt("record length cut short")
                (header_len,) = _LENGTH.unpack(prefix)
                if header_len > MAX_HEADER_JSON:
                    raise corrupt(f"implausible header length {header_len}")
                header = _read_exact(stream, header_len)
                if len(header) < header_len:
                    raise corrupt("record header cut short")
                body_prefix = _read_exact(stream, _LENGTH.size)
                if len(body_prefix) < _LENGTH.size:
                    raise corrupt("body length cut short")
                (body_len,) = _LENGTH.unpack(body_prefix)
                payload = _read_exact(stream, body_len)
                if len(payload) < body_len:
                    raise corrupt("record body cut short")
            except EOFError as exc:
                raise corrupt(f"gzip stream ended early ({exc})") from exc
            except (gzip.BadGzipFile, zlib.error) as exc:
                raise corrupt(f"bad gzip data ({exc})") from exc
            try:
                meta = json.loads(header)
                timestamp = float(meta["t"])
                headers = decode_headers(meta["h"])
                properties = decode_headers(meta.get("p") or {})
            except (ValueError, KeyError, TypeError, AttributeError) as exc:
                raise corrupt(f"unreadable record header ({exc})") from exc
            yield Record(timestamp, headers, payload, properties)
            position += 1


# ---------------------------------------------------------------- index


class ArchiveIndex:
    """The ordered list of a stream's segments, stored as ``{prefix}/{stream}/index.jsonl``.

    Assumes one writer per stream; readers see either the old or the new index
    (``objects.put`` replaces it atomically).
    """

    def __init__(
        self,
        prefix: str,
        stream: str,
        segments: list[SegmentInfo] | None = None,
        *,
        endpoint_url: str | None = None,
    ) -> None:
        self.prefix = prefix
        self.stream = stream
        self.url = index_url(prefix, stream)
        self.endpoint_url = endpoint_url
        self.segments: list[SegmentInfo] = sorted(segments or [], key=lambda s: s.sequence)

    @classmethod
    def load(
        cls, prefix: str, stream: str, *, endpoint_url: str | None = None
    ) -> ArchiveIndex:
        """Read the stream's index; an absent index gives an empty one.

        Raises:
            ArchiveError: the index exists but a line is not a segment entry.
            ObjectStoreError: the store cannot be read.
        """
        index = cls(prefix, stream, endpoint_url=endpoint_url)
        if objects.stat(index.url, endpoint_url=endpoint_url) is None:
            return index
        data = b"".join(objects.iter_chunks(index.url, endpoint_url=endpoint_url))
        segments = []
        for number, line in enumerate(data.decode("utf-8").splitlines(), 1):
            if not line.strip():
                continue
            try:
                segments.append(SegmentInfo.from_json(line))
            except (ValueError, KeyError, TypeError) as exc:
                raise ArchiveError(
                    f"{index.url}: line {number} is not a segment entry ({exc})"
                ) from exc
        index.segments = sorted(segments, key=lambda s: s.sequence)
        return index

    @property
    def next_sequence(self) -> int:
        """The sequence number for the next segment."""
        return self.segments[-1].sequence + 1 if self.segments else 0

    def add(self, info: SegmentInfo) -> None:
        """Append a segment and rewrite the index in the store.

        Raises:
            ValueError: ``info.sequence`` is not after the last recorded one.
            ObjectStoreError: the index could not be written (it is unchanged,
                in the store and in memory).
        """
        if self.segments and info.sequence <= self.segments[-1].sequence:
            raise ValueError(
                f"segment {info.sequence} is not after segment "
                f"{self.segments[-1].sequence} in {self.url}"
            )
        updated = [*self.segments, info]
        text = "".join(segment.to_json() + "\n" for segment in updated)
        objects.put(
            self.url, io.BytesIO(text.encode("utf-8")), INDEX_CONTENT_TYPE,
            endpoint_url=self.endpoint_url,
        )
        self.segments = updated

    def segments_for(
        self, from_ts: float | None = None, until_ts: float | None = None
    ) -> list[SegmentInfo]:
        """Segments that may hold records with ``from_ts <= t < until_ts``, in order.

        ``None`` leaves that side of the window open.
        """
        return [
            segment
            for segment in self.segments
            if (from_ts is None or segment.high_ts >= from_ts)
            and (until_ts is None or segment.low_ts < until_ts)
        ]


# ---------------------------------------------------------------- selection


def record_id(record: Record) -> str | None:
    """A record's message id: its ``sb-id`` header, else its AMQP message-id (the
    same id ``headers.message_id`` gives a received message)."""
    value = record.headers.get(ID)
    if isinstance(value, bytes):
        value = value.decode("utf-8", "replace")
    if isinstance(value, str) and value:
        return value
    fallback = record.properties.get("message_id")
    return fallback if isinstance(fallback, str) and fallback else None


def select(
    prefix: str,
    stream: str,
    from_ts: float | None = None,
    until_ts: float | None = None,
    *,
    endpoint_url: str | None = None,
    index: ArchiveIndex | None = None,
    dedup_window: int = DEFAULT_WINDOW,
) -> Iterator[Record]:
    """The archived records of ``stream`` with ``from_ts <= t < until_ts``, in original
    order, each id once.

    Delivery into an archive is at-least-once: an archiver that lost its
    connection after storing a segment stores the redelivered messages again,
    right after. A record whose id (:func:`record_id`) is among the last
    ``dedup_window`` distinct ids given is skipped; 0 gives every stored record
    (:func:`iter_records` reads one segment as stored). Records without an id
    are always given.

    The window and the index are checked when this is called, not at the first
    record; the segments are then streamed one at a time. Pass ``index`` when it
    is loaded already.

    Raises:
        ValueError: ``from_ts`` is after ``until_ts``, or ``dedup_window`` < 0.
        NoArchiveError: the stream has no archive under ``prefix``.
        SegmentCorruptError: while iterating, a segment is truncated or corrupt.
    """
    if from_ts is not None and until_ts is not None and from_ts > until_ts:
        raise ValueError(
            f"empty time window: --from is after --until ({from_ts} > {until_ts})"
        )
    seen = SeenIds(dedup_window)
    if index is None:
        index = ArchiveIndex.load(prefix, stream, endpoint_url=endpoint_url)
    if not index.segments:
        raise NoArchiveError(
            f"stream {stream!r} has no archive under {prefix} (no segments in {index.url}); "
            "check the archive prefix and that archiving is enabled for the stream"
        )
    segments = index.segments_for(from_ts, until_ts)

    def generate() -> Iterator[Record]:
        for segment in segments:
            for record in iter_records(segment.url, endpoint_url=endpoint_url):
                if from_ts is not None and record.timestamp < from_ts:
                    continue
                if until_ts is not None and record.timestamp >= until_ts:
                    continue
                if not seen.first_time(record_id(record)):
                    continue
                yield record

    return generate()
