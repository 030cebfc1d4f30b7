"""One agent pool per operation: launch template, autoscaling group, Phantom-style scaling.

The manager publishes three metrics per operation (``infra/metrics.py``):
``Wanted`` (1/0), ``Backlog`` and ``BacklogPerAgent``. The pool turns them into
capacity the way the local dispatcher's ``manager/scaling.py`` does:

- demand gates everything: the target-tracking policy follows
  ``IF(Wanted >= 1, BacklogPerAgent, 0)``, so an unwanted operation never scales
  out however long its backlog grows;
- scale out: target tracking holds BacklogPerAgent at the operation's
  ``target_backlog_per_agent`` (scale-in disabled: its own scale-in would drop
  a wanted pool to zero on an empty queue);
- wake from zero: target tracking cannot leave 0 (per-agent backlog means
  nothing without agents), so an alarm on "wanted and desired capacity 0" adds
  ``max(1, min)`` agents. The desired capacity it reads is the manager's
  ``DesiredCapacity`` (the group's, as last described), not AWS's
  ``GroupDesiredCapacity``, which exists only per minute;
- scale in while wanted: an alarm on "wanted, BacklogPerAgent below half the
  target for the scale-in cooldown, more than one agent" removes one agent,
  at most once per ``scale_in_cooldown``. Below half the target, one agent
  fewer still stays at or under the target, so this never undoes a scale-out;
- idle to zero: an alarm on ``Wanted < 1`` for ``idle_seconds`` sets the
  capacity to 0 (the group's ``min`` still holds, as AWS clamps to it).

Cooldowns map onto AWS as: ``scale_out_cooldown`` -> the target-tracking
policy's estimated instance warm-up and the group's default instance warm-up;
``scale_in_cooldown`` -> the scale-in and idle policies' cooldown, the scale-in
alarm's look-back and the group's default cooldown.

Periods: the manager publishes every metric at high resolution, so the wake
alarm and the target-tracking metrics use 10-second periods, and so do the
scale-in and idle alarms while their look-back fits in the three hours
CloudWatch keeps 10-second datapoints (``metrics.alarm_period``); longer ones
use one minute. The alarms target tracking creates are AWS's own: their
periods follow the metric's, their datapoint counts are not ours to set.

Missing metrics (a silent manager) change nothing: every alarm treats missing
data as not breaching, so agents neither start nor stop on a gap.

Warm pool (optional, ``warm_pool`` > 0): the group keeps that many instances
launched, set up and stopped (``Warmed:Stopped``); waking starts one of them
instead of booting a new instance, and scale-in returns instances to the pool
(``reuse_on_scale_in``) rather than terminating them. A stopped instance costs
its EBS volumes, not its instance hours.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import pulumi
import pulumi_aws as aws

from . import metrics
from .iam import instance_profile, policy_document, statement
from .launch import LaunchTemplateArgs, latest, secure_launch_template
from .lifecycle_hook import HEARTBEAT_TIMEOUT_SECONDS, HOOK_NAME, drain_hook
from .operations import OperationSpec, operation_env
from .storage import OPERATIONS_PREFIX, STREAMS_PREFIX
from .user_data import agent_user_data

# Below this fraction of the target, removing one agent keeps the rest at or
# under the target (n agents at < T/2 each carry < T each as n-1 for n >= 2).
SCALE_IN_FRACTION = 0.5
# The wake alarm's gate (the manager's DesiredCapacity) lags the manager's view
# of the group (refreshed every 15 s), a publish (5 s) and an alarm period (10 s);
# a cooldown of a minute keeps one wake-up from being counted twice while an
# alarm still in ALARM repeats its action (Auto Scaling actions repeat each minute).
WAKE_COOLDOWN_SECONDS = 60
# The group's own capacity metrics, for dashboards and the operator.
GROUP_METRICS = ("GroupDesiredCapacity", "GroupInServiceInstances")
# A rolling instance refresh replaces agents when the template changes (a new
# definition or image) while keeping half of them consuming.
REFRESH_MIN_HEALTHY_PERCENT = 50


def seconds(value: float) -> int:
    """Whole seconds for AWS, rounded up so a cooldown is never shortened."""
    return math.ceil(value)


def periods(duration: float) -> int:
    """Alarm evaluation periods covering ``duration`` seconds (at least one), each
    of :func:`metrics.alarm_period` for that look-back."""
    return max(1, math.ceil(duration / metrics.alarm_period(duration)))


def object_prefixes(spec: OperationSpec, producers: Sequence[str]) -> list[str]:
    """The objects-bucket prefixes an agent of ``spec`` may read, each ending in ``/``.

    Its input's references come from ``stream-file`` uploads to its input
    stream and from the operations that publish to that stream (``producers``);
    its own prefix is read back when an upload is copied into place.
    """
    names = {f"{STREAMS_PREFIX}/{spec.input}/", f"{OPERATIONS_PREFIX}/{spec.name}/"}
    names.update(f"{OPERATIONS_PREFIX}/{p}/" for p in producers)
    return sorted(names)


def agent_policy(spec: OperationSpec, producers: Sequence[str], secret_arn: str,
                 objects_arn: str) -> str:
    """The agent role's only policy: its broker secret and its object prefixes, nothing else."""
    readable = object_prefixes(spec, producers)
    own = f"{objects_arn}/{OPERATIONS_PREFIX}/{spec.name}/*"
    return policy_document([
        statement("ReadBrokerUrl", ["ssm:GetParameter"], [secret_arn]),
        statement("ReadInputObjects", ["s3:GetObject"],
                  [f"{objects_arn}/{prefix}*" for prefix in readable]),
        statement("WriteOwnObjects",
                  ["s3:PutObject", "s3:DeleteObject", "s3:AbortMultipartUpload"], [own]),
        # Lets S3 answer 404 rather than 403 for a missing object, on these prefixes only.
        statement("ListInputPrefixes", ["s3:ListBucket"], [objects_arn],
                  {"StringLike": {"s3:prefix": [f"{prefix}*" for prefix in readable]}}),
    ])


