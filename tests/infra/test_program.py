"""The whole program under Pulumi mocks, with three operations from the manager's mapping."""

from __future__ import annotations

import base64
import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pulumi
import pytest
import yaml

from infra.__main__ import build, main
from infra.operations import OperationConfigError, parse_operations
from infra.settings import KEYS, ConfigError, check_broker_password, load
from streamboss.manager.stack_config import operations_config, render

from .conftest import (
    PASSWORD,
    SECRET_KEYS,
    TOKEN,
    assert_private_encrypted_tls_only,
    assert_secure_template,
    is_secret,
    plain,
    policy_documents,
    sample_declarations,
    set_config,
    stack_config,
)

ROOT = Path(__file__).resolve().parents[2]
OPERATIONS = ("count", "resize", "upper")
# Every resource of one pool is named agents-<operation> or agents-<operation>-<part>.
POOL_PARTS = ("", "-role", "-policy", "-profile", "-lt", "-asg", "-track", "-wake",
              "-wake-alarm", "-shrink", "-shrink-alarm", "-idle", "-idle-alarm", "-drain",
              "-drain-policy")


def run_program(stack, config: dict[str, str] | None = None) -> Any:
    set_config(config or stack_config())
    return stack.run(lambda: build(pulumi.Config()).broker.endpoint)


def test_three_operations_give_three_groups_with_their_bounds_and_policies(stack):
    run_program(stack)

    groups = {g.name: g.inputs for g in stack.of_type("aws:autoscaling/group:Group")}
    assert {name: (g["minSize"], g["maxSize"]) for name, g in groups.items()} == {
        "agents-upper-asg": (0, 4), "agents-resize-asg": (1, 10), "agents-count-asg": (0, 2)}
    policies: dict[str, dict[str, Any]] = {}
    for policy in stack.of_type("aws:autoscaling/policy:Policy"):
        policies.setdefault(policy.inputs["autoscalingGroupName"], {})[policy.name] = policy.inputs
    for operation, target in (("upper", 1000), ("resize", 20), ("count", 5000)):
        mine = policies[f"agents-{operation}-asg"]
        assert set(mine) == {f"agents-{operation}-{p}" for p in ("track", "wake", "shrink", "idle")}
        config = mine[f"agents-{operation}-track"]["targetTrackingConfiguration"]
        assert config["targetValue"] == target
    alarms = stack.of_type("aws:cloudwatch/metricAlarm:MetricAlarm")
    actions = {a for alarm in alarms for a in alarm.inputs["alarmActions"]}
    simple = [p for p in stack.of_type("aws:autoscaling/policy:Policy")
              if p.inputs["policyType"] == "SimpleScaling"]
    assert len(alarms) == len(simple) == 9
    assert actions == {p.state["arn"] for p in simple}


def test_cooldowns_and_idle_periods_are_the_declared_ones(stack):
    run_program(stack)
    # resize: scale_out 120 s, scale_in 600 s, idle 1800 s (conftest.sample_declarations).
    assert stack.named("agents-resize-track").inputs["estimatedInstanceWarmup"] == 120
    assert stack.named("agents-resize-shrink").inputs["cooldown"] == 600
    assert stack.named("agents-resize-idle").inputs["cooldown"] == 600
    idle_alarm = stack.named("agents-resize-idle-alarm").inputs
    assert (idle_alarm["evaluationPeriods"], idle_alarm["period"]) == (180, 10)  # 1800 s at 10 s
    assert stack.named("agents-resize-asg").inputs["defaultCooldown"] == 600


def test_every_bucket_is_private_encrypted_and_tls_only(stack):
    run_program(stack)
    buckets = stack.of_type("aws:s3/bucket:Bucket")
    assert len(buckets) == 2
    for bucket in buckets:
        assert_private_encrypted_tls_only(stack, bucket)


