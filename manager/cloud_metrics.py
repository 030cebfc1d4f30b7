"""The CloudWatch metrics that drive the agent pools' autoscaling on AWS.

The manager's AWS dispatcher publishes them for every declared operation; the
scaling policies and alarms of the Pulumi program (``infra/operation_pool.py``,
through ``infra/metrics.py``) read them. Both sides take the names from here, so
a rename cannot split them.

Importing this module needs nothing beyond the standard library (``infra/``
imports it under ``pulumi up``); :class:`MetricsPublisher` imports boto3 only
when it first publishes.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

log = logging.getLogger(__name__)

# Our own namespace, so the manager's cloudwatch:PutMetricData permission can be
# scoped to it with a condition (the action has no resource-level ARNs).
NAMESPACE = "streamboss"

# Every metric carries this one dimension; its value is the operation's name.
OPERATION_DIMENSION = "Operation"

# Messages waiting in the operation's queue (sb.op.<name>).
BACKLOG = "Backlog"
# 1 while the operation is wanted (its output stream has a subscriber), else 0.
WANTED = "Wanted"
# Backlog / max(1, running agents): what the target-tracking policy holds at
# the operation's target_backlog_per_agent.
BACKLOG_PER_AGENT = "BacklogPerAgent"
# The operation's autoscaling group's desired capacity, as the manager last read
# it (DescribeAutoScalingGroups). The wake and scale-in alarms gate on it rather
# than on AWS's own GroupDesiredCapacity, which Auto Scaling publishes only at
# one-minute granularity: an alarm on it cannot have a 10-second period.
DESIRED_CAPACITY = "DesiredCapacity"

# Every datum is high resolution (StorageResolution 1), so alarms on these
# metrics may use 10-second periods; AWS charges a high-resolution alarm more
# than a standard one (see the README's "On AWS").
STORAGE_RESOLUTION = 1
# The period of the pools' alarms on these metrics (10, 20 or 30 s are allowed
# only on high-resolution metrics).
ALARM_PERIOD_SECONDS = 10
# CloudWatch keeps sub-minute datapoints for three hours; an alarm looking back
# further than that uses the standard period instead.
HIGH_RESOLUTION_LOOKBACK_SECONDS = 3 * 3600
STANDARD_PERIOD_SECONDS = 60

# Every operation is published at least this often, whether or not anything
# changed: half the alarm period, so each 10-second bucket an alarm evaluates
# holds a datapoint (alarms treat a missing one as "not breaching", which would
# restart an idle alarm's count). One PutMetricData request carries up to
# MAX_DATUMS_PER_CALL datums, so this is one request per interval for up to 250
# operations.
PUBLISH_INTERVAL = 5.0

# A Wanted flip or a new operation is published at once, not at the next
# interval; a flapping demand still costs at most one extra request a second.
MIN_FLIP_INTERVAL = 1.0

# CloudWatch's limit of datums in one PutMetricData request.
MAX_DATUMS_PER_CALL = 1000

# After a failed publish (no credentials, no route to CloudWatch, throttling)
# wait this long before the next attempt, so a lasting error costs one request
# per interval rather than one per pass.
RETRY_SECONDS = 15.0

UNITS = {BACKLOG: "Count", WANTED: "None", BACKLOG_PER_AGENT: "Count",
         DESIRED_CAPACITY: "Count"}


def alarm_period(lookback: float) -> int:
    """The period of an alarm that looks back ``lookback`` seconds: high resolution
    while CloudWatch keeps 10-second datapoints that long, else one minute."""
    if lookback <= HIGH_RESOLUTION_LOOKBACK_SECONDS:
        return ALARM_PERIOD_SECONDS
    return STANDARD_PERIOD_SECONDS


def dimensions(operation: str) -> dict[str, str]:
    """The CloudWatch dimensions of ``operation``'s metrics."""
    return {OPERATION_DIMENSION: operation}


@dataclass(frozen=True)
class Sample:
    """One operation as one reconciler pass saw it.

    Attributes:
        operation: the operation's name.
        backlog: messages waiting in its queue.
        wanted: whether its output stream has a subscriber.
        running: its running agents; None when unknown (the autoscaling groups
            could not be read), which leaves ``BacklogPerAgent`` out rather than
            publishing a per-agent backlog computed for zero agents.
        desired: its group's desired capacity; None when unknown (no group yet,
            or the groups could not be read), which leaves ``DesiredCapacity`` out.
    """

    operation: str
    backlog: int
    wanted: bool
    running: int | None
    desired: int | None = None


def values(sample: Sample) -> dict[str, float]:
    """The metric values of one sample, by metric name."""
    result: dict[str, float] = {BACKLOG: float(sample.backlog),
                                WANTED: 1.0 if sample.wanted else 0.0}
    if sample.running is not None:
        result[BACKLOG_PER_AGENT] = sample.backlog / max(1, sample.running)
    if sample.desired is not None:
        result[DESIRED_CAPACITY] = float(sample.desired)
    return result


