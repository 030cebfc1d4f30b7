"""The ``aws`` dispatcher: agents are autoscaling groups of a Pulumi stack.

Each declared operation is one autoscaling group of the stack (``infra/``).
The dispatcher does three things the local one does by running processes:

- the declarations become the stack's ``streamboss:operations`` config; after
  a change (debounced) a :class:`StackUpdater` thread runs a preview and then an
  update through the Automation API, one at a time, retrying failures later;
- every pass's observations become the CloudWatch metrics the groups' scaling
  policies track (``cloud_metrics.py``), published by an observer thread;
- agent counts come from the groups (``DescribeAutoScalingGroups``, cached), not
  from the reconciler's decision: on AWS the scaling policies do the scaling,
  so :meth:`AwsDispatcher.scale` only records the count the manager decided.

Archivers still run on the manager's machine, through an inner
:class:`LocalDispatcher`. Broker topology is the reconciler's, as with the
local dispatcher. Nothing here blocks the reconciler on AWS: the reconciler
only reads and writes memory; the AWS calls happen on the two threads.
"""

from __future__ import annotations

import hashlib
import logging
import threading
import time
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from typing import Any, Protocol

from .cloud_alarms import PoolAlarms
from .cloud_metrics import MetricsPublisher, Sample
from .dispatch_local import ARCHIVER_PREFIX, LocalDispatcher
from .model import Archive, Definition, Operation
from .pulumi_stack import PulumiUnavailable, StackError
from .stack_config import StackConfig, StackConfigError, stack_config
from .store import Store

log = logging.getLogger(__name__)

# Declarations often change in bursts (a script creating a pipeline); one update
# after the burst is cheaper and faster than one per call.
DEBOUNCE_SECONDS = 5.0
# A failed update is retried after this long, doubling up to the maximum: a
# transient error (a concurrent update, throttling) clears, a lasting one (bad
# credentials) does not run `pulumi preview` every few seconds.
RETRY_SECONDS = 60.0
RETRY_SECONDS_MAX = 900.0
# How stale the autoscaling groups' view may get. The groups change on the
# scale of instance boot times (a minute), and each refresh is one paged call.
GROUPS_REFRESH_SECONDS = 15.0
# After a failed describe, wait this long before the next.
GROUPS_RETRY_SECONDS = 30.0
# The observer thread's tick: how soon a wanted flip reaches CloudWatch at most.
OBSERVE_INTERVAL = 1.0
# How long stopping the manager waits for a running update; Pulumi keeps the
# stack locked while the CLI runs, and a SIGTERM'd CLI cancels it cleanly.
STOP_TIMEOUT = 5.0
# The tags the Pulumi program puts on every operation's group (infra/__main__.py
# and infra/operation_pool.py); the stack tag holds the stack's short name.
STACK_TAG = "streamboss:stack"
OPERATION_TAG = "streamboss:operation"
# Autoscaling lifecycle states: starting or serving count as running (as a
# just-spawned local agent does); leaving counts as draining.
RUNNING_STATES = frozenset({"Pending", "Pending:Wait", "Pending:Proceed", "InService"})
DRAINING_STATES = frozenset({"Terminating", "Terminating:Wait", "Terminating:Proceed",
                             "Detaching"})

IDLE, WAITING, PREVIEWING, UPDATING, FAILED = "idle", "waiting", "previewing", "updating", "failed"
# The stack's updates are not this manager's (--no-deploy): `pulumi up` runs elsewhere.
EXTERNAL = "external"


class StackDriver(Protocol):
    """What the updater needs of a stack (:class:`pulumi_stack.PulumiStack`)."""

    name: str

    def apply(self, config: StackConfig,
              on_phase: Callable[[str], None] | None = None) -> dict[str, Any]: ...


def _utc_now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


