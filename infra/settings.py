"""The stack's settings: every ``streamboss:*`` config key, read, defaulted and checked.

``Pulumi.dev.yaml`` documents each key. Reading everything here, once, keeps
the components free of config lookups and lets a bad value fail before any
resource is declared, with one line naming the key.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from typing import Any

import pulumi

from .broker import CLUSTER_MULTI_AZ, DEPLOYMENT_MODES, SINGLE_INSTANCE
from .operations import OperationSpec, parse_operations

# The structured config key the manager's AWS dispatcher writes
# (manager/stack_config.py CONFIG_KEY without the namespace).
OPERATIONS_KEY = "operations"
# The secret config key with the operations' env values (stack_config.ENV_KEY).
OPERATIONS_ENV_KEY = "operationsEnv"
# Every key :func:`load` reads; Pulumi.dev.yaml documents each one.
KEYS = (
    "vpcCidr", "availabilityZones", "vpcId", "subnetIds",
    "brokerDeploymentMode", "brokerInstanceType", "brokerEngineVersion", "brokerUsername",
    "brokerPassword",
    "archiveTransitionDays", "archiveStorageClass", "archiveNoncurrentExpirationDays",
    "objectsExpirationDays",
    "amiOwners", "managerAmi", "agentAmi", "rootVolumeGb",
    "managerInstanceType", "managerApiCidrs", "managerStateVolumeGb", "managerToken",
    "agentInstanceType", OPERATIONS_KEY, OPERATIONS_ENV_KEY,
)

# Far more addresses than agents will ever need, and clear of the 172.17/16
# Docker bridge and the 192.168/16 home networks people VPN in from.
DEFAULT_VPC_CIDR = "10.40.0.0/16"
# mq.t3.micro, the smallest broker, runs SINGLE_INSTANCE only; mq.m5.large is the
# smallest that can cluster.
DEFAULT_BROKER_INSTANCE_TYPE = {SINGLE_INSTANCE: "mq.t3.micro", CLUSTER_MULTI_AZ: "mq.m5.large"}
# The RabbitMQ line Amazon MQ currently offers; it requires automatic minor upgrades.
DEFAULT_BROKER_ENGINE_VERSION = "3.13"
DEFAULT_BROKER_USERNAME = "streamboss"
# Amazon MQ's password rules for RabbitMQ users.
BROKER_PASSWORD_MIN_LENGTH = 12
BROKER_PASSWORD_FORBIDDEN = ",:="
# Archive segments are written once and read back rarely (replays):
# Standard-IA after a month halves their cost; S3 refuses IA transitions before 30 days.
DEFAULT_ARCHIVE_TRANSITION_DAYS = 30
DEFAULT_ARCHIVE_STORAGE_CLASS = "STANDARD_IA"
# Overwritten or deleted segment versions are kept this long for recovery, then expire.
DEFAULT_ARCHIVE_NONCURRENT_DAYS = 90
ARCHIVE_STORAGE_CLASSES = ("STANDARD_IA", "ONEZONE_IA", "INTELLIGENT_TIERING", "GLACIER_IR",
                           "GLACIER", "DEEP_ARCHIVE")
# The manager runs the API, the reconciler and the archiver: small but not burstable-tiny.
DEFAULT_MANAGER_INSTANCE_TYPE = "t3.small"
# The manager's SQLite store and state directory; gp3's minimum cost is per GiB.
DEFAULT_MANAGER_STATE_VOLUME_GB = 8
# A general-purpose default; an operation's own instance_type overrides it.
DEFAULT_AGENT_INSTANCE_TYPE = "t3.small"
# Images the Packer builds in this account make; another account's AMIs need owners set.
DEFAULT_AMI_OWNERS = ("self",)


class ConfigError(ValueError):
    """A bad stack config value; the message is one line naming the key."""


@dataclass(frozen=True)
class Settings:
    """Everything the program reads from stack config (see Pulumi.dev.yaml)."""

    vpc_cidr: str
    vpc_id: str | None
    subnet_ids: tuple[str, ...]
    availability_zones: tuple[str, ...]
    broker_deployment_mode: str
    broker_instance_type: str
    broker_engine_version: str
    broker_username: str
    broker_password: pulumi.Output[str]
    archive_transition_days: int
    archive_storage_class: str
    archive_noncurrent_expiration_days: int
    objects_expiration_days: int
    ami_owners: tuple[str, ...]
    manager_ami: str | None
    manager_instance_type: str
    manager_api_cidrs: tuple[str, ...]
    manager_token: pulumi.Output[str]
    manager_state_volume_gb: int
    agent_ami: str | None
    agent_instance_type: str
    root_volume_gb: int | None
    operations: tuple[OperationSpec, ...]
    # {operation: {name: value}}, a secret: it never shows in plain text.
    operations_env: pulumi.Output[Any]


def load(config: pulumi.Config) -> Settings:
    """Read and check every setting.

    Raises:
        ConfigError: a missing required key or a bad value.
        operations.OperationConfigError: a bad ``operations`` entry.
    """
    mode = config.get("brokerDeploymentMode") or SINGLE_INSTANCE
    if mode not in DEPLOYMENT_MODES:
        raise ConfigError(
            f"brokerDeploymentMode {mode!r}: use one of {', '.join(DEPLOYMENT_MODES)}")
    broker_type = config.get("brokerInstanceType") or DEFAULT_BROKER_INSTANCE_TYPE[mode]
    if mode == CLUSTER_MULTI_AZ and broker_type.startswith("mq.t3."):
        raise ConfigError(f"brokerInstanceType {broker_type!r} cannot run {CLUSTER_MULTI_AZ}; "
                          "use mq.m5.large or larger")
    vpc_id = config.get("vpcId") or None
    subnet_ids = _strings(config, "subnetIds")
    if vpc_id and not subnet_ids:
        raise ConfigError("vpcId is set but subnetIds is not: list the private subnets to use")
    if subnet_ids and not vpc_id:
        raise ConfigError("subnetIds is set but vpcId is not: give the VPC they belong to")
    if vpc_id and mode == CLUSTER_MULTI_AZ and len(subnet_ids) < 2:
        raise ConfigError(f"{CLUSTER_MULTI_AZ} needs subnetIds in at least two availability zones")
    zones = _strings(config, "availabilityZones")
    if zones and len(zones) < 2:
        raise ConfigError("availabilityZones needs at least two zones")
    storage_class = config.get("archiveStorageClass") or DEFAULT_ARCHIVE_STORAGE_CLASS
    if storage_class not in ARCHIVE_STORAGE_CLASSES:
        raise ConfigError(f"archiveStorageClass {storage_class!r}: use one of "
                          f"{', '.join(ARCHIVE_STORAGE_CLASSES)}")
    return Settings(
        vpc_cidr=_vpc_cidr(config.get("vpcCidr") or DEFAULT_VPC_CIDR),
        vpc_id=vpc_id,
        subnet_ids=subnet_ids,
        availability_zones=zones,
        broker_deployment_mode=mode,
        broker_instance_type=broker_type,
        broker_engine_version=config.get("brokerEngineVersion") or DEFAULT_BROKER_ENGINE_VERSION,
        broker_username=config.get("brokerUsername") or DEFAULT_BROKER_USERNAME,
        broker_password=config.require_secret("brokerPassword").apply(check_broker_password),
        archive_transition_days=_int(config, "archiveTransitionDays",
                                     DEFAULT_ARCHIVE_TRANSITION_DAYS, minimum=1),
        archive_storage_class=storage_class,
        archive_noncurrent_expiration_days=_int(config, "archiveNoncurrentExpirationDays",
                                                DEFAULT_ARCHIVE_NONCURRENT_DAYS, minimum=1),
        objects_expiration_days=_int(config, "objectsExpirationDays", 0, minimum=0),
        ami_owners=_strings(config, "amiOwners") or DEFAULT_AMI_OWNERS,
        manager_ami=config.get("managerAmi") or None,
        manager_instance_type=config.get("managerInstanceType") or DEFAULT_MANAGER_INSTANCE_TYPE,
        manager_api_cidrs=tuple(_cidr("managerApiCidrs", c)
                                for c in _strings(config, "managerApiCidrs")),
        manager_token=config.require_secret("managerToken"),
        manager_state_volume_gb=_int(config, "managerStateVolumeGb",
                                     DEFAULT_MANAGER_STATE_VOLUME_GB, minimum=1),
        agent_ami=config.get("agentAmi") or None,
        agent_instance_type=config.get("agentInstanceType") or DEFAULT_AGENT_INSTANCE_TYPE,
        root_volume_gb=_optional_int(config, "rootVolumeGb", minimum=1),
        operations=tuple(parse_operations(config.get_object(OPERATIONS_KEY))),
        operations_env=config.get_secret_object(OPERATIONS_ENV_KEY) or pulumi.Output.secret({}),
    )


def check_broker_password(password: str) -> str:
    """Return ``password`` if Amazon MQ will take it for a RabbitMQ user.

    Checked inside the secret's ``apply``, so the value never appears in the message.

    Raises:
        ConfigError: too short, or holding a character Amazon MQ refuses.
    """
    if len(password) < BROKER_PASSWORD_MIN_LENGTH:
        raise ConfigError(f"brokerPassword must be at least {BROKER_PASSWORD_MIN_LENGTH} "
                          "characters long")
    if any(c in password for c in BROKER_PASSWORD_FORBIDDEN) or len(set(password)) < 4:
        raise ConfigError("brokerPassword must hold at least 4 different characters and no "
                          "comma, colon or equals sign (Amazon MQ's rules)")
    return password


def _strings(config: pulumi.Config, key: str) -> tuple[str, ...]:
    value: Any = config.get_object(key)
    if value is None:
        return ()
    if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
        raise ConfigError(f"{key} must be a list of strings, got {value!r}")
    return tuple(value)


def _int(config: pulumi.Config, key: str, default: int, *, minimum: int) -> int:
    value = _optional_int(config, key, minimum=minimum)
    return default if value is None else value


def _optional_int(config: pulumi.Config, key: str, *, minimum: int) -> int | None:
    value: Any = config.get_object(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(f"{key} must be a whole number of at least {minimum}, got {value!r}")
    return value


def _cidr(key: str, value: str) -> str:
    # IPv4 only: the security group rules and the VPC are IPv4.
    try:
        network = ipaddress.IPv4Network(value, strict=True)
    except ValueError as exc:
        raise ConfigError(f"{key}: {value!r} is not an IPv4 CIDR block ({exc})") from None
    return str(network)


def _vpc_cidr(value: str) -> str:
    cidr = _cidr("vpcCidr", value)
    # Sixteen subnets must fit, each at least a /28 (AWS's smallest subnet).
    if not 16 <= ipaddress.IPv4Network(cidr).prefixlen <= 24:
        raise ConfigError(f"vpcCidr {value!r} must be an IPv4 block from /16 to /24")
    return cidr
