"""Each component alone, under Pulumi mocks: the resources it declares and their guards."""

from __future__ import annotations

import base64
import json
from pathlib import Path
from typing import Any

import pulumi
import pytest

from infra import metrics
from infra.broker import Broker, BrokerArgs, broker_url
from infra.iam import PolicyError, policy_document, role_name_prefix, statement
from infra.launch import AGENT_ROLE, LaunchTemplateArgs, find_image, secure_launch_template
from infra.manager_node import STATE_DEVICE, ManagerNode, ManagerNodeArgs
from infra.network import Network, NetworkArgs, private_subnet_cidrs, s3_endpoint_policy
from infra.operation_pool import OperationPool, OperationPoolArgs, object_prefixes
from infra.operations import parse_operations
from infra.security_groups import MANAGER_API_PORT, SecurityGroups, SecurityGroupsArgs
from infra.storage import PrivateBucket, PrivateBucketArgs, Storage, StorageArgs
from infra.user_data import agent_user_data
from streamboss.agent.config import build_config

from .conftest import (
    PASSWORD,
    TOKEN,
    ZONES,
    assert_private_encrypted_tls_only,
    assert_secure_template,
    is_secret,
    plain,
)

# -- helpers ---------------------------------------------------------------------------------

BUCKET_ARNS = ("arn:aws:s3:::stack-archive", "arn:aws:s3:::stack-objects")



def cloud_config(template: Any) -> dict[str, Any]:
    """The launch template's user data, decoded: the cloud-config document."""
    # An agent's user data is a secret (it holds the definition's env values).
    text = base64.b64decode(plain(template.inputs["userData"])).decode()
    header, _, body = text.partition("\n")
    assert header == "#cloud-config"
    return json.loads(body)


def written(template: Any) -> dict[str, str]:
    return {Path(f["path"]).name: f["content"] for f in cloud_config(template)["write_files"]}


def sample_spec(**changes: Any) -> Any:
    entry = {"name": "resize", "input": "images", "output": "thumbs",
             "definition": {"exec": "convert - -resize 50% -", "mode": "per-message"},
             "min": 0, "max": 10, "target_backlog_per_agent": 20, "scale_out_cooldown": 90.5,
             "scale_in_cooldown": 300, "idle_seconds": 1800, **changes}
    (spec,) = parse_operations([entry])
    return spec


def image() -> pulumi.Output[Any]:
    return find_image(AGENT_ROLE, None, ["self"])


# -- network ---------------------------------------------------------------------------------


def test_a_new_network_is_private_subnets_in_two_zones(stack):
    subnets = stack.run(lambda: Network("net", NetworkArgs(vpc_cidr="10.40.0.0/16",
                                                           s3_bucket_arns=BUCKET_ARNS))
                        .private_subnet_ids)

    (vpc,) = stack.of_type("aws:ec2/vpc:Vpc")
    assert vpc.inputs["cidrBlock"] == "10.40.0.0/16"
    # The mocks record resources as their registrations complete, in no fixed order.
    declared = sorted(stack.of_type("aws:ec2/subnet:Subnet"), key=lambda s: s.name)
    assert subnets == [s.name + "-id" for s in declared]
    assert [s.inputs["cidrBlock"] for s in declared] == ["10.40.0.0/20", "10.40.16.0/20"]
    assert [s.inputs["availabilityZone"] for s in declared] == ZONES[:2]
    assert not any(s.inputs["mapPublicIpOnLaunch"] for s in declared)
    kinds = {d.type for d in stack.declared}
    assert "aws:ec2/internetGateway:InternetGateway" not in kinds
    assert "aws:ec2/natGateway:NatGateway" not in kinds
    assert not stack.of_type("aws:ec2/route:Route")
    (default_sg,) = stack.of_type("aws:ec2/defaultSecurityGroup:DefaultSecurityGroup")
    assert "ingress" not in default_sg.inputs and "egress" not in default_sg.inputs
    endpoints = {e.inputs["serviceName"]: e.inputs["vpcEndpointType"]
                 for e in stack.of_type("aws:ec2/vpcEndpoint:VpcEndpoint")}
    assert endpoints == {"com.amazonaws.eu-west-1.s3": "Gateway",
                         "com.amazonaws.eu-west-1.ssm": "Interface",
                         "com.amazonaws.eu-west-1.monitoring": "Interface",
                         "com.amazonaws.eu-west-1.autoscaling": "Interface"}


