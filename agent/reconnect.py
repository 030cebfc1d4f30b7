"""What a long-running consumer does when it stops or its broker connection goes away.

Shared by the stream agent and the archiver: conditions that retrying cannot
fix (a bad URL, refused credentials, a missing stream or queue, or any failure
before the first successful start) end the process with one line on stderr;
a connection lost while draining ends the drain (the broker has taken back
everything in flight); otherwise it reconnects with backoff.
"""

from __future__ import annotations

import logging
import sys

from pika.adapters.select_connection import IOLoop

from .broker import BrokerSession

log = logging.getLogger(__name__)

# Reconnect backoff: quick after a broker restart, gentle on a long outage.
RECONNECT_DELAY = 0.5
RECONNECT_DELAY_MAX = 30.0
EXIT_FATAL = 2


class Reconnecting:
    """Mixin: call :meth:`after_connection_lost` from the session's ``on_lost``
    once the owner has dropped what the broker took back.

    The owner provides these attributes; :meth:`_finish` closes the connection
    once (after :meth:`_before_close`, the owner's own clean-up) and so ends the loop.
    """

    program: str
    label: str
    ioloop: IOLoop
    session: BrokerSession
    exit_code: int
    _ever_ready: bool
    _draining: bool
    _stopping: bool
    _reconnect_delay: float
    _drain_timer: object | None

    def _before_close(self) -> None:
        """The owner's clean-up when it stops (its children, say)."""

    def _finish(self) -> None:
        if self._stopping:
            return
        self._stopping = True
        if self._drain_timer is not None:
            self.ioloop.remove_timeout(self._drain_timer)
        self._before_close()
        if self.session.connection is not None:
            self.session.close()
        else:
            self.ioloop.stop()

    def after_connection_lost(self, reason: str, fatal: bool) -> None:
        if self._stopping:
            self.ioloop.stop()
            return
        if fatal or not self._ever_ready:
            # Nothing has been consumed yet: a bad URL, credentials or stream is the
            # operator's to fix, and saying so now beats retrying forever.
            print(f"{self.program}: error: {reason}", file=sys.stderr)
            self.exit_code = EXIT_FATAL
            self._stopping = True
            self.ioloop.stop()
            return
        if self._draining:
            # The broker has taken back everything in flight; nothing is left to drain.
            log.warning("%s: connection lost while draining (%s)", self.label, reason)
            self._finish()
            self.ioloop.stop()
            return
        delay = self._reconnect_delay
        self._reconnect_delay = min(delay * 2, RECONNECT_DELAY_MAX)
        log.warning("%s: connection lost (%s); reconnecting in %.1fs", self.label, reason, delay)
        self.ioloop.call_later(delay, self._reconnect)

    def _reconnect(self) -> None:
        if not self._stopping:
            self.session.connect()
