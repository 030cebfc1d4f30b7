"""The AWS dispatcher: Automation API calls and their order (a fake stops at the
API boundary), the debounced one-at-a-time updater, the scaling metrics and the
autoscaling groups through moto, the real reconciler against the real RabbitMQ,
and the one-line refusal of a manager whose machine has no Pulumi CLI."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
import uuid
import warnings
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import boto3
import pika
import pytest
from click.testing import CliRunner
from moto import mock_aws
from pulumi.automation import OpType
from pulumi.automation._cmd import CommandResult
from pulumi.automation.errors import CommandError, StackNotFoundError

from infra.operations import parse_operations
from streamboss.manager import cli as cli_module
from streamboss.manager import cloud_metrics
from streamboss.manager.api import Manager, create_app
from streamboss.manager.broker import Broker
from streamboss.manager.cloud_alarms import PoolAlarms, alarm_kind
from streamboss.manager.cloud_metrics import MetricsPublisher, Sample
from streamboss.manager.dispatch_aws import (
    FAILED,
    IDLE,
    WAITING,
    AgentGroups,
    AwsDispatcher,
    StackUpdater,
    sha256,
)
from streamboss.manager.dispatch_local import LocalDispatcher
from streamboss.manager.model import Definition, Operation, ScalingPolicy
from streamboss.manager.pulumi_stack import (
    CLI_MISSING,
    PulumiStack,
    PulumiUnavailable,
    StackError,
    check_stack_name,
)
from streamboss.manager.reconciler import OperationStatus, Reconciler, dead_queue
from streamboss.manager.stack_config import (
    CONFIG_KEY,
    StackConfig,
    operations_config,
    render,
    stack_config,
)
from streamboss.manager.store import Store

from .conftest import MANAGER, MOTO_ENV, ROOT, free_port, op_queue, stream_exchange
from .requirements import require

# These tests are about a machine without the Pulumi CLI (CI's, as set up by .ci/run).
NO_PULUMI_CLI = "a Pulumi CLI is installed here: these tests need a machine without one"

REGION = "us-east-1"


# -- a fake Automation API: records every call, answers like pulumi.automation -------------


class FakeConfigValue:
    def __init__(self, value: str, secret: bool = False) -> None:
        self.value = value
        self.secret = secret


class FakeSummary:
    def __init__(self, result: str, changes: dict[Any, int]) -> None:
        self.result = result
        self.resource_changes = changes


class FakeResult:
    def __init__(self, change_summary: dict[Any, int] | None = None,
                 summary: FakeSummary | None = None) -> None:
        self.change_summary = change_summary
        self.summary = summary


class FakeAutomation:
    """Stands in for ``pulumi.automation``; ``fail`` makes one step raise."""

    ConfigValue = FakeConfigValue

    def __init__(self, fail: dict[str, BaseException] | None = None,
                 up_result: str = "succeeded") -> None:
        self.calls: list[tuple[Any, ...]] = []
        self.fail = fail or {}
        self.up_result = up_result

    def _step(self, name: str, *args: Any) -> None:
        self.calls.append((name, *args))
        if name in self.fail:
            raise self.fail[name]

    def select_stack(self, stack_name: str, work_dir: str) -> FakeAutomation:
        self._step("select_stack", stack_name, work_dir)
        return self

    def set_config(self, key: str, value: FakeConfigValue, path: bool = False) -> None:
        self._step("set_config", key, value.value, value.secret, path)

    def set_secret(self, stack: str, key: str, value: str) -> None:
        """PulumiStack's secret_writer (the CLI with the value on stdin)."""
        self._step("set_secret", stack, key, value)

    def preview(self, **kwargs: Any) -> FakeResult:
        self._step("preview", kwargs.get("message"))
        return FakeResult(change_summary={OpType.CREATE: 7, OpType.SAME: 40})

    def up(self, **kwargs: Any) -> FakeResult:
        self._step("up", kwargs.get("message"))
        return FakeResult(summary=FakeSummary(self.up_result, {OpType.CREATE: 7,
                                                               OpType.SAME: 40}))


def command_error(stderr: str) -> CommandError:
    return CommandError(CommandResult(stdout="Previewing update (o/p/s)\n", stderr=stderr,
                                      code=255))


@pytest.fixture
def project(tmp_path: Path) -> Path:
    (tmp_path / "Pulumi.yaml").write_text("name: streamboss\nruntime: python\n")
    return tmp_path


def sample_declarations() -> tuple[list[Operation], dict[int, Definition]]:
    definitions = {
        1: Definition(1, "upper", 1, {"exec": "tr a-z A-Z", "mode": "service"}, ""),
        2: Definition(2, "resize", 3, {"exec": ["convert", "-", "-resize", "50%", "-"],
                                       "image": "ami-0imagemagick"}, ""),
        3: Definition(3, "count", 1, {"exec": "wc -c"}, ""),
    }
    operations = [
        Operation("upper", 1, "raw", "shout", ScalingPolicy(min=0, max=4)),
        Operation("resize", 2, "images", "thumbs", ScalingPolicy(min=1, max=10)),
        Operation("count", 3, "shout", "sizes", ScalingPolicy(min=0, max=2)),
    ]
    return operations, definitions


CONFIG_TEXT = render(operations_config(*sample_declarations()))
CONFIG = stack_config(*sample_declarations())


def test_apply_selects_sets_config_previews_then_updates_in_that_order(project: Path):
    auto = FakeAutomation()
    phases: list[str] = []
    summary = PulumiStack("acme/streamboss/dev", project, auto,
                           auto.set_secret).apply(CONFIG, phases.append)
    message = "streamboss manager: declarations changed"
    assert auto.calls == [
        ("select_stack", "acme/streamboss/dev", str(project)),
        ("set_config", "streamboss:operations", CONFIG_TEXT, False, False),
        ("set_secret", "acme/streamboss/dev", "streamboss:operationsEnv", CONFIG.env),
        ("preview", message),
        ("up", message),
    ]
    assert phases == ["previewing", "updating"]
    assert summary == {"preview": {"create": 7, "same": 40},
                       "update": {"result": "succeeded", "changes": {"create": 7, "same": 40}}}
    json.dumps(summary)  # what /v1/status serves must be JSON


def test_the_config_text_written_is_what_the_pulumi_program_parses(project: Path):
    auto = FakeAutomation()
    PulumiStack("o/p/s", project, auto, auto.set_secret).apply(CONFIG)
    (_, key, text, secret, _) = auto.calls[1]
    # infra/settings.py reads the key with Config.get_object, i.e. json.loads of this text.
    specs = parse_operations(json.loads(text))
    assert key == CONFIG_KEY and not secret
    assert [(s.name, s.input, s.output, s.min, s.max) for s in specs] == [
        ("count", "shout", "sizes", 0, 2), ("resize", "images", "thumbs", 1, 10),
        ("upper", "raw", "shout", 0, 4)]
    assert specs[1].image == "ami-0imagemagick"