@dataclass
class OperationPoolArgs:
    """One operation's pool and what it connects to.

    Attributes:
        operation: the operation (from the ``operations`` config).
        producers: operations whose output stream is this one's input.
        subnet_ids: private subnets the agents run in.
        security_group_id: the agents' shared security group.
        image: the AMI (the operation's own, or the stream-agent image).
        instance_type: the stack's agent instance type (the operation's own wins).
        root_volume_gb: root volume size; None for the image's.
        broker_secret_parameter_name / broker_secret_parameter_arn: the broker URL's parameter.
        objects_bucket / objects_bucket_arn: the claim-check objects bucket.
        region: the AWS region.
        tags: tags for every resource.
        operations_env: the secret ``operationsEnv`` (every operation's env values);
            None: the definitions' own.
    """

    operation: OperationSpec
    producers: tuple[str, ...]
    subnet_ids: pulumi.Input[list[str]]
    security_group_id: pulumi.Input[str]
    image: pulumi.Output[aws.ec2.GetAmiResult]
    instance_type: str
    root_volume_gb: int | None
    broker_secret_parameter_name: pulumi.Input[str]
    broker_secret_parameter_arn: pulumi.Input[str]
    objects_bucket: pulumi.Input[str]
    objects_bucket_arn: pulumi.Input[str]
    region: pulumi.Input[str]
    tags: dict[str, str] = field(default_factory=dict)
    operations_env: pulumi.Input[Any] | None = None