def sha256(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


class StackUpdater:
    """Applies the newest stack config, debounced, one apply at a time.

    :meth:`offer` is cheap and called every reconciler pass; the apply itself
    runs on the updater's thread (:meth:`start`) or, in tests, in :meth:`run_due`.

    Parameters:
        driver: applies a stack config (preview, then update).
        debounce: seconds without a further change before applying.
        retry: first retry delay after a failure (doubles up to ``retry_max``).
        clock: monotonic seconds.
    """

    def __init__(self, driver: StackDriver, debounce: float = DEBOUNCE_SECONDS,
                 retry: float = RETRY_SECONDS, retry_max: float = RETRY_SECONDS_MAX,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.driver = driver
        self.debounce = debounce
        self.retry = retry
        self.retry_max = retry_max
        self.clock = clock
        self._cond = threading.Condition()
        self._wanted: StackConfig | None = None
        self._changed_at = float("-inf")
        self._applied: StackConfig | None = None
        self._failed: StackConfig | None = None
        self._retry_at = float("-inf")
        self._retry_delay = retry
        self._phase: str | None = None
        self._last_result: dict[str, Any] | None = None
        self._last_error: str | None = None
        self._stop = False
        self._thread: threading.Thread | None = None
        self.applies = 0

    # -- the reconciler's side ---------------------------------------------------------

    def offer(self, config: StackConfig) -> None:
        """The config the declarations call for now; a change restarts the debounce."""
        with self._cond:
            if config != self._wanted:
                self._wanted = config
                self._changed_at = self.clock()
                self._cond.notify_all()

    def fail(self, message: str) -> None:
        """The declarations cannot be mapped to a config; nothing is applied until they can."""
        with self._cond:
            if message != self._last_error:
                log.error("stack %s: %s", self.driver.name, message)
            self._last_error = message

    def state(self) -> dict[str, Any]:
        """What ``streamboss status`` shows: the state, the last result and error."""
        with self._cond:
            now = self.clock()
            if self._phase is not None:
                state = self._phase
            elif self._wanted is None or self._wanted == self._applied:
                state = IDLE
            elif self._wanted == self._failed:
                state = FAILED
            else:
                state = WAITING
            due = self._due_at()
            return {
                "stack": self.driver.name,
                "state": state,
                "next_attempt_in": None if self._phase is not None or due is None
                else max(0.0, round(due - now, 1)),
                "last_result": dict(self._last_result) if self._last_result else None,
                "last_error": self._last_error,
                # Digests of streamboss:operations only: never of the secret env values.
                "applied_config_sha256": self._applied.digest if self._applied else None,
                "wanted_config_sha256": self._wanted.digest if self._wanted else None,
            }

    # -- the updater's side ------------------------------------------------------------

    def _due_at(self) -> float | None:
        """Monotonic time the next apply is due, or None when there is nothing to do."""
        if self._wanted is None or self._wanted == self._applied:
            return None
        due = self._changed_at + self.debounce
        if self._wanted == self._failed:
            due = max(due, self._retry_at)
        return due

    def run_due(self) -> bool:
        """Apply the wanted config if it is due now.

        Returns:
            True when an apply ran (whatever its outcome).
        """
        with self._cond:
            due = self._due_at()
            if due is None or self.clock() < due or self._phase is not None:
                return False
            config = self._wanted
            assert config is not None
            self._phase = PREVIEWING
        self._apply(config)
        return True

    def _apply(self, config: StackConfig) -> None:
        started = _utc_now()
        self.applies += 1
        log.info("stack %s: applying the declarations (config sha256 %s)", self.driver.name,
                 config.digest[:12])
        try:
            summary = self.driver.apply(config, self._set_phase)
        except StackError as exc:
            self._finish(config, started, "failed", {**exc.summary, "failed_in": exc.phase},
                         str(exc))
        except PulumiUnavailable as exc:
            self._finish(config, started, "failed", {}, str(exc))
        except Exception as exc:  # the updater thread must survive anything the API raises
            self._finish(config, started, "failed", {}, f"{type(exc).__name__}: {exc}")
        else:
            self._finish(config, started, "succeeded", summary, None)

    def _set_phase(self, phase: str) -> None:
        with self._cond:
            self._phase = phase

    def _finish(self, config: StackConfig, started: str, outcome: str,
                summary: dict[str, Any], error: str | None) -> None:
        with self._cond:
            self._phase = None
            self._last_result = {"started_at": started, "finished_at": _utc_now(),
                                 "outcome": outcome, "summary": summary,
                                 "config_sha256": config.digest}
            if error is None:
                self._applied = config
                self._failed = None
                self._last_error = None
                self._retry_delay = self.retry
                log.info("stack %s: updated (%s)", self.driver.name, summary.get("update"))
            else:
                error = error.splitlines()[0] if error else "failed"
                self._failed = config
                self._last_error = error
                self._retry_at = self.clock() + self._retry_delay
                log.error("stack %s: %s; retrying in %.0fs", self.driver.name, error,
                          self._retry_delay)
                self._retry_delay = min(self._retry_delay * 2, self.retry_max)
            self._cond.notify_all()

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="stack-updater", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = STOP_TIMEOUT) -> None:
        with self._cond:
            self._stop = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)
            if self._thread.is_alive():
                log.warning("stack %s: an update is still running; the Pulumi CLI finishes "
                            "or cancels it on its own", self.driver.name)

    def _loop(self) -> None:
        while True:
            with self._cond:
                if self._stop:
                    return
                due = self._due_at()
                wait = None if due is None else due - self.clock()
                if wait is None or wait > 0:
                    self._cond.wait(wait)
                    continue
            self.run_due()


