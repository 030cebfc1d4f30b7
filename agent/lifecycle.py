"""``stream-agent-lifecycle``: drain this node's agents before its autoscaling group terminates it.

Each operation pool has a termination lifecycle hook (``infra/operation_pool.py``):
an instance chosen for scale-in waits in ``Terminating:Wait`` until someone
completes the hook's action, or until the hook's heartbeat timeout passes. This
handler runs beside the agent on every agent node (the ``stream_agent`` role's
``stream-agent-lifecycle.service``) and:

1. polls IMDSv2 every few seconds for ``autoscaling/target-lifecycle-state``;
2. on ``Terminated`` (or ``Warmed:Terminated``, ``Warmed:Stopped``) stops the node's agents: by
   default ``systemctl stop --no-block stream-agent.service``, so systemd sends
   the unit's ``KillSignal=SIGTERM`` to the agent, which stops consuming,
   finishes its in-flight messages and exits 0 (``--pid`` signals processes
   directly instead, where systemd is not PID 1);
3. records a lifecycle-action heartbeat every ``--heartbeat-interval`` seconds
   while any of them still runs, so a slow drain keeps the instance waiting;
4. completes the lifecycle action with ``CONTINUE`` once they have exited (or
   after ``--drain-limit`` seconds at most), then exits 0.

The hook's name comes from the environment (user data's ``lifecycle.env``); the
group's from ``--group`` or, as on the pools' nodes, the instance's
``aws:autoscaling:groupName`` tag in instance metadata (the agents' launch
templates serve tags there): user data cannot name the group, which is declared
after the launch template it uses.

Everything is bounded: every metadata and API request has a timeout, errors are
one log line each and retried with backoff, and the handler never exits on a
transient error (only a bad configuration exits 2, which the unit does not
restart). It reads no message and holds no secret: the autoscaling client takes
the instance profile's credentials the usual boto3 way; ``AWS_ENDPOINT_URL_AUTO_SCALING``
and ``AWS_EC2_METADATA_SERVICE_ENDPOINT`` point it elsewhere (tests).
"""

from __future__ import annotations

import logging
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from types import FrameType
from typing import Any, Protocol

import click

from .imds import (
    GROUP_NAME_TAG,
    INSTANCE_ID,
    TARGET_LIFECYCLE_STATE,
    Metadata,
    MetadataError,
    NotFound,
)

log = logging.getLogger("streamboss.lifecycle")

# The environment the node's unit gets from /etc/streamboss/lifecycle.env (user data).
GROUP_ENV = "STREAMBOSS_LIFECYCLE_GROUP"
HOOK_ENV = "STREAMBOSS_LIFECYCLE_HOOK"
HEARTBEAT_TIMEOUT_ENV = "STREAMBOSS_LIFECYCLE_HEARTBEAT_TIMEOUT"
UNITS_ENV = "STREAMBOSS_LIFECYCLE_UNITS"
DEFAULT_UNITS = ("stream-agent.service",)

# Target states that mean "this instance leaves service". A warm pool's instance
# terminated from the pool goes through the same termination hook, and so does one
# a pool with an instance reuse policy takes back on scale-in (it waits in
# Warmed:Pending:Wait on its way to Warmed:Stopped, the pools' pool state). An
# instance launched into the pool has no action waiting: its agent is stopped all
# the same (it must not consume from the pool) and completing finds nothing.
TERMINATING_STATES = frozenset({"Terminated", "Warmed:Terminated", "Warmed:Stopped"})
CONTINUE = "CONTINUE"

DEFAULT_POLL_INTERVAL = 5.0
# AWS's own default heartbeat timeout; the pools set theirs (a minute) in the env.
DEFAULT_HEARTBEAT_TIMEOUT = 3600.0
# Heartbeats three times per timeout: one lost call does not end the wait.
HEARTBEATS_PER_TIMEOUT = 3
# The agent's drain is bounded by its --drain-timeout (30 s on nodes) and the unit's
# TimeoutStopSec (45 s, then SIGKILL); waiting longer than this means something is stuck.
DEFAULT_DRAIN_LIMIT = 120.0
# How long completing the action is retried before the hook's default result decides.
DEFAULT_COMPLETE_LIMIT = 120.0
# Backoff after errors: doubles from the base, capped.
BACKOFF_CAP = 60.0
COMPLETE_BACKOFF_CAP = 15.0
# While draining, how often the targets are looked at.
DRAIN_CHECK_INTERVAL = 0.5
# systemctl answers at once; a hung one must not hold the loop.
SYSTEMCTL_TIMEOUT = 15.0
# An API call: botocore's connect and read timeouts, and its own retries per call.
API_CONNECT_TIMEOUT = 5.0
API_READ_TIMEOUT = 10.0
API_ATTEMPTS = 3