def test_configured_zones_are_used(stack):
    stack.run(lambda: Network("net", NetworkArgs(vpc_cidr="10.1.0.0/24",
                                                 availability_zones=("z-b", "z-c"),
                                                 s3_bucket_arns=BUCKET_ARNS)).vpc_id)
    declared = sorted(stack.of_type("aws:ec2/subnet:Subnet"), key=lambda s: s.name)
    assert [s.inputs["availabilityZone"] for s in declared] == ["z-b", "z-c"]
    assert [s.inputs["cidrBlock"] for s in declared] == ["10.1.0.0/28", "10.1.0.16/28"]


def test_an_existing_vpc_is_used_as_is(stack):
    network = None

    def declare() -> Any:
        nonlocal network
        network = Network("net", NetworkArgs(vpc_cidr="10.40.0.0/16", vpc_id="vpc-1",
                                             subnet_ids=("subnet-a", "subnet-b")))
        return pulumi.Output.all(network.vpc_id, network.vpc_cidr, network.private_subnet_ids)

    assert stack.run(declare) == ["vpc-1", "172.31.0.0/16", ["subnet-a", "subnet-b"]]
    assert {d.type for d in stack.declared} == {"streamboss:infra:Network"}


def test_the_s3_endpoint_reaches_only_the_stacks_buckets_with_the_nodes_actions(stack):
    stack.run(lambda: Network("net", NetworkArgs(vpc_cidr="10.40.0.0/16",
                                                 s3_bucket_arns=BUCKET_ARNS)).vpc_id)
    (endpoint,) = [e for e in stack.of_type("aws:ec2/vpcEndpoint:VpcEndpoint")
                   if e.inputs["vpcEndpointType"] == "Gateway"]
    policy = json.loads(endpoint.inputs["policy"])
    resources = {r for st in policy["Statement"] for r in st["Resource"]}
    assert resources == {*BUCKET_ARNS, *(f"{arn}/*" for arn in BUCKET_ARNS)}
    assert "*" not in json.dumps(policy).replace('"Principal": "*"', "").replace("/*", "")
    by_sid = {st["Sid"]: st for st in policy["Statement"]}
    assert set(by_sid) == {"StackObjects", "StackBuckets"}
    assert all(st["Effect"] == "Allow" and "Condition" not in st for st in by_sid.values())
    assert by_sid["StackObjects"]["Resource"] == [f"{arn}/*" for arn in sorted(BUCKET_ARNS)]
    assert sorted(by_sid["StackObjects"]["Action"]) == [
        "s3:AbortMultipartUpload", "s3:DeleteObject", "s3:GetObject", "s3:PutObject"]
    assert by_sid["StackBuckets"] == {"Sid": "StackBuckets", "Effect": "Allow",
                                      "Principal": "*", "Action": ["s3:ListBucket"],
                                      "Resource": sorted(BUCKET_ARNS)}


@pytest.mark.parametrize("arns", [(), ("*",), ("arn:aws:s3:::*",), ("arn:aws:s3:::b/*",),
                                  ("arn:aws:s3:::b", "arn:aws:iam::1:role/x")])
def test_an_endpoint_policy_without_the_stacks_buckets_is_refused(arns):
    with pytest.raises(ValueError):
        s3_endpoint_policy(list(arns))


def test_a_new_network_without_bucket_arns_is_refused(stack):
    with pytest.raises(ValueError, match="bucket ARNs"):
        stack.run(lambda: Network("net", NetworkArgs(vpc_cidr="10.40.0.0/16")).vpc_id)


def test_subnet_cidrs_are_the_first_sixteenths():
    assert private_subnet_cidrs("10.40.0.0/16", 3) == ["10.40.0.0/20", "10.40.16.0/20",
                                                       "10.40.32.0/20"]


# -- security groups -------------------------------------------------------------------------


def rules(stack, kind: str) -> list[dict[str, Any]]:
    return [r.inputs for r in stack.of_type(f"aws:vpc/securityGroup{kind}Rule:"
                                            f"SecurityGroup{kind}Rule")]


def test_the_manager_api_is_open_to_the_vpc_only_by_default(stack):
    stack.run(lambda: SecurityGroups("nodes", SecurityGroupsArgs(
        vpc_id="vpc-1", vpc_cidr="10.40.0.0/16")).manager_id)
    ingress = rules(stack, "Ingress")
    assert [(r["securityGroupId"], r["fromPort"], r["toPort"], r["cidrIpv4"]) for r in ingress] \
        == [("nodes-manager-id", MANAGER_API_PORT, MANAGER_API_PORT, "10.40.0.0/16")]
    egress = {(r["securityGroupId"], r["fromPort"], r["cidrIpv4"]) for r in rules(stack, "Egress")}
    assert egress == {(group, port, cidr) for group in ("nodes-manager-id", "nodes-agents-id")
                      for port, cidr in ((5671, "10.40.0.0/16"), (443, "0.0.0.0/0"))}