def metric_data(samples: Iterable[Sample], timestamp: datetime) -> list[dict[str, Any]]:
    """PutMetricData datums for ``samples``, sorted by operation then metric name.

    Parameters:
        samples: one per operation.
        timestamp: the time every datum carries (timezone-aware).

    Returns:
        Datums in boto3's shape (``MetricName``, ``Dimensions``, ``Timestamp``,
        ``Value``, ``Unit``, ``StorageResolution``).
    """
    data = []
    for sample in sorted(samples, key=lambda s: s.operation):
        dims = [{"Name": k, "Value": v} for k, v in sorted(dimensions(sample.operation).items())]
        for name, value in sorted(values(sample).items()):
            data.append({"MetricName": name, "Dimensions": dims, "Timestamp": timestamp,
                         "Value": value, "Unit": UNITS[name],
                         "StorageResolution": STORAGE_RESOLUTION})
    return data


def _default_client() -> Any:
    import boto3
    from botocore.config import Config

    # Short timeouts and few retries: a CloudWatch outage must cost seconds, not
    # the minutes of botocore's defaults, before the next attempt is scheduled.
    return boto3.client("cloudwatch", config=Config(
        connect_timeout=3, read_timeout=5, retries={"max_attempts": 2, "mode": "standard"}))


class MetricsPublisher:
    """Publishes the scaling metrics every interval, and at once when demand changes.

    Not thread-safe: one thread calls :meth:`publish_if_due`; :meth:`last` may be
    read from any.

    Parameters:
        client_factory: makes the CloudWatch client on first use (region and
            credentials from the usual AWS chain); tests pass a moto-backed one.
        wall_clock: the time the datums carry.
        interval: seconds between publishes when nothing changes.
        min_flip_interval: seconds a Wanted flip waits after the last publish.
    """

    def __init__(self, client_factory: Callable[[], Any] = _default_client,
                 wall_clock: Callable[[], datetime] = lambda: datetime.now(UTC),
                 interval: float = PUBLISH_INTERVAL,
                 min_flip_interval: float = MIN_FLIP_INTERVAL) -> None:
        self._client_factory = client_factory
        self._client: Any = None
        self._wall_clock = wall_clock
        self.interval = interval
        self.min_flip_interval = min_flip_interval
        self._published: dict[str, dict[str, float]] | None = None
        self._published_at = float("-inf")
        self._retry_at = float("-inf")
        self.last_published_at: str | None = None
        self.last_error: str | None = None
        self.published_calls = 0

    def due(self, samples: Mapping[str, Sample], now: float) -> bool:
        """Whether ``samples`` should be published at monotonic time ``now``."""
        if now < self._retry_at:
            return False
        if self._published is None or now - self._published_at >= self.interval:
            return True
        current = {name: values(s) for name, s in samples.items()}
        if set(current) != set(self._published) or any(
                current[n].get(WANTED) != self._published[n].get(WANTED) for n in current):
            return now - self._published_at >= self.min_flip_interval
        return False

    def last(self) -> dict[str, Any]:
        """What was last published, for ``status``: the time and the values by operation."""
        published = self._published
        return {"published_at": self.last_published_at,
                "values": {} if published is None else
                {name: dict(sorted(v.items())) for name, v in sorted(published.items())}}

    def publish_if_due(self, samples: Mapping[str, Sample], now: float) -> bool:
        """Publish ``samples`` (by operation) if :meth:`due`; errors are logged once.

        Returns:
            True when they were published now.
        """
        if not samples:
            # Nothing to send; not a publish either, so the first operation's
            # metrics go out at once rather than after the flip bound.
            self._published = {}
            return False
        if not self.due(samples, now):
            return False
        try:
            self.publish(samples.values())
        except Exception as exc:  # any AWS or network error: retried later, never raised
            message = f"{type(exc).__name__}: {exc}".splitlines()[0]
            if message != self.last_error:
                log.warning("publishing the scaling metrics to CloudWatch failed (%s); "
                            "retrying every %.0fs", message, RETRY_SECONDS)
            self.last_error = message
            self._retry_at = now + RETRY_SECONDS
            return False
        if self.last_error is not None:
            log.info("publishing the scaling metrics to CloudWatch works again")
        self.last_error = None
        self._published = {name: values(s) for name, s in samples.items()}
        self._published_at = now
        return True

    def publish(self, samples: Iterable[Sample]) -> None:
        """Send the datums of ``samples``, at most :data:`MAX_DATUMS_PER_CALL` per request.

        Raises:
            Exception: whatever boto3 raises (credentials, region, network, API).
        """
        stamp = self._wall_clock()
        data = metric_data(samples, stamp)
        if self._client is None:
            self._client = self._client_factory()
        for start in range(0, len(data), MAX_DATUMS_PER_CALL):
            self._client.put_metric_data(Namespace=NAMESPACE,
                                         MetricData=data[start:start + MAX_DATUMS_PER_CALL])
            self.published_calls += 1
        self.last_published_at = stamp.isoformat(timespec="seconds").replace("+00:00", "Z")
