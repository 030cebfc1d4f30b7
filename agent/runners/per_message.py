"""``per-message`` mode: one child per message, several at once.

stdin is the body, the whole of stdout is the output, a non-zero exit is a
failure. Children run in a small thread pool because each one blocks on its
pipes; results return to the loop thread through ``add_callback_threadsafe``.
"""

from __future__ import annotations

import contextlib
import heapq
import logging
import os
import select
import subprocess
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import IO

from .. import objects, retry
from ..config import ProcessDefinition
from ..delivery import Delivery
from ..headers import object_reference
from ..object_refs import ObjectStores, OpenedObject, ReferenceRefused, open_reference
from ..process import StderrTail, child_env, exit_reason, kill_group, spawn
from . import Outcomes

log = logging.getLogger(__name__)

# Large enough to keep the pipe full, small enough that a big object never is.
FEED_CHUNK = 1024 * 1024
# How often a feeder waiting for room in a child's pipe looks whether the child is gone.
STOP_POLL_MS = 100
# How long a message waits, once its child is gone, for a feeder stuck in a store read.
FEEDER_GRACE = 5.0


@dataclass(frozen=True)
class Result:
    returncode: int
    stdout: bytes
    timed_out: bool


class Watchdog:
    """Kills children that overrun their deadline, from one thread for all of them.

    ``Popen.communicate(timeout=...)`` would do this per child, but it waits for
    the exit by polling with sleeps, which costs about a millisecond per message;
    a blocking ``communicate()`` plus this thread does not.
    """

    def __init__(self) -> None:
        self._lock = threading.Condition()
        self._deadlines: list[tuple[float, int, subprocess.Popen[bytes]]] = []
        self._expired: set[int] = set()
        self._thread: threading.Thread | None = None

    def watch(self, child: subprocess.Popen[bytes], timeout: float) -> None:
        with self._lock:
            heapq.heappush(self._deadlines, (time.monotonic() + timeout, child.pid, child))
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="watchdog", daemon=True)
                self._thread.start()
            self._lock.notify()

    def done(self, child: subprocess.Popen[bytes]) -> bool:
        """Stop watching ``child``; return whether it was killed for overrunning."""
        with self._lock:
            self._deadlines = [d for d in self._deadlines if d[2] is not child]
            heapq.heapify(self._deadlines)
            if child.pid in self._expired:
                self._expired.discard(child.pid)
                return True
            return False

    def _run(self) -> None:
        with self._lock:
            while True:
                now = time.monotonic()
                while self._deadlines and self._deadlines[0][0] <= now:
                    _, pid, child = heapq.heappop(self._deadlines)
                    self._expired.add(pid)
                    kill_group(child)
                wait = self._deadlines[0][0] - now if self._deadlines else None
                self._lock.wait(wait)


class ObjectFeed:
    """Streams a referenced object, opened inside the stores, into a child's stdin.

    The object is never whole in memory: it goes from the store to the pipe in
    chunks, capped at its declared size, and its size and digest are checked once
    it has all gone in. No read outlives the message: the pump stops as soon as
    the child stops reading (its stdin closes) or :func:`run_once` sets
    :attr:`stop` because the child is gone. A child that stopped reading early is
    judged by its exit status, as with a plain body it did not read to the end
    (``head -c 10``): what it read came from inside the stores and within the
    declared size, but the digest of the rest was never computed.
    """

    def __init__(self, opened: OpenedObject) -> None:
        self.opened = opened
        # A store failure midway: worth retrying.
        self.error: str | None = None
        # A rule the object broke while it was read (larger, smaller, another
        # digest): it never succeeds, so it is dead-lettered.
        self.refused: str | None = None
        self.stop = threading.Event()

    @property
    def url(self) -> str:
        return self.opened.reference.url

    def close(self) -> None:
        self.opened.close()

    def pump(self, stdin: IO[bytes]) -> None:
        fd = stdin.fileno()
        try:
            # Non-blocking writes with a poll between them: a child that neither
            # reads nor exits (or a grandchild holding the pipe) cannot hold this
            # thread once run_once has set stop.
            os.set_blocking(fd, False)
            for chunk in self.opened.chunks(FEED_CHUNK):
                if not self._write(fd, chunk):
                    return  # the child stopped reading: so does the feeder
        except ReferenceRefused as exc:
            self.refused = str(exc)
        except objects.ObjectStoreError as exc:
            self.error = str(exc)
        finally:
            self.close()
            with contextlib.suppress(OSError):
                stdin.close()

    def _write(self, fd: int, chunk: bytes) -> bool:
        """Write all of ``chunk``; False once the child is gone or stopped reading."""
        view = memoryview(chunk)
        poller = select.poll()
        poller.register(fd, select.POLLOUT)
        while view:
            if self.stop.is_set():
                return False
            try:
                written = os.write(fd, view)
            except BlockingIOError:
                poller.poll(STOP_POLL_MS)  # room in the pipe, or time to look at stop
                continue
            except OSError:
                return False  # EPIPE: the child closed its stdin or exited
            view = view[written:]
        return True