def test_the_manager_api_is_open_to_exactly_the_configured_cidrs(stack):
    stack.run(lambda: SecurityGroups("nodes", SecurityGroupsArgs(
        vpc_id="vpc-1", vpc_cidr="10.40.0.0/16",
        manager_api_cidrs=("192.0.2.0/24", "198.51.100.7/32"))).agents_id)
    ingress = rules(stack, "Ingress")
    assert sorted(r["cidrIpv4"] for r in ingress) == ["192.0.2.0/24", "198.51.100.7/32"]
    assert all(r["securityGroupId"] == "nodes-manager-id" for r in ingress)


# -- broker ----------------------------------------------------------------------------------


def declare_broker(mode: str = "SINGLE_INSTANCE", instance_type: str = "mq.t3.micro") -> Broker:
    return Broker("broker", BrokerArgs(
        vpc_id="vpc-1", subnet_ids=["subnet-a", "subnet-b"],
        amqps_client_group_ids=["sg-manager", "sg-agents"],
        management_client_group_ids=["sg-manager"], deployment_mode=mode,
        instance_type=instance_type, engine_version="3.13", username="streamboss",
        password=pulumi.Output.secret(PASSWORD), secret_parameter_name="/streamboss/t/broker-url"))


def test_the_broker_is_private_rabbitmq_reachable_only_from_node_groups(stack):
    endpoint = stack.run(lambda: declare_broker().endpoint)

    (mq,) = stack.of_type("aws:mq/broker:Broker")
    assert mq.inputs["engineType"] == "RabbitMQ"
    assert mq.inputs["publiclyAccessible"] is False
    assert mq.inputs["deploymentMode"] == "SINGLE_INSTANCE"
    assert mq.inputs["subnetIds"] == ["subnet-a"]
    assert mq.inputs["securityGroups"] == ["broker-sg-id"]
    assert endpoint.startswith("amqps://") and endpoint.endswith(":5671")
    assert "@" not in endpoint
    ingress = rules(stack, "Ingress")
    assert all("cidrIpv4" not in r and "cidrIpv6" not in r for r in ingress)
    assert {(r["referencedSecurityGroupId"], r["fromPort"], r["toPort"]) for r in ingress} == {
        ("sg-manager", 5671, 5671), ("sg-agents", 5671, 5671), ("sg-manager", 443, 443)}
    assert all(r["securityGroupId"] == "broker-sg-id" for r in ingress)
    assert not rules(stack, "Egress")


def test_a_cluster_broker_spans_every_subnet(stack):
    stack.run(lambda: declare_broker("CLUSTER_MULTI_AZ", "mq.m5.large").endpoint)
    (mq,) = stack.of_type("aws:mq/broker:Broker")
    assert mq.inputs["deploymentMode"] == "CLUSTER_MULTI_AZ"
    assert mq.inputs["subnetIds"] == ["subnet-a", "subnet-b"]


def test_the_broker_credentials_are_secrets_and_the_url_is_an_ssm_secure_string(stack):
    name = stack.run(lambda: declare_broker().secret_parameter_name)

    (mq,) = stack.of_type("aws:mq/broker:Broker")
    assert is_secret(mq.inputs["users"])
    (parameter,) = stack.of_type("aws:ssm/parameter:Parameter")
    assert name == "/streamboss/t/broker-url" == parameter.inputs["name"]
    assert parameter.inputs["type"] == "SecureString"
    assert is_secret(parameter.inputs["value"])
    assert plain(parameter.inputs["value"]) == (
        f"amqps://streamboss:{PASSWORD}@b-broker-mq.mq.eu-west-1.amazonaws.com:5671/%2F")


def test_broker_url_encodes_credentials_and_refuses_a_non_tls_endpoint():
    assert broker_url("amqps://host.example:5671", "u@x", "p/w%d!") == \
        "amqps://u%40x:p%2Fw%25d%21@host.example:5671/%2F"
    with pytest.raises(ValueError, match="not an amqps"):
        broker_url("amqp://host.example:5672", "u", "p")


# -- storage ---------------------------------------------------------------------------------


