"""Security groups for the nodes: one for the manager, one shared by all agent pools.

They are made before the broker, because the broker admits exactly these two
groups and the nodes need the broker's secret: the groups break that cycle.
Agents accept no inbound traffic at all; the manager accepts its API port only
from the configured CIDRs (by default, only from inside the VPC).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import pulumi
import pulumi_aws as aws

# The manager's HTTP API port (manager/server.py DEFAULT_PORT).
MANAGER_API_PORT = 8181
# Amazon MQ for RabbitMQ: AMQP over TLS, and the management API over HTTPS.
AMQPS_PORT = 5671
HTTPS_PORT = 443
# AWS APIs (S3 through the gateway endpoint, SSM, CloudWatch) answer on public
# addresses unless an interface endpoint serves them, so HTTPS egress cannot be
# narrowed to the VPC.
ANYWHERE = "0.0.0.0/0"


@dataclass
class SecurityGroupsArgs:
    """Where the groups live and who may reach the manager.

    Attributes:
        vpc_id: the VPC.
        vpc_cidr: its address block: AMQPS egress goes only there.
        manager_api_cidrs: who may call the manager's API; empty for the VPC only.
        tags: tags for every resource.
    """

    vpc_id: pulumi.Input[str]
    vpc_cidr: pulumi.Input[str]
    manager_api_cidrs: tuple[str, ...] = ()
    tags: dict[str, str] = field(default_factory=dict)


class SecurityGroups(pulumi.ComponentResource):
    """The manager's and the agents' security groups.

    Outputs:
        manager_id: the manager node's group.
        agents_id: the group every agent pool's instances share.
    """

    manager_id: pulumi.Output[str]
    agents_id: pulumi.Output[str]

    def __init__(self, name: str, args: SecurityGroupsArgs,
                 opts: pulumi.ResourceOptions | None = None) -> None:
        super().__init__("streamboss:infra:SecurityGroups", name, None, opts)
        child = pulumi.ResourceOptions(parent=self)
        manager = aws.ec2.SecurityGroup(
            f"{name}-manager", vpc_id=args.vpc_id,
            description="streamboss manager: its API from allowed CIDRs only",
            tags={**args.tags, "Name": f"{name}-manager"}, opts=child)
        agents = aws.ec2.SecurityGroup(
            f"{name}-agents", vpc_id=args.vpc_id,
            description="streamboss agents: no inbound traffic",
            tags={**args.tags, "Name": f"{name}-agents"}, opts=child)
        sources: list[pulumi.Input[str]] = list(args.manager_api_cidrs) or [args.vpc_cidr]
        for index, cidr in enumerate(sources):
            aws.vpc.SecurityGroupIngressRule(
                f"{name}-manager-api-{index}", security_group_id=manager.id,
                ip_protocol="tcp", from_port=MANAGER_API_PORT, to_port=MANAGER_API_PORT,
                cidr_ipv4=cidr, description="streamboss manager API", opts=child)
        for role, group in (("manager", manager), ("agents", agents)):
            aws.vpc.SecurityGroupEgressRule(
                f"{name}-{role}-amqps", security_group_id=group.id, ip_protocol="tcp",
                from_port=AMQPS_PORT, to_port=AMQPS_PORT, cidr_ipv4=args.vpc_cidr,
                description="AMQPS to the broker inside the VPC", opts=child)
            aws.vpc.SecurityGroupEgressRule(
                f"{name}-{role}-https", security_group_id=group.id, ip_protocol="tcp",
                from_port=HTTPS_PORT, to_port=HTTPS_PORT, cidr_ipv4=ANYWHERE,
                description="HTTPS to AWS APIs (and the broker's management API)", opts=child)
        self.manager_id = manager.id
        self.agents_id = agents.id
        self.register_outputs({"manager_id": self.manager_id, "agents_id": self.agents_id})
