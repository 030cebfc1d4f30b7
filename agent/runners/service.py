"""``service`` mode: one long-running child fed a pipelined window of framed records.

Records are written to the child's stdin as soon as they arrive and its
answers are matched to them in order, so the child is never idle waiting for
a round trip. All pipe I/O is non-blocking on the agent's own loop: no thread
hand-offs on the hot path.

When the child dies or overruns the timeout, the oldest unanswered record
fails (a child answers in order, so that is the record it was working on: the
agent retries or dead-letters it), the child is restarted with backoff and
every other unanswered record is fed to the new child.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import subprocess
import time
from collections import deque

from .. import retry
from ..config import ProcessDefinition
from ..delivery import Delivery
from ..framing import Decoder, FramingError, encode
from ..headers import object_reference
from ..process import StderrTail, child_env, exit_reason, kill_group, spawn
from . import Outcomes

log = logging.getLogger(__name__)

READ_SIZE = 256 * 1024
# Restart backoff: quick for a one-off crash, slow for a child that cannot start.
RESTART_DELAY = 0.1
RESTART_DELAY_MAX = 10.0
# How long a child that closed stdout may take to exit before it is killed.
EXIT_GRACE = 2.0


class ServiceRunner:
    """Keeps one child running and matches its output records to input records."""

    def __init__(self, definition: ProcessDefinition, outcomes: Outcomes, label: str) -> None:
        self.definition = definition
        self.outcomes = outcomes
        self.ioloop = outcomes.ioloop
        self.label = label
        self._argv = definition.argv
        self._env = child_env(definition)
        self._child: subprocess.Popen[bytes] | None = None
        self._inflight: deque[Delivery] = deque()
        self._pending_write = bytearray()
        self._decoder = Decoder(definition.out_framing)
        self._stderr = StderrTail(label)
        self._head_since = time.monotonic()
        self._restart_delay = RESTART_DELAY
        self._restart_timer: object | None = None
        self._stopped = False
        self._killed_for_timeout = False
        self._open_fds: set[int] = set()
        self._want_write = False
        self._write_scheduled = False
        self._watchdog: object | None = None

    # -- public -------------------------------------------------------------

    def start(self) -> None:
        self._spawn()
        if self.definition.timeout:
            self._watchdog = self.ioloop.call_later(self._watch_interval(), self._check_timeout)

    def submit(self, delivery: Delivery) -> None:
        if object_reference(delivery.properties):
            self.outcomes.dead_letter(
                delivery, retry.BAD_INPUT,
                "object references are resolved in per-message mode only", None, "")
            return
        try:
            frame = encode(self.definition.framing, delivery.body)
        except FramingError as exc:
            self.outcomes.dead_letter(delivery, retry.BAD_INPUT, str(exc), None, "")
            return
        if not self._inflight:
            self._head_since = time.monotonic()
        self._inflight.append(delivery)
        if self._child is not None:
            self._pending_write += frame
            if not self._write_scheduled:
                # Deliveries come in bursts from one socket read: one write per loop
                # turn carries the whole burst to the child.
                self._write_scheduled = True
                self.ioloop.call_later(0, self._scheduled_write)

    def reset(self) -> None:
        """The connection is gone: its deliveries are the broker's again. The child may
        be half way through them, and its answers would be matched to the records of
        the next connection, so it is replaced."""
        self._inflight.clear()
        self._pending_write.clear()
        child = self._child
        if child is None:
            return  # a restart is already scheduled
        log.info("%s: connection lost; restarting the service process", self.label)
        kill_group(child)
        self._close_fds()
        child.wait()
        self._child = None
        self._stderr.flush()
        self._spawn()

    def stop(self) -> None:
        self._stopped = True
        if self._watchdog is not None:
            self.ioloop.remove_timeout(self._watchdog)
        if self._restart_timer is not None:
            self.ioloop.remove_timeout(self._restart_timer)
        child = self._child
        if child is None:
            return
        self._close_fds()
        try:
            child.wait(timeout=EXIT_GRACE)
        except subprocess.TimeoutExpired:
            kill_group(child)
            child.wait()
        self._child = None

    # -- child life cycle ---------------------------------------------------

    def _spawn(self) -> None:
        self._restart_timer = None
        if self._stopped:
            return
        try:
            child = spawn(self._argv, self._env)
        except Exception as exc:
            # OSError: the program went missing; anything else is ours. Either way the
            # record at the head is charged, so records cannot wait on it for ever.
            unexpected = not isinstance(exc, OSError)
            detail = f"cannot start {self._argv[0]}: " + (
                f"{type(exc).__name__}: {exc}" if unexpected else str(exc.strerror))
            log.error("%s: %s", self.label, detail, exc_info=unexpected)
            if self._inflight:
                self.outcomes.fail(self._inflight.popleft(),
                                   retry.UNEXPECTED if unexpected else retry.PROGRAM_FAILED,
                                   detail, None, "")
            self._schedule_restart()
            return
        log.info("%s: started service process %d", self.label, child.pid)
        self._child = child
        self._decoder.reset()
        self._stderr.clear()
        self._killed_for_timeout = False
        self._want_write = False
        assert child.stdin and child.stdout and child.stderr
        for stream, handler, events in (
            (child.stdin, self._on_stdin, 0),
            (child.stdout, self._on_stdout, self.ioloop.READ),
            (child.stderr, self._on_stderr, self.ioloop.READ),
        ):
            fd = stream.fileno()
            os.set_blocking(fd, False)
            self.ioloop.add_handler(fd, handler, events)
            self._open_fds.add(fd)
        # Records that outlived the previous child go to this one, in order.
        self._pending_write = bytearray()
        for delivery in self._inflight:
            self._pending_write += encode(self.definition.framing, delivery.body)
        self._head_since = time.monotonic()
        self._write()

    def _schedule_restart(self) -> None:
        if self._stopped:
            return
        delay = self._restart_delay
        self._restart_delay = min(delay * 2, RESTART_DELAY_MAX)
        log.warning("%s: restarting the service process in %.1fs", self.label, delay)
        self._restart_timer = self.ioloop.call_later(delay, self._spawn)

    def _close_fds(self) -> None:
        child = self._child
        if child is None:
            return
        for stream in (child.stdin, child.stdout, child.stderr):
            if stream is None:
                continue
            fd = stream.fileno() if not stream.closed else -1
            if fd in self._open_fds:
                self.ioloop.remove_handler(fd)
                self._open_fds.discard(fd)
            with contextlib.suppress(OSError):
                stream.close()

    def _on_child_gone(self) -> None:
        """stdout reached EOF: collect the exit status, charge the head record, restart."""
        child = self._child
        assert child is not None
        # EOF on stdin lets a child that only closed stdout finish exiting.
        assert child.stdin is not None
        stdin_fd = child.stdin.fileno()
        if stdin_fd in self._open_fds:
            self.ioloop.remove_handler(stdin_fd)
            self._open_fds.discard(stdin_fd)
        with contextlib.suppress(OSError):
            child.stdin.close()
        deadline = time.monotonic() + EXIT_GRACE
        while child.poll() is None and time.monotonic() < deadline:
            time.sleep(0.005)
        if child.poll() is None:
            kill_group(child)
            child.wait()
        # Its last words (often a traceback) may still sit unread in the stderr
        # pipe when stdout's EOF is handled first; keep them for the log and the
        # dead letter before the pipe is closed.
        self._drain_stderr(child)
        self._close_fds()
        self._child = None
        self._stderr.flush()
        if self._stopped:
            return
        if self._killed_for_timeout:
            path, reason = retry.TIMED_OUT, f"timed out after {self.definition.timeout:g}s"
            code = None
        else:
            path, reason = retry.PROGRAM_FAILED, f"service process {exit_reason(child.returncode)}"
            code = child.returncode
        log.warning("%s: service process %d %s with %d record(s) unanswered", self.label,
                    child.pid, reason, len(self._inflight))
        if self._inflight:
            self.outcomes.fail(self._inflight.popleft(), path, reason, code, self._stderr.text())
        self._schedule_restart()

    def _drain_stderr(self, child: subprocess.Popen[bytes]) -> None:
        """Feed whatever is readable on ``child``'s stderr now, without blocking."""
        stream = child.stderr
        if stream is None or stream.closed or stream.fileno() not in self._open_fds:
            return
        fd = stream.fileno()
        while True:
            try:
                chunk = os.read(fd, READ_SIZE)
            except OSError:  # BlockingIOError: nothing more for now
                return
            if not chunk:
                return
            self._stderr.feed(chunk)

    def _check_timeout(self) -> None:
        self._watchdog = self.ioloop.call_later(self._watch_interval(), self._check_timeout)
        timeout = self.definition.timeout
        if (self._child is not None and self._inflight and timeout
                and time.monotonic() - self._head_since > timeout):
            log.warning("%s: no answer for %.1fs; killing the service process", self.label,
                        time.monotonic() - self._head_since)
            self._killed_for_timeout = True
            kill_group(self._child)

    def _watch_interval(self) -> float:
        return min(max((self.definition.timeout or 1.0) / 4, 0.05), 1.0)

    # -- pipes --------------------------------------------------------------

    def _write(self) -> None:
        child = self._child
        if child is None or not self._pending_write:
            return
        assert child.stdin is not None
        fd = child.stdin.fileno()
        try:
            written = os.write(fd, self._pending_write)
        except BlockingIOError:
            written = 0
        except OSError as exc:
            if exc.errno != errno.EPIPE:
                raise
            # The child is going away; its stdout EOF will tell us.
            self._pending_write.clear()
            if self._want_write:
                self._want_write = False
                self.ioloop.update_handler(fd, 0)
            return
        del self._pending_write[:written]
        want_write = bool(self._pending_write)
        if want_write != self._want_write:
            # Only a full pipe needs the loop's help; most writes go through at once.
            self._want_write = want_write
            self.ioloop.update_handler(fd, self.ioloop.WRITE if want_write else 0)

    def _scheduled_write(self) -> None:
        self._write_scheduled = False
        self._write()

    def _on_stdin(self, _fd: int, _events: int) -> None:
        self._write()

    def _on_stdout(self, fd: int, _events: int) -> None:
        try:
            chunk = os.read(fd, READ_SIZE)
        except BlockingIOError:
            return
        if not chunk:
            self._on_child_gone()
            return
        try:
            records = self._decoder.feed(chunk)
        except FramingError as exc:
            log.error("%s: service process wrote a corrupt record (%s); restarting it",
                      self.label, exc)
            assert self._child is not None
            kill_group(self._child)
            return
        if not records:
            return
        inflight = self._inflight
        emit = self.outcomes.emit
        for record in records:
            if not inflight:
                log.error("%s: service process wrote a record nobody asked for; dropped",
                          self.label)
                continue
            emit(inflight.popleft(), record)
        self._head_since = time.monotonic()
        self._restart_delay = RESTART_DELAY

    def _on_stderr(self, fd: int, _events: int) -> None:
        try:
            chunk = os.read(fd, READ_SIZE)
        except BlockingIOError:
            return
        if not chunk:
            self.ioloop.remove_handler(fd)
            self._open_fds.discard(fd)
            return
        self._stderr.feed(chunk)

    @property
    def inflight(self) -> int:
        return len(self._inflight)