def test_a_private_bucket_has_every_guard(stack):
    stack.run(lambda: PrivateBucket("plain", PrivateBucketArgs()).arn)
    (bucket,) = stack.of_type("aws:s3/bucket:Bucket")
    guards = assert_private_encrypted_tls_only(stack, bucket)
    assert "aws:s3/bucketVersioning:BucketVersioning" not in guards
    (rule,) = guards["aws:s3/bucketLifecycleConfiguration:BucketLifecycleConfiguration"]["rules"]
    assert rule["abortIncompleteMultipartUpload"]["daysAfterInitiation"] == 7


def test_the_archive_is_versioned_with_a_lifecycle_and_objects_may_expire(stack):
    stack.run(lambda: Storage("storage", StorageArgs(
        archive_transition_days=45, archive_storage_class="GLACIER_IR",
        archive_noncurrent_expiration_days=120, objects_expiration_days=14)).archive.bucket)

    buckets = {b.name: b for b in stack.of_type("aws:s3/bucket:Bucket")}
    assert set(buckets) == {"storage-archive", "storage-objects"}
    archive = assert_private_encrypted_tls_only(stack, buckets["storage-archive"])
    objects = assert_private_encrypted_tls_only(stack, buckets["storage-objects"])
    versioning = archive["aws:s3/bucketVersioning:BucketVersioning"]
    assert versioning["versioningConfiguration"]["status"] == "Enabled"
    assert "aws:s3/bucketVersioning:BucketVersioning" not in objects
    lifecycle = {r["id"]: r for r in archive[
        "aws:s3/bucketLifecycleConfiguration:BucketLifecycleConfiguration"]["rules"]}
    tiering = lifecycle["archive-tiering"]
    assert tiering["status"] == "Enabled"
    assert tiering["transitions"] == [{"days": 45, "storageClass": "GLACIER_IR"}]
    assert tiering["noncurrentVersionExpiration"]["noncurrentDays"] == 120
    expiry = {r["id"]: r for r in objects[
        "aws:s3/bucketLifecycleConfiguration:BucketLifecycleConfiguration"]["rules"]}
    assert expiry["objects-expiry"]["expiration"]["days"] == 14


# -- launch templates and IAM ---------------------------------------------------------------


def test_a_launch_template_requires_imdsv2_and_encrypts_the_image_root(stack):
    def declare() -> Any:
        holder = pulumi.ComponentResource("test:index:Holder", "holder")
        return secure_launch_template("lt", LaunchTemplateArgs(
            image=image(), instance_type="t3.small", instance_profile_arn="arn:profile",
            security_group_ids=["sg-1"], user_data="#cloud-config\n{}\n", root_volume_gb=20),
            holder).id

    stack.run(declare)
    template = stack.named("lt")
    assert_secure_template(template)
    assert template.inputs["imageId"] == "ami-stream-agent"
    (mapping,) = template.inputs["blockDeviceMappings"]
    assert mapping["deviceName"] == "/dev/xvda"
    assert mapping["ebs"]["volumeSize"] == 20
    assert base64.b64decode(template.inputs["userData"]) == b"#cloud-config\n{}\n"


@pytest.mark.parametrize(("given", "expected"), [
    (None, ("tag:streamboss:role", "stream-agent")),
    ("ami-0123", ("image-id", "ami-0123")),
    ("streamboss-agent-gpu-*", ("name", "streamboss-agent-gpu-*")),
])
def test_images_are_found_by_tag_id_or_name(stack, monkeypatch, given, expected):
    seen = []
    original = stack.mocks.call

    def spy(args: Any) -> Any:
        seen.append(args.args)
        return original(args)

    monkeypatch.setattr(stack.mocks, "call", spy)
    stack.run(lambda: find_image(AGENT_ROLE, given, ["self", "123"]).id)
    (lookup,) = seen
    assert lookup["owners"] == ["self", "123"] and lookup["mostRecent"] is True
    assert [(f["name"], f["values"]) for f in lookup["filters"]] == [(expected[0], [expected[1]])]


def test_a_wildcard_on_every_resource_is_refused():
    allowed = statement("Ok", ["s3:GetObject"], ["*"])
    assert json.loads(policy_document([allowed]))["Statement"] == [allowed]
    for actions in (["*"], ["s3:*"], ["s3:GetObject", "ec2:*"]):
        with pytest.raises(PolicyError, match="every resource"):
            policy_document([statement("Bad", actions, ["*"])])


def test_role_name_prefixes_fit_iam():
    long_name = "agents-" + "x" * 63
    assert len(role_name_prefix(long_name)) == 38
    assert role_name_prefix("manager") == "sb-manager-"


# -- manager node ----------------------------------------------------------------------------


