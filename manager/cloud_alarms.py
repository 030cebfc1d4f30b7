"""The agent pools' CloudWatch alarms as ``streamboss status`` shows them.

Each operation's pool (``infra/operation_pool.py``) has a wake, a scale-in and
an idle alarm, and its target-tracking policy has the two alarms AWS creates
for it. Their states (OK, ALARM, INSUFFICIENT_DATA) say why a pool is where it
is: "wanted but no agents" is the wake alarm in ALARM, a pool that will not
return to zero has its idle alarm in OK.

The alarms are found by name prefix (the pools' resources are named
``agents-<operation>-...``; target tracking's ``TargetTracking-<group>-...``)
and matched to an operation by the autoscaling group their action scales, so
another stack's alarms with the same names are never shown. Reads are cached
(:data:`REFRESH_SECONDS`) so that ``status`` stays cheap, and an error is kept
as one line for ``status`` to print, never raised.
"""

from __future__ import annotations

import logging
import re
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any

log = logging.getLogger(__name__)

# The name prefixes of the pools' alarms (infra/__main__.py names each pool
# "agents-<operation>"; AWS names a target-tracking policy's alarms
# "TargetTracking-<group name>-AlarmHigh-<uuid>" / "-AlarmLow-").
NAME_PREFIXES = ("agents-", "TargetTracking-agents-")
# How long a successful read is shown before the next status reads again.
REFRESH_SECONDS = 10.0
# After a failed read, status shows the error this long before trying again.
RETRY_SECONDS = 30.0

# A policy ARN names its group: ...:scalingPolicy:<id>:autoScalingGroupName/<group>:policyName/<p>
_GROUP_IN_ARN = re.compile(r":autoScalingGroupName/(?P<group>[^:]+):policyName/")
# "agents-upper-wake-alarm-1a2b3c4" -> "wake" (Pulumi appends a random suffix).
_POOL_ALARM = re.compile(r"-(?P<kind>[a-z]+)-alarm(?:-[0-9a-f]+)?$")


def alarm_kind(name: str) -> str:
    """A short label for an alarm of a pool: wake, shrink, idle, track-high, track-low."""
    if name.startswith("TargetTracking-"):
        if "-AlarmHigh-" in name:
            return "track-high"
        if "-AlarmLow-" in name:
            return "track-low"
        return "track"
    found = _POOL_ALARM.search(name)
    return found.group("kind") if found else name


def alarms_by_group(alarms: list[dict[str, Any]]) -> dict[str, dict[str, dict[str, str]]]:
    """The alarms (DescribeAlarms' MetricAlarms) by the group their actions scale, then kind."""
    found: dict[str, dict[str, dict[str, str]]] = {}
    for alarm in alarms:
        groups = {m.group("group") for action in alarm.get("AlarmActions", [])
                  if (m := _GROUP_IN_ARN.search(action))}
        for group in groups:
            updated = alarm.get("StateUpdatedTimestamp")
            found.setdefault(group, {})[alarm_kind(alarm["AlarmName"])] = {
                "state": alarm.get("StateValue", "INSUFFICIENT_DATA"),
                "since": updated.isoformat(timespec="seconds").replace("+00:00", "Z")
                if hasattr(updated, "isoformat") else None,
            }
    return found


def _client() -> Any:
    import boto3
    from botocore.config import Config

    # Status waits for this read: short timeouts and no retry.
    return boto3.client("cloudwatch", config=Config(
        connect_timeout=2, read_timeout=4, retries={"max_attempts": 1, "mode": "standard"}))


class PoolAlarms:
    """The pools' alarm states, read at most every :data:`REFRESH_SECONDS`.

    Parameters:
        client_factory: makes the CloudWatch client on first use.
        clock: monotonic seconds.
        refresh: seconds a successful read is reused.
    """

    def __init__(self, client_factory: Callable[[], Any] = _client,
                 clock: Callable[[], float] = time.monotonic,
                 refresh: float = REFRESH_SECONDS) -> None:
        self._client_factory = client_factory
        self._client: Any = None
        self._clock = clock
        self.refresh_seconds = refresh
        self._lock = threading.Lock()
        self._reading = threading.Lock()
        self._by_group: dict[str, dict[str, dict[str, str]]] = {}
        self._next_at = float("-inf")
        self.observed = False
        self.last_error: str | None = None
        self.reads = 0

    def refresh_if_stale(self) -> None:
        """Read the alarms if the cached view is old; one reader at a time, the
        others use the cached view meanwhile."""
        if self._clock() < self._next_at or not self._reading.acquire(blocking=False):
            return
        try:
            self.reads += 1
            try:
                alarms = self._describe()
            except Exception as exc:  # any AWS or network error: one line in status
                message = f"{type(exc).__name__}: {exc}".splitlines()[0]
                if message != self.last_error:
                    log.warning("reading the agent pools' alarms failed (%s)", message)
                with self._lock:
                    self.last_error = message
                self._next_at = self._clock() + RETRY_SECONDS
                return
            with self._lock:
                self._by_group = alarms_by_group(alarms)
                self.observed = True
                self.last_error = None
            self._next_at = self._clock() + self.refresh_seconds
        finally:
            self._reading.release()

    def _describe(self) -> list[dict[str, Any]]:
        if self._client is None:
            self._client = self._client_factory()
        alarms: list[dict[str, Any]] = []
        for prefix in NAME_PREFIXES:
            pages = self._client.get_paginator("describe_alarms").paginate(
                AlarmNamePrefix=prefix, AlarmTypes=["MetricAlarm"])
            for page in pages:
                alarms.extend(page.get("MetricAlarms", []))
        return alarms

    def for_groups(self, groups: Mapping[str, str]) -> dict[str, dict[str, dict[str, str]]]:
        """Alarm states by operation, for ``groups`` (operation -> its group's name)."""
        with self._lock:
            return {operation: {kind: dict(v) for kind, v in
                                sorted(self._by_group.get(group, {}).items())}
                    for operation, group in sorted(groups.items())}

    def state(self) -> dict[str, Any]:
        with self._lock:
            return {"observed": self.observed, "error": self.last_error}