def test_a_failed_preview_stops_before_the_update_with_pulumis_error_line(project: Path):
    auto = FakeAutomation(fail={"preview": command_error(
        "warning: A new version of Pulumi is available.\n"
        "error: streamboss:brokerPassword is required\n")})
    with pytest.raises(StackError) as caught:
        PulumiStack("o/p/s", project, auto, auto.set_secret).apply(CONFIG)
    assert [c[0] for c in auto.calls] == ["select_stack", "set_config", "set_secret",
                                          "preview"]
    assert caught.value.phase == "preview"
    assert str(caught.value) == "preview failed: error: streamboss:brokerPassword is required"


def test_a_failed_update_keeps_the_preview_in_its_summary(project: Path):
    auto = FakeAutomation(fail={"up": command_error("some provider noise\nfinal line\n")})
    with pytest.raises(StackError) as caught:
        PulumiStack("o/p/s", project, auto, auto.set_secret).apply(CONFIG)
    assert caught.value.phase == "update"
    assert str(caught.value) == "update failed: final line"
    assert caught.value.summary == {"preview": {"create": 7, "same": 40}}


def test_an_update_whose_result_is_not_succeeded_is_a_failure(project: Path):
    with pytest.raises(StackError, match="update failed: result failed"):
        auto = FakeAutomation(up_result="failed")
        PulumiStack("o/p/s", project, auto, auto.set_secret).apply(CONFIG)


def test_a_missing_stack_names_pulumi_stack_init(project: Path):
    auto = FakeAutomation(fail={"select_stack": StackNotFoundError(
        CommandResult("", "error: no stack named 'o/p/s' found", 255))})
    with pytest.raises(StackError, match=r"stack o/p/s does not exist: run `pulumi stack init "
                                         r"o/p/s`"):
        PulumiStack("o/p/s", project, auto, auto.set_secret).apply(CONFIG)


def test_the_real_automation_api_without_the_cli_is_the_one_line_cli_error(project: Path):
    require(shutil.which("pulumi") is None, NO_PULUMI_CLI)
    # pulumi.automation raises FileNotFoundError: 'pulumi' when it shells out.
    with pytest.raises(PulumiUnavailable) as caught:
        PulumiStack("o/p/s", project).apply(CONFIG)
    assert str(caught.value) == CLI_MISSING
    with pytest.raises(PulumiUnavailable, match="no `pulumi` on PATH"):
        PulumiStack("o/p/s", project).check()


@pytest.mark.parametrize("name", ["dev", "acme/dev", "acme/streamboss/dev", "o/p/s"])
def test_stack_references_are_accepted(name: str):
    assert check_stack_name(name) == name


@pytest.mark.parametrize("name", ["", "a/b/c/d", "a//b", "a b", "/dev", "dev/"])
def test_malformed_stack_references_are_refused(name: str):
    with pytest.raises(ValueError, match="ORG/PROJECT/STACK"):
        check_stack_name(name)


# -- the updater: debounce, one at a time, failures and retries -----------------------------


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class RecordingDriver:
    name = "acme/streamboss/dev"

    def __init__(self) -> None:
        self.applied: list[str] = []
        self.fail_next: list[str] = []

    def apply(self, config: StackConfig, on_phase: Any = None) -> dict[str, Any]:
        self.applied.append(config.operations)
        if self.fail_next:
            raise StackError("preview", self.fail_next.pop(0), {})
        return {"preview": {"update": 1}, "update": {"result": "succeeded", "changes": {}}}


def test_quick_changes_are_applied_once_after_the_debounce():
    clock, driver = Clock(), RecordingDriver()
    updater = StackUpdater(driver, debounce=5.0, clock=clock)
    for text in ("A", "B", "C"):
        updater.offer(StackConfig(text))
        assert updater.state()["state"] == WAITING
        assert not updater.run_due()
        clock.now += 2.0
    # C was offered 2 s ago: 3 more seconds of quiet are needed.
    clock.now += 2.9
    assert not updater.run_due()
    clock.now += 0.1
    assert updater.run_due()
    assert driver.applied == ["C"]
    state = updater.state()
    assert state["state"] == IDLE and state["last_error"] is None
    assert state["applied_config_sha256"] == sha256("C") == state["wanted_config_sha256"]
    assert state["last_result"]["outcome"] == "succeeded"
    # The same config again is nothing to do.
    updater.offer(StackConfig("C"))
    clock.now += 60
    assert not updater.run_due()
    assert driver.applied == ["C"]


def test_a_change_reverted_within_the_debounce_applies_nothing():
    clock, driver = Clock(), RecordingDriver()
    updater = StackUpdater(driver, debounce=5.0, clock=clock)
    updater.offer(StackConfig("A"))
    clock.now += 5
    updater.run_due()
    updater.offer(StackConfig("B"))
    clock.now += 1
    updater.offer(StackConfig("A"))
    assert updater.state()["state"] == IDLE
    clock.now += 60
    assert not updater.run_due()
    assert driver.applied == ["A"]


def test_a_failure_is_recorded_and_retried_later_with_backoff():
    clock, driver = Clock(), RecordingDriver()
    driver.fail_next = ["preview failed: error: no credentials", "preview failed: again"]
    updater = StackUpdater(driver, debounce=5.0, retry=60.0, clock=clock)
    updater.offer(StackConfig("A"))
    clock.now += 5
    assert updater.run_due()
    state = updater.state()
    assert state["state"] == FAILED
    assert state["last_error"] == "preview failed: error: no credentials"
    assert state["last_result"]["outcome"] == "failed"
    assert state["applied_config_sha256"] is None
    assert state["next_attempt_in"] == 60.0
    clock.now += 59
    assert not updater.run_due()
    clock.now += 1
    assert updater.run_due()  # the retry fails again: the delay doubles
    assert updater.state()["next_attempt_in"] == 120.0
    clock.now += 119
    assert not updater.run_due()
    clock.now += 1
    assert updater.run_due()
    assert driver.applied == ["A", "A", "A"]
    state = updater.state()
    assert state["state"] == IDLE and state["last_error"] is None
    assert state["applied_config_sha256"] == sha256("A")


def test_a_new_config_after_a_failure_waits_only_for_the_debounce():
    clock, driver = Clock(), RecordingDriver()
    driver.fail_next = ["update failed: x"]
    updater = StackUpdater(driver, debounce=5.0, retry=600.0, clock=clock)
    updater.offer(StackConfig("A"))
    clock.now += 5
    updater.run_due()
    updater.offer(StackConfig("B"))
    assert updater.state()["state"] == WAITING
    clock.now += 5
    assert updater.run_due()
    assert driver.applied == ["A", "B"]