def declare_manager() -> ManagerNode:
    return ManagerNode("manager", ManagerNodeArgs(
        subnet_ids=["subnet-a", "subnet-b"], security_group_id="sg-manager",
        image=find_image("stream-manager", None, ["self"]), instance_type="t3.small",
        root_volume_gb=None, state_volume_gb=12, token=pulumi.Output.secret(TOKEN),
        token_parameter_name="/streamboss/t/manager-token",
        broker_secret_parameter_name="/streamboss/t/broker-url",
        broker_secret_parameter_arn="arn:aws:ssm:eu-west-1:1:parameter/streamboss/t/broker-url",
        management_url="https://b-1.mq.eu-west-1.amazonaws.com", archive_bucket="archive-b",
        archive_bucket_arn="arn:aws:s3:::archive-b", objects_bucket="objects-b",
        region="eu-west-1"))


def test_the_manager_node_boots_its_image_with_a_separate_encrypted_state_volume(stack):
    address = stack.run(lambda: declare_manager().address)

    assert address == f"http://10.40.0.10:{MANAGER_API_PORT}"
    template = stack.named("manager-lt")
    assert_secure_template(template)
    assert template.inputs["imageId"] == "ami-stream-manager"
    assert template.inputs["vpcSecurityGroupIds"] == ["sg-manager"]
    assert "volumeSize" not in template.inputs["blockDeviceMappings"][0]["ebs"]
    instance = stack.named("manager-instance")
    assert instance.inputs["launchTemplate"] == {"id": "manager-lt-id", "version": "1"}
    assert instance.inputs["subnetId"] == "subnet-a"
    (volume,) = stack.of_type("aws:ebs/volume:Volume")
    assert volume.inputs["encrypted"] is True and volume.inputs["size"] == 12
    assert volume.inputs["availabilityZone"] == ZONES[0]
    (attachment,) = stack.of_type("aws:ec2/volumeAttachment:VolumeAttachment")
    assert attachment.inputs["deviceName"] == STATE_DEVICE
    assert attachment.inputs["volumeId"] == "manager-state-id"
    assert not stack.of_type("aws:autoscaling/group:Group")


def test_the_manager_token_is_a_secret_and_user_data_only_names_it(stack):
    stack.run(lambda: declare_manager().token_parameter_name)

    (parameter,) = stack.of_type("aws:ssm/parameter:Parameter")
    assert parameter.inputs["type"] == "SecureString" and is_secret(parameter.inputs["value"])
    assert plain(parameter.inputs["value"]) == TOKEN
    env = written(stack.named("manager-lt"))["manager.env"]
    assert TOKEN not in env
    settings = dict(line.split("=", 1) for line in env.splitlines())
    assert settings["STREAMBOSS_TOKEN_PARAMETER"] == "/streamboss/t/manager-token"
    assert settings["STREAMBOSS_BROKER_URL_PARAMETER"] == "/streamboss/t/broker-url"
    assert settings["STREAMBOSS_ARCHIVE_STORE"] == "s3://archive-b"
    assert settings["STREAMBOSS_OBJECT_STORE"] == "s3://objects-b/streams"
    assert settings["STREAMBOSS_STATE_DEVICE"] == STATE_DEVICE
    assert cloud_config(stack.named("manager-lt"))["runcmd"] == [
        ["systemctl", "enable", "--now", "stream-manager.service"]]


def test_the_manager_may_read_its_secrets_publish_its_metrics_and_use_the_archive(stack):
    stack.run(lambda: declare_manager().instance_id)

    policy = json.loads(stack.named("manager-policy").inputs["policy"])
    by_sid = {s["Sid"]: s for s in policy["Statement"]}
    assert set(by_sid) == {"ReadSecrets", "PublishScalingMetrics", "DescribeAgentGroups",
                           "DescribePoolAlarms", "ReadWriteArchive", "ListArchive"}
    assert by_sid["DescribeAgentGroups"]["Action"] == ["autoscaling:DescribeAutoScalingGroups"]
    assert "Condition" not in by_sid["DescribeAgentGroups"]
    assert by_sid["DescribePoolAlarms"]["Action"] == ["cloudwatch:DescribeAlarms"]
    assert by_sid["ReadSecrets"]["Action"] == ["ssm:GetParameter"]
    assert set(by_sid["ReadSecrets"]["Resource"]) == {
        "arn:aws:ssm:eu-west-1:1:parameter/streamboss/t/broker-url",
        "arn:aws:ssm:eu-west-1:123456789012:parameter/streamboss/t/manager-token"}
    metrics_statement = by_sid["PublishScalingMetrics"]
    assert metrics_statement["Action"] == ["cloudwatch:PutMetricData"]
    assert metrics_statement["Condition"] == {
        "StringEquals": {"cloudwatch:namespace": metrics.NAMESPACE}}
    assert by_sid["ReadWriteArchive"]["Resource"] == ["arn:aws:s3:::archive-b/*"]
    assert by_sid["ListArchive"]["Resource"] == ["arn:aws:s3:::archive-b"]
    trust = json.loads(stack.named("manager-role").inputs["assumeRolePolicy"])
    assert trust["Statement"][0]["Principal"] == {"Service": "ec2.amazonaws.com"}


