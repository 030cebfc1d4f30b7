"""Network: private subnets in two availability zones, or an existing VPC's.

Nothing in the stack needs an inbound path from the internet: the broker is
private, agents only dial out, and the manager's API is reached from inside the
VPC (or from the CIDRs allowed in ``security_groups.py``). So a new VPC gets
private subnets only, with no internet or NAT gateway, and VPC endpoints for
the AWS APIs the nodes call (S3, SSM Parameter Store, CloudWatch metrics).
"""

from __future__ import annotations

import ipaddress
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
        tags: tags for every resource.
    """

    vpc_cidr: str
    vpc_id: str | None = None
    subnet_ids: tuple[str, ...] = ()
    availability_zones: tuple[str, ...] = ()
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
                            route_table_ids=[routes.id], tags=args.tags, opts=child)
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
