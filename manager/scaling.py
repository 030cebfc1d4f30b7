"""Phantom-style scaling: how many agents an operation should have right now.

Pure functions over observed numbers, so the policy can be tested without a
broker: demand gates everything, the backlog sets the count between min and
max, cooldowns damp the changes and ``idle_seconds`` delays scale to zero.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from .model import ScalingPolicy


@dataclass
class ScaleState:
    """What the reconciler remembers about one operation between passes."""

    desired: int = 0
    last_wanted: float = float("-inf")
    last_scale_out: float = float("-inf")
    last_scale_in: float = float("-inf")


def decide(policy: ScalingPolicy, state: ScaleState, wanted: bool, backlog: int,
           now: float) -> int:
    """Return the agent count for this pass and update ``state``.

    Parameters:
        policy: the operation's scaling policy.
        state: the operation's memory; ``desired`` is the current target.
        wanted: whether the operation's output has a subscriber now.
        backlog: messages the operation has still to finish: waiting plus delivered
            to its agents and not yet acknowledged, so agents busy with
            messages are not scaled in from under them.
        now: a monotonic clock reading.
    """
    current = state.desired
    if wanted:
        state.last_wanted = now
        by_backlog = math.ceil(backlog / policy.target_backlog_per_agent)
        target = min(policy.max, max(policy.min, 1, by_backlog))
    elif now - state.last_wanted >= policy.idle_seconds:
        target = 0
    else:
        # Recently wanted: keep the agents warm until the idle period ends.
        target = current
    if target > current:
        # Waking from zero is what a new consumer waits for: no cooldown there.
        if current > 0 and now - state.last_scale_out < policy.scale_out_cooldown:
            return current
        state.last_scale_out = now
    elif target < current:
        if target > 0 and (now - state.last_scale_in < policy.scale_in_cooldown
                           or now - state.last_scale_out < policy.scale_in_cooldown):
            return current
        state.last_scale_in = now
    state.desired = target
    return target