# -- operation pool --------------------------------------------------------------------------


def declare_pool(spec: Any, producers: tuple[str, ...] = ()) -> OperationPool:
    return OperationPool(f"agents-{spec.name}", OperationPoolArgs(
        operation=spec, producers=producers, subnet_ids=["subnet-a", "subnet-b"],
        security_group_id="sg-agents", image=image(), instance_type="t3.small",
        root_volume_gb=None, broker_secret_parameter_name="/streamboss/t/broker-url",
        broker_secret_parameter_arn="arn:aws:ssm:eu-west-1:1:parameter/streamboss/t/broker-url",
        objects_bucket="objects-b", objects_bucket_arn="arn:aws:s3:::objects-b",
        region="eu-west-1"))


def test_a_pool_is_one_group_with_the_declared_bounds_and_cooldowns(stack):
    spec = sample_spec(min=2, max=7)
    assert stack.run(lambda: declare_pool(spec).group_name) == "agents-resize-asg"

    group = stack.named("agents-resize-asg")
    assert group.inputs["minSize"] == 2 and group.inputs["maxSize"] == 7
    assert "desiredCapacity" not in group.inputs
    assert group.inputs["vpcZoneIdentifiers"] == ["subnet-a", "subnet-b"]
    assert group.inputs["launchTemplate"] == {"id": "agents-resize-lt-id", "version": "1"}
    assert group.inputs["defaultCooldown"] == 300
    assert group.inputs["defaultInstanceWarmup"] == 91
    assert "GroupDesiredCapacity" in group.inputs["enabledMetrics"]
    assert group.inputs["instanceRefresh"]["strategy"] == "Rolling"
    tags = {t["key"]: t["value"] for t in group.inputs["tags"]}
    assert tags["streamboss:operation"] == "resize"
    assert all(t["propagateAtLaunch"] for t in group.inputs["tags"])
    template = stack.named("agents-resize-lt")
    assert_secure_template(template)
    assert template.inputs["vpcSecurityGroupIds"] == ["sg-agents"]
    assert template.inputs["instanceType"] == "t3.small"


def test_a_warm_pool_keeps_that_many_stopped_instances_and_takes_scaled_in_ones_back(stack):
    stack.run(lambda: declare_pool(sample_spec(warm_pool=2, min=1)).group_name)

    group = stack.named("agents-resize-asg")
    assert group.inputs["warmPool"] == {
        "poolState": "Stopped", "minSize": 2, "maxGroupPreparedCapacity": 2,
        "instanceReusePolicy": {"reuseOnScaleIn": True}}


def test_a_pool_without_a_warm_pool_declares_none(stack):
    stack.run(lambda: declare_pool(sample_spec()).group_name)

    assert "warmPool" not in stack.named("agents-resize-asg").inputs


def test_target_tracking_holds_the_declared_backlog_per_agent_while_wanted(stack):
    stack.run(lambda: declare_pool(sample_spec(target_backlog_per_agent=25)).group_name)

    track = stack.named("agents-resize-track")
    assert track.inputs["policyType"] == "TargetTrackingScaling"
    assert track.inputs["autoscalingGroupName"] == "agents-resize-asg"
    assert track.inputs["estimatedInstanceWarmup"] == 91
    config = track.inputs["targetTrackingConfiguration"]
    assert config["targetValue"] == 25
    assert config["disableScaleIn"] is True
    queries = {q["id"]: q for q in config["customizedMetricSpecification"]["metrics"]}
    for query_id, metric in (("wanted", metrics.WANTED),
                             ("backlogperagent", metrics.BACKLOG_PER_AGENT)):
        stat = queries[query_id]["metricStat"]["metric"]
        assert stat["metricName"] == metric and stat["namespace"] == metrics.NAMESPACE
        assert stat["dimensions"] == [{"name": "Operation", "value": "resize"}]
        # The manager's metrics are high resolution: tracked at 10 s, not AWS's default 60.
        assert queries[query_id]["metricStat"]["period"] == 10
    (returned,) = [q for q in queries.values() if q["returnData"]]
    assert returned["expression"] == "IF(wanted >= 1, backlogperagent, 0)"


