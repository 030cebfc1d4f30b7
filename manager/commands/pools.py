"""``streamboss status`` on the aws dispatcher: why each agent pool is where it is.

One row per operation: its group's desired and in-service counts, its alarms'
states (wake, shrink, idle and target tracking's two) and the metrics the
manager last published for it, with their time. A part that could not be read
is one line on stderr, never a traceback.
"""

from __future__ import annotations

from typing import Any

import click

from .common import table

# The alarms in the order an operator reads a pool's story: waking, tracking,
# shrinking, going idle.
ALARM_ORDER = ("wake", "track-high", "track-low", "shrink", "idle")
COLUMNS = ["pool", "desired", "in_service", "alarms", "wanted", "backlog", "per_agent",
           "published"]


def _count(value: Any) -> str:
    return "-" if value is None else f"{value:g}" if isinstance(value, float) else str(value)


def _alarms(states: dict[str, dict[str, Any]]) -> str:
    if not states:
        return "-"
    kinds = sorted(states, key=lambda k: (ALARM_ORDER.index(k) if k in ALARM_ORDER
                                          else len(ALARM_ORDER), k))
    return ", ".join(f"{kind} {states[kind]['state']}" for kind in kinds)


def pool_rows(operations: dict[str, Any]) -> list[dict[str, str]]:
    """The table's rows from ``/v1/status``'s ``cloud.operations``."""
    rows = []
    for name, pool in sorted(operations.items()):
        group = pool.get("group") or {}
        metrics = pool.get("metrics") or {}
        values = metrics.get("values") or {}
        rows.append({
            "pool": name,
            "desired": _count(group.get("desired")),
            "in_service": _count(group.get("in_service")),
            "alarms": _alarms(pool.get("alarms") or {}),
            "wanted": _count(values.get("Wanted")),
            "backlog": _count(values.get("Backlog")),
            "per_agent": _count(values.get("BacklogPerAgent")),
            "published": metrics.get("published_at") or "-",
        })
    return rows


def pool_lines(cloud: dict[str, Any]) -> None:
    """The pools' table (stdout) and an alarm-read error (stderr, one line)."""
    alarms = cloud.get("alarms") or {}
    if alarms.get("error"):
        click.echo(f"alarms: {alarms['error']} (alarm states unknown)", err=True)
    operations = cloud.get("operations")
    if operations is None:
        return
    click.echo()
    table(pool_rows(operations), COLUMNS)