def test_every_launch_template_requires_imdsv2_and_encrypts_its_volumes(stack):
    run_program(stack)
    templates = stack.of_type("aws:ec2/launchTemplate:LaunchTemplate")
    assert sorted(t.name for t in templates) == [
        "agents-count-lt", "agents-resize-lt", "agents-upper-lt", "manager-lt"]
    for template in templates:
        assert_secure_template(template)
    for volume in stack.of_type("aws:ebs/volume:Volume"):
        assert volume.inputs["encrypted"] is True
    # Nothing launches outside a template (whose guards were just checked).
    for instance in stack.of_type("aws:ec2/instance:Instance"):
        assert "launchTemplate" in instance.inputs and "ami" not in instance.inputs
    for group in stack.of_type("aws:autoscaling/group:Group"):
        assert "launchConfiguration" not in group.inputs


def test_images_come_from_the_packer_tags_unless_an_operation_names_its_own(stack):
    run_program(stack)
    images = {t.name: t.inputs["imageId"]
              for t in stack.of_type("aws:ec2/launchTemplate:LaunchTemplate")}
    assert images == {"manager-lt": "ami-stream-manager", "agents-upper-lt": "ami-stream-agent",
                      "agents-count-lt": "ami-stream-agent",
                      "agents-resize-lt": "ami-0imagemagick"}


def test_the_broker_is_not_public_and_admits_only_our_node_groups(stack):
    run_program(stack)
    (broker,) = stack.of_type("aws:mq/broker:Broker")
    assert broker.inputs["publiclyAccessible"] is False
    assert broker.inputs["engineType"] == "RabbitMQ"
    (broker_group,) = broker.inputs["securityGroups"]
    node_groups = {"nodes-manager-id", "nodes-agents-id"}
    ingress = [r.inputs for r in stack.of_type(
        "aws:vpc/securityGroupIngressRule:SecurityGroupIngressRule")
        if r.inputs["securityGroupId"] == broker_group]
    assert ingress
    assert {r["referencedSecurityGroupId"] for r in ingress} == node_groups
    assert {r["fromPort"] for r in ingress} == {5671, 443}
    assert all(r["fromPort"] == r["toPort"] and r["ipProtocol"] == "tcp" for r in ingress)
    assert all("cidrIpv4" not in r and "cidrIpv6" not in r and "prefixListId" not in r
               for r in ingress)
    # The group is the broker's alone: no instance or template uses it.
    for template in stack.of_type("aws:ec2/launchTemplate:LaunchTemplate"):
        assert template.inputs["vpcSecurityGroupIds"][0] in node_groups
    assert not [g for g in stack.of_type("aws:ec2/securityGroup:SecurityGroup")
                if "ingress" in g.inputs or "egress" in g.inputs]


def test_no_policy_grants_a_wildcard_action_on_every_resource(stack):
    run_program(stack)
    documents = policy_documents(stack.declared)
    roles = ["manager", *(f"agents-{op}" for op in OPERATIONS)]
    assert sorted(name for name, _ in documents) == sorted([
        "storage-archive-tls-only.policy", "storage-objects-tls-only.policy",
        "network-s3.policy",
        *(f"{role}-policy.policy" for role in roles),
        *(f"agents-{op}-drain-policy.policy" for op in OPERATIONS),
        *(f"{role}-role.assumeRolePolicy" for role in roles)])
    for name, document in documents:
        for statement in document["Statement"]:
            actions = statement.get("Action", [])
            actions = [actions] if isinstance(actions, str) else actions
            resources = statement.get("Resource", [])
            resources = [resources] if isinstance(resources, str) else resources
            if statement["Effect"] != "Allow":
                continue
            assert "NotAction" not in statement and "NotResource" not in statement, name
            assert not any(a == "*" or a.endswith(":*") for a in actions), (name, statement)
            if "*" in resources:
                # Only for actions without resource-level ARNs: the manager's read-only
                # describes of the agent groups and of their alarms (no condition key
                # applies to them), else scoped by a condition.
                if actions in (["autoscaling:DescribeAutoScalingGroups"],
                               ["cloudwatch:DescribeAlarms"]):
                    continue
                assert actions == ["cloudwatch:PutMetricData"], (name, statement)
                assert statement["Condition"], (name, statement)


