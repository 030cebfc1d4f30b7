"""The CloudWatch metrics that drive the agent pools' autoscaling.

The manager's AWS dispatcher publishes these for every declared operation; the
scaling policies and alarms in ``operation_pool.py`` read them. The names are
defined once, in the manager (``manager/cloud_metrics.py``, installed as
``streamboss.manager.cloud_metrics``), and re-exported here, so a rename
cannot split the publisher from the alarms. That module is pure (standard
library only), so this one still imports nothing from Pulumi; it needs the
streamboss package in the program's virtualenv (``pip install -e '.[aws]'``
in the repository's ``.venv``, which ``Pulumi.yaml`` names).
"""

from __future__ import annotations

from streamboss.manager.cloud_metrics import (
    ALARM_PERIOD_SECONDS,
    BACKLOG,
    BACKLOG_PER_AGENT,
    DESIRED_CAPACITY,
    NAMESPACE,
    OPERATION_DIMENSION,
    WANTED,
    alarm_period,
    dimensions,
)

__all__ = ["ALARM_PERIOD_SECONDS", "BACKLOG", "BACKLOG_PER_AGENT", "DESIRED_CAPACITY",
           "NAMESPACE", "OPERATION_DIMENSION", "WANTED", "alarm_period", "dimensions"]
