"""The archiver: drains a stream's archive subscription into segments in object storage.

One archiver runs per archived stream, started and supervised by the manager's
dispatcher like an agent. It consumes ``sb.sub.archive.<stream>`` (exclusively:
the archive's index has one writer), appends each message to the current
segment, rolls the segment by size, age or record count, uploads it on a
background thread and only then acks every message it holds (one multiple-ack).
A killed archiver loses nothing: its unfinished segment was never acked, so
the broker delivers those messages again to the next one.

The broker URL comes from ``STREAMBOSS_BROKER_URL`` (never argv); S3 credentials
from the usual AWS chain and an S3-compatible endpoint from
``STREAMBOSS_S3_ENDPOINT_URL``.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from types import FrameType
from typing import Any

import click
import pika
from pika.adapters.select_connection import IOLoop

from streamboss.agent import objects
from streamboss.agent.archive import ArchiveError, ArchiveIndex, Record, SegmentWriter
from streamboss.agent.archive import record_timestamp as _record_timestamp
from streamboss.agent.broker import BrokerSession, Topology
from streamboss.agent.config import BROKER_URL_ENV, DEFAULT_BROKER_URL
from streamboss.agent.isolation import make_non_dumpable
from streamboss.agent.log_format import setup_logging
from streamboss.agent.naming import archive_queue, stream_exchange
from streamboss.agent.reconnect import EXIT_FATAL, RECONNECT_DELAY, Reconnecting

from .model import DEFAULT_SEGMENT_BYTES, DEFAULT_SEGMENT_SECONDS

log = logging.getLogger("streamboss.archiver")

# Every message of a segment stays unacked until the segment is stored, so the
# record cap is also the prefetch unit: two segments' worth lets the next one
# fill while the previous one uploads.
DEFAULT_SEGMENT_RECORDS = 20_000
# How often the age limit is checked; a segment is at most this late.
ROLL_CHECK_INTERVAL = 0.25
# SIGTERM finishes the open segment; an upload hung longer than this is abandoned
# (its messages go back to the queue).
DRAIN_TIMEOUT = 120.0
# Basic properties worth keeping for a replay. user_id (checked against the
# replaying user) and expiration (would expire on replay) are left out on purpose.
KEPT_PROPERTIES = ("content_type", "content_encoding", "delivery_mode", "priority",
                   "correlation_id", "reply_to", "message_id", "timestamp", "type", "app_id")

EXIT_OK = 0
EXIT_FAILED = 1


@dataclass(frozen=True)
class ArchiverConfig:
    """What one archiver needs; see :func:`archiver_command` for each field."""

    broker_url: str
    stream: str
    store: str
    segment_bytes: int = DEFAULT_SEGMENT_BYTES
    segment_seconds: float = DEFAULT_SEGMENT_SECONDS
    segment_records: int = DEFAULT_SEGMENT_RECORDS
    endpoint_url: str | None = None


def kept_properties(properties: pika.BasicProperties) -> dict[str, Any]:
    """The basic properties of a message that an archive keeps, when set."""
    kept = {}
    for name in KEPT_PROPERTIES:
        value = getattr(properties, name, None)
        if value is not None:
            kept[name] = value
    return kept


class Archiver(Reconnecting):
    """Consume, append, roll, store, ack; :meth:`run` returns the exit code."""

    def __init__(self, config: ArchiverConfig) -> None:
        self.config = config
        self.label = f"archive {config.stream}"
        self.program = "archiver"
        self.ioloop = IOLoop()
        exchange = stream_exchange(config.stream)
        # Only the subscription is needed: a stopped archive of a deleted stream
        # still drains what its subscription holds.
        topology = Topology(required=(), declared=(),
                            queue=archive_queue(config.stream), bind_to=exchange,
                            own_queue=False, exclusive=True)
        self.session = BrokerSession(
            config.broker_url, self.ioloop, topology, 2 * config.segment_records,
            on_ready=self._on_ready, on_message=self._on_message,
            on_confirm=lambda _seq, _multiple, _ack: None, on_lost=self._on_lost,
            on_cancelled=self._on_cancelled, connection_name="streamboss-archiver")
        # One thread: segments are stored, indexed and acked strictly in order.
        self.uploader = ThreadPoolExecutor(max_workers=1, thread_name_prefix="archive-upload")
        self.index: ArchiveIndex | None = None
        self.writer: SegmentWriter | None = None
        self.last_tag = 0
        self.epoch = 0
        self.pending = 0
        self.stored_segments = 0
        self.stored_records = 0
        self.exit_code = EXIT_OK
        self._failed: str | None = None
        self._ever_ready = False
        self._draining = False
        self._stopping = False
        self._reconnect_delay = RECONNECT_DELAY
        self._drain_timer: object | None = None

    # -- run ------------------------------------------------------------------

    def run(self) -> int:
        """Load the index, consume until SIGTERM (or a failure), return the exit code."""
        try:
            self.index = ArchiveIndex.load(self.config.store, self.config.stream,
                                           endpoint_url=self.config.endpoint_url)
        except (ArchiveError, objects.ObjectStoreError) as exc:
            print(f"archiver: error: {exc}", file=sys.stderr)
            return EXIT_FATAL
        previous = {sig: signal.signal(sig, self._on_signal)
                    for sig in (signal.SIGTERM, signal.SIGINT)}
        try:
            self.session.connect()
            self.ioloop.call_later(ROLL_CHECK_INTERVAL, self._check_age)
            self.ioloop.start()
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            self.uploader.shutdown(wait=True, cancel_futures=True)
            if self.writer is not None:
                self.writer.close()
            self.ioloop.close()
        return self.exit_code

    def _on_signal(self, _signum: int, _frame: FrameType | None) -> None:
        self.ioloop.add_callback_threadsafe(self.begin_shutdown)

    def begin_shutdown(self) -> None:
        """Stop consuming, store the open segment, ack it, exit. A second call leaves now."""
        if self._draining:
            log.warning("%s: second signal; leaving the open segment to the next archiver",
                        self.label)
            self._finish()
            return
        self._draining = True
        log.info("%s: stopping; storing the open segment first", self.label)
        if not self.session.is_open:
            self._finish()
            return
        self._drain_timer = self.ioloop.call_later(DRAIN_TIMEOUT, self._finish)
        self.session.cancel()

    def _on_cancelled(self) -> None:
        if self._draining:
            self._roll()
            self._check_drained()

    def _check_drained(self) -> None:
        if self._draining and self.writer is None and self.pending == 0:
            log.info("%s: stopped after storing %d segment(s), %d message(s)", self.label,
                     self.stored_segments, self.stored_records)
            self._finish()

    # -- broker events ------------------------------------------------------------

    def _on_ready(self) -> None:
        self._reconnect_delay = RECONNECT_DELAY
        if not self._ever_ready:
            self._ever_ready = True
            assert self.index is not None
            log.info("%s: archiving %s into %s (next segment %d)", self.label,
                     archive_queue(self.config.stream), self.config.store,
                     self.index.next_sequence)
        else:
            log.info("%s: reconnected", self.label)
        if self._draining:
            self._finish()

    def _on_lost(self, reason: str, fatal: bool) -> None:
        # The broker takes back every unacked message: the open segment and any
        # segment still uploading will be delivered again, so drop them.
        self.epoch += 1
        if self.writer is not None:
            self.writer.close()
            self.writer = None
        self.after_connection_lost(reason, fatal)

    def _on_message(self, tag: int, properties: pika.BasicProperties, body: bytes) -> None:
        if self.writer is None:
            self.writer = SegmentWriter()
        headers = properties.headers or {}
        self.writer.append(Record(_record_timestamp(headers, time.time()), headers, body,
                                  kept_properties(properties)))
        self.last_tag = tag
        if (self.writer.count >= self.config.segment_records
                or self.writer.uncompressed_size >= self.config.segment_bytes):
            self._roll()

    # -- segments -------------------------------------------------------------------

    def _check_age(self) -> None:
        if self._stopping:
            return
        writer = self.writer
        if writer is not None and writer.should_roll(self.config.segment_bytes,
                                                     self.config.segment_seconds):
            self._roll()
        self.ioloop.call_later(ROLL_CHECK_INTERVAL, self._check_age)

    def _roll(self) -> None:
        """Hand the open segment to the uploader; its messages are acked once it is stored."""
        writer, self.writer = self.writer, None
        if writer is None or writer.count == 0:
            if writer is not None:
                writer.close()
            return
        self.pending += 1
        self.uploader.submit(self._store, writer, self.last_tag, self.epoch)

    def _store(self, writer: SegmentWriter, tag: int, epoch: int) -> None:
        """On the uploader thread: upload, index, then let the loop ack."""
        index = self.index
        assert index is not None
        if self._failed is not None or epoch != self.epoch:
            # The connection that delivered these is gone: they will come again.
            writer.close()
            self.ioloop.add_callback_threadsafe(lambda: self._on_stored(None, 0, 0, epoch))
            return
        count = writer.count
        try:
            info = writer.finish(self.config.store, self.config.stream, index.next_sequence,
                                 endpoint_url=self.config.endpoint_url)
            index.add(info)
        except Exception as exc:
            # Whatever went wrong, this segment is not stored: a failure the store
            # reports (ArchiveError, ObjectStoreError, OSError) or one nobody
            # foresaw (a bug, a library's own exception). Either way the loop must
            # hear of it: an exception left in this thread's future would leave the
            # segment's messages for the next segment's multiple-ack to ack.
            known = isinstance(exc, ArchiveError | objects.ObjectStoreError | OSError)
            self._failed = str(exc) if known else f"{type(exc).__name__}: {exc}"
            writer.close()
            self.ioloop.add_callback_threadsafe(self._on_store_failed)
            return
        self.ioloop.add_callback_threadsafe(
            lambda: self._on_stored(info.url, info.sequence, count, epoch, tag))

    def _on_stored(self, url: str | None, sequence: int, count: int, epoch: int,
                   tag: int = 0) -> None:
        self.pending -= 1
        if url is not None:
            self.stored_segments += 1
            self.stored_records += count
            log.info("%s: stored segment %d (%d message(s)) at %s", self.label, sequence,
                     count, url)
            if epoch == self.epoch:
                # Every earlier delivery is in this segment or an earlier, stored one.
                self.session.ack(tag, multiple=True)
        self._check_drained()

    def _on_store_failed(self) -> None:
        # Nothing after the failed segment may be acked (a multiple-ack would cover
        # it): leave, and let the broker hand everything unacked to the next archiver.
        print(f"archiver: error: cannot store a segment of {self.config.stream!r}: "
              f"{self._failed}", file=sys.stderr)
        self.exit_code = EXIT_FAILED
        self._finish()


@click.command("archiver")
@click.option("--stream", required=True, help="The archived stream.")
@click.option("--store", required=True, metavar="URL",
              help="Archive prefix: file:///DIR or s3://BUCKET[/PREFIX].")
@click.option("--segment-bytes", type=click.IntRange(min=1), default=DEFAULT_SEGMENT_BYTES,
              show_default=True, help="Roll a segment at this many (uncompressed) bytes.")
@click.option("--segment-seconds", type=click.FloatRange(min=0.001),
              default=DEFAULT_SEGMENT_SECONDS, show_default=True,
              help="Roll a segment this long after its first message.")
@click.option("--segment-records", type=click.IntRange(min=1),
              default=DEFAULT_SEGMENT_RECORDS, show_default=True,
              help="Roll a segment at this many messages (half the unacked window).")
def archiver_command(stream: str, store: str, segment_bytes: int, segment_seconds: float,
                     segment_records: int) -> None:
    """Drain STREAM's archive subscription into segments (run by the manager)."""
    # It holds the broker URL in its environment; a program an agent runs as the
    # same user must not read it from /proc/<pid>/environ.
    make_non_dumpable()
    setup_logging()
    config = ArchiverConfig(
        broker_url=os.environ.get(BROKER_URL_ENV) or DEFAULT_BROKER_URL, stream=stream,
        store=store, segment_bytes=segment_bytes, segment_seconds=segment_seconds,
        segment_records=segment_records, endpoint_url=os.environ.get(objects.ENDPOINT_ENV))
    sys.exit(Archiver(config).run())


def main() -> None:
    from streamboss.agent.cli import run_cli

    run_cli(archiver_command, "archiver")


if __name__ == "__main__":
    main()