class AgentGroups:
    """The stack's autoscaling groups by operation, from cached describe calls.

    Parameters:
        stack: the stack's short name (the ``streamboss:stack`` tag's value).
        client_factory: makes the autoscaling client on first use.
        refresh: seconds a successful view is used before the next describe.
    """

    def __init__(self, stack: str, client_factory: Callable[[], Any],
                 refresh: float = GROUPS_REFRESH_SECONDS) -> None:
        self.stack = stack
        self._client_factory = client_factory
        self._client: Any = None
        self.refresh_seconds = refresh
        self._lock = threading.Lock()
        self._groups: dict[str, dict[str, Any]] = {}
        self.observed_at: float | None = None
        self._next_at = float("-inf")
        self.last_error: str | None = None

    def refresh_if_stale(self, now: float) -> bool:
        """Describe the groups if the view is older than the refresh period.

        Returns:
            True when a describe call was made (successful or not).
        """
        if now < self._next_at:
            return False
        try:
            groups = self._describe()
        except Exception as exc:  # any AWS or network error: keep the last view
            message = f"{type(exc).__name__}: {exc}".splitlines()[0]
            if message != self.last_error:
                log.warning("reading the agents' autoscaling groups failed (%s); agent counts "
                            "are unknown until it works", message)
            with self._lock:
                self.last_error = message
            self._next_at = now + GROUPS_RETRY_SECONDS
            return True
        with self._lock:
            if self.last_error is not None:
                log.info("reading the agents' autoscaling groups works again")
            self._groups = groups
            self.observed_at = now
            self.last_error = None
        self._next_at = now + self.refresh_seconds
        return True

    def _describe(self) -> dict[str, dict[str, Any]]:
        if self._client is None:
            self._client = self._client_factory()
        found: dict[str, dict[str, Any]] = {}
        pages = self._client.get_paginator("describe_auto_scaling_groups").paginate(
            Filters=[{"Name": f"tag:{STACK_TAG}", "Values": [self.stack]}])
        for page in pages:
            for group in page["AutoScalingGroups"]:
                tags = {t["Key"]: t["Value"] for t in group.get("Tags", [])}
                operation = tags.get(OPERATION_TAG)
                if operation is None:
                    continue
                states = [i.get("LifecycleState", "") for i in group.get("Instances", [])]
                found[operation] = {
                    "group": group["AutoScalingGroupName"],
                    "min": group.get("MinSize"),
                    "max": group.get("MaxSize"),
                    "desired": group.get("DesiredCapacity"),
                    "running": sum(1 for s in states if s in RUNNING_STATES),
                    # Serving now, as opposed to starting (what status shows an operator).
                    "in_service": sum(1 for s in states if s == "InService"),
                    "draining": sum(1 for s in states if s in DRAINING_STATES),
                }
        return found

    @property
    def known(self) -> bool:
        """Whether the view is current: read once, and the last describe worked."""
        with self._lock:
            return self.observed_at is not None and self.last_error is None

    def get(self, operation: str) -> dict[str, Any] | None:
        with self._lock:
            group = self._groups.get(operation)
            return dict(group) if group else None

    def view(self) -> dict[str, Any]:
        with self._lock:
            return {"groups": {k: dict(v) for k, v in sorted(self._groups.items())},
                    "observed": self.observed_at is not None, "error": self.last_error}


