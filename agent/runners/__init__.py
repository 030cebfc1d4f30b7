"""Process runners: how an operation's program turns input records into output records."""

from __future__ import annotations

from typing import Any, Protocol

from pika.adapters.select_connection import IOLoop

from ..delivery import Delivery


class Outcomes(Protocol):
    """What a runner reports back; every call happens on the agent's loop thread."""

    ioloop: IOLoop

    def emit(self, delivery: Delivery, body: bytes,
             headers: dict[str, Any] | None = None) -> None:
        """The program turned ``delivery`` into ``body`` (empty: no output); ``headers``
        are added to the output's own (an object reference's, say)."""

    def dead_letter(self, delivery: Delivery, reason: str, exit_code: int | None,
                    stderr: str) -> None:
        """Give up on ``delivery`` after its attempts; ``delivery.attempts`` says how many."""

    def requeue(self, delivery: Delivery) -> None:
        """Hand ``delivery`` back to the broker untouched (the agent, not the message, failed)."""


class Runner(Protocol):
    def start(self) -> None:
        """Start whatever must run before the first record."""

    def submit(self, delivery: Delivery) -> None:
        """Feed one record; its outcome is reported later through :class:`Outcomes`."""

    def stop(self) -> None:
        """Stop all children; called once nothing is in flight, or on a hard exit."""
