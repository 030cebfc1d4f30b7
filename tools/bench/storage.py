"""Object storage, archive and replay figures, each against a plain baseline in the same run.

``objects``: a file's round trip through the claim-check path (``objects.put`` as
``stream-file`` uploads it: streamed, hashed, multipart; then ``objects.iter_chunks``
with the sha256 check, as an agent reads it) against raw boto3 ``upload_file`` +
``download_fileobj`` of the same file on the same endpoint: a moto S3 server in its
own process on loopback. Rounds alternate which goes first; medians.

``rss``: peak RSS (``VmHWM``, the process alone, polled every 10 ms) of ``streamboss
stream-file`` streaming a large file (1 GiB; ``--quick`` 256 MiB) to a ``file://``
store and to the moto server, and of a per-message agent streaming the referenced
object into ``sha256sum``.

``archive``: N messages (100-byte bodies, the agent's header set) published to a
stream whose archive subscription exists; the ingest rate is a plain pika
async-confirm publisher's. Then an archiver (``python -m streamboss.manager.archiver``,
its own process, ``file://`` store, 1 s segments) drains that backlog; its rate is N
over archiver process start -> the index holding all N (start-up included, nothing
subtracted; the index is polled every 20 ms).

``replay``: those N archived records replayed onto another stream (in process:
``replay.select`` + ``ConfirmedPublisher``) against the plain publisher sending the
same N prepared messages; both until the broker confirmed the last one.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections import deque
from pathlib import Path
from typing import Any

import pika
import pika.channel
import pika.frame
from pika.adapters.select_connection import IOLoop

from tools.bench.probe import Admin
from tools.bench.relays import agent_like_properties, body, parameters

KEYS = ("objects", "rss", "archive", "replay")
PYTHON = sys.executable
MIB = 1024 * 1024
# Round-trip file: big enough for multipart on both sides, small enough for moto's memory.
OBJECT_SIZE = 256 * MIB
OBJECT_SIZE_QUICK = 64 * MIB
RSS_SIZE = 1024 * MIB
RSS_SIZE_QUICK = 256 * MIB
ARCHIVE_N = 100_000
ARCHIVE_N_QUICK = 20_000
# Plain publisher window: the same as ConfirmedPublisher's default.
WINDOW = 1000
# Bounds that keep a broken run from hanging the bench; not speed claims.
WAIT_TIMEOUT = 600.0


def progress(text: str) -> None:
    print(f"[bench] {text}", file=sys.stderr, flush=True)


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def moto_server(log_dir: Path) -> Any:
    """A moto S3 server in its own process; yields its endpoint URL."""
    import httpx

    port = free_port()
    log = (log_dir / "moto.log").open("ab")
    process = subprocess.Popen([PYTHON, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                               stdout=log, stderr=log, stdin=subprocess.DEVNULL)
    endpoint = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                httpx.get(endpoint, timeout=1)
                break
            except httpx.HTTPError:
                if time.monotonic() > deadline or process.poll() is not None:
                    raise RuntimeError(f"moto server did not start; see {log.name}") from None
                time.sleep(0.1)
        yield endpoint
    finally:
        process.terminate()
        process.wait(timeout=30)
        log.close()


AWS_ENV = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
           "AWS_DEFAULT_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true"}


def random_file(path: Path, size: int) -> str:
    digest = hashlib.sha256()
    chunk = os.urandom(MIB)
    with path.open("wb") as out:
        for index in range(size // MIB):
            # Distinct chunks, cheaply: a counter in front of one random MiB.
            piece = index.to_bytes(8, "big") + chunk[8:]
            digest.update(piece)
            out.write(piece)
    return digest.hexdigest()


# -- objects ------------------------------------------------------------------------


class _Discard:
    """A file that keeps nothing: raw boto3 downloads and checks nothing."""

    def write(self, data: bytes) -> int:
        return len(data)


def objects_round_trip(endpoint: str, log_dir: Path, size: int, rounds: int) -> dict[str, Any]:
    import boto3

    from streamboss.agent import objects

    client = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")
    bucket = f"bench-{uuid.uuid4().hex[:8]}"
    client.create_bucket(Bucket=bucket)
    path = log_dir / "object.bin"
    expected = random_file(path, size)

    def raw(key: str) -> float:
        started = time.perf_counter()
        client.upload_file(str(path), bucket, key)
        client.download_fileobj(bucket, key, _Discard())
        return time.perf_counter() - started

    def ours(key: str) -> float:
        url = f"s3://{bucket}/{key}"
        started = time.perf_counter()
        with path.open("rb") as source:
            info = objects.put(url, source, "application/octet-stream", endpoint_url=endpoint)
        digest = hashlib.sha256()
        for chunk in objects.iter_chunks(url, endpoint_url=endpoint):
            digest.update(chunk)
        elapsed = time.perf_counter() - started
        assert info.sha256 == expected == digest.hexdigest(), "round trip changed the bytes"
        return elapsed

    raw_s: list[float] = []
    ours_s: list[float] = []
    for round_no in range(rounds):
        order = (raw, ours) if round_no % 2 == 0 else (ours, raw)
        for run in order:
            elapsed = run(f"r{round_no}-{run.__name__}")
            (raw_s if run is raw else ours_s).append(elapsed)
    path.unlink()
    raw_med, ours_med = statistics.median(raw_s), statistics.median(ours_s)
    return {"size": size, "raw_s": raw_s, "ours_s": ours_s,
            "raw_mb_s": size / MIB / raw_med, "ours_mb_s": size / MIB / ours_med,
            "ratio": raw_med / ours_med}


# -- rss ------------------------------------------------------------------------------


def _peak_rss_mb(process: subprocess.Popen[bytes], timeout: float = WAIT_TIMEOUT
                 ) -> tuple[int, float]:
    """Wait for ``process``; its exit code and its own peak RSS in MB (10^6 bytes).

    ``VmHWM`` from /proc, polled until the process exits: ``wait4``'s ``ru_maxrss``
    would count the pages the child shared with this (large) parent before exec.
    """
    peak_kb = 0
    deadline = time.monotonic() + timeout
    while process.poll() is None:
        with contextlib.suppress(OSError, ValueError):
            for line in Path(f"/proc/{process.pid}/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    peak_kb = max(peak_kb, int(line.split()[1]))
        if time.monotonic() > deadline:
            process.kill()
        time.sleep(0.01)
    return process.returncode, peak_kb * 1024 / 1e6


def peak_rss(url: str, admin: Admin, endpoint: str | None, log_dir: Path, size: int,
             store: str) -> dict[str, Any]:
    """stream-file of a ``size`` file into a per-message sha256sum agent: both peaks."""
    run = uuid.uuid4().hex[:6]
    source, sink, operation = f"bench-rss-{run}-in", f"bench-rss-{run}-out", f"bench-rss-{run}"
    ch = admin.channel
    for stream in (source, sink):
        ch.exchange_declare(f"sb.stream.{stream}", exchange_type="topic", durable=True)
    capture = f"bench-rss-{run}-capture"
    ch.queue_declare(capture, durable=True)
    ch.queue_bind(capture, f"sb.stream.{sink}", routing_key="#")
    # The agent reads references only inside its object store: the one uploaded to.
    env = {**os.environ, **AWS_ENV, "STREAMBOSS_BROKER_URL": url,
           "STREAMBOSS_OBJECT_STORE": store}
    if endpoint:
        env["STREAMBOSS_S3_ENDPOINT_URL"] = endpoint
    path = log_dir / "rss.bin"
    expected = random_file(path, size)
    agent_log = (log_dir / f"rss-agent-{run}.log").open("ab")
    agent = subprocess.Popen(
        [PYTHON, "-m", "streamboss.agent", "--operation", operation, "--input", source,
         "--output", sink, "--exec", "sha256sum"],
        env=env, stdout=agent_log, stderr=agent_log, stdin=subprocess.DEVNULL)
    try:
        time.sleep(1.0)  # the agent declares its queue before the reference is published
        started = time.perf_counter()
        uploader = subprocess.Popen(
            [PYTHON, "-m", "streamboss.manager", "stream-file", source, str(path), "--store",
             store], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
            stdin=subprocess.DEVNULL)
        code, upload_mb = _peak_rss_mb(uploader)
        uploaded_s = time.perf_counter() - started
        if code != 0:
            raise RuntimeError(f"stream-file failed: {uploader.stderr.read().decode()[-300:]}")
        deadline = time.monotonic() + WAIT_TIMEOUT
        result = None
        while result is None:
            method, _props, data = ch.basic_get(capture, auto_ack=True)
            if method is not None:
                result = data
            elif time.monotonic() > deadline:
                raise RuntimeError("the agent produced no digest")
            else:
                time.sleep(0.05)
        done_s = time.perf_counter() - started
        if result.split()[0].decode() != expected:
            raise RuntimeError("the agent's digest does not match the file")
        agent.terminate()
        _code, agent_mb = _peak_rss_mb(agent)
    finally:
        if agent.returncode is None:
            agent.kill()
            agent.wait()
        agent_log.close()
        path.unlink(missing_ok=True)
        ch.queue_delete(capture)
        ch.queue_delete(f"sb.op.{operation}")
        for stream in (source, sink, f"{operation}.dead"):
            ch.exchange_delete(f"sb.stream.{stream}")
    return {"size": size, "store": store.split(":")[0], "uploader_mb": upload_mb,
            "agent_mb": agent_mb, "upload_s": uploaded_s, "end_to_end_s": done_s}


# -- publishing baseline ---------------------------------------------------------------


def plain_publish(url: str, exchange: str, messages: list[tuple[bytes, pika.BasicProperties]]
                  ) -> float:
    """A plain pika async-confirm publisher (window WINDOW); seconds until the last confirm."""
    ioloop = IOLoop()
    state: dict[str, Any] = {"sent": 0, "confirmed": 0, "channel": None, "start": 0.0,
                             "end": 0.0}
    outstanding: deque[int] = deque()

    def pump() -> None:
        channel = state["channel"]
        while state["sent"] < len(messages) and len(outstanding) < WINDOW:
            data, props = messages[state["sent"]]
            channel.basic_publish(exchange, "", data, props)
            state["sent"] += 1
            outstanding.append(state["sent"])

    def on_confirm(frame: pika.frame.Method) -> None:
        tag, multiple = frame.method.delivery_tag, frame.method.multiple
        while outstanding and (outstanding[0] <= tag if multiple else outstanding[0] == tag):
            outstanding.popleft()
            state["confirmed"] += 1
        if state["confirmed"] == len(messages):
            state["end"] = time.perf_counter()
            connection.close()
        else:
            pump()

    def on_channel(channel: pika.channel.Channel) -> None:
        state["channel"] = channel
        channel.confirm_delivery(ack_nack_callback=on_confirm, callback=lambda _f: start())

    def start() -> None:
        state["start"] = time.perf_counter()
        pump()

    connection = pika.SelectConnection(
        parameters(url), on_open_callback=lambda c: c.channel(on_open_callback=on_channel),
        on_close_callback=lambda _c, _r: ioloop.stop(), custom_ioloop=ioloop)
    ioloop.start()
    ioloop.close()
    if state["confirmed"] != len(messages):
        raise RuntimeError(f"plain publisher: {state['confirmed']} of {len(messages)} confirmed")
    return state["end"] - state["start"]


def prepared(exchange: str, n: int) -> list[tuple[bytes, pika.BasicProperties]]:
    build = agent_like_properties(exchange)
    return [(body(i), build()) for i in range(n)]


def queue_depth(admin: Admin, queue: str) -> int:
    return admin.channel.queue_declare(queue, passive=True).method.message_count


# -- archive and replay ---------------------------------------------------------------


def archive_and_replay(url: str, admin: Admin, log_dir: Path, n: int, keys: set[str]
                       ) -> dict[str, Any]:
    from streamboss.agent.archive import ArchiveIndex
    from streamboss.manager.publisher import ConfirmedPublisher
    from streamboss.manager.replay import select, to_message

    run = uuid.uuid4().hex[:6]
    stream, target = f"bench-arc-{run}", f"bench-arc-{run}-replayed"
    queue, capture = f"sb.sub.archive.{stream}", f"bench-arc-{run}-capture"
    store = f"file://{log_dir / 'archive'}"
    ch = admin.channel
    for name in (stream, target):
        ch.exchange_declare(f"sb.stream.{name}", exchange_type="topic", durable=True)
    ch.queue_declare(queue, durable=True)
    ch.queue_bind(queue, f"sb.stream.{stream}", routing_key="#")
    ch.queue_declare(capture, durable=True)
    ch.queue_bind(capture, f"sb.stream.{target}", routing_key="#")
    figures: dict[str, Any] = {"n": n}
    try:
        messages = prepared(f"sb.stream.{stream}", n)
        ingest_s = plain_publish(url, f"sb.stream.{stream}", messages)
        figures["ingest_rate"] = n / ingest_s
        progress(f"archive: {n:,} messages ingested at {n / ingest_s:,.0f} msg/s")
        time.sleep(2.0)  # let the broker settle
        log = (log_dir / f"archiver-{run}.log").open("ab")
        env = {**os.environ, "STREAMBOSS_BROKER_URL": url}
        started = time.perf_counter()
        archiver = subprocess.Popen(
            [PYTHON, "-m", "streamboss.manager.archiver", "--stream", stream, "--store", store,
             "--segment-seconds", "1"], env=env, stdout=log, stderr=log,
            stdin=subprocess.DEVNULL)
        try:
            deadline = time.monotonic() + WAIT_TIMEOUT
            stored = 0
            while stored < n:
                if time.monotonic() > deadline or archiver.poll() is not None:
                    raise RuntimeError(f"archiver stored {stored} of {n}; see {log.name}")
                time.sleep(0.02)
                segments = ArchiveIndex.load(store, stream).segments
                stored = sum(s.count for s in segments)
            archive_s = time.perf_counter() - started
        finally:
            archiver.terminate()
            archiver.wait(timeout=60)
            log.close()
        segments = ArchiveIndex.load(store, stream).segments
        figures.update(
            archive_rate=n / archive_s, archive_vs_ingest=ingest_s / archive_s,
            segments=len(segments),
            compression=sum(s.uncompressed_size for s in segments)
            / max(1, sum(s.size for s in segments)))
        progress(f"archive: drained at {n / archive_s:,.0f} msg/s into {len(segments)} "
                 "segment(s)")
        if "replay" in keys:
            replay_s: list[float] = []
            raw_s: list[float] = []
            plain = prepared(f"sb.stream.{target}", n)
            for round_no in range(2):
                for which in (("raw", "replay") if round_no % 2 == 0 else ("replay", "raw")):
                    ch.queue_purge(capture)
                    time.sleep(1.0)
                    if which == "raw":
                        raw_s.append(plain_publish(url, f"sb.stream.{target}", plain))
                    else:
                        begun = time.perf_counter()
                        selection = select(store, stream, None, None)
                        count = ConfirmedPublisher(url, target).run(
                            to_message(r, stream) for r in selection.records)
                        replay_s.append(time.perf_counter() - begun)
                        if count != n:
                            raise RuntimeError(f"replay published {count} of {n}")
                    if queue_depth(admin, capture) != n:
                        raise RuntimeError(f"{which}: the capture queue does not hold {n}")
            figures.update(replay_rate=n / statistics.median(replay_s),
                           raw_publish_rate=n / statistics.median(raw_s),
                           replay_vs_raw=statistics.median(raw_s) / statistics.median(replay_s),
                           replay_s=replay_s, raw_s=raw_s)
    finally:
        with contextlib.suppress(Exception):
            for name in (queue, capture):
                ch.queue_delete(name)
            for name in (stream, target):
                ch.exchange_delete(f"sb.stream.{name}")
    return figures


def storage(url: str, admin: Admin, keys: set[str], quick: bool, log_dir: Path
            ) -> dict[str, Any]:
    """Run the selected storage rows; a failed row is reported, not raised."""
    section: dict[str, Any] = {}
    work = Path(tempfile.mkdtemp(prefix="storage-", dir=log_dir))
    rounds = 1 if quick else 3
    if keys & {"objects", "rss"}:
        with moto_server(work) as endpoint:
            os.environ.update({k: v for k, v in AWS_ENV.items() if k not in os.environ})
            if "objects" in keys:
                size = OBJECT_SIZE_QUICK if quick else OBJECT_SIZE
                progress(f"objects: {size // MIB} MiB round trips against moto S3")
                try:
                    section["objects"] = objects_round_trip(endpoint, work, size, rounds)
                except Exception as exc:
                    section["objects"] = {"error": f"{type(exc).__name__}: {exc}"}
            if "rss" in keys:
                size = RSS_SIZE_QUICK if quick else RSS_SIZE
                section["rss"] = []
                for store in (f"file://{work / 'objects'}", None):
                    bucket = None
                    if store is None:
                        import boto3

                        bucket = f"bench-rss-{uuid.uuid4().hex[:8]}"
                        boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1"
                                     ).create_bucket(Bucket=bucket)
                        store = f"s3://{bucket}"
                    progress(f"rss: streaming {size // MIB} MiB through {store.split(':')[0]}")
                    try:
                        section["rss"].append(peak_rss(url, admin, endpoint, work, size, store))
                    except Exception as exc:
                        section["rss"].append({"store": store.split(":")[0],
                                               "error": f"{type(exc).__name__}: {exc}"})
    if keys & {"archive", "replay"}:
        n = ARCHIVE_N_QUICK if quick else ARCHIVE_N
        try:
            section["archive"] = archive_and_replay(url, admin, work, n, keys)
        except Exception as exc:
            section["archive"] = {"error": f"{type(exc).__name__}: {exc}"}
    return section