def alarm_for(stack, policy_name: str) -> dict[str, Any]:
    arn = stack.named(policy_name).state["arn"]
    (alarm,) = [a.inputs for a in stack.of_type("aws:cloudwatch/metricAlarm:MetricAlarm")
                if a.inputs["alarmActions"] == [arn]]
    return alarm


def test_a_wanted_pool_wakes_from_zero(stack):
    stack.run(lambda: declare_pool(sample_spec(min=0)).group_name)

    wake = stack.named("agents-resize-wake")
    assert wake.inputs["adjustmentType"] == "ChangeInCapacity"
    assert wake.inputs["scalingAdjustment"] == 1
    alarm = alarm_for(stack, "agents-resize-wake")
    queries = {q["id"]: q for q in alarm["metricQueries"]}
    assert queries["wanted"]["metric"]["metricName"] == metrics.WANTED
    assert queries["wanted"]["metric"]["dimensions"] == {"Operation": "resize"}
    # The gate is the manager's high-resolution DesiredCapacity: AWS's own
    # GroupDesiredCapacity exists only per minute and would hold the alarm at 60 s.
    assert queries["desired"]["metric"]["metricName"] == metrics.DESIRED_CAPACITY
    assert queries["desired"]["metric"]["namespace"] == metrics.NAMESPACE
    assert queries["desired"]["metric"]["dimensions"] == {"Operation": "resize"}
    assert {q["metric"]["period"] for q in queries.values() if "metric" in q} == {10}
    assert queries["act"]["expression"] == "IF(wanted >= 1 AND desired < 1, 1, 0)"
    assert alarm["comparisonOperator"] == "GreaterThanOrEqualToThreshold"
    assert alarm["threshold"] == 1 and alarm["evaluationPeriods"] == 1
    assert alarm["treatMissingData"] == "notBreaching"


@pytest.mark.parametrize(("idle", "periods", "period"), [
    (1800, 180, 10), (95, 10, 10), (0, 1, 10), (60, 6, 10), (10_800, 1080, 10),
    # Beyond the three hours CloudWatch keeps 10-second datapoints: one-minute periods.
    (10_801, 181, 60), (86_400, 1440, 60)])
def test_an_unwanted_pool_goes_to_zero_after_its_idle_period(stack, idle, periods, period):
    stack.run(lambda: declare_pool(sample_spec(idle_seconds=idle, min=0)).group_name)

    idle_policy = stack.named("agents-resize-idle")
    assert idle_policy.inputs["adjustmentType"] == "ExactCapacity"
    assert idle_policy.inputs["scalingAdjustment"] == 0
    assert idle_policy.inputs["cooldown"] == 300
    alarm = alarm_for(stack, "agents-resize-idle")
    assert alarm["metricName"] == metrics.WANTED and alarm["namespace"] == metrics.NAMESPACE
    assert alarm["dimensions"] == {"Operation": "resize"}
    assert alarm["comparisonOperator"] == "LessThanThreshold" and alarm["threshold"] == 1
    assert alarm["evaluationPeriods"] == alarm["datapointsToAlarm"] == periods
    assert alarm["period"] == period
    window = alarm["evaluationPeriods"] * alarm["period"]
    assert idle <= window < max(idle, 1) + period
    # CloudWatch: at most a day of look-back for periods under an hour.
    assert window <= 86_400


def test_a_wanted_pool_scales_in_one_agent_per_cooldown_but_never_below_one(stack):
    stack.run(lambda: declare_pool(sample_spec(target_backlog_per_agent=20, min=0))
              .group_name)

    shrink = stack.named("agents-resize-shrink")
    assert shrink.inputs["scalingAdjustment"] == -1
    assert shrink.inputs["cooldown"] == 300
    alarm = alarm_for(stack, "agents-resize-shrink")
    (act,) = [q for q in alarm["metricQueries"] if q["returnData"]]
    assert act["expression"] == "IF(wanted >= 1 AND backlogperagent < 10 AND desired > 1, 1, 0)"
    assert alarm["evaluationPeriods"] == 30                    # 300 s at 10 s
    assert {q["metric"]["period"] for q in alarm["metricQueries"] if "metric" in q} == {10}


