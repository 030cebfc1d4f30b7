"""Network: private subnets in two availability zones, or an existing VPC's.

Nothing in the stack needs an inbound path from the internet: the broker is
private, agents only dial out, and the manager's API is reached from inside the
VPC (or from the CIDRs allowed in ``security_groups.py``). So a new VPC gets
private subnets only, with no internet or NAT gateway, and VPC endpoints for
the AWS APIs the nodes call (S3, SSM Parameter Store, CloudWatch metrics).

The S3 gateway endpoint carries every S3 request the VPC makes, so its policy is
a second fence around the data: only the stack's own buckets (archive and
objects), and only the S3 actions the node roles use. Credentials of any account
(a stolen key, an attacker's own) cannot move data through it into another
bucket, and a node role widened by mistake still reaches nothing else.
"""

from __future__ import annotations

import ipaddress
import json
import re
from collections.abc import Sequence
from dataclasses import dataclass, field

import pulumi
import pulumi_aws as aws

# Private subnets, one per zone: the broker's cluster mode and the agent pools
# spread over them, and losing one zone leaves the other running.
ZONE_COUNT = 2
# Each subnet is 1/16th of the VPC (a /20 of the default /16): room for a third
# zone or public subnets later without renumbering.
SUBNET_EXTRA_BITS = 4
# The AWS APIs the nodes call besides S3 (a free gateway endpoint): agents and
# the manager read the broker secret from SSM, the manager publishes metrics
# (monitoring) and reads the agent groups' sizes (autoscaling).
INTERFACE_ENDPOINT_SERVICES = ("ssm", "monitoring", "autoscaling")
HTTPS_PORT = 443
# The S3 actions nodes use, the union of the node roles' S3 statements
# (manager_node.py, operation_pool.py): objects read, written (multipart uploads
# included), deleted and aborted; buckets listed (S3 answers 404, not 403, for a
# missing object only with ListBucket).
S3_OBJECT_ACTIONS = ("s3:AbortMultipartUpload", "s3:DeleteObject", "s3:GetObject",
                     "s3:PutObject")
S3_BUCKET_ACTIONS = ("s3:ListBucket",)


def s3_endpoint_policy(bucket_arns: Sequence[str]) -> str:
    """The S3 gateway endpoint's policy: :data:`S3_OBJECT_ACTIONS` on the objects of
    ``bucket_arns`` and :data:`S3_BUCKET_ACTIONS` on the buckets, nothing else.

    Raises:
        ValueError: no bucket, or a bucket ARN that is not one (an endpoint policy
            that named ``*`` would let anything through).
    """
    arns = sorted(set(bucket_arns))
    if not arns:
        raise ValueError("the S3 endpoint policy needs the stack's bucket ARNs")
    for arn in arns:
        if not re.fullmatch(r"arn:aws[a-z-]*:s3:::[a-z0-9][a-z0-9.-]*", arn):
            raise ValueError(f"{arn!r} is not an S3 bucket ARN")
    return json.dumps({"Version": "2012-10-17", "Statement": [
        # Principal "*": an endpoint policy restricts every caller; each node's own
        # role still decides what that node may do within this.
        {"Sid": "StackObjects", "Effect": "Allow", "Principal": "*",
         "Action": list(S3_OBJECT_ACTIONS), "Resource": [f"{arn}/*" for arn in arns]},
        {"Sid": "StackBuckets", "Effect": "Allow", "Principal": "*",
         "Action": list(S3_BUCKET_ACTIONS), "Resource": arns},
    ]}, sort_keys=True)


def private_subnet_cidrs(vpc_cidr: str, count: int = ZONE_COUNT) -> list[str]:
    """The first ``count`` subnets of ``vpc_cidr``, each :data:`SUBNET_EXTRA_BITS` longer."""
    network = ipaddress.ip_network(vpc_cidr)
    subnets = network.subnets(prefixlen_diff=SUBNET_EXTRA_BITS)
    return [str(next(subnets)) for _ in range(count)]


@dataclass
class NetworkArgs:
    """What the network is made of.

    Attributes:
        vpc_cidr: the new VPC's address block (ignored with ``vpc_id``).
        vpc_id: an existing VPC to use instead of creating one.
        subnet_ids: the existing VPC's private subnets (with ``vpc_id``), in
            distinct availability zones.
        availability_zones: zones for the new subnets; empty for the region's first two.
        s3_bucket_arns: the stack's buckets, the only ones the new VPC's S3 endpoint
            reaches (required with a new VPC; an existing VPC's endpoints are its owner's).
        tags: tags for every resource.
    """

    vpc_cidr: str
    vpc_id: str | None = None
    subnet_ids: tuple[str, ...] = ()
    availability_zones: tuple[str, ...] = ()
    s3_bucket_arns: Sequence[pulumi.Input[str]] = ()
    tags: dict[str, str] = field(default_factory=dict)