class BlockingDriver:
    """Blocks in apply until released; counts how many applies overlap."""

    name = "o/p/s"

    def __init__(self) -> None:
        self.applied: list[str] = []
        self.entered = threading.Event()
        self.release = threading.Event()
        self.active = 0
        self.max_active = 0
        self.lock = threading.Lock()

    def apply(self, config: StackConfig, on_phase: Any = None) -> dict[str, Any]:
        with self.lock:
            self.active += 1
            self.max_active = max(self.max_active, self.active)
            self.applied.append(config.operations)
        if on_phase:
            on_phase("updating")
        self.entered.set()
        self.release.wait(10)
        with self.lock:
            self.active -= 1
        return {}


def wait_for(predicate: Any, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def test_one_apply_at_a_time_and_changes_meanwhile_make_one_more():
    driver = BlockingDriver()
    updater = StackUpdater(driver, debounce=0.05)
    updater.start()
    try:
        updater.offer(StackConfig("A"))
        assert driver.entered.wait(5)
        driver.entered.clear()
        for text in ("B", "C", "D"):
            updater.offer(StackConfig(text))
        time.sleep(0.3)  # several debounce periods: still only the first apply
        assert driver.applied == ["A"]
        assert updater.state()["state"] == "updating"
        driver.release.set()
        wait_for(lambda: updater.state()["applied_config_sha256"] == sha256("D"))
    finally:
        driver.release.set()
        updater.stop()
    assert driver.applied == ["A", "D"]
    assert driver.max_active == 1


# -- metrics through moto ---------------------------------------------------------------------


@pytest.fixture
def aws_env(monkeypatch: pytest.MonkeyPatch) -> Any:
    for key, value in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                       "AWS_SESSION_TOKEN": "testing", "AWS_DEFAULT_REGION": REGION,
                       "AWS_EC2_METADATA_DISABLED": "true"}.items():
        monkeypatch.setenv(key, value)
    for key in ("AWS_PROFILE", "AWS_REGION", "AWS_ENDPOINT_URL"):
        monkeypatch.delenv(key, raising=False)
    with mock_aws():
        yield


STAMP = datetime(2026, 1, 2, 3, 4, 0, tzinfo=UTC)


def metric_values(operation: str, around: datetime = STAMP) -> dict[str, float]:
    """Every streamboss metric of ``operation`` in moto, by name: its one datapoint's sum
    (within a day of ``around``)."""
    client = boto3.client("cloudwatch", region_name=REGION)
    found = {}
    dims = [{"Name": "Operation", "Value": operation}]
    listed = client.list_metrics(Namespace="streamboss", Dimensions=dims)["Metrics"]
    for metric in listed:
        assert metric["Dimensions"] == dims
        stats = client.get_metric_statistics(
            Namespace="streamboss", MetricName=metric["MetricName"], Dimensions=dims,
            StartTime=around - timedelta(days=1), EndTime=around + timedelta(days=1),
            Period=60, Statistics=["Sum", "SampleCount"])["Datapoints"]
        assert len(stats) == 1 and stats[0]["SampleCount"] == 1.0, stats
        found[metric["MetricName"]] = stats[0]["Sum"]
    return found


def test_metrics_reach_cloudwatch_with_their_names_dimension_and_values(aws_env):
    publisher = MetricsPublisher(wall_clock=lambda: STAMP)
    samples = {"upper": Sample("upper", 2500, True, 2, 3), "idle": Sample("idle", 7, False, 0),
               "blind": Sample("blind", 30, True, None)}
    assert publisher.publish_if_due(samples, now=0.0)
    assert publisher.published_calls == 1
    assert metric_values("upper") == {"Backlog": 2500.0, "Wanted": 1.0, "BacklogPerAgent": 1250.0,
                                      "DesiredCapacity": 3.0}
    # No agents: backlog per agent is the whole backlog (max(1, running)).
    assert metric_values("idle") == {"Backlog": 7.0, "Wanted": 0.0, "BacklogPerAgent": 7.0}
    # Agents unknown: no per-agent value rather than a wrong one.
    assert metric_values("blind") == {"Backlog": 30.0, "Wanted": 1.0}
    assert publisher.last_published_at == "2026-01-02T03:04:00Z"
    assert cloud_metrics.NAMESPACE == "streamboss"


def test_the_pulumi_program_scales_on_the_same_names():
    from infra import metrics

    assert (metrics.NAMESPACE, metrics.OPERATION_DIMENSION, metrics.BACKLOG, metrics.WANTED,
            metrics.BACKLOG_PER_AGENT, metrics.DESIRED_CAPACITY) == (
        "streamboss", "Operation", "Backlog", "Wanted", "BacklogPerAgent", "DesiredCapacity")
    assert metrics.dimensions is cloud_metrics.dimensions
    assert metrics.alarm_period is cloud_metrics.alarm_period


def test_every_datum_is_high_resolution_so_alarms_may_use_10_second_periods():
    client = CountingClient()
    publisher = MetricsPublisher(lambda: client, wall_clock=lambda: STAMP)
    publisher.publish_if_due({"op": Sample("op", 5, True, 1, 1),
                              "blind": Sample("blind", 5, True, None)}, 0.0)
    (data,) = client.calls
    assert len(data) == 6
    assert all(d["StorageResolution"] == 1 for d in data)
    # An alarm on them may have a 10-second period while CloudWatch keeps such
    # datapoints (three hours); a longer look-back falls back to one minute.
    assert cloud_metrics.alarm_period(10) == 10
    assert cloud_metrics.alarm_period(3 * 3600) == 10
    assert cloud_metrics.alarm_period(3 * 3600 + 1) == 60
    # Published twice per alarm period: every 10-second bucket holds a datapoint.
    assert cloud_metrics.PUBLISH_INTERVAL * 2 <= cloud_metrics.ALARM_PERIOD_SECONDS


def test_moto_cloudwatch_takes_the_high_resolution_datums(aws_env):
    publisher = MetricsPublisher(wall_clock=lambda: datetime.now(UTC))
    assert publisher.publish_if_due({"op": Sample("op", 3, True, 1, 1)}, 0.0)
    assert publisher.last_error is None
    client = boto3.client("cloudwatch", region_name=REGION)
    now = datetime.now(UTC)
    stats = client.get_metric_statistics(
        Namespace="streamboss", MetricName="Wanted",
        Dimensions=[{"Name": "Operation", "Value": "op"}], StartTime=now - timedelta(minutes=5),
        EndTime=now + timedelta(minutes=5), Period=10, Statistics=["Maximum"])["Datapoints"]
    assert [d["Maximum"] for d in stats] == [1.0]


