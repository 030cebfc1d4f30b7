"""Pulumi mocks for the infra tests: no CLI, no provider, no AWS.

``set_mocks`` is process-global, so it is called once, by the session fixture
``pulumi_mocks``; every test that declares resources asks for ``stack``, which
clears the recorded resources and returns a :class:`Stack` helper to run a
function under the mocks and read back what was declared (the inputs the
engine would send to AWS, camelCase as on the wire).
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import pulumi
import pulumi_aws as aws
import pytest
from pulumi.runtime import rpc

from streamboss.manager.model import Definition, Operation, ScalingPolicy
from streamboss.manager.stack_config import operations_config, render

with warnings.catch_warnings():
    # pulumi-aws 7 warns about its own deprecated V2 resources as its modules load.
    warnings.simplefilter("ignore", DeprecationWarning)
    for _module in ("autoscaling", "cloudwatch", "ebs", "ec2", "iam", "mq", "s3", "ssm", "vpc"):
        getattr(aws, _module)

REGION = "eu-west-1"
ACCOUNT = "123456789012"
ZONES = ["eu-west-1a", "eu-west-1b", "eu-west-1c"]
PASSWORD = "correct-horse-battery-staple"
TOKEN = "manager-token-0123456789"


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if "tests/infra/" in item.nodeid:
            item.add_marker(pytest.mark.filterwarnings("ignore::DeprecationWarning"))


@dataclass
class Declared:
    """One resource as the program declared it."""

    type: str
    name: str
    inputs: dict[str, Any]
    state: dict[str, Any]


class StackMocks(pulumi.runtime.Mocks):
    """Records every resource and answers the lookups the program makes."""

    def __init__(self) -> None:
        self.declared: list[Declared] = []

    def new_resource(self, args: pulumi.runtime.MockResourceArgs) -> tuple[str, dict[str, Any]]:
        state = dict(args.inputs)
        name = args.name
        kind = args.typ
        if kind == "aws:s3/bucket:Bucket":
            state.setdefault("bucket", f"{name}-bucket")
            state["arn"] = f"arn:aws:s3:::{state['bucket']}"
        elif kind == "aws:ssm/parameter:Parameter":
            state["arn"] = f"arn:aws:ssm:{REGION}:{ACCOUNT}:parameter{state['name']}"
        elif kind == "aws:mq/broker:Broker":
            host = f"b-{name}.mq.{REGION}.amazonaws.com"
            state["instances"] = [{"endpoints": [f"amqps://{host}:5671"],
                                   "consoleUrl": f"https://{host}", "ipAddress": ""}]
        elif kind == "aws:ec2/launchTemplate:LaunchTemplate":
            state["latestVersion"] = 1
        elif kind == "aws:ec2/instance:Instance":
            state["privateIp"] = "10.40.0.10"
        state.setdefault("name", name)
        state.setdefault("arn", f"arn:aws:mock:{REGION}:{ACCOUNT}:{name}")
        self.declared.append(Declared(kind, name, dict(args.inputs), state))
        return f"{name}-id", state

    def call(self, args: pulumi.runtime.MockCallArgs) -> tuple[dict[str, Any], list[Any]]:
        token = args.token
        if token == "aws:ec2/getAmi:getAmi":
            (selector,) = args.args["filters"]
            value = selector["values"][0]
            image = value if value.startswith("ami-") else f"ami-{value}"
            return {"id": image, "imageId": image, "rootDeviceName": "/dev/xvda"}, []
        if token == "aws:index/getRegion:getRegion":
            return {"id": REGION, "name": REGION, "region": REGION}, []
        if token == "aws:index/getAvailabilityZones:getAvailabilityZones":
            return {"id": REGION, "names": ZONES}, []
        if token == "aws:ec2/getVpc:getVpc":
            return {"id": args.args["id"], "cidrBlock": "172.31.0.0/16"}, []
        if token == "aws:ec2/getSubnet:getSubnet":
            return {"id": args.args["id"], "availabilityZone": ZONES[0]}, []
        raise AssertionError(f"the program made an unexpected lookup: {token}")


@pytest.fixture(scope="session")
def pulumi_mocks() -> StackMocks:
    mocks = StackMocks()
    pulumi.runtime.set_mocks(mocks, project="streamboss", stack="dev", preview=False)
    return mocks


class Stack:
    """Runs declarations under the mocks and reads back what they declared."""

    def __init__(self, mocks: StackMocks) -> None:
        self.mocks = mocks

    def run(self, declare: Callable[[], Any]) -> Any:
        """Call ``declare`` under the mocks; return the resolved value of what it returns."""
        self.mocks.declared.clear()
        result: list[Any] = []

        @pulumi.runtime.test
        def body() -> Any:
            return pulumi.Output.from_input(declare()).apply(result.append)

        body()
        return result[0] if result else None

    @property
    def declared(self) -> list[Declared]:
        return list(self.mocks.declared)

    def of_type(self, kind: str) -> list[Declared]:
        return [d for d in self.mocks.declared if d.type == kind]

    def named(self, name: str) -> Declared:
        (found,) = [d for d in self.mocks.declared if d.name == name]
        return found


@pytest.fixture
def stack(pulumi_mocks: StackMocks) -> Iterator[Stack]:
    pulumi.runtime.set_all_config({}, [])
    yield Stack(pulumi_mocks)
    pulumi.runtime.set_all_config({}, [])


def is_secret(value: Any) -> bool:
    return isinstance(value, dict) and value.get(rpc._special_sig_key) == rpc._special_secret_sig


def plain(value: Any) -> Any:
    """``value`` with Pulumi's secret wrappers removed, at any depth."""
    if is_secret(value):
        return plain(value["value"])
    if isinstance(value, dict):
        return {k: plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [plain(v) for v in value]
    return value


# -- a sample declaration set: three operations, two chained -----------------------

def sample_declarations(**changes: dict[str, Any]) -> tuple[list[Operation], dict[int, Definition]]:
    """Three operations as the manager stores them; ``changes`` overrides policy fields by name."""
    definitions = {
        1: Definition(1, "upper", 1, {"exec": "tr a-z A-Z", "mode": "service",
                                      "framing": "line", "name": "upper"}, ""),
        2: Definition(2, "resize", 3, {"exec": ["convert", "-", "-resize", "50%", "-"],
                                       "mode": "per-message", "name": "resize",
                                       "image": "ami-0imagemagick"}, ""),
        3: Definition(3, "count", 1, {"exec": "wc -c", "name": "count"}, ""),
    }
    policies = {
        "upper": ScalingPolicy(min=0, max=4, target_backlog_per_agent=1000,
                               scale_out_cooldown=60, scale_in_cooldown=300, idle_seconds=600),
        "resize": ScalingPolicy(min=1, max=10, target_backlog_per_agent=20,
                                scale_out_cooldown=120.0, scale_in_cooldown=600.0,
                                idle_seconds=1800.0),
        "count": ScalingPolicy(min=0, max=2, target_backlog_per_agent=5000,
                               scale_out_cooldown=30, scale_in_cooldown=90, idle_seconds=60),
    }
    for name, fields in changes.items():
        policies[name] = ScalingPolicy(**{**policies[name].to_dict(), **fields})
    operations = [
        Operation("upper", 1, "raw", "shout", policies["upper"]),
        Operation("resize", 2, "images", "thumbs", policies["resize"]),
        # Chained: count reads what upper writes.
        Operation("count", 3, "shout", "sizes", policies["count"]),
    ]
    return operations, definitions


def stack_config(operations_text: str | None = None, **extra: str) -> dict[str, str]:
    """A full dev stack config (as `pulumi config` would hand it to the program)."""
    if operations_text is None:
        operations_text = render(operations_config(*sample_declarations()))
    config = {
        "streamboss:brokerPassword": PASSWORD,
        "streamboss:managerToken": TOKEN,
        "streamboss:operations": operations_text,
    }
    config.update({f"streamboss:{k}": v for k, v in extra.items()})
    return config


SECRET_KEYS = ["streamboss:brokerPassword", "streamboss:managerToken"]


def set_config(config: dict[str, str]) -> None:
    pulumi.runtime.set_all_config(config, SECRET_KEYS)


def policy_documents(declared: list[Declared]) -> list[tuple[str, dict[str, Any]]]:
    """Every IAM or bucket policy document among ``declared``, parsed, with its resource name."""
    documents = []
    for item in declared:
        for key in ("policy", "assumeRolePolicy"):
            text = plain(item.inputs.get(key))
            if isinstance(text, str):
                documents.append((f"{item.name}.{key}", json.loads(text)))
    return documents


# -- shared assertions ------------------------------------------------------------------


def assert_secure_template(template: Any) -> None:
    options = template.inputs["metadataOptions"]
    assert options["httpTokens"] == "required"
    assert options["httpPutResponseHopLimit"] == 1
    mappings = template.inputs["blockDeviceMappings"]
    assert mappings
    assert all(m["ebs"]["encrypted"] == "true" for m in mappings)


def guards_of(stack, bucket_name: str) -> dict[str, dict[str, Any]]:
    """The inputs of every resource configuring ``bucket_name`` (by its mock id), by type."""
    bucket_id = f"{bucket_name}-id"
    found: dict[str, dict[str, Any]] = {}
    for d in stack.declared:
        if d.inputs.get("bucket") == bucket_id:
            assert d.type not in found
            found[d.type] = d.inputs
    return found


def assert_private_encrypted_tls_only(stack, bucket: Any) -> dict[str, dict[str, Any]]:
    guards = guards_of(stack, bucket.name)
    block = guards["aws:s3/bucketPublicAccessBlock:BucketPublicAccessBlock"]
    assert all(block[flag] is True for flag in (
        "blockPublicAcls", "blockPublicPolicy", "ignorePublicAcls", "restrictPublicBuckets"))
    ownership = guards["aws:s3/bucketOwnershipControls:BucketOwnershipControls"]
    assert ownership["rule"]["objectOwnership"] == "BucketOwnerEnforced"
    (rule,) = guards["aws:s3/bucketServerSideEncryptionConfiguration:"
                     "BucketServerSideEncryptionConfiguration"]["rules"]
    assert rule["applyServerSideEncryptionByDefault"]["sseAlgorithm"] in ("AES256", "aws:kms")
    policy = json.loads(guards["aws:s3/bucketPolicy:BucketPolicy"]["policy"])
    arn = bucket.state["arn"]
    (deny,) = [s for s in policy["Statement"] if s["Effect"] == "Deny"]
    assert deny["Condition"] == {"Bool": {"aws:SecureTransport": "false"}}
    assert deny["Principal"] == "*" and deny["Action"] == "s3:*"
    assert sorted(deny["Resource"]) == [arn, f"{arn}/*"]
    assert not [s for s in policy["Statement"] if s["Effect"] == "Allow"]
    assert "acl" not in bucket.inputs and "policy" not in bucket.inputs
    return guards