def run_once(argv: list[str], env: dict[str, str], body: bytes | ObjectFeed,
             timeout: float | None, stderr: StderrTail, live: set[subprocess.Popen[bytes]],
             watchdog: Watchdog) -> Result:
    """Run the program once on ``body`` (bytes, or an object streamed from storage);
    kill its process group if it overruns ``timeout``.

    The child sits in ``live`` while it runs, so that a hard stop can kill it.
    A feeder still writing when the child is gone is stopped before this returns.
    """
    try:
        child = spawn(argv, env)
    except OSError as exc:
        if isinstance(body, ObjectFeed):
            body.close()
        stderr.feed(f"cannot start {argv[0]}: {exc.strerror}\n".encode())
        return Result(127, b"", False)
    live.add(child)
    if timeout is not None:
        watchdog.watch(child, timeout)
    feeder: threading.Thread | None = None
    try:
        if isinstance(body, ObjectFeed):
            # stdin is ours to stream; communicate() then only collects the output.
            stdin, child.stdin = child.stdin, None
            assert stdin is not None
            feeder = threading.Thread(target=body.pump, args=(stdin,), daemon=True)
            feeder.start()
            out, err = child.communicate()
        else:
            out, err = child.communicate(body)
    finally:
        if feeder is not None:
            assert isinstance(body, ObjectFeed)
            body.stop.set()  # the child has exited: nothing more goes in
            feeder.join(FEEDER_GRACE)
            if feeder.is_alive():
                # Stuck in a read from the store (a file never blocks: regular files
                # only; an S3 read ends at botocore's read timeout). The message does
                # not wait for it: the read's thread closes the object when it returns.
                body.error = (f"{body.url}: the object store did not answer within "
                              f"{FEEDER_GRACE:g}s after the program ended")
        live.discard(child)
        timed_out = timeout is not None and watchdog.done(child)
    if isinstance(body, ObjectFeed) and body.refused:
        # The object was not what its reference described: what the child said
        # about it (it may echo it) is neither logged nor kept for the dead letter.
        err = b""
    stderr.feed(err)
    stderr.flush()
    return Result(child.returncode, out, timed_out)


class PerMessageRunner:
    """Runs up to ``concurrency`` children at once, one attempt per delivery.

    A failed attempt is reported, not repeated here: the agent republishes the
    message to wait out its retry delay on the broker, so a failing message
    never holds a worker.
    """

    def __init__(self, definition: ProcessDefinition, concurrency: int, outcomes: Outcomes,
                 label: str, stores: ObjectStores) -> None:
        self.definition = definition
        # Where object references may point; anything else is dead-lettered unread.
        self.stores = stores
        self.outcomes = outcomes
        self.label = label
        self._argv = definition.argv
        self._env = child_env(definition)
        self._pool = ThreadPoolExecutor(max_workers=concurrency,
                                        thread_name_prefix=f"{label}-child")
        self._live: set[subprocess.Popen[bytes]] = set()
        self._watchdog = Watchdog()

    def start(self) -> None:
        pass

    def submit(self, delivery: Delivery) -> None:
        self._pool.submit(self._guarded, delivery)

    def reset(self) -> None:
        # Queued work checks its epoch before it starts (see _guarded); children
        # already running finish and their results are dropped by the agent.
        pass

    def _guarded(self, delivery: Delivery) -> None:
        if delivery.epoch != self.outcomes.epoch:
            return  # queued under a connection that is gone: the broker has it again
        try:
            self._work(delivery)
        except Exception as exc:
            # Our fault more likely than the message's, but a message that keeps
            # triggering it must still end: it is charged an attempt like any failure.
            log.exception("%s: agent error while running a message", self.label)
            self._report(self.outcomes.fail, delivery, retry.UNEXPECTED,
                         f"{type(exc).__name__}: {exc}", None, "")

    def stop(self) -> None:
        # Called once nothing is in flight, or on a hard exit: anything still
        # running is abandoned to the broker's redelivery.
        self._pool.shutdown(wait=False, cancel_futures=True)
        for child in list(self._live):
            kill_group(child)

    def _work(self, delivery: Delivery) -> None:
        definition = self.definition
        reference = object_reference(delivery.properties)
        stderr = StderrTail(self.label)
        feed: ObjectFeed | None = None
        if reference is not None:
            try:
                feed = ObjectFeed(open_reference(reference, self.stores, require_digest=True))
            except ReferenceRefused as exc:
                # Refused before any child runs: nothing of the target can reach it.
                self._report(self.outcomes.dead_letter, delivery, retry.BAD_INPUT, str(exc),
                             None, "")
                return
            except objects.ObjectStoreError as exc:
                self._report(self.outcomes.fail, delivery, retry.OBJECT_STORE, str(exc),
                             None, "")
                return
        result = run_once(self._argv, self._env, feed or delivery.body, definition.timeout,
                          stderr, self._live, self._watchdog)
        if feed is not None:
            if feed.refused:
                # A corrupt or swapped object does not heal by retrying.
                self._report(self.outcomes.dead_letter, delivery, retry.BAD_INPUT,
                             feed.refused, None, "")
                return
            if feed.error:
                self._report(self.outcomes.fail, delivery, retry.OBJECT_STORE, feed.error,
                             None, stderr.text())
                return
        if result.returncode == 0 and not result.timed_out:
            self._report(self.outcomes.emit, delivery, result.stdout)
            return
        if result.timed_out:
            self._report(self.outcomes.fail, delivery, retry.TIMED_OUT,
                         f"timed out after {definition.timeout:g}s", None, stderr.text())
        else:
            self._report(self.outcomes.fail, delivery, retry.PROGRAM_FAILED,
                         f"program {exit_reason(result.returncode)}", result.returncode,
                         stderr.text())

    def _report(self, callback: object, *args: object) -> None:
        self.outcomes.ioloop.add_callback_threadsafe(lambda: callback(*args))  # type: ignore[operator]
