"""streamboss on AWS: reads the stack config, wires the components, exports the addresses.

Each concern is a component in its own module (network, security_groups,
broker, storage, manager_node, operation_pool); this file only connects them.
Settings and their defaults are in settings.py; Pulumi.dev.yaml documents them.
"""

import sys
from pathlib import Path

# `pulumi up` runs this file by path (runpy, with infra/ first on sys.path), and
# pytest imports it as `infra.__main__` from the repository root. Putting the
# root on sys.path lets the program import its modules as the `infra` package
# (relative imports inside it) the same way in both cases.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from dataclasses import dataclass

import pulumi
import pulumi_aws as aws

from infra.broker import Broker, BrokerArgs
from infra.launch import AGENT_ROLE, MANAGER_ROLE, find_image
from infra.manager_node import ManagerNode, ManagerNodeArgs
from infra.network import Network, NetworkArgs
from infra.operation_pool import OperationPool, OperationPoolArgs
from infra.operations import OperationConfigError
from infra.security_groups import SecurityGroups, SecurityGroupsArgs
from infra.settings import ConfigError, Settings, load
from infra.storage import STREAMS_PREFIX, Storage, StorageArgs


@dataclass
class Program:
    """The components :func:`build` made, for tests and for reading the wiring."""

    settings: Settings
    network: Network
    security_groups: SecurityGroups
    broker: Broker
    storage: Storage
    manager: ManagerNode
    pools: dict[str, OperationPool]


def build(config: pulumi.Config) -> Program:
    """Declare the whole stack from ``config`` and export its outputs.

    Raises:
        ConfigError, OperationConfigError: a bad setting, before anything is declared.
    """
    settings = load(config)
    stack = pulumi.get_stack()
    tags = {"streamboss:stack": stack, "managed-by": "pulumi"}
    # SSM parameter names: one tree per stack, so two stacks in one account never collide.
    parameters = f"/streamboss/{stack}"
    region = aws.get_region_output().region

    # Storage first: the network's S3 endpoint admits these buckets only (storage
    # depends on nothing of the network's, so there is no cycle).
    storage = Storage("storage", StorageArgs(
        archive_transition_days=settings.archive_transition_days,
        archive_storage_class=settings.archive_storage_class,
        archive_noncurrent_expiration_days=settings.archive_noncurrent_expiration_days,
        objects_expiration_days=settings.objects_expiration_days, tags=tags))
    network = Network("network", NetworkArgs(
        vpc_cidr=settings.vpc_cidr, vpc_id=settings.vpc_id, subnet_ids=settings.subnet_ids,
        availability_zones=settings.availability_zones,
        s3_bucket_arns=[storage.archive.arn, storage.objects.arn], tags=tags))
    groups = SecurityGroups("nodes", SecurityGroupsArgs(
        vpc_id=network.vpc_id, vpc_cidr=network.vpc_cidr,
        manager_api_cidrs=settings.manager_api_cidrs, tags=tags))
    broker = Broker("broker", BrokerArgs(
        vpc_id=network.vpc_id, subnet_ids=network.private_subnet_ids,
        amqps_client_group_ids=[groups.manager_id, groups.agents_id],
        management_client_group_ids=[groups.manager_id],
        deployment_mode=settings.broker_deployment_mode,
        instance_type=settings.broker_instance_type,
        engine_version=settings.broker_engine_version,
        username=settings.broker_username, password=settings.broker_password,
        secret_parameter_name=f"{parameters}/broker-url", tags=tags))
    manager = ManagerNode("manager", ManagerNodeArgs(
        subnet_ids=network.private_subnet_ids, security_group_id=groups.manager_id,
        image=find_image(MANAGER_ROLE, settings.manager_ami, settings.ami_owners),
        instance_type=settings.manager_instance_type, root_volume_gb=settings.root_volume_gb,
        state_volume_gb=settings.manager_state_volume_gb, token=settings.manager_token,
        token_parameter_name=f"{parameters}/manager-token",
        broker_secret_parameter_name=broker.secret_parameter_name,
        broker_secret_parameter_arn=broker.secret_parameter_arn,
        management_url=broker.console_url,
        archive_bucket=storage.archive.bucket, archive_bucket_arn=storage.archive.arn,
        objects_bucket=storage.objects.bucket, region=region, stack=stack, tags=tags))

    # Looked up only when a pool needs it: a stack with no operations (or only
    # operations with their own image) must not fail for want of a stream-agent AMI.
    agent_image = None
    pools = {}
    for spec in settings.operations:
        producers = tuple(o.name for o in settings.operations
                          if o.output == spec.input and o.name != spec.name)
        if spec.image:
            image = find_image(AGENT_ROLE, spec.image, settings.ami_owners)
        else:
            if agent_image is None:
                agent_image = find_image(AGENT_ROLE, settings.agent_ami, settings.ami_owners)
            image = agent_image
        pools[spec.name] = OperationPool(f"agents-{spec.name}", OperationPoolArgs(
            operation=spec, producers=producers, subnet_ids=network.private_subnet_ids,
            security_group_id=groups.agents_id, image=image,
            instance_type=settings.agent_instance_type, root_volume_gb=settings.root_volume_gb,
            broker_secret_parameter_name=broker.secret_parameter_name,
            broker_secret_parameter_arn=broker.secret_parameter_arn,
            objects_bucket=storage.objects.bucket, objects_bucket_arn=storage.objects.arn,
            region=region, tags=tags, operations_env=settings.operations_env))

    pulumi.export("brokerEndpoint", broker.endpoint)
    pulumi.export("brokerManagementUrl", broker.console_url)
    pulumi.export("brokerSecretParameter", broker.secret_parameter_name)
    pulumi.export("archiveBucket", storage.archive.bucket)
    pulumi.export("objectsBucket", storage.objects.bucket)
    pulumi.export("streamFileStore", storage.objects.bucket.apply(
        lambda b: f"s3://{b}/{STREAMS_PREFIX}"))
    pulumi.export("managerAddress", manager.address)
    pulumi.export("managerTokenParameter", manager.token_parameter_name)
    pulumi.export("vpcId", network.vpc_id)
    group_names = {name: pool.group_name for name, pool in pools.items()}
    pulumi.export("agentGroups", pulumi.Output.all(**group_names) if group_names else {})
    return Program(settings, network, groups, broker, storage, manager, pools)


def main() -> None:
    """Entry point under `pulumi up`: a bad setting is one line, not a traceback."""
    try:
        build(pulumi.Config())
    except (ConfigError, OperationConfigError) as exc:
        raise pulumi.RunError(str(exc)) from None


if __name__ == "__main__":
    main()
