"""One input message on its way through the agent."""

from __future__ import annotations

from dataclasses import dataclass

import pika


@dataclass(slots=True, eq=False)
class Delivery:
    """An input message and what the agent knows of its handling.

    ``epoch`` numbers the broker connection it arrived on: a delivery tag is
    only meaningful on that connection, so work finished for an older epoch
    is dropped (the broker has already redelivered the message).
    ``attempt`` is this attempt's number (attempts used before it, plus one);
    ``solo`` says it came from the solo queue.
    """

    tag: int
    epoch: int
    body: bytes
    properties: pika.BasicProperties
    parent: str | None
    attempt: int = 1
    solo: bool = False
