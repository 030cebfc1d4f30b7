"""Definitions against the broker's consumer timeout: refuse, or lift it per queue.

RabbitMQ closes the channel of a consumer that has held one delivery
unacknowledged for longer than its ``consumer_timeout`` (30 minutes by default,
also on Amazon MQ); every delivery on that channel then goes back to the queue,
charged an attempt. How long an agent can hold a delivery follows from the
definition (see ``agent.config.delivery_hold``). RabbitMQ 3.12 and later take a
per-queue ``consumer-timeout`` policy key: there the manager sets a policy on the
operation's queues instead of refusing. Before 3.12 the timeout is node-wide
configuration that the manager cannot change, so a definition that could
outlast it is refused with one line that says what to change.
"""

from __future__ import annotations

import math
import re
from typing import Any

from streamboss.agent.config import (
    AgentConfig,
    ConfigError,
    ProcessDefinition,
    check_consumer_timeout,
    delivery_hold,
    parse_definition,
)
from streamboss.agent.naming import operation_queue, solo_queue

# The first RabbitMQ release with the `consumer-timeout` policy key.
PER_QUEUE_SINCE = (3, 12)
# The policy that lifts an operation's consumer timeout: one per operation, so
# each gets exactly what its definition needs and goes with it.
POLICY_PREFIX = "sb.consumer-timeout."
# Room above the longest hold for the ack's round trip and a loaded machine; the
# broker checks the timeout about once a minute anyway, so this costs nothing.
POLICY_MARGIN = 60.0


def per_queue_supported(version: tuple[int, ...] | None) -> bool:
    """Whether a broker of ``version`` takes a per-queue consumer timeout."""
    return version is not None and version[:2] >= PER_QUEUE_SINCE


def agent_defaults(definition: ProcessDefinition) -> tuple[int, int]:
    """(window, concurrency) of an agent the local dispatcher starts for ``definition``
    on this machine: the agent's own defaults, since definitions set no prefetch."""
    config = AgentConfig("x", "x", "x", definition)
    return config.window, config.concurrency


def refusal(definition: ProcessDefinition, limit: float) -> str | None:
    """The one-line refusal for a broker whose consumer timeout is ``limit`` seconds
    and cannot be lifted per queue; None when ``definition`` fits."""
    window, concurrency = agent_defaults(definition)
    try:
        check_consumer_timeout(definition, limit, window, concurrency)
    except ConfigError as exc:
        return str(exc)
    return None


def policy_name(operation: str) -> str:
    return POLICY_PREFIX + operation


def policy(operation: str, definition: ProcessDefinition, limit: float,
           ) -> dict[str, Any] | None:
    """The policy body that lets ``operation``'s agents hold a delivery as long as its
    definition allows, or None when the broker's own ``limit`` is enough.

    It matches the operation's input and solo queues (the ones agents consume)
    and nothing else. A definition without a timeout gets no policy: it cannot be
    given a finite one, and stays refused.
    """
    hold = delivery_hold(definition, *agent_defaults(definition))
    if hold is None or hold <= limit:
        return None
    names = "|".join(re.escape(q) for q in (operation_queue(operation), solo_queue(operation)))
    return {"pattern": f"^({names})$", "apply-to": "queues", "priority": 0,
            "definition": {"consumer-timeout": int(math.ceil(hold + POLICY_MARGIN) * 1000)}}


def parsed(body: dict[str, Any]) -> ProcessDefinition:
    """A stored definition's body as the agent will read it."""
    return parse_definition(body)