GROUP_NAME = re.compile(r"[^\x00-\x1f\x7f]{1,255}")
HOOK_NAME = re.compile(r"[A-Za-z0-9_/-]{1,255}")
UNIT_NAME = re.compile(r"[A-Za-z0-9:_.@\\-]{1,255}\.service")

EXIT_OK = 0
EXIT_CONFIG = 2


def one_line(exc: BaseException) -> str:
    """``exc`` as one log line (botocore and urllib messages can span several)."""
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


# -- what is drained -----------------------------------------------------------------


class Targets(Protocol):
    """The node's agents: told to drain once, then watched until they have exited."""

    def stop(self) -> None:
        """Ask every target to drain (SIGTERM); errors are logged, not raised."""

    def running(self) -> list[str]:
        """The targets still running (a target that cannot be checked counts as running)."""


class Units:
    """Agents run by systemd: ``systemctl stop --no-block`` (the unit's SIGTERM, its
    KillMode and TimeoutStopSec), then ``ActiveState`` until inactive."""

    def __init__(self, units: Sequence[str], systemctl: str = "systemctl") -> None:
        self.units = list(units)
        self.systemctl = systemctl

    def stop(self) -> None:
        result = self._run("stop", "--no-block", "--", *self.units)
        if result is not None:
            log.info("asked systemd to stop %s (SIGTERM: the agents drain)",
                     ", ".join(self.units))

    def running(self) -> list[str]:
        still = []
        for unit in self.units:
            result = self._run("show", "--property=ActiveState", "--value", "--", unit)
            state = result.strip() if result is not None else "unknown"
            if state not in ("inactive", "failed"):
                still.append(f"{unit} ({state})")
        return still

    def _run(self, *args: str) -> str | None:
        try:
            done = subprocess.run([self.systemctl, *args], capture_output=True, text=True,
                                  timeout=SYSTEMCTL_TIMEOUT, stdin=subprocess.DEVNULL)
        except (OSError, subprocess.SubprocessError) as exc:
            log.error("systemctl %s: %s", args[0], one_line(exc))
            return None
        if done.returncode != 0:
            log.error("systemctl %s exited %d: %s", args[0], done.returncode,
                      " ".join(done.stderr.split()) or "no message")
            return None
        return done.stdout


class Pids:
    """Agents known by process id (no systemd as PID 1, or a test): SIGTERM each, then
    wait until each is gone (a zombie counts as gone: it has exited)."""

    def __init__(self, pids: Sequence[int]) -> None:
        self.pids = list(pids)

    def stop(self) -> None:
        for pid in self.pids:
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                log.info("pid %d: already gone", pid)
            except OSError as exc:
                log.error("pid %d: SIGTERM failed: %s", pid, one_line(exc))
            else:
                log.info("pid %d: sent SIGTERM (the agent drains)", pid)

    def running(self) -> list[str]:
        return [f"pid {pid}" for pid in self.pids if pid_running(pid)]


def pid_running(pid: int) -> bool:
    """Whether ``pid`` exists and has not exited (a zombie has)."""
    try:
        with open(f"/proc/{pid}/stat") as handle:
            state = handle.read().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state not in ("Z", "X")


class Both:
    """Units and pids together."""

    def __init__(self, *parts: Targets) -> None:
        self.parts = parts

    def stop(self) -> None:
        for part in self.parts:
            part.stop()

    def running(self) -> list[str]:
        return [name for part in self.parts for name in part.running()]


# -- the autoscaling calls -----------------------------------------------------------


class Actions(Protocol):
    """The two lifecycle calls the node's role may make on its own group."""

    group: str | None

    def heartbeat(self, instance_id: str) -> None: ...

    def complete(self, instance_id: str) -> None: ...


class LifecycleActionGone(Exception):
    """AWS has no waiting action for this instance (completed, timed out, or no hook)."""