def test_more_than_a_thousand_datums_go_in_several_calls(aws_env):
    publisher = MetricsPublisher(wall_clock=lambda: STAMP)
    samples = {f"op{i:03d}": Sample(f"op{i:03d}", i, True, 1) for i in range(400)}
    publisher.publish_if_due(samples, now=0.0)
    assert publisher.published_calls == 2  # 1,200 datums, at most 1,000 a call
    client = boto3.client("cloudwatch", region_name=REGION)
    listed = [m for page in client.get_paginator("list_metrics").paginate(Namespace="streamboss")
              for m in page["Metrics"]]
    assert len(listed) == 1200
    assert metric_values("op399") == {"Backlog": 399.0, "Wanted": 1.0, "BacklogPerAgent": 399.0}


class CountingClient:
    def __init__(self) -> None:
        self.calls: list[list[dict[str, Any]]] = []

    def put_metric_data(self, Namespace: str, MetricData: list[dict[str, Any]]) -> None:
        assert Namespace == "streamboss"
        self.calls.append(MetricData)


def test_published_every_interval_and_at_once_on_a_wanted_flip_at_most_once_a_second():
    client = CountingClient()
    publisher = MetricsPublisher(lambda: client, wall_clock=lambda: STAMP)
    quiet = {"op": Sample("op", 10, False, 0)}
    assert publisher.publish_if_due(quiet, 0.0)
    assert not publisher.publish_if_due(quiet, 4.9)            # nothing changed
    assert publisher.publish_if_due(quiet, 5.0)                # an interval passed: again
    busier = {"op": Sample("op", 500, False, 0)}
    assert not publisher.publish_if_due(busier, 6.0)           # backlog moved: next interval
    assert publisher.publish_if_due({"op": Sample("op", 500, True, 0)}, 6.5)  # wanted flipped
    # Flapping demand: at most one extra publish a second.
    assert not publisher.publish_if_due({"op": Sample("op", 500, False, 0)}, 7.0)
    assert publisher.publish_if_due({"op": Sample("op", 500, False, 0)}, 7.5)
    both = {"op": Sample("op", 500, False, 0), "new": Sample("new", 0, False, 0)}
    assert not publisher.publish_if_due(both, 8.0)
    assert publisher.publish_if_due(both, 8.5)                 # a new operation: at once
    assert len(client.calls) == 5
    values = {d["MetricName"]: d["Value"] for d in client.calls[2]}
    assert values == {"Backlog": 500.0, "Wanted": 1.0, "BacklogPerAgent": 500.0}
    assert publisher.last() == {"published_at": "2026-01-02T03:04:00Z", "values": {
        "new": {"Backlog": 0.0, "BacklogPerAgent": 0.0, "Wanted": 0.0},
        "op": {"Backlog": 500.0, "BacklogPerAgent": 500.0, "Wanted": 0.0}}}


def test_a_failing_publish_is_logged_once_retried_later_and_never_raised(caplog):
    class Flaky(CountingClient):
        down = True

        def put_metric_data(self, Namespace: str, MetricData: list[dict[str, Any]]) -> None:
            if self.down:
                raise ConnectionError("no route to monitoring.us-east-1.amazonaws.com")
            super().put_metric_data(Namespace, MetricData)

    client = Flaky()
    publisher = MetricsPublisher(lambda: client, wall_clock=lambda: STAMP)
    samples = {"op": Sample("op", 1, True, 1)}
    assert not publisher.publish_if_due(samples, 0.0)
    assert publisher.last_error == "ConnectionError: no route to monitoring.us-east-1.amazonaws.com"
    assert not publisher.due(samples, 14.0)                    # retry waits 15 s
    assert not publisher.publish_if_due(samples, 15.0)         # fails again, same message
    warnings = [r for r in caplog.records if "CloudWatch failed" in r.getMessage()]
    assert len(warnings) == 1
    client.down = False
    assert not publisher.publish_if_due(samples, 29.0)
    assert publisher.publish_if_due(samples, 30.0)
    assert publisher.last_error is None and len(client.calls) == 1


