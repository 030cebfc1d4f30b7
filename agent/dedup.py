"""A bounded memory of message ids, for dropping the duplicates at-least-once delivery makes.

Redelivery puts a copy of a message shortly after its original (an agent that
died before its ack, an archiver that lost its connection after storing a
segment), and deterministic output ids make a redelivered input's outputs carry
the ids they had the first time. So remembering the last N distinct ids, not
all of them, is enough to drop nearly every duplicate in constant memory.
Replay, archive readers and ``streamboss consume --dedup`` share this one.
"""

from __future__ import annotations

from collections import deque

# Replay and archive readers remember this many ids: redelivered records sit
# right after their originals, within a segment or two (a segment rolls at
# 20,000 records), and 100,000 short ids take a few MiB.
DEFAULT_WINDOW = 100_000


class SeenIds:
    """The last ``window`` distinct ids, oldest forgotten first.

    Parameters:
        window: how many distinct ids to remember; 0 remembers none, so every
            id is new.

    Raises:
        ValueError: ``window`` is negative.
    """

    def __init__(self, window: int = DEFAULT_WINDOW) -> None:
        if window < 0:
            raise ValueError(f"a window of {window} ids makes no sense: use 0 or more")
        self.window = window
        self._ids: set[str] = set()
        self._order: deque[str] = deque()

    def first_time(self, ident: str | None) -> bool:
        """True when ``ident`` is not among the remembered ids (it is remembered from
        now on); False for a duplicate. A message without an id cannot be recognised
        again, so ``None`` (or an empty id) is always new."""
        if not ident:
            return True
        if ident in self._ids:
            return False
        if self.window == 0:
            return True
        self._ids.add(ident)
        self._order.append(ident)
        if len(self._order) > self.window:
            self._ids.discard(self._order.popleft())
        return True

    def __len__(self) -> int:
        return len(self._order)