class AutoScalingActions:
    """``RecordLifecycleActionHeartbeat`` and ``CompleteLifecycleAction`` by instance id
    (no lifecycle token needed), on one group and hook."""

    def __init__(self, group: str | None, hook: str, client: Any = None) -> None:
        # None until the handler has read it from the instance's metadata.
        self.group = group
        self.hook = hook
        self._client = client

    @property
    def client(self) -> Any:
        if self._client is None:
            import boto3
            from botocore.config import Config

            # The region comes from AWS_REGION (lifecycle.env), credentials from the
            # instance profile, the endpoint from AWS_ENDPOINT_URL_AUTO_SCALING if set.
            self._client = boto3.client("autoscaling", config=Config(
                connect_timeout=API_CONNECT_TIMEOUT, read_timeout=API_READ_TIMEOUT,
                retries={"max_attempts": API_ATTEMPTS, "mode": "standard"}))
        return self._client

    def heartbeat(self, instance_id: str) -> None:
        self._call(self.client.record_lifecycle_action_heartbeat, instance_id)

    def complete(self, instance_id: str) -> None:
        self._call(self.client.complete_lifecycle_action, instance_id,
                   LifecycleActionResult=CONTINUE)

    def _call(self, method: Callable[..., Any], instance_id: str, **extra: str) -> None:
        from botocore.exceptions import ClientError

        try:
            method(AutoScalingGroupName=self.group, LifecycleHookName=self.hook,
                   InstanceId=instance_id, **extra)
        except ClientError as exc:
            # "No active Lifecycle Action found": nothing is waiting any more.
            if exc.response.get("Error", {}).get("Code") == "ValidationError":
                raise LifecycleActionGone(one_line(exc)) from None
            raise


# -- the handler ---------------------------------------------------------------------


@dataclass(frozen=True)
class Timing:
    """The handler's intervals and bounds, in seconds."""

    poll_interval: float = DEFAULT_POLL_INTERVAL
    heartbeat_interval: float = DEFAULT_HEARTBEAT_TIMEOUT / HEARTBEATS_PER_TIMEOUT
    drain_limit: float = DEFAULT_DRAIN_LIMIT
    complete_limit: float = DEFAULT_COMPLETE_LIMIT