def test_the_s3_endpoint_admits_the_stacks_two_buckets_and_every_s3_use_of_the_nodes(stack):
    """The gateway endpoint's policy names the archive and objects buckets (and their
    objects) and nothing else; every S3 action and resource a node role is granted lies
    within it, so no node is cut off and a role widened by mistake still reaches only
    these buckets."""
    run_program(stack)
    buckets = {b.name: b.state["arn"] for b in stack.of_type("aws:s3/bucket:Bucket")}
    assert set(buckets) == {"storage-archive", "storage-objects"}
    (endpoint,) = [e for e in stack.of_type("aws:ec2/vpcEndpoint:VpcEndpoint")
                   if e.inputs["vpcEndpointType"] == "Gateway"]
    policy = json.loads(endpoint.inputs["policy"])
    allowed = {(action, resource) for st in policy["Statement"] if st["Effect"] == "Allow"
               for action in st["Action"] for resource in st["Resource"]}
    resources = {resource for _, resource in allowed}
    arns = set(buckets.values())
    assert resources == arns | {f"{arn}/*" for arn in arns}, "the stack's buckets only"
    used = 0
    for name, document in policy_documents(stack.declared):
        if not name.endswith("-policy.policy"):
            continue
        for statement in document["Statement"]:
            for action in [a for a in statement["Action"] if a.startswith("s3:")]:
                for resource in statement["Resource"]:
                    # An object ARN under a prefix is admitted by the bucket's /* entry.
                    bucket, _, key = resource.partition("/")
                    wanted = (action, f"{bucket}/*" if key else bucket)
                    assert wanted in allowed, (name, action, resource)
                    used += 1
    assert used, "the node roles use S3"


def test_no_secret_appears_in_clear_anywhere_in_the_declared_inputs(stack):
    run_program(stack)
    secret_holders = []
    for item in stack.declared:
        clear = json.dumps(strip_secrets(item.inputs))
        assert PASSWORD not in clear and TOKEN not in clear, item.name
        if PASSWORD in json.dumps(plain(item.inputs)) or TOKEN in json.dumps(plain(item.inputs)):
            secret_holders.append(item.name)
    assert sorted(secret_holders) == ["broker-mq", "broker-url", "manager-token"]
    for template in stack.of_type("aws:ec2/launchTemplate:LaunchTemplate"):
        text = plain(template.inputs["userData"])
        assert "/streamboss/dev/broker-url" in base64.b64decode(text).decode()
        # An agent's user data holds its definition's env values: always a secret.
        assert is_secret(template.inputs["userData"]) == template.name.startswith("agents-")


def strip_secrets(value: Any) -> Any:
    if is_secret(value):
        return "[secret]"
    if isinstance(value, dict):
        return {k: strip_secrets(v) for k, v in value.items()}
    if isinstance(value, list):
        return [strip_secrets(v) for v in value]
    return value


def pools(declared: list[Any]) -> dict[str, dict[tuple[str, str], Any]]:
    """Every pool's resources by (type, name), keyed by operation; the rest under ''."""
    result: dict[str, dict[tuple[str, str], Any]] = {}
    for item in declared:
        owner = next((op for op in OPERATIONS for part in POOL_PARTS
                      if item.name == f"agents-{op}{part}"), "")
        result.setdefault(owner, {})[(item.type, item.name)] = item.inputs
    return result