def _client(service: str) -> Callable[[], Any]:
    def make() -> Any:
        import boto3
        from botocore.config import Config

        # Short timeouts: a slow AWS endpoint delays the next observation, nothing else.
        return boto3.client(service, config=Config(
            connect_timeout=3, read_timeout=10, retries={"max_attempts": 2, "mode": "standard"}))

    return make


class AwsDispatcher:
    """The reconciler's dispatcher for AWS (see the module docstring).

    Parameters:
        store: the declarations; each pass's stack config is computed from them.
        driver: applies the stack config (a :class:`pulumi_stack.PulumiStack`).
        local: runs the archivers on this machine.
        groups: the agents' autoscaling groups (default: boto3, this stack's tag).
        metrics: the CloudWatch publisher (default: boto3).
        alarms: the pools' alarm states for status (default: boto3).
        debounce: seconds of quiet before a changed config is applied.
        clock: monotonic seconds (tests drive it).
        deploys: whether this manager updates the stack. False on the manager node
            (--no-deploy): it has neither the Pulumi CLI nor deploy permissions, and
            only publishes the metrics and reads the groups; ``driver`` then only names
            the stack, whose short name is the groups' ``streamboss:stack`` tag.
    """

    def __init__(self, store: Store, driver: StackDriver, local: LocalDispatcher,
                 groups: AgentGroups | None = None, metrics: MetricsPublisher | None = None,
                 alarms: PoolAlarms | None = None,
                 debounce: float = DEBOUNCE_SECONDS,
                 clock: Callable[[], float] = time.monotonic, deploys: bool = True) -> None:
        self.store = store
        self.deploys = deploys
        self.local = local
        self.clock = clock
        self.updater = StackUpdater(driver, debounce=debounce, clock=clock)
        short_name = driver.name.rsplit("/", 1)[-1]
        self.groups = groups or AgentGroups(short_name, _client("autoscaling"))
        self.metrics = metrics or MetricsPublisher()
        self.alarms = alarms or PoolAlarms()
        # Deleted operations and when: their queue goes only once a describe made
        # after the deletion shows no agents (see status()).
        self._forgotten: dict[str, float] = {}
        self._samples: dict[str, Sample] = {}
        self._samples_lock = threading.Lock()
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._observer: threading.Thread | None = None

    # -- the reconciler's Dispatcher protocol ---------------------------------------------

    def scale(self, operation: Operation, definition: Definition, count: int) -> None:
        """Nothing to start: the group's policies do the scaling, on the metrics.

        The count the manager decided stays in the reconciler's status (``desired``);
        a re-declared operation is no longer a deleted one.
        """
        self._forgotten.pop(operation.name, None)

    def run_archiver(self, archive: Archive, run: bool) -> None:
        self.local.run_archiver(archive, run)

    def status(self, operation: str) -> dict[str, int]:
        """Agents of ``operation``'s group (archiver pools: the local processes).

        A deleted operation reports one draining agent until a describe made
        after its deletion shows its group empty or gone, so the reconciler
        keeps its queue while an agent may still consume from it.
        """
        if operation.startswith(ARCHIVER_PREFIX):
            return self.local.status(operation)
        group = self.groups.get(operation)
        running = group["running"] if group else 0
        draining = group["draining"] if group else 0
        forgotten_at = self._forgotten.get(operation)
        if forgotten_at is not None and running == 0 and draining == 0:
            observed = self.groups.observed_at
            if not self.groups.known or observed is None or observed <= forgotten_at:
                draining = 1
            else:
                del self._forgotten[operation]
        return {"running": running, "draining": draining, "restarts": 0}

    def forget(self, operation: str) -> None:
        if operation.startswith(ARCHIVER_PREFIX):
            self.local.forget(operation)
        else:
            self._forgotten[operation] = self.clock()

    def reap(self) -> None:
        self.local.reap()

    def _offer_config(self) -> None:
        try:
            definitions = {d.id: d for d in self.store.definitions()}
            config = stack_config(self.store.operations(), definitions)
        except StackConfigError as exc:
            self.updater.fail(str(exc))
        else:
            self.updater.offer(config)

    def report(self, statuses: Mapping[str, Any]) -> None:
        """End of a pass: offer the stack config and hand the observations to the observer.

        Parameters:
            statuses: the pass's ``OperationStatus`` by operation name.
        """
        if self.deploys:
            self._offer_config()
        known = self.groups.known
        samples = {name: Sample(name, s.backlog, s.wanted, s.running if known else None,
                                self._desired(name) if known else None)
                   for name, s in statuses.items()}
        with self._samples_lock:
            flipped = any(self._samples.get(n) is None or self._samples[n].wanted != s.wanted
                          for n, s in samples.items())
            self._samples = samples
        if flipped:
            # Demand changed: the observer publishes now, not at its next tick
            # (the publisher bounds how often a flapping demand may do that).
            self._wake.set()

    def _desired(self, operation: str) -> int | None:
        group = self.groups.get(operation)
        return None if group is None else group.get("desired")

    # -- lifecycle ----------------------------------------------------------------------

    def replace_previous(self) -> int:
        """Stop archivers a previous manager left (agents on AWS are the groups')."""
        return self.local.replace_previous()

    def observe(self, now: float | None = None) -> None:
        """One observer step: refresh the groups if stale, publish metrics if due."""
        now = self.clock() if now is None else now
        with self._samples_lock:
            samples = dict(self._samples)
        # Publish first: a Wanted flip must not wait behind a describe call.
        self.metrics.publish_if_due(samples, now)
        self.groups.refresh_if_stale(now)

    def start(self) -> None:
        """Start the observer and (when it deploys) the stack updater threads."""
        if self.deploys:
            self.updater.start()
        self._observer = threading.Thread(target=self._observe_loop, name="aws-observer",
                                          daemon=True)
        self._observer.start()

    def _observe_loop(self) -> None:
        while not self._stop.is_set():
            try:
                self.observe()
            except Exception:  # keep observing; each part logs its own AWS errors
                log.exception("AWS observer step failed")
            self._wake.wait(OBSERVE_INTERVAL)
            self._wake.clear()

    def stop_all(self, timeout: float = 40.0) -> None:
        """The manager is stopping: stop the threads and drain the local archivers.

        The agents are the autoscaling groups' and keep running.
        """
        self._stop.set()
        self._wake.set()
        if self._observer is not None:
            self._observer.join(timeout=OBSERVE_INTERVAL + 15)
        self.updater.stop()
        self.local.stop_all(timeout)

    def describe(self) -> dict[str, Any]:
        """The dispatcher's own state for ``/v1/status``."""
        return {
            "stack": self.updater.state() if self.deploys else {
                "stack": self.updater.driver.name, "state": EXTERNAL, "last_error": None,
                "last_result": None, "next_attempt_in": None},
            "cloud": {
                "agent_groups": self.groups.view(),
                "metrics": {"last_published_at": self.metrics.last_published_at,
                            "error": self.metrics.last_error},
                **self.pools_view(),
            },
        }

    def pools_view(self) -> dict[str, Any]:
        """Per operation, why its pool is where it is: the group's counts, its
        alarms' states and the metrics last published for it (``status``).

        The alarms are read here, at most every few seconds (``PoolAlarms``);
        the groups and metrics are the observer's, already in memory.
        """
        self.alarms.refresh_if_stale()
        groups = self.groups.view()["groups"]
        last = self.metrics.last()
        alarms = self.alarms.for_groups({op: g["group"] for op, g in groups.items()})
        return {
            "alarms": self.alarms.state(),
            "operations": {op: {
                "group": groups.get(op),
                "alarms": alarms.get(op, {}),
                "metrics": {"published_at": last["published_at"] if op in last["values"]
                            else None, "values": last["values"].get(op)},
            } for op in sorted(set(groups) | set(last["values"]))},
        }