class OperationPool(pulumi.ComponentResource):
    """An autoscaling group of stream agents for one operation, and its scaling.

    Outputs:
        group_name: the autoscaling group's name.
        launch_template_id: its launch template.
    """

    group_name: pulumi.Output[str]
    launch_template_id: pulumi.Output[str]

    def __init__(self, name: str, args: OperationPoolArgs,
                 opts: pulumi.ResourceOptions | None = None) -> None:
        super().__init__("streamboss:infra:OperationPool", name, None, opts)
        spec = args.operation
        child = pulumi.ResourceOptions(parent=self)
        tags = {**args.tags, "streamboss:operation": spec.name}
        policy = pulumi.Output.all(args.broker_secret_parameter_arn, args.objects_bucket_arn).apply(
            lambda arns: agent_policy(spec, args.producers, arns[0], arns[1]))
        profile = instance_profile(name, policy, tags, self)
        # The user data holds the definition's env values: a secret, so Pulumi keeps
        # it encrypted in the state and never prints it (the env arrives as one; a
        # hand-written env in plain `operations` is made one here).
        user_data = pulumi.Output.secret(pulumi.Output.all(
            args.broker_secret_parameter_name, args.objects_bucket, args.region,
            args.operations_env).apply(
            lambda values: agent_user_data(
                operation=spec.name, input_stream=spec.input, output_stream=spec.output,
                definition=with_env(spec, values[3]),
                object_store=f"s3://{values[1]}/{OPERATIONS_PREFIX}",
                # The agent reads references only where its role may: its input's
                # uploads and its producers' outputs (and its own, under object_store).
                object_allow=[f"s3://{values[1]}/{prefix.rstrip('/')}"
                              for prefix in object_prefixes(spec, args.producers)],
                broker_url_parameter=values[0], region=values[2],
                lifecycle_hook=HOOK_NAME, heartbeat_timeout=HEARTBEAT_TIMEOUT_SECONDS)))
        template = secure_launch_template(f"{name}-lt", LaunchTemplateArgs(
            image=args.image, instance_type=spec.instance_type or args.instance_type,
            instance_profile_arn=profile.arn, security_group_ids=[args.security_group_id],
            user_data=user_data, root_volume_gb=args.root_volume_gb,
            tags={**tags, "Name": name}, metadata_tags=True), self)
        group = aws.autoscaling.Group(
            f"{name}-asg",
            min_size=spec.min,
            max_size=spec.max,
            # No desired_capacity: the scaling policies own it, and `pulumi up`
            # must not reset whatever they chose.
            vpc_zone_identifiers=args.subnet_ids,
            launch_template=latest(template),
            default_cooldown=seconds(spec.scale_in_cooldown),
            default_instance_warmup=seconds(spec.scale_out_cooldown),
            enabled_metrics=list(GROUP_METRICS),
            metrics_granularity="1Minute",
            instance_refresh={"strategy": "Rolling",
                              "preferences": {"min_healthy_percentage":
                                              REFRESH_MIN_HEALTHY_PERCENT}},
            # A pool at zero has nothing to wait for, and agents have no health endpoint.
            wait_for_capacity_timeout="0",
            warm_pool=warm_pool(spec),
            tags=[{"key": key, "value": value, "propagate_at_launch": True}
                  for key, value in sorted({**tags, "Name": name}.items())],
            opts=child,
        )
        # Scale-in drains: the termination hook waits for the node's lifecycle handler.
        drain_hook(name, group, profile.role, self)
        self._scaling(name, spec, group, child)
        self.group_name = group.name
        self.launch_template_id = template.id
        self.register_outputs({"group_name": self.group_name,
                               "launch_template_id": self.launch_template_id})

    def _scaling(self, name: str, spec: OperationSpec, group: aws.autoscaling.Group,
                 child: pulumi.ResourceOptions) -> None:
        dims = metrics.dimensions(spec.name)
        aws.autoscaling.Policy(
            f"{name}-track",
            autoscaling_group_name=group.name,
            policy_type="TargetTrackingScaling",
            estimated_instance_warmup=seconds(spec.scale_out_cooldown),
            target_tracking_configuration={
                "target_value": spec.target_backlog_per_agent,
                "disable_scale_in": True,
                "customized_metric_specification": {"metrics": [
                    _tracked(metrics.WANTED, "Maximum", dims),
                    _tracked(metrics.BACKLOG_PER_AGENT, "Average", dims),
                    {"id": "gated", "expression": "IF(wanted >= 1, backlogperagent, 0)",
                     "label": "BacklogPerAgent while wanted", "return_data": True},
                ]},
            },
            opts=child,
        )
        floor = max(1, spec.min)
        wake = aws.autoscaling.Policy(
            f"{name}-wake", autoscaling_group_name=group.name, policy_type="SimpleScaling",
            adjustment_type="ChangeInCapacity", scaling_adjustment=floor,
            cooldown=WAKE_COOLDOWN_SECONDS, opts=child)
        _math_alarm(f"{name}-wake-alarm", f"{spec.name}: wanted with no agents: start {floor}",
                    "IF(wanted >= 1 AND desired < 1, 1, 0)", 1, metrics.ALARM_PERIOD_SECONDS,
                    dims, wake, child)
        shrink = aws.autoscaling.Policy(
            f"{name}-shrink", autoscaling_group_name=group.name, policy_type="SimpleScaling",
            adjustment_type="ChangeInCapacity", scaling_adjustment=-1,
            cooldown=seconds(spec.scale_in_cooldown), opts=child)
        low = spec.target_backlog_per_agent * SCALE_IN_FRACTION
        _math_alarm(f"{name}-shrink-alarm",
                    f"{spec.name}: backlog per agent below {low:g}: one fewer",
                    f"IF(wanted >= 1 AND backlogperagent < {low:g} AND desired > {floor}, 1, 0)",
                    periods(spec.scale_in_cooldown), metrics.alarm_period(spec.scale_in_cooldown),
                    dims, shrink, child)
        idle = aws.autoscaling.Policy(
            f"{name}-idle", autoscaling_group_name=group.name, policy_type="SimpleScaling",
            adjustment_type="ExactCapacity", scaling_adjustment=0,
            cooldown=seconds(spec.scale_in_cooldown), opts=child)
        idle_periods = periods(spec.idle_seconds)
        aws.cloudwatch.MetricAlarm(
            f"{name}-idle-alarm",
            alarm_description=f"{spec.name}: unwanted for {spec.idle_seconds:g}s: scale to zero",
            namespace=metrics.NAMESPACE, metric_name=metrics.WANTED, dimensions=dims,
            statistic="Maximum", period=metrics.alarm_period(spec.idle_seconds),
            comparison_operator="LessThanThreshold", threshold=1,
            evaluation_periods=idle_periods, datapoints_to_alarm=idle_periods,
            treat_missing_data="notBreaching", alarm_actions=[idle.arn], opts=child)


