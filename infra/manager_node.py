"""The manager node: one instance from the stream-manager image, its state on its own volume.

One instance rather than a one-instance autoscaling group: the manager's
declarations live in SQLite in its state directory, and a group's replacement
instance would start with an empty store. The state directory is a separate
encrypted EBS volume instead, so replacing the instance (a new image, new user
data) keeps every declaration; EC2 recovers the instance itself on host failure.

The API token is a Pulumi secret stored as an SSM SecureString, like the broker
URL; the node reads both with its role and is told only their names.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import pulumi
import pulumi_aws as aws

from . import metrics
from .iam import instance_profile, policy_document, statement
from .launch import LaunchTemplateArgs, latest, secure_launch_template
from .security_groups import MANAGER_API_PORT
from .storage import STREAMS_PREFIX
from .user_data import manager_user_data

# The state volume's device name as EC2 attaches it (Nitro instances show it as
# an NVMe device whose serial names the volume; the image's role mounts it).
STATE_DEVICE = "/dev/sdf"
STATE_VOLUME_TYPE = "gp3"


def manager_policy(secret_arns: list[str], archive_arn: str) -> str:
    """The manager role's only policy: its secrets, its metrics, reading the agent groups,
    the archive bucket."""
    return policy_document([
        statement("ReadSecrets", ["ssm:GetParameter"], secret_arns),
        # PutMetricData has no resource-level ARNs: the namespace condition is the scope.
        statement("PublishScalingMetrics", ["cloudwatch:PutMetricData"], ["*"],
                  {"StringEquals": {"cloudwatch:namespace": metrics.NAMESPACE}}),
        # The AWS dispatcher's agent counts (``manager/dispatch_aws.py``). Describe
        # calls have no resource-level ARNs; this one only reads.
        statement("DescribeAgentGroups", ["autoscaling:DescribeAutoScalingGroups"], ["*"]),
        # `streamboss status` shows the pools' alarm states; read only, no resource ARNs.
        statement("DescribePoolAlarms", ["cloudwatch:DescribeAlarms"], ["*"]),
        statement("ReadWriteArchive",
                  ["s3:GetObject", "s3:PutObject", "s3:DeleteObject", "s3:AbortMultipartUpload"],
                  [f"{archive_arn}/*"]),
        statement("ListArchive", ["s3:ListBucket"], [archive_arn]),
    ])


@dataclass
class ManagerNodeArgs:
    """The manager node and what it connects to.

    Attributes:
        subnet_ids: private subnets; the instance and its state volume go in the first.
        security_group_id: the manager's own security group.
        image: the stream-manager AMI.
        instance_type: the EC2 instance type.
        root_volume_gb: root volume size; None for the image's.
        state_volume_gb: the state volume's size.
        token: the API's bearer token, a Pulumi secret.
        token_parameter_name: the SSM parameter to keep it in.
        broker_secret_parameter_name / broker_secret_parameter_arn: the broker URL's parameter.
        management_url: the broker's management API.
        archive_bucket / archive_bucket_arn: the archive bucket.
        objects_bucket: the objects bucket (``stream-file`` uploads).
        region: the AWS region.
        stack: the stack's name as its agent groups carry it (tag ``streamboss:stack``);
            None: this Pulumi stack's.
        tags: tags for every resource.
    """

    subnet_ids: pulumi.Input[list[str]]
    security_group_id: pulumi.Input[str]
    image: pulumi.Output[aws.ec2.GetAmiResult]
    instance_type: str
    root_volume_gb: int | None
    state_volume_gb: int
    token: pulumi.Input[str]
    token_parameter_name: str
    broker_secret_parameter_name: pulumi.Input[str]
    broker_secret_parameter_arn: pulumi.Input[str]
    management_url: pulumi.Input[str]
    archive_bucket: pulumi.Input[str]
    archive_bucket_arn: pulumi.Input[str]
    objects_bucket: pulumi.Input[str]
    region: pulumi.Input[str]
    stack: str | None = None
    tags: dict[str, str] = field(default_factory=dict)


class ManagerNode(pulumi.ComponentResource):
    """The stream manager's instance, role, launch template, state volume and token.

    Outputs:
        address: the API's URL inside the VPC (``http://<private ip>:8181``).
        instance_id: the instance.
        token_parameter_name: where the API token is kept.
    """

    address: pulumi.Output[str]
    instance_id: pulumi.Output[str]
    token_parameter_name: pulumi.Output[str]

    def __init__(self, name: str, args: ManagerNodeArgs,
                 opts: pulumi.ResourceOptions | None = None) -> None:
        super().__init__("streamboss:infra:ManagerNode", name, None, opts)
        child = pulumi.ResourceOptions(parent=self)
        token = aws.ssm.Parameter(
            f"{name}-token", name=args.token_parameter_name, type="SecureString",
            description="streamboss manager API bearer token",
            value=pulumi.Output.secret(args.token), tags=args.tags, opts=child)
        policy = pulumi.Output.all(args.broker_secret_parameter_arn, token.arn,
                                   args.archive_bucket_arn).apply(
            lambda arns: manager_policy([arns[0], arns[1]], arns[2]))
        profile = instance_profile(name, policy, args.tags, self)
        user_data = pulumi.Output.all(
            args.broker_secret_parameter_name, token.name, args.management_url,
            args.archive_bucket, args.objects_bucket, args.region,
        ).apply(lambda v: manager_user_data(
            broker_url_parameter=v[0], token_parameter=v[1], management_url=v[2],
            archive_store=f"s3://{v[3]}", object_store=f"s3://{v[4]}/{STREAMS_PREFIX}",
            api_port=MANAGER_API_PORT, state_device=STATE_DEVICE, region=v[5],
            stack=args.stack or pulumi.get_stack()))
        template = secure_launch_template(f"{name}-lt", LaunchTemplateArgs(
            image=args.image, instance_type=args.instance_type,
            instance_profile_arn=profile.arn, security_group_ids=[args.security_group_id],
            user_data=user_data, root_volume_gb=args.root_volume_gb,
            tags={**args.tags, "Name": name}), self)
        subnet = pulumi.Output.from_input(args.subnet_ids).apply(lambda ids: ids[0])
        # Replaced instances release the state volume before the new one takes it.
        replace_first = pulumi.ResourceOptions(parent=self, delete_before_replace=True)
        instance = aws.ec2.Instance(
            f"{name}-instance", subnet_id=subnet,
            launch_template=latest(template),
            tags={**args.tags, "Name": name}, opts=replace_first)
        # The subnet's zone, not the instance's: a replaced instance's zone is unknown
        # until it exists, which would make a preview plan to replace the volume.
        zone = aws.ec2.get_subnet_output(
            id=subnet, opts=pulumi.InvokeOutputOptions(parent=self)).availability_zone
        volume = aws.ebs.Volume(
            f"{name}-state", availability_zone=zone,
            size=args.state_volume_gb, type=STATE_VOLUME_TYPE, encrypted=True,
            tags={**args.tags, "Name": f"{name}-state"},
            # The declarations live here: `pulumi destroy` must be told twice.
            opts=pulumi.ResourceOptions(parent=self, protect=True))
        aws.ec2.VolumeAttachment(
            f"{name}-state-attachment", device_name=STATE_DEVICE, instance_id=instance.id,
            volume_id=volume.id, stop_instance_before_detaching=True, opts=replace_first)
        self.address = instance.private_ip.apply(lambda ip: f"http://{ip}:{MANAGER_API_PORT}")
        self.instance_id = instance.id
        self.token_parameter_name = token.name
        self.register_outputs({"address": self.address, "instance_id": self.instance_id,
                               "token_parameter_name": self.token_parameter_name})
