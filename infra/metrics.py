"""The CloudWatch metrics that drive the agent pools' autoscaling.

The manager's AWS dispatcher publishes these once a period for every declared
operation; the scaling policies and alarms in ``operation_pool.py`` read them.
Both sides import the names from here, so a rename cannot split them. Pure
constants: importable without Pulumi.
"""

from __future__ import annotations

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

# One datapoint a minute: standard-resolution metrics are the cheapest, and
# alarms on them can use 60-second periods. The alarms use the same period, so
# a manager that publishes less often looks like missing data.
PERIOD_SECONDS = 60


def dimensions(operation: str) -> dict[str, str]:
    """The CloudWatch dimensions of ``operation``'s metrics."""
    return {OPERATION_DIMENSION: operation}