def warm_pool(spec: OperationSpec) -> dict[str, Any] | None:
    """The group's warm pool: ``spec.warm_pool`` stopped instances, reused on scale-in;
    None (no warm pool) for 0.

    The pool's size is max(min_size, max_group_prepared_capacity - desired): with
    the prepared capacity at the warm count (or the group's min, if larger; AWS
    counts the group's own instances in it), the pool holds exactly the warm
    count whatever the group's size, instead of AWS's default of up to ``max``
    stopped instances.
    """
    if not spec.warm_pool:
        return None
    return {"pool_state": "Stopped", "min_size": spec.warm_pool,
            "max_group_prepared_capacity": max(spec.warm_pool, spec.min),
            "instance_reuse_policy": {"reuse_on_scale_in": True}}


def with_env(spec: OperationSpec, operations_env: Any) -> dict[str, Any]:
    """``spec``'s definition with its real env values (see :func:`operation_env`)."""
    definition = {key: value for key, value in spec.definition.items() if key != "env"}
    env = operation_env(spec, operations_env)
    if env:
        definition["env"] = env
    return definition


def _tracked(metric: str, stat: str, dims: dict[str, str]) -> dict[str, Any]:
    # High-resolution metrics: target tracking may read them at 10 s.
    return {"id": metric.lower(), "return_data": False, "metric_stat": {
        "stat": stat, "period": metrics.ALARM_PERIOD_SECONDS,
        "metric": {"namespace": metrics.NAMESPACE, "metric_name": metric,
                   "dimensions": [{"name": k, "value": v} for k, v in sorted(dims.items())]}}}


def _math_alarm(name: str, description: str, expression: str, evaluation_periods: int,
                period: int, dims: dict[str, str], policy: aws.autoscaling.Policy,
                child: pulumi.ResourceOptions) -> None:
    """An alarm that fires ``policy`` while ``expression`` is 1, evaluated every ``period``.

    The expression may use ``wanted``, ``backlogperagent`` and ``desired`` (the
    group's desired capacity): all three the manager's high-resolution metrics.
    """
    sources: list[tuple[str, str, str]] = [
        ("wanted", metrics.WANTED, "Maximum"),
        ("backlogperagent", metrics.BACKLOG_PER_AGENT, "Average"),
        ("desired", metrics.DESIRED_CAPACITY, "Maximum"),
    ]
    queries: list[dict[str, Any]] = [
        {"id": query_id, "return_data": False, "metric": {
            "namespace": metrics.NAMESPACE, "metric_name": metric, "stat": stat,
            "period": period, "dimensions": dims}}
        for query_id, metric, stat in sources if query_id in expression]
    aws.cloudwatch.MetricAlarm(
        name,
        alarm_description=description,
        metric_queries=[
            *queries,
            {"id": "act", "expression": expression, "label": description, "return_data": True},
        ],
        comparison_operator="GreaterThanOrEqualToThreshold", threshold=1,
        evaluation_periods=evaluation_periods, datapoints_to_alarm=evaluation_periods,
        treat_missing_data="notBreaching", alarm_actions=[policy.arn], opts=child)