def test_no_region_is_an_error_reported_not_raised(monkeypatch: pytest.MonkeyPatch,
                                                   tmp_path: Path):
    for key in ("AWS_DEFAULT_REGION", "AWS_REGION", "AWS_PROFILE"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    publisher = MetricsPublisher()
    assert not publisher.publish_if_due({"op": Sample("op", 1, True, 1)}, 0.0)
    assert publisher.last_error is not None and "NoRegionError" in publisher.last_error


# -- the autoscaling groups through moto ---------------------------------------------------------


def make_group(name: str, stack: str, operation: str | None, desired: int) -> None:
    ec2 = boto3.client("ec2", region_name=REGION)
    if not ec2.describe_launch_templates(
            Filters=[{"Name": "launch-template-name", "Values": ["agents"]}])["LaunchTemplates"]:
        ec2.create_launch_template(LaunchTemplateName="agents", LaunchTemplateData={
            "ImageId": "ami-12c6146b", "InstanceType": "t3.small"})
    # The tags infra/__main__.py and infra/operation_pool.py put on every pool.
    tags = {"streamboss:stack": stack, "managed-by": "pulumi", "Name": f"agents-{operation}"}
    if operation:
        tags["streamboss:operation"] = operation
    boto3.client("autoscaling", region_name=REGION).create_auto_scaling_group(
        AutoScalingGroupName=name, MinSize=0, MaxSize=8, DesiredCapacity=desired,
        LaunchTemplate={"LaunchTemplateName": "agents", "Version": "$Latest"},
        AvailabilityZones=[f"{REGION}a"],
        Tags=[{"Key": k, "Value": v, "PropagateAtLaunch": True} for k, v in tags.items()])


class NullDriver:
    name = "acme/streamboss/dev"

    def apply(self, config: StackConfig, on_phase: Any = None) -> dict[str, Any]:
        return {}


@pytest.fixture
def dispatcher(aws_env, tmp_path: Path) -> Any:
    store = Store(tmp_path / "state")
    clock = Clock()
    made = AwsDispatcher(store, NullDriver(), LocalDispatcher(tmp_path / "state", "amqp://x"),
                         clock=clock)
    made.test_clock = clock  # type: ignore[attr-defined]
    yield made
    store.close()


def test_agent_counts_come_from_this_stacks_tagged_groups(dispatcher):
    make_group("agents-upper-asg-1a2b", "dev", "upper", 3)
    make_group("agents-upper-asg-9f9f", "prod", "upper", 5)   # another stack's pool
    make_group("something-else", "dev", None, 1)               # not an operation's
    dispatcher.observe()
    assert dispatcher.status("upper") == {"running": 3, "draining": 0, "restarts": 0}
    assert dispatcher.status("lower") == {"running": 0, "draining": 0, "restarts": 0}
    view = dispatcher.describe()["cloud"]["agent_groups"]
    assert view["error"] is None
    assert view["groups"] == {"upper": {"group": "agents-upper-asg-1a2b", "min": 0, "max": 8,
                                        "desired": 3, "running": 3, "in_service": 3,
                                        "draining": 0}}


def test_groups_are_described_at_most_every_refresh_period(dispatcher):
    make_group("agents-upper-asg", "dev", "upper", 1)
    dispatcher.observe()
    boto3.client("autoscaling", region_name=REGION).set_desired_capacity(
        AutoScalingGroupName="agents-upper-asg", DesiredCapacity=4)
    dispatcher.test_clock.now += 14
    dispatcher.observe()
    assert dispatcher.status("upper")["running"] == 1          # cached
    dispatcher.test_clock.now += 1
    dispatcher.observe()
    assert dispatcher.status("upper")["running"] == 4


def test_a_deleted_operations_agents_count_until_a_later_describe_shows_none(dispatcher):
    make_group("agents-gone-asg", "dev", "gone", 0)
    dispatcher.observe()
    assert dispatcher.status("gone") == {"running": 0, "draining": 0, "restarts": 0}
    dispatcher.forget("gone")
    # The view predates the deletion: an agent may have started since, keep the queue.
    assert dispatcher.status("gone")["draining"] == 1
    dispatcher.test_clock.now += 15
    dispatcher.observe()
    assert dispatcher.status("gone") == {"running": 0, "draining": 0, "restarts": 0}


def test_unreadable_groups_are_reported_and_leave_counts_unknown(tmp_path: Path, caplog):
    def denied() -> Any:
        raise PermissionError("AccessDenied: autoscaling:DescribeAutoScalingGroups")

    store = Store(tmp_path / "state")
    clock = Clock()
    published = CountingClient()
    made = AwsDispatcher(store, NullDriver(), LocalDispatcher(tmp_path / "state", "amqp://x"),
                         groups=AgentGroups("dev", denied),
                         metrics=MetricsPublisher(lambda: published), clock=clock)
    try:
        made.observe()
        made.observe()
        assert not made.groups.known
        made.report({"op": OperationStatus("op", "a", "b", True, 1, 0, 0, 0, 42, 0, None, None)})
        clock.now += 60
        made.observe()
        names = {d["MetricName"] for d in published.calls[-1]}
        assert names == {"Backlog", "Wanted"}                   # no per-agent guess
        assert made.describe()["cloud"]["agent_groups"]["error"] == (
            "PermissionError: AccessDenied: autoscaling:DescribeAutoScalingGroups")
        logged = [r for r in caplog.records if "autoscaling groups failed" in r.getMessage()]
        assert len(logged) == 1
    finally:
        store.close()


# -- the real reconciler on the real broker, AWS through moto ------------------------------------


def test_a_reconciler_pass_declares_topology_offers_the_config_and_publishes_metrics(
        aws_env, tmp_path: Path, broker_url: str, names):
    store = Store(tmp_path / "state")
    driver = RecordingDriver()
    clock = Clock()
    dispatcher = AwsDispatcher(store, driver, LocalDispatcher(tmp_path / "state", broker_url),
                               debounce=0.0, clock=clock)
    reconciler = Reconciler(store, Broker(broker_url), dispatcher)
    source, sink, operation = names("in"), names("out"), names("op")
    definition = store.define_process({"definition": {"exec": "tr a-z A-Z", "name": "upper"}})
    store.create_stream(source)
    store.create_operation(operation, str(definition.id), source, sink,
                           {"min": 0, "max": 3, "target_backlog_per_agent": 2})
    make_group("agents-op-asg", "dev", operation, 2)
    connection = pika.BlockingConnection(pika.URLParameters(broker_url))
    try:
        reconciler.run_pass()              # topology over AMQP, as with the local dispatcher
        channel = connection.channel()
        channel.confirm_delivery()
        for i in range(6):
            channel.basic_publish(stream_exchange(source), "", f"m{i}".encode())
        # A consumer on the output stream makes the operation wanted.
        watcher = channel.queue_declare("", exclusive=True).method.queue
        channel.queue_bind(watcher, stream_exchange(sink), "#")
        channel.basic_consume(watcher, lambda *_: None)
        dispatcher.groups.refresh_if_stale(clock())   # the groups' view: 2 agents
        reconciler.run_pass()
        status = reconciler.status[operation]
        assert (status.wanted, status.backlog, status.running, status.desired) == (True, 6, 2, 3)
        assert dispatcher.local.pools == {}    # no local agent process for an operation
        dispatcher.observe()
        assert metric_values(operation, datetime.now(UTC)) == {
            "Backlog": 6.0, "Wanted": 1.0, "BacklogPerAgent": 3.0, "DesiredCapacity": 2.0}
        # The declarations became the stack config, applied once the debounce is over.
        expected = render(operations_config(store.operations(),
                                            {d.id: d for d in store.definitions()}))
        assert dispatcher.updater.run_due()
        assert driver.applied == [expected]
        assert [s.name for s in parse_operations(json.loads(driver.applied[0]))] == [operation]
    finally:
        connection.close()
        remove_declared(reconciler, store, operation, (source, sink))
    assert Broker(broker_url).queue_state(op_queue(operation)) is None


def remove_declared(reconciler: Reconciler, store: Store, operation: str,
                    streams: tuple[str, ...]) -> None:
    """Delete what a test's reconciler declared on the broker; close it and the store."""
    reconciler.broker.delete_operation(operation, dead_queue(operation))
    for stream in streams:
        reconciler.broker.delete_stream(stream)
    reconciler.broker.close()
    store.close()


def wanted_datapoints(operation: str) -> tuple[int, float | None, float | None]:
    """How many ``Wanted`` datums of ``operation`` moto holds, and their minimum and maximum."""
    client = boto3.client("cloudwatch", region_name=REGION)
    now = datetime.now(UTC)
    stats = client.get_metric_statistics(
        Namespace="streamboss", MetricName="Wanted",
        Dimensions=[{"Name": "Operation", "Value": operation}],
        StartTime=now - timedelta(days=1), EndTime=now + timedelta(days=1), Period=86_400,
        Statistics=["SampleCount", "Minimum", "Maximum"])["Datapoints"]
    if not stats:
        return 0, None, None
    return (int(sum(d["SampleCount"] for d in stats)), min(d["Minimum"] for d in stats),
            max(d["Maximum"] for d in stats))


def test_a_new_consumer_publishes_wanted_1_at_once_not_at_the_next_periodic_publish(
        aws_env, tmp_path: Path, broker_url: str, names):
    """Demand appears -> the observer thread publishes Wanted = 1 through moto's
    CloudWatch, although the periodic publish is an hour away and the test's clock
    moves only the one second the flip bound asks for: only the flip can publish."""
    store = Store(tmp_path / "state")
    clock = Clock()
    publisher = MetricsPublisher(interval=3600.0)
    dispatcher = AwsDispatcher(store, RecordingDriver(),
                               LocalDispatcher(tmp_path / "state", broker_url),
                               metrics=publisher, debounce=3600.0, clock=clock)
    reconciler = Reconciler(store, Broker(broker_url), dispatcher)
    source, sink, operation = names("in"), names("out"), names("op")
    definition = store.define_process({"definition": {"exec": "cat", "name": "relay"}})
    store.create_stream(source)
    store.create_operation(operation, str(definition.id), source, sink, {"min": 0, "max": 2})
    make_group("agents-op-asg", "dev", operation, 0)
    connection = pika.BlockingConnection(pika.URLParameters(broker_url))
    dispatcher.start()
    try:
        reconciler.run_pass()
        assert not reconciler.status[operation].wanted
        wait_for(lambda: publisher.published_calls == 1)      # a new operation: at once
        assert wanted_datapoints(operation) == (1, 0.0, 0.0)
        clock.now += 1.0                                        # the flip bound, no more
        channel = connection.channel()
        watcher = channel.queue_declare("", exclusive=True).method.queue
        channel.queue_bind(watcher, stream_exchange(sink), "#")
        channel.basic_consume(watcher, lambda *_: None)
        reconciler.run_pass()
        assert reconciler.status[operation].wanted
        wait_for(lambda: wanted_datapoints(operation) == (2, 0.0, 1.0), timeout=30)
        assert publisher.published_calls == 2
        assert publisher.last()["values"][operation]["Wanted"] == 1.0
    finally:
        dispatcher.stop_all(timeout=5)
        connection.close()
        remove_declared(reconciler, store, operation, (source, sink))


# -- the API and the CLI show the stack's state ----------------------------------------------------


def status_of(manager: Manager) -> dict[str, Any]:
    """``GET /v1/status`` of ``manager``, in process."""
    with warnings.catch_warnings():
        # Starlette deprecates its httpx-based test client as it loads (a UserWarning
        # subclass); it still works.
        warnings.simplefilter("ignore")
        from fastapi.testclient import TestClient
    # A loopback Host, as the manager answers no other.
    return TestClient(create_app(manager), base_url="http://127.0.0.1").get("/v1/status").json()


def test_status_api_and_cli_show_the_stack_update(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    store = Store(tmp_path / "state")
    clock = Clock()
    driver = RecordingDriver()
    driver.fail_next = ["update failed: error: 1 resource failed"]
    dispatcher = AwsDispatcher(store, driver, LocalDispatcher(tmp_path / "state", "amqp://x"),
                               groups=AgentGroups("dev", lambda: None),
                               metrics=MetricsPublisher(CountingClient),
                               alarms=PoolAlarms(NoAlarms), clock=clock)
    try:
        dispatcher.report({})
        clock.now += 5
        dispatcher.updater.run_due()
        manager = Manager(store, Broker("amqp://guest:guest@127.0.0.1:1/"), None, None, "aws", "",
                          dispatcher.describe)
        body = status_of(manager)
    finally:
        store.close()
    stack = body["stack"]
    assert body["dispatcher"] == "aws"
    assert stack["stack"] == "acme/streamboss/dev" and stack["state"] == FAILED
    assert stack["last_error"] == "update failed: error: 1 resource failed"
    assert stack["last_result"]["outcome"] == "failed"
    assert stack["last_result"]["summary"] == {"failed_in": "preview"}
    assert stack["wanted_config_sha256"] == sha256("[]")
    assert set(body["cloud"]) == {"agent_groups", "metrics", "alarms", "operations"}

    monkeypatch.setattr(cli_module, "_call", lambda *_a, **_k: body)
    table = CliRunner().invoke(cli_module.cli, ["status"])
    assert table.exit_code == 0, table.output
    assert "stack acme/streamboss/dev: failed (next attempt in 60s); last update failed at " \
           in table.stdout
    assert "stack: update failed: error: 1 resource failed" in table.stderr
    as_json = CliRunner().invoke(cli_module.cli, ["status", "-o", "json"])
    assert json.loads(as_json.stdout)["stack"] == stack


class NoAlarms:
    """A CloudWatch client that has no alarms."""

    def get_paginator(self, name: str) -> Any:
        assert name == "describe_alarms"
        return self

    def paginate(self, **kwargs: Any) -> list[dict[str, Any]]:
        return [{"MetricAlarms": []}]


def policy_arn(group: str, name: str) -> str:
    """A scaling policy of ``group`` (moto's put_scaling_policy answers without the ARN)."""
    autoscaling = boto3.client("autoscaling", region_name=REGION)
    autoscaling.put_scaling_policy(AutoScalingGroupName=group, PolicyName=name,
                                   PolicyType="SimpleScaling",
                                   AdjustmentType="ChangeInCapacity", ScalingAdjustment=1)
    (policy,) = autoscaling.describe_policies(AutoScalingGroupName=group,
                                              PolicyNames=[name])["ScalingPolicies"]
    return policy["PolicyARN"]


def make_alarm(name: str, action: str, state: str) -> None:
    cloudwatch = boto3.client("cloudwatch", region_name=REGION)
    cloudwatch.put_metric_alarm(
        AlarmName=name, Namespace="streamboss", MetricName="Wanted",
        Dimensions=[{"Name": "Operation", "Value": "upper"}], Statistic="Maximum", Period=10,
        EvaluationPeriods=1, Threshold=1, ComparisonOperator="GreaterThanOrEqualToThreshold",
        AlarmActions=[action])
    cloudwatch.set_alarm_state(AlarmName=name, StateValue=state, StateReason="test")


@pytest.mark.parametrize(("name", "kind"), [
    ("agents-upper-wake-alarm-1a2b3c4", "wake"), ("agents-a-idle-idle-alarm-0f0f0f0", "idle"),
    ("agents-upper-shrink-alarm", "shrink"),
    ("TargetTracking-agents-upper-asg-1a2b-AlarmHigh-4e1c-8f0e", "track-high"),
    ("TargetTracking-agents-upper-asg-1a2b-AlarmLow-4e1c-8f0e", "track-low")])
def test_alarm_kinds_come_from_the_pools_resource_names(name: str, kind: str):
    assert alarm_kind(name) == kind


def test_status_shows_each_pools_group_counts_alarm_states_and_last_metrics(
        dispatcher, monkeypatch: pytest.MonkeyPatch):
    clock = dispatcher.test_clock
    dispatcher.alarms = PoolAlarms(clock=clock)
    make_group("agents-upper-asg-1a2b", "dev", "upper", 1)
    make_group("agents-upper-asg-prod", "prod", "upper", 3)    # another stack's pool
    wake = policy_arn("agents-upper-asg-1a2b", "agents-upper-wake-77aa")
    make_alarm("agents-upper-wake-alarm-1a2b3c4", wake, "ALARM")
    make_alarm("agents-upper-idle-alarm-5d6e7f8",
               policy_arn("agents-upper-asg-1a2b", "agents-upper-idle-88bb"), "OK")
    make_alarm("TargetTracking-agents-upper-asg-1a2b-AlarmHigh-4e1c",
               policy_arn("agents-upper-asg-1a2b", "agents-upper-track-99cc"),
               "INSUFFICIENT_DATA")
    # The same names in the other stack, acting on its group: never shown as ours.
    make_alarm("agents-upper-wake-alarm-ffff000",
               policy_arn("agents-upper-asg-prod", "agents-upper-wake-00dd"), "OK")
    dispatcher.groups.refresh_if_stale(clock())
    dispatcher.report({"upper": OperationStatus("upper", "raw", "shout", True, 1, 1, 0, 0, 42,
                                                0, None, None)})
    dispatcher.observe()

    pool = dispatcher.describe()["cloud"]["operations"]["upper"]
    assert pool["group"]["group"] == "agents-upper-asg-1a2b"
    assert (pool["group"]["desired"], pool["group"]["in_service"]) == (1, 1)
    assert {kind: a["state"] for kind, a in pool["alarms"].items()} == {
        "wake": "ALARM", "idle": "OK", "track-high": "INSUFFICIENT_DATA"}
    assert pool["metrics"]["values"] == {"Backlog": 42.0, "BacklogPerAgent": 42.0,
                                         "DesiredCapacity": 1.0, "Wanted": 1.0}
    assert pool["metrics"]["published_at"] == dispatcher.metrics.last_published_at is not None

    # Cached: status again within the refresh period reads no alarm.
    reads = dispatcher.alarms.reads
    dispatcher.describe()
    assert dispatcher.alarms.reads == reads
    boto3.client("cloudwatch", region_name=REGION).set_alarm_state(
        AlarmName="agents-upper-wake-alarm-1a2b3c4", StateValue="OK", StateReason="woke")
    clock.now += 10
    assert dispatcher.describe()["cloud"]["operations"]["upper"]["alarms"]["wake"]["state"] \
        == "OK"

    shown = status_in_the_cli(dispatcher, monkeypatch)
    lines = shown.stdout.splitlines()
    header = next(line for line in lines if line.startswith("POOL"))
    assert header.split() == ["POOL", "DESIRED", "IN_SERVICE", "ALARMS", "WANTED", "BACKLOG",
                              "PER_AGENT", "PUBLISHED"]
    (row,) = [line for line in lines if line.startswith("upper ")]
    assert row.split() == ["upper", "1", "1", "wake", "OK,", "track-high",
                           "INSUFFICIENT_DATA,", "idle", "OK", "1", "42", "42",
                           dispatcher.metrics.last_published_at]


def status_in_the_cli(dispatcher: Any, monkeypatch: pytest.MonkeyPatch) -> Any:
    """`streamboss status` as the CLI prints the dispatcher's /v1/status (exit 0)."""
    manager = Manager(dispatcher.store, Broker("amqp://guest:guest@127.0.0.1:1/"), None, None,
                      "aws", "", dispatcher.describe)
    body = status_of(manager)
    monkeypatch.setattr(cli_module, "_call", lambda *_a, **_k: body)
    shown = CliRunner().invoke(cli_module.cli, ["status"])
    assert shown.exit_code == 0, shown.output
    return shown


def test_alarms_that_cannot_be_read_are_one_line_in_status(dispatcher,
                                                          monkeypatch: pytest.MonkeyPatch):
    def denied() -> Any:
        raise PermissionError("AccessDenied: cloudwatch:DescribeAlarms\nmore detail")

    dispatcher.alarms = PoolAlarms(denied, clock=dispatcher.test_clock)
    make_group("agents-upper-asg-1a2b", "dev", "upper", 1)
    dispatcher.observe()
    cloud = dispatcher.describe()["cloud"]
    assert cloud["alarms"] == {"observed": False,
                               "error": "PermissionError: AccessDenied: cloudwatch:DescribeAlarms"}
    assert cloud["operations"]["upper"]["alarms"] == {}
    shown = status_in_the_cli(dispatcher, monkeypatch)
    assert shown.stderr.splitlines().count(
        "alarms: PermissionError: AccessDenied: cloudwatch:DescribeAlarms (alarm states "
        "unknown)") == 1
    assert "Traceback" not in shown.output
    (row,) = [line for line in shown.stdout.splitlines() if line.startswith("upper ")]
    assert row.split()[:4] == ["upper", "1", "1", "-"]


def test_the_local_dispatchers_status_has_no_stack(tmp_path: Path):
    store = Store(tmp_path / "state")
    try:
        manager = Manager(store, Broker("amqp://guest:guest@127.0.0.1:1/"), None, None)
        body = status_of(manager)
    finally:
        store.close()
    assert body["stack"] is None and body["cloud"] is None


# -- the real command on this machine, where no Pulumi CLI is installed ---------------------------


def test_manager_aws_without_the_pulumi_cli_is_one_line_and_starts_nothing(tmp_path: Path):
    require(shutil.which("pulumi") is None, NO_PULUMI_CLI)
    port = free_port()
    state = tmp_path / "state"
    empty_bin = tmp_path / "bin"
    empty_bin.mkdir()
    started = time.monotonic()
    result = subprocess.run(
        [*MANAGER, "manager", "--dispatcher", "aws", "--stack", "o/p/s", "--port", str(port),
         "--state-dir", str(state)],
        capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL, cwd=ROOT,
        env={**os.environ, "PATH": str(empty_bin)})
    assert result.returncode != 0
    assert result.stderr.splitlines() == [f"streamboss: error: {CLI_MISSING}"]
    assert result.stdout == ""
    assert time.monotonic() - started < 30
    assert not state.exists()              # no store, no lock, no logs
    with socket.socket() as probe:         # nothing listened on the port
        probe.bind(("127.0.0.1", port))


def test_manager_aws_without_stack_is_a_usage_error():
    result = subprocess.run([*MANAGER, "manager", "--dispatcher", "aws"], capture_output=True,
                            text=True, timeout=60, stdin=subprocess.DEVNULL)
    assert result.returncode == 2
    assert result.stderr.splitlines() == [
        "streamboss manager: error: --dispatcher aws needs --stack ORG/PROJECT/STACK"]



# -- a real aws manager: the real Automation API against a stand-in CLI, AWS on moto server --------

FAKE_PULUMI = """#!{python}
import json, os, sys
argv = sys.argv[1:]
# The Automation API puts global flags (--non-interactive) before the command.
args = argv[1:] if argv[:1] == ["--non-interactive"] else argv
# A secret arrives on stdin (never in argv, which every user may read).
stdin = sys.stdin.read() if "--secret" in args else None
with open(os.environ["FAKE_PULUMI_LOG"], "a") as log:
    log.write(json.dumps({{"argv": argv, "cwd": os.getcwd(), "stdin": stdin}}) + "\\n")
if args == ["version"]:
    print("v3.272.0")
elif args[:2] not in (["stack", "select"], ["config", "set"]):
    print("error: the tests' stand-in for the Pulumi CLI cannot " + args[0], file=sys.stderr)
    sys.exit(1)
"""


ENV_SECRET = "env-secret-6d1f"


def test_a_real_aws_manager_drives_the_automation_api_and_publishes_to_cloudwatch(
        tmp_path: Path, broker_url: str, moto_server, managers):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    cli_path = bin_dir / "pulumi"
    cli_path.write_text(FAKE_PULUMI.format(python=sys.executable))
    cli_path.chmod(0o755)
    calls = tmp_path / "pulumi-calls.jsonl"
    stack_name = f"acme/streamboss/t{uuid.uuid4().hex[:8]}"
    operation, source, sink = managers.name("op"), managers.name("in"), managers.name("out")
    aws = {**MOTO_ENV, "AWS_ENDPOINT_URL": moto_server.endpoint}
    def client(service: str) -> Any:
        return boto3.client(service, endpoint_url=moto_server.endpoint, region_name=REGION,
                            aws_access_key_id="testing", aws_secret_access_key="testing")

    autoscaling, ec2 = client("autoscaling"), client("ec2")
    template = f"agents-{uuid.uuid4().hex[:8]}"
    ec2.create_launch_template(LaunchTemplateName=template, LaunchTemplateData={
        "ImageId": "ami-12c6146b", "InstanceType": "t3.small"})
    autoscaling.create_auto_scaling_group(
        AutoScalingGroupName=f"agents-{operation}-asg", MinSize=0, MaxSize=4, DesiredCapacity=2,
        LaunchTemplate={"LaunchTemplateName": template, "Version": "$Latest"},
        AvailabilityZones=[f"{REGION}a"],
        Tags=[{"Key": "streamboss:stack", "Value": stack_name.rsplit("/", 1)[1],
               "PropagateAtLaunch": True},
              {"Key": "streamboss:operation", "Value": operation, "PropagateAtLaunch": True}])

    manager = managers.new()
    manager.extra_env.update({**aws, "FAKE_PULUMI_LOG": str(calls),
                              "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"})
    log = manager.log_path.open("ab")
    proc = subprocess.Popen(
        [*MANAGER, "manager", "--dispatcher", "aws", "--stack", stack_name, "--port",
         str(manager.port), "--state-dir", str(manager.state_dir)],
        stdin=subprocess.DEVNULL, stdout=log, stderr=log, env=manager.env(), cwd=tmp_path)
    manager.proc = proc
    try:
        manager.wait_healthy()
        seed = tmp_path / "upper.json"
        seed.write_text(json.dumps({"definition": {"exec": "tr a-z A-Z", "name": "upper",
                                                   "env": {"API_KEY": ENV_SECRET}}}))
        definition = manager.ok("define-process", str(seed)).strip()
        manager.ok("create-stream", source)
        manager.ok("create-operation", operation, definition, source, sink, "--max", "4")

        def stack_failed_with_these_declarations() -> dict[str, Any] | None:
            stack = manager.status()["stack"]
            last = stack["last_result"] or {}
            return stack if (stack["state"] == FAILED and last.get("config_sha256")
                             == stack["wanted_config_sha256"]) else None

        stack = wait_for_value(stack_failed_with_these_declarations, 30)
        assert stack["last_error"] == (
            "preview failed: error: the tests' stand-in for the Pulumi CLI cannot preview")
        # The real Automation API ran the CLI in the project directory, in this order.
        ran = [json.loads(line) for line in calls.read_text().splitlines()]
        ran = [entry for entry in ran if entry["argv"] != ["version"]]
        assert {entry["cwd"] for entry in ran} == {str(ROOT)}
        commands = [entry["argv"] for entry in ran]
        text = commands[-3][-1]
        assert commands[-4:-1] == [
            ["--non-interactive", "stack", "select", "--stack", stack_name],
            ["config", "set", "streamboss:operations", "--plaintext", "--stack", stack_name,
             "--non-interactive", "--", text],
            ["config", "set", "streamboss:operationsEnv", "--secret", "--stack", stack_name]]
        assert commands[-1][:2] == ["--non-interactive", "preview"]
        assert [s.name for s in parse_operations(json.loads(text))] == [operation]
        # The env values: masked in the plain value, on the CLI's stdin as a secret.
        (definition,) = [d for d in json.loads(text)]
        assert definition["definition"]["env"] == {"API_KEY": "<secret>"}
        assert json.loads(ran[-2]["stdin"]) == {operation: {"API_KEY": ENV_SECRET}}
        assert not any(ENV_SECRET in arg for entry in ran for arg in entry["argv"])

        # Agent counts from the group; the metrics in CloudWatch (moto server).
        manager.wait_status(operation, lambda s: s["running"] == 2, 30, "2 agents from the ASG")
        cloudwatch = client("cloudwatch")
        dims = [{"Name": "Operation", "Value": operation}]

        def published() -> set[str] | None:
            names = {m["MetricName"] for m in cloudwatch.list_metrics(
                Namespace="streamboss", Dimensions=dims)["Metrics"]}
            return names if names == {"Backlog", "Wanted", "BacklogPerAgent",
                                      "DesiredCapacity"} else None

        wait_for_value(published, 30)
        shown = manager.cli("status")
        assert shown.returncode == 0, shown.stderr
        assert f"stack {stack_name}: failed" in shown.stdout
        assert "stack: preview failed: error: the tests' stand-in" in shown.stderr
    finally:
        code = manager.stop()
        log.close()
    assert code == 0, manager.log()
    assert "Traceback" not in manager.log()


def wait_for_value(produce: Any, timeout: float) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = produce()
        if value:
            return value
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.2)