def test_an_agent_reads_its_secret_and_its_prefixes_only(stack):
    spec = sample_spec(input="shout")
    stack.run(lambda: declare_pool(spec, producers=("upper",)).group_name)

    policy = json.loads(stack.named("agents-resize-policy").inputs["policy"])
    by_sid = {s["Sid"]: s for s in policy["Statement"]}
    assert set(by_sid) == {"ReadBrokerUrl", "ReadInputObjects", "WriteOwnObjects",
                           "ListInputPrefixes"}
    assert by_sid["ReadBrokerUrl"] == {
        "Sid": "ReadBrokerUrl", "Effect": "Allow", "Action": ["ssm:GetParameter"],
        "Resource": ["arn:aws:ssm:eu-west-1:1:parameter/streamboss/t/broker-url"]}
    assert by_sid["ReadInputObjects"]["Action"] == ["s3:GetObject"]
    assert by_sid["ReadInputObjects"]["Resource"] == [
        "arn:aws:s3:::objects-b/operations/resize/*", "arn:aws:s3:::objects-b/operations/upper/*",
        "arn:aws:s3:::objects-b/streams/shout/*"]
    assert by_sid["WriteOwnObjects"]["Resource"] == [
        "arn:aws:s3:::objects-b/operations/resize/*"]
    assert by_sid["ListInputPrefixes"]["Resource"] == ["arn:aws:s3:::objects-b"]
    assert by_sid["ListInputPrefixes"]["Condition"] == {"StringLike": {"s3:prefix": [
        "operations/resize/*", "operations/upper/*", "streams/shout/*"]}}
    assert not any("kms:" in a for s in policy["Statement"] for a in s["Action"])


def test_object_prefixes_are_unique_and_sorted():
    assert object_prefixes(sample_spec(), ["b", "a", "b"]) == [
        "operations/a/", "operations/b/", "operations/resize/", "streams/images/"]


def test_the_agent_user_data_is_a_config_the_agent_itself_accepts(stack, tmp_path, monkeypatch):
    spec = sample_spec(definition={"exec": ["convert", "-", "-resize", "50%", "-"],
                                   "mode": "per-message", "timeout": 30})
    stack.run(lambda: declare_pool(spec).group_name)

    template = stack.named("agents-resize-lt")
    files = written(template)
    assert set(files) == {"agent.json", "agent.env", "lifecycle.env"}
    env = dict(line.split("=", 1) for line in files["agent.env"].splitlines())
    assert env == {"STREAMBOSS_BROKER_URL_PARAMETER": "/streamboss/t/broker-url",
                   "AWS_REGION": "eu-west-1", "AWS_DEFAULT_REGION": "eu-west-1"}
    monkeypatch.delenv("STREAMBOSS_OBJECT_STORE", raising=False)
    monkeypatch.delenv("STREAMBOSS_OBJECT_ALLOW", raising=False)
    agent = build_config(None, None, None, {}, json.loads(files["agent.json"]))
    assert (agent.operation, agent.input, agent.output) == ("resize", "images", "thumbs")
    assert agent.definition.argv == ["convert", "-", "-resize", "50%", "-"]
    assert agent.definition.timeout == 30
    assert agent.object_store == "s3://objects-b/operations"
    # References are read where the agent's role may read: its input's uploads too.
    assert agent.object_allow == ("s3://objects-b/operations/resize",
                                  "s3://objects-b/streams/images")
    assert cloud_config(template)["runcmd"] == [
        ["systemctl", "enable", "--now", "stream-agent.service",
         "stream-agent-lifecycle.service"]]


def test_an_operation_may_name_its_own_image_and_instance_type(stack):
    stack.run(lambda: declare_pool(sample_spec(instance_type="c6i.large")).group_name)
    assert stack.named("agents-resize-lt").inputs["instanceType"] == "c6i.large"


def test_user_data_is_byte_stable_and_refuses_unsafe_environment_values():
    def render(parameter: str) -> str:
        return agent_user_data(operation="op", input_stream="a", output_stream="b",
                               definition={"mode": "service", "exec": "cat"},
                               object_store="s3://o/operations",
                               broker_url_parameter=parameter, region="eu-west-1")

    assert render("/p") == render("/p")
    assert render("/p") == agent_user_data(
        operation="op", input_stream="a", output_stream="b",
        definition={"exec": "cat", "mode": "service"}, object_store="s3://o/operations",
        broker_url_parameter="/p", region="eu-west-1")
    with pytest.raises(ValueError, match="environment file"):
        render("/p\nSTREAMBOSS_BROKER_URL=amqps://evil")