class Handler:
    """Watches the target lifecycle state; on termination drains, heartbeats, completes."""

    def __init__(self, metadata: Metadata, targets: Targets, actions: Actions,
                 timing: Timing, stopping: threading.Event | None = None) -> None:
        self.metadata = metadata
        self.targets = targets
        self.actions = actions
        self.timing = timing
        self.stopping = stopping or threading.Event()

    def run(self) -> int:
        """Watch until the instance terminates, drain, complete; exit 0 (also on SIGTERM)."""
        instance_id = self.watch()
        if instance_id is None:
            log.info("stopped before the instance was terminated")
            return EXIT_OK
        self.drain(instance_id)
        self.complete(instance_id)
        return EXIT_OK

    def watch(self) -> str | None:
        """Poll until the target lifecycle state is a terminating one; return the
        instance id (None when told to stop first)."""
        instance_id: str | None = None
        last_state: str | None = None
        failures = 0
        while not self.stopping.is_set():
            try:
                if instance_id is None:
                    instance_id = self.metadata.get(INSTANCE_ID)
                    log.info("watching instance %s", instance_id)
                if self.actions.group is None:
                    self.actions.group = self._group_name()
                    log.info("its autoscaling group: %s", self.actions.group)
                state = self._target_state()
            except MetadataError as exc:
                failures += 1
                delay = _backoff(self.timing.poll_interval, failures, BACKOFF_CAP)
                log.warning("instance metadata: %s; again in %.0fs", one_line(exc), delay)
                self.stopping.wait(delay)
                continue
            except Exception as exc:  # never crash-loop on something unforeseen
                failures += 1
                delay = _backoff(self.timing.poll_interval, failures, BACKOFF_CAP)
                log.error("watching the lifecycle state: %s; again in %.0fs",
                          one_line(exc), delay)
                self.stopping.wait(delay)
                continue
            failures = 0
            if state != last_state:
                log.info("target lifecycle state: %s", state or "none (not in a group yet?)")
                last_state = state
            if state in TERMINATING_STATES:
                return instance_id
            self.stopping.wait(self.timing.poll_interval)
        return None

    def _group_name(self) -> str:
        try:
            name = self.metadata.get(GROUP_NAME_TAG)
        except NotFound:
            raise MetadataError(
                f"no {GROUP_NAME_TAG.rsplit('/', 1)[1]} tag (tags in instance metadata not "
                f"enabled, or not in a group): set --group or {GROUP_ENV}") from None
        if not GROUP_NAME.fullmatch(name):
            raise MetadataError(f"{GROUP_NAME_TAG}: not a group name")
        return name

    def _target_state(self) -> str | None:
        try:
            return self.metadata.get(TARGET_LIFECYCLE_STATE)
        except NotFound:
            return None

    def drain(self, instance_id: str) -> None:
        """Stop the agents; heartbeat while any runs, for at most the drain limit."""
        log.info("instance %s is being terminated: draining its agents", instance_id)
        self.targets.stop()
        started = time.monotonic()
        deadline = started + self.timing.drain_limit
        next_heartbeat = started + self.timing.heartbeat_interval
        while True:
            running = self.targets.running()
            if not running:
                log.info("agents drained in %.1fs", time.monotonic() - started)
                return
            now = time.monotonic()
            if now >= deadline:
                log.warning("still running after %.0fs: %s; completing anyway",
                            self.timing.drain_limit, ", ".join(running))
                return
            if now >= next_heartbeat:
                next_heartbeat = now + self.timing.heartbeat_interval
                try:
                    self.actions.heartbeat(instance_id)
                    log.info("heartbeat recorded (waiting for %s)", ", ".join(running))
                except LifecycleActionGone as exc:
                    log.warning("heartbeat: no waiting lifecycle action (%s)", exc)
                except Exception as exc:
                    log.error("heartbeat failed: %s", one_line(exc))
            time.sleep(min(DRAIN_CHECK_INTERVAL, max(0.0, deadline - now)))

    def complete(self, instance_id: str) -> None:
        """Complete the lifecycle action (CONTINUE), retrying with backoff up to the limit;
        past it, the hook's default result (CONTINUE) ends the wait anyway."""
        deadline = time.monotonic() + self.timing.complete_limit
        attempt = 0
        while True:
            attempt += 1
            try:
                self.actions.complete(instance_id)
            except LifecycleActionGone as exc:
                log.warning("complete: no waiting lifecycle action (%s)", exc)
                return
            except Exception as exc:
                delay = _backoff(1.0, attempt, COMPLETE_BACKOFF_CAP)
                if time.monotonic() + delay > deadline:
                    log.error("complete failed (%s); giving up after %d attempts: the "
                              "hook's heartbeat timeout ends the wait", one_line(exc), attempt)
                    return
                log.warning("complete failed (%s); again in %.0fs", one_line(exc), delay)
                time.sleep(delay)
                continue
            log.info("lifecycle action completed (CONTINUE) for %s", instance_id)
            return


def _backoff(base: float, failures: int, cap: float) -> float:
    return min(cap, base * 2 ** max(0, failures - 1))


# -- the command ---------------------------------------------------------------------

HELP = f"""Drain this node's stream agents before its autoscaling group terminates it.

Polls IMDSv2 (AWS_EC2_METADATA_SERVICE_ENDPOINT, default http://169.254.169.254)
for the instance's target lifecycle state. On Terminated it stops the agents
(systemctl stop --no-block UNIT: the unit's SIGTERM, so each agent finishes its
in-flight messages and exits 0; or SIGTERM to each --pid), records a lifecycle
heartbeat every --heartbeat-interval seconds while any still runs, then
completes the lifecycle action with CONTINUE and exits 0.

The hook comes from --hook or {HOOK_ENV} (the node's lifecycle.env, written by
user data); the group from --group, {GROUP_ENV}, or else the instance's
aws:autoscaling:groupName tag in instance metadata. AWS credentials and region come
the usual boto3 way (the instance profile; AWS_REGION); the node's role may
make only these two calls, on its own group.
"""


@click.command("stream-agent-lifecycle", help=HELP)
@click.option("--group", envvar=GROUP_ENV, metavar="NAME",
              help=f"The instance's autoscaling group.  [env: {GROUP_ENV}; default: the "
              "aws:autoscaling:groupName tag in instance metadata]")
@click.option("--hook", envvar=HOOK_ENV, metavar="NAME",
              help=f"The group's termination lifecycle hook.  [env: {HOOK_ENV}]")