def test_changing_one_operation_changes_only_its_pool(stack):
    run_program(stack)
    before = pools(stack.declared)
    changed = render(operations_config(*sample_declarations(
        resize={"max": 20, "target_backlog_per_agent": 50, "idle_seconds": 300})))
    run_program(stack, stack_config(changed))
    after = pools(stack.declared)

    assert set(before) == set(after) == {"", *OPERATIONS}
    for owner in ("", "count", "upper"):
        assert before[owner] == after[owner], owner
    assert set(before["resize"]) == set(after["resize"])
    differ = sorted(name for key, name in before["resize"]
                    if before["resize"][(key, name)] != after["resize"][(key, name)])
    assert differ == ["agents-resize-asg", "agents-resize-idle-alarm",
                      "agents-resize-shrink-alarm", "agents-resize-track"]
    assert after["resize"][("aws:autoscaling/group:Group", "agents-resize-asg")]["maxSize"] == 20


def test_changing_a_definition_changes_only_that_pool_template(stack):
    run_program(stack)
    before = pools(stack.declared)
    operations, definitions = sample_declarations()
    definitions[1].body["exec"] = "tr A-Z a-z"
    run_program(stack, stack_config(render(operations_config(operations, definitions))))
    after = pools(stack.declared)
    changed = {name for owner in before for key, name in before[owner]
               if before[owner][(key, name)] != after[owner].get((key, name))}
    assert changed == {"agents-upper-lt"}


def test_the_program_outputs_the_addresses(stack):
    set_config(stack_config())

    def declare() -> Any:
        program = build(pulumi.Config())
        return pulumi.Output.all(
            program.broker.endpoint, program.storage.archive.bucket,
            program.storage.objects.bucket, program.manager.address,
            {name: pool.group_name for name, pool in program.pools.items()})

    endpoint, archive, objects, manager, groups = stack.run(declare)
    assert endpoint == "amqps://b-broker-mq.mq.eu-west-1.amazonaws.com:5671"
    assert (archive, objects) == ("storage-archive-bucket", "storage-objects-bucket")
    assert manager == "http://10.40.0.10:8181"
    assert groups == {op: f"agents-{op}-asg" for op in OPERATIONS}


def test_a_chained_operation_may_read_what_its_producer_writes(stack):
    run_program(stack)
    policy = json.loads(stack.named("agents-count-policy").inputs["policy"])
    (read,) = [s for s in policy["Statement"] if s["Sid"] == "ReadInputObjects"]
    assert "arn:aws:s3:::storage-objects-bucket/operations/upper/*" in read["Resource"]
    upper = json.loads(stack.named("agents-upper-policy").inputs["policy"])
    assert "operations/count" not in json.dumps(upper)


def test_an_existing_vpc_and_a_cluster_broker(stack):
    run_program(stack, stack_config(vpcId="vpc-1", subnetIds='["subnet-a","subnet-b"]',
                                    brokerDeploymentMode="CLUSTER_MULTI_AZ"))
    assert not stack.of_type("aws:ec2/vpc:Vpc")
    (broker,) = stack.of_type("aws:mq/broker:Broker")
    assert broker.inputs["deploymentMode"] == "CLUSTER_MULTI_AZ"
    assert broker.inputs["hostInstanceType"] == "mq.m5.large"
    assert broker.inputs["subnetIds"] == ["subnet-a", "subnet-b"]
    for group in stack.of_type("aws:autoscaling/group:Group"):
        assert group.inputs["vpcZoneIdentifiers"] == ["subnet-a", "subnet-b"]


def test_no_operations_is_a_stack_without_pools_or_agent_image(stack, monkeypatch):
    lookups = []
    original = stack.mocks.call

    def spy(args: Any) -> Any:
        lookups.append(args.args.get("filters"))
        return original(args)

    monkeypatch.setattr(stack.mocks, "call", spy)
    run_program(stack, stack_config("[]"))
    assert not stack.of_type("aws:autoscaling/group:Group")
    assert len(stack.of_type("aws:ec2/launchTemplate:LaunchTemplate")) == 1
    images = [f[0]["values"][0] for f in lookups if f]
    assert images == ["stream-manager"]