class Network(pulumi.ComponentResource):
    """A VPC and its private subnets.

    Outputs:
        vpc_id: the VPC.
        vpc_cidr: its address block (security groups allow the VPC by it).
        private_subnet_ids: the subnets nodes and the broker go in, one per zone.
    """

    vpc_id: pulumi.Output[str]
    vpc_cidr: pulumi.Output[str]
    private_subnet_ids: pulumi.Output[list[str]]

    def __init__(self, name: str, args: NetworkArgs,
                 opts: pulumi.ResourceOptions | None = None) -> None:
        super().__init__("streamboss:infra:Network", name, None, opts)
        if args.vpc_id:
            # An existing VPC: its owner provides routes to the AWS APIs.
            self.vpc_id = pulumi.Output.from_input(args.vpc_id)
            self.vpc_cidr = aws.ec2.get_vpc_output(
                id=args.vpc_id, opts=pulumi.InvokeOutputOptions(parent=self)).cidr_block
            self.private_subnet_ids = pulumi.Output.from_input(list(args.subnet_ids))
        else:
            self._create(name, args)
        self.register_outputs({"vpc_id": self.vpc_id, "vpc_cidr": self.vpc_cidr,
                               "private_subnet_ids": self.private_subnet_ids})

    def _create(self, name: str, args: NetworkArgs) -> None:
        if not args.s3_bucket_arns:
            raise ValueError("a new VPC's S3 endpoint needs the stack's bucket ARNs "
                             "(NetworkArgs.s3_bucket_arns)")
        child = pulumi.ResourceOptions(parent=self)
        vpc = aws.ec2.Vpc(f"{name}-vpc", cidr_block=args.vpc_cidr,
                          # Interface endpoints answer under the services' own names.
                          enable_dns_support=True, enable_dns_hostnames=True,
                          tags={**args.tags, "Name": f"{name}-vpc"}, opts=child)
        # The default security group allows all traffic among its members; nothing
        # should use it, so it is emptied (a managed default group keeps no rules).
        aws.ec2.DefaultSecurityGroup(f"{name}-default-sg", vpc_id=vpc.id, tags=args.tags,
                                     opts=child)
        if args.availability_zones:
            zones = pulumi.Output.from_input(list(args.availability_zones[:ZONE_COUNT]))
        else:
            zones = aws.get_availability_zones_output(
                state="available", opts=pulumi.InvokeOutputOptions(parent=self)).names
        routes = aws.ec2.RouteTable(f"{name}-private", vpc_id=vpc.id,
                                    tags={**args.tags, "Name": f"{name}-private"}, opts=child)
        subnets = []
        for index, cidr in enumerate(private_subnet_cidrs(args.vpc_cidr)):
            subnet = aws.ec2.Subnet(
                f"{name}-private-{index}", vpc_id=vpc.id, cidr_block=cidr,
                availability_zone=zones.apply(lambda names, i=index: names[i]),
                map_public_ip_on_launch=False,
                tags={**args.tags, "Name": f"{name}-private-{index}"}, opts=child)
            aws.ec2.RouteTableAssociation(f"{name}-private-{index}", subnet_id=subnet.id,
                                          route_table_id=routes.id, opts=child)
            subnets.append(subnet)
        region = aws.get_region_output(opts=pulumi.InvokeOutputOptions(parent=self)).region
        aws.ec2.VpcEndpoint(f"{name}-s3", vpc_id=vpc.id, vpc_endpoint_type="Gateway",
                            service_name=region.apply(lambda r: f"com.amazonaws.{r}.s3"),
                            route_table_ids=[routes.id],
                            policy=pulumi.Output.all(*args.s3_bucket_arns).apply(
                                s3_endpoint_policy),
                            tags=args.tags, opts=child)
        endpoint_sg = aws.ec2.SecurityGroup(
            f"{name}-endpoints", vpc_id=vpc.id,
            description="AWS API endpoints: HTTPS from inside the VPC only",
            tags=args.tags, opts=child)
        aws.vpc.SecurityGroupIngressRule(
            f"{name}-endpoints-https", security_group_id=endpoint_sg.id,
            ip_protocol="tcp", from_port=HTTPS_PORT, to_port=HTTPS_PORT,
            cidr_ipv4=vpc.cidr_block, description="HTTPS from the VPC", opts=child)
        for service in INTERFACE_ENDPOINT_SERVICES:
            aws.ec2.VpcEndpoint(
                f"{name}-{service}", vpc_id=vpc.id, vpc_endpoint_type="Interface",
                service_name=region.apply(lambda r, s=service: f"com.amazonaws.{r}.{s}"),
                private_dns_enabled=True, subnet_ids=[s.id for s in subnets],
                security_group_ids=[endpoint_sg.id], tags=args.tags, opts=child)
        self.vpc_id = vpc.id
        self.vpc_cidr = vpc.cidr_block
        self.private_subnet_ids = pulumi.Output.all(*[s.id for s in subnets])
