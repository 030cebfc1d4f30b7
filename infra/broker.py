"""Broker: Amazon MQ for RabbitMQ, private, TLS only, its URL kept as an SSM secret.

Amazon MQ's RabbitMQ speaks AMQP only over TLS (amqps, 5671) and serves the
management API over HTTPS (443), which the manager uses to see who consumes a
stream. The broker has no public address and its security group admits only
the groups it is given: AMQPS from the manager and the agents, HTTPS from the
manager alone (agents have no use for the management API).

Nodes never get the password in their user data: the full broker URL lives in
an SSM SecureString parameter, and each node's role may read that one
parameter. Its name is what the nodes are told.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote, urlsplit

import pulumi
import pulumi_aws as aws

from .security_groups import AMQPS_PORT, HTTPS_PORT

ENGINE_TYPE = "RabbitMQ"
# One node (dev), or a three-node cluster across zones behind one endpoint (prod).
SINGLE_INSTANCE = "SINGLE_INSTANCE"
CLUSTER_MULTI_AZ = "CLUSTER_MULTI_AZ"
DEPLOYMENT_MODES = (SINGLE_INSTANCE, CLUSTER_MULTI_AZ)
# The default virtual host, spelled as pika's URL parser wants it.
DEFAULT_VHOST_PATH = "/%2F"


def broker_url(endpoint: str, username: str, password: str) -> str:
    """The AMQPS URL an agent connects with: ``endpoint`` plus credentials and vhost.

    Parameters:
        endpoint: the broker's endpoint as Amazon MQ reports it (``amqps://host:5671``).
        username: the broker user.
        password: its password; percent-encoded, so any character Amazon MQ allows is safe.

    Raises:
        ValueError: ``endpoint`` is not an amqps URL with a host.
    """
    parts = urlsplit(endpoint)
    if parts.scheme != "amqps" or not parts.hostname:
        raise ValueError(f"broker endpoint {endpoint!r} is not an amqps://host:port URL")
    port = parts.port or AMQPS_PORT
    credentials = f"{quote(username, safe='')}:{quote(password, safe='')}"
    return f"amqps://{credentials}@{parts.hostname}:{port}{DEFAULT_VHOST_PATH}"


@dataclass
class BrokerArgs:
    """The broker's shape and who may reach it.

    Attributes:
        vpc_id: the VPC.
        subnet_ids: private subnets in distinct zones; a single instance uses the first.
        amqps_client_group_ids: security groups admitted on AMQPS (manager, agents).
        management_client_group_ids: security groups admitted on HTTPS (manager).
        deployment_mode: SINGLE_INSTANCE (dev) or CLUSTER_MULTI_AZ (prod).
        instance_type: the broker host type (mq.t3.micro runs single instance only).
        engine_version: RabbitMQ version line.
        username: the broker user.
        password: its password, a Pulumi secret.
        secret_parameter_name: the SSM parameter that will hold the broker URL.
        tags: tags for every resource.
    """

    vpc_id: pulumi.Input[str]
    subnet_ids: pulumi.Input[list[str]]
    amqps_client_group_ids: list[pulumi.Input[str]]
    management_client_group_ids: list[pulumi.Input[str]]
    deployment_mode: str
    instance_type: str
    engine_version: str
    username: str
    password: pulumi.Input[str]
    secret_parameter_name: str
    tags: dict[str, str] = field(default_factory=dict)


class Broker(pulumi.ComponentResource):
    """Amazon MQ for RabbitMQ and the SSM parameter holding its URL.

    Outputs:
        endpoint: ``amqps://host:5671``, without credentials.
        console_url: the management UI and API (``https://host``).
        security_group_id: the broker's own group.
        secret_parameter_name / secret_parameter_arn: where the full URL is kept.
    """

    endpoint: pulumi.Output[str]
    console_url: pulumi.Output[str]
    security_group_id: pulumi.Output[str]
    secret_parameter_name: pulumi.Output[str]
    secret_parameter_arn: pulumi.Output[str]

    def __init__(self, name: str, args: BrokerArgs,
                 opts: pulumi.ResourceOptions | None = None) -> None:
        super().__init__("streamboss:infra:Broker", name, None, opts)
        child = pulumi.ResourceOptions(parent=self)
        group = aws.ec2.SecurityGroup(
            f"{name}-sg", vpc_id=args.vpc_id,
            description="streamboss broker: AMQPS and HTTPS from streamboss nodes only",
            tags={**args.tags, "Name": f"{name}-sg"}, opts=child)
        rules = [("amqps", AMQPS_PORT, args.amqps_client_group_ids),
                 ("https", HTTPS_PORT, args.management_client_group_ids)]
        for label, port, sources in rules:
            for index, source in enumerate(sources):
                aws.vpc.SecurityGroupIngressRule(
                    f"{name}-{label}-{index}", security_group_id=group.id, ip_protocol="tcp",
                    from_port=port, to_port=port, referenced_security_group_id=source,
                    description=f"{label} from a streamboss node group", opts=child)
        single = args.deployment_mode == SINGLE_INSTANCE
        subnets = pulumi.Output.from_input(args.subnet_ids).apply(
            lambda ids: ids[:1] if single else ids)
        broker = aws.mq.Broker(
            f"{name}-mq",
            engine_type=ENGINE_TYPE,
            engine_version=args.engine_version,
            # Amazon MQ requires this for RabbitMQ 3.13 and later.
            auto_minor_version_upgrade=True,
            host_instance_type=args.instance_type,
            deployment_mode=args.deployment_mode,
            publicly_accessible=False,
            subnet_ids=subnets,
            security_groups=[group.id],
            users=[aws.mq.BrokerUserArgs(username=args.username, password=args.password)],
            tags=args.tags,
            opts=child,
        )
        self.endpoint = broker.instances.apply(_first_endpoint)
        self.console_url = broker.instances.apply(
            lambda instances: instances[0].console_url if instances else "")
        url = pulumi.Output.all(self.endpoint, args.password).apply(
            lambda values: broker_url(values[0], args.username, values[1]))
        parameter = aws.ssm.Parameter(
            f"{name}-url",
            name=args.secret_parameter_name,
            type="SecureString",
            description="streamboss broker URL with credentials (amqps)",
            value=pulumi.Output.secret(url),
            tags=args.tags,
            opts=child,
        )
        self.security_group_id = group.id
        self.secret_parameter_name = parameter.name
        self.secret_parameter_arn = parameter.arn
        self.register_outputs({
            "endpoint": self.endpoint, "console_url": self.console_url,
            "security_group_id": self.security_group_id,
            "secret_parameter_name": self.secret_parameter_name,
            "secret_parameter_arn": self.secret_parameter_arn,
        })


def _first_endpoint(instances: list[Any] | None) -> str:
    # A RabbitMQ broker has one endpoint, even as a cluster (behind its own load balancer).
    for instance in instances or []:
        for endpoint in instance.endpoints or []:
            if endpoint.startswith("amqps://"):
                return endpoint
    raise ValueError("Amazon MQ reported no amqps endpoint for the broker")