@pytest.mark.parametrize(("extra", "message"), [
    ({"operations": '[{"name": "x"}]'}, "operation 'x': missing field(s) input, output"),
    ({"brokerDeploymentMode": "MULTI"}, "brokerDeploymentMode 'MULTI': use one of"),
    ({"brokerDeploymentMode": "CLUSTER_MULTI_AZ", "brokerInstanceType": "mq.t3.micro"},
     "brokerInstanceType 'mq.t3.micro' cannot run CLUSTER_MULTI_AZ"),
    ({"vpcId": "vpc-1"}, "vpcId is set but subnetIds is not"),
    ({"vpcCidr": "10.0.0.0/8"}, "vpcCidr '10.0.0.0/8' must be an IPv4 block from /16 to /24"),
    ({"managerApiCidrs": '["10.0.0.1/8"]'}, "managerApiCidrs: '10.0.0.1/8' is not an IPv4 CIDR"),
    ({"managerApiCidrs": '["2001:db8::/32"]'}, "managerApiCidrs: '2001:db8::/32' is not an IPv4"),
    ({"archiveTransitionDays": "0"}, "archiveTransitionDays must be a whole number of at least"),
    ({"archiveStorageClass": "TAPE"}, "archiveStorageClass 'TAPE': use one of"),
    ({"availabilityZones": '["a"]'}, "availabilityZones needs at least two zones"),
])
def test_a_bad_setting_fails_before_anything_is_declared(stack, extra, message):
    set_config(stack_config(**extra))
    with pytest.raises((ConfigError, OperationConfigError), match="^" + re.escape(message)):
        stack.run(lambda: build(pulumi.Config()))
    assert not [d for d in stack.declared if d.type.startswith("aws:")]


def test_min_above_max_names_the_operation_and_the_field(stack):
    value = render(operations_config(*sample_declarations(count={"min": 3, "max": 2})))
    set_config(stack_config(value))
    with pytest.raises(pulumi.RunError) as caught:
        stack.run(main)
    assert str(caught.value) == "operation 'count': 'min' 3 is greater than 'max' 2"


def test_missing_secrets_are_named(stack):
    config = stack_config()
    del config["streamboss:managerToken"]
    set_config(config)
    with pytest.raises(pulumi.ConfigMissingError, match="streamboss:managerToken"):
        stack.run(lambda: build(pulumi.Config()))


@pytest.mark.parametrize("password", ["short", "has,a,comma-in-it", "aaaaaaaaaaaaaaa"])
def test_a_password_amazon_mq_would_refuse_is_refused_without_showing_it(password):
    with pytest.raises(ConfigError) as caught:
        check_broker_password(password)
    assert password not in str(caught.value)


# -- the example stack file -------------------------------------------------------------------


def test_the_example_stack_file_documents_every_key_and_its_operations_parse():
    text = (ROOT / "Pulumi.dev.yaml").read_text()
    document = yaml.safe_load(text)
    config = document["config"]
    for key in KEYS:
        assert f"streamboss:{key}:" in text, f"Pulumi.dev.yaml does not document {key}"
    assert {k.split(":", 1)[1] for k in config if k.startswith("streamboss:")} <= set(KEYS)
    specs = parse_operations(config["streamboss:operations"])
    assert [s.name for s in specs] == ["resize", "upper"]
    # Every optional field of an operation is shown in use.
    assert (specs[0].instance_type, specs[0].warm_pool) == ("c6i.large", 1)
    assert "warm_pool" in text and "image" in text
    assert not any(k in config for k in ("streamboss:brokerPassword", "streamboss:managerToken"))


def test_settings_read_exactly_the_documented_keys(stack):
    read: list[str] = []

    class Recording(pulumi.Config):
        def get(self, key: str, default: Any = None) -> Any:  # type: ignore[override]
            read.append(key)
            return super().get(key, default)

        def require_secret(self, key: str) -> Any:  # type: ignore[override]
            read.append(key)
            return super().require_secret(key)

        def get_object(self, key: str, default: Any = None) -> Any:  # type: ignore[override]
            read.append(key)
            return super().get_object(key, default)

        def get_secret_object(self, key: str) -> Any:  # type: ignore[override]
            read.append(key)
            return super().get_secret_object(key)

    set_config(stack_config())
    stack.run(lambda: load(Recording("streamboss")).broker_password)
    assert sorted(set(read)) == sorted(KEYS)