@click.option("--unit", "units", multiple=True, metavar="UNIT",
              help=f"A systemd unit running an agent (repeatable).  [env: {UNITS_ENV}, "
              f"comma-separated; default: {', '.join(DEFAULT_UNITS)}]")
@click.option("--pid", "pids", multiple=True, type=click.IntRange(min=2),
              help="An agent's process id (repeatable): SIGTERM it rather than a unit.")
@click.option("--poll-interval", type=click.FloatRange(min=0.05),
              default=DEFAULT_POLL_INTERVAL, show_default=True,
              help="Seconds between two looks at the target lifecycle state.")
@click.option("--heartbeat-timeout", envvar=HEARTBEAT_TIMEOUT_ENV,
              type=click.FloatRange(min=1), default=DEFAULT_HEARTBEAT_TIMEOUT,
              show_default=True,
              help=f"The hook's heartbeat timeout.  [env: {HEARTBEAT_TIMEOUT_ENV}]")
@click.option("--heartbeat-interval", type=click.FloatRange(min=0.05),
              help="Seconds between heartbeats while draining.  [default: a third of "
              "--heartbeat-timeout]")
@click.option("--drain-limit", type=click.FloatRange(min=0), default=DEFAULT_DRAIN_LIMIT,
              show_default=True, help="At most this many seconds of waiting for the agents.")
@click.option("--complete-limit", type=click.FloatRange(min=0),
              default=DEFAULT_COMPLETE_LIMIT, show_default=True,
              help="Seconds completing the action is retried.")
@click.option("--log-level", type=click.Choice(["debug", "info", "warning", "error"]),
              default="info", show_default=True)
def lifecycle_command(group: str | None, hook: str | None, units: tuple[str, ...],
                      pids: tuple[int, ...], poll_interval: float, heartbeat_timeout: float,
                      heartbeat_interval: float | None, drain_limit: float,
                      complete_limit: float, log_level: str) -> None:
    logging.basicConfig(level=log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        stream=sys.stderr)
    logging.getLogger("botocore").setLevel(logging.WARNING)
    group, hook = _names(group, hook)
    unit_list = list(units) or [u for u in os.environ.get(UNITS_ENV, "").split(",") if u]
    if not unit_list and not pids:
        unit_list = list(DEFAULT_UNITS)
    bad = [u for u in unit_list if not UNIT_NAME.fullmatch(u)]
    if bad:
        raise click.UsageError(f"{bad[0]!r} is not a systemd service name (NAME.service); "
                               f"fix --unit or {UNITS_ENV}")
    parts: list[Targets] = []
    if unit_list:
        parts.append(Units(unit_list))
    if pids:
        parts.append(Pids(pids))
    timing = Timing(
        poll_interval=poll_interval,
        heartbeat_interval=heartbeat_interval or heartbeat_timeout / HEARTBEATS_PER_TIMEOUT,
        drain_limit=drain_limit, complete_limit=complete_limit)
    stopping = threading.Event()

    def on_signal(_signum: int, _frame: FrameType | None) -> None:
        stopping.set()

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, on_signal)
    handler = Handler(Metadata(), parts[0] if len(parts) == 1 else Both(*parts),
                      AutoScalingActions(group, hook), timing, stopping)
    log.info("group %s, hook %s; agents: %s", group or "(from instance metadata)", hook,
             ", ".join([*unit_list, *(f"pid {p}" for p in pids)]))
    sys.exit(handler.run())


def _names(group: str | None, hook: str | None) -> tuple[str | None, str]:
    group = group or None  # an empty setting: read it from the instance's metadata
    if not hook:
        raise click.UsageError(f"no lifecycle hook: set --hook or {HOOK_ENV}")
    if group is not None and not GROUP_NAME.fullmatch(group):
        raise click.UsageError(f"{GROUP_ENV} must be 1 to 255 printable characters")
    if not HOOK_NAME.fullmatch(hook):
        raise click.UsageError(f"{HOOK_ENV} must be 1 to 255 of A-Z a-z 0-9 _ - /")
    return group, hook


def main() -> None:
    """Entry point of the ``stream-agent-lifecycle`` console script."""
    from .cli import run_cli

    run_cli(lifecycle_command, "stream-agent-lifecycle")


if __name__ == "__main__":
    main()
