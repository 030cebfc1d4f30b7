"""Process runners: how an operation's program turns input records into output records."""

from __future__ import annotations

from typing import Protocol

from pika.adapters.select_connection import IOLoop

from ..delivery import Delivery


class Outcomes(Protocol):
    """What a runner reports back; every call happens on the agent's loop thread.

    ``path`` is one of :data:`streamboss.agent.retry.PATHS`; ``detail`` says what
    happened on it ("exited with code 3").
    """

    ioloop: IOLoop
    # The broker connection now: work for a delivery of an older epoch is dropped
    # (the broker has taken the delivery back and will hand it out again).
    epoch: int

    def emit(self, delivery: Delivery, body: bytes) -> None:
        """The program turned ``delivery`` into ``body`` (empty: no output)."""

    def fail(self, delivery: Delivery, path: str, detail: str, exit_code: int | None,
             stderr: str) -> None:
        """This attempt failed: ``delivery`` is retried later if it has attempts left,
        else dead-lettered."""

    def dead_letter(self, delivery: Delivery, path: str, detail: str, exit_code: int | None,
                    stderr: str) -> None:
        """Give up on ``delivery`` now: retrying cannot help (a malformed record)."""


class Runner(Protocol):
    def start(self) -> None:
        """Start whatever must run before the first record."""

    def submit(self, delivery: Delivery) -> None:
        """Feed one record; its outcome is reported later through :class:`Outcomes`."""

    def reset(self) -> None:
        """The broker connection was lost: forget every delivery handed in so far."""

    def stop(self) -> None:
        """Stop all children; called once nothing is in flight, or on a hard exit."""