def test_the_example_stack_file_runs_as_a_stack(stack):
    config = yaml.safe_load((ROOT / "Pulumi.dev.yaml").read_text())["config"]
    values = {k: v if isinstance(v, str) else json.dumps(v) for k, v in config.items()}
    values.update({"streamboss:brokerPassword": PASSWORD, "streamboss:managerToken": TOKEN})
    run_program(stack, values)
    groups = {g.name: g.inputs for g in stack.of_type("aws:autoscaling/group:Group")}
    assert sorted(groups) == ["agents-resize-asg", "agents-upper-asg"]
    assert stack.named("agents-resize-lt").inputs["instanceType"] == "c6i.large"


# -- run the way `pulumi up` runs it ------------------------------------------------------------

RUNNER = textwrap.dedent("""
    import json, os, runpy, sys, warnings
    warnings.simplefilter("ignore", DeprecationWarning)
    import pulumi

    declared = []

    class Mocks(pulumi.runtime.Mocks):
        def new_resource(self, args):
            state = dict(args.inputs)
            service = "s3" if args.typ == "aws:s3/bucket:Bucket" else "mock"
            state.setdefault("arn", f"arn:aws:{service}:::" + args.name)
            state.setdefault("name", args.name)
            state.setdefault("bucket", args.name)
            if args.typ == "aws:mq/broker:Broker":
                state["instances"] = [{"endpoints": ["amqps://b.mq:5671"], "consoleUrl": "https://b"}]
            if args.typ == "aws:ec2/launchTemplate:LaunchTemplate":
                state["latestVersion"] = 1
            declared.append(args.typ)
            return args.name + "-id", state

        def call(self, args):
            return {"id": "x", "names": ["a", "b"], "region": "r", "rootDeviceName": "/dev/xvda",
                    "availabilityZone": "a", "cidrBlock": "10.0.0.0/16"}, []

    pulumi.runtime.set_mocks(Mocks(), project="streamboss", stack="dev", preview=False)
    pulumi.runtime.set_all_config(json.loads(os.environ["TEST_CONFIG"]),
                                  json.loads(os.environ["TEST_SECRETS"]))
    try:
        pulumi.runtime.test(lambda: runpy.run_path(".", run_name="__main__"))()
    except pulumi.RunError as exc:
        print("RunError:", exc)
        sys.exit(1)
    print(json.dumps(sorted(set(declared))), declared.count("aws:autoscaling/group:Group"))
""")


def run_like_pulumi(config: dict[str, str]) -> subprocess.CompletedProcess[str]:
    # `pulumi up` runs infra/ by path with infra/ as the working directory; this
    # does the same in a fresh interpreter that cannot see the repository root.
    env = {**os.environ, "TEST_CONFIG": json.dumps(config), "TEST_SECRETS": json.dumps(SECRET_KEYS)}
    env.pop("PYTHONPATH", None)
    return subprocess.run([sys.executable, "-I", "-c", RUNNER], cwd=ROOT / "infra", env=env,
                          capture_output=True, text=True, timeout=60)


def test_the_program_runs_from_its_directory_the_way_pulumi_runs_it():
    result = run_like_pulumi(stack_config())
    assert result.returncode == 0, result.stderr
    kinds, groups = result.stdout.rsplit(" ", 1)
    assert int(groups) == 3
    assert "aws:mq/broker:Broker" in json.loads(kinds)


def test_under_pulumi_a_bad_setting_is_one_line():
    result = run_like_pulumi(stack_config(brokerDeploymentMode="MULTI"))
    assert result.returncode == 1
    assert result.stdout.strip() == (
        "RunError: brokerDeploymentMode 'MULTI': use one of SINGLE_INSTANCE, CLUSTER_MULTI_AZ")
