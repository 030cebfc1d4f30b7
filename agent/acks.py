"""Acknowledgements, coalesced: one ``basic.ack(multiple)`` per settled run of deliveries.

Deliveries finish out of order (several per-message children) but
``multiple`` acks cover every lower tag, so an ack is sent only for the
longest prefix of the delivery order that is settled. Per-message ``basic.ack``
is the largest share of a relay's cost (BASELINES.md), so acks are flushed once
per loop turn rather than once per confirm.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable

from pika.adapters.select_connection import IOLoop

_ACKED = True
_REJECTED = False


class Acker:
    """Tracks delivery tags of one channel from delivery to settlement.

    Parameters:
        ioloop: where the flush is scheduled.
        send_ack: ``(tag, multiple)`` sends a ``basic.ack``.
        after_flush: called after each flush (the agent checks whether it has drained).
    """

    def __init__(self, ioloop: IOLoop, send_ack: Callable[[int, bool], None],
                 after_flush: Callable[[], None]) -> None:
        self._ioloop = ioloop
        self._send_ack = send_ack
        self._after_flush = after_flush
        self._order: deque[int] = deque()
        self._settled: dict[int, bool] = {}
        self._flush_pending = False
        self._held = False

    def hold(self) -> None:
        """Send no acks until :meth:`release`: the broker's window stays as full as it is."""
        self._held = True

    def release(self) -> None:
        self._held = False
        self._schedule()

    def received(self, tag: int) -> None:
        self._order.append(tag)

    def acked(self, tag: int) -> None:
        """``tag`` is done; its ack goes out with the next flush."""
        self._settled[tag] = _ACKED
        self._schedule()

    def rejected(self, tag: int) -> None:
        """``tag`` was nacked already; it must not hold up later acks."""
        self._settled[tag] = _REJECTED
        self._schedule()

    @property
    def outstanding(self) -> int:
        """Deliveries not yet acked or rejected on the wire."""
        return len(self._order)

    def reset(self) -> list[int]:
        """Forget everything (the channel is gone); return the unsettled tags."""
        tags = list(self._order)
        self._order.clear()
        self._settled.clear()
        self._held = False
        return tags

    def _schedule(self) -> None:
        if not self._flush_pending:
            self._flush_pending = True
            self._ioloop.call_later(0, self.flush)

    def flush(self) -> None:
        """Ack the longest settled prefix with one ``multiple`` ack, the rest one by one.

        Settled deliveries behind a slow one are acked singly rather than held:
        the broker counts them against the prefetch window until they are acked.
        """
        self._flush_pending = False
        if self._held:
            self._after_flush()
            return
        order, settled = self._order, self._settled
        last_acked = 0
        while order and order[0] in settled:
            tag = order.popleft()
            if settled.pop(tag) is _ACKED:
                last_acked = tag
        if last_acked:
            self._send_ack(last_acked, True)
        if settled:
            for tag, outcome in settled.items():
                if outcome is _ACKED:
                    self._send_ack(tag, False)
            self._order = deque(tag for tag in order if tag not in settled)
            settled.clear()
        self._after_flush()
