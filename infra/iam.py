"""IAM: instance roles built from explicit statements, refused if they grant ``*`` on ``*``.

Every node role is one inline policy written out statement by statement, so a
reader sees exactly what a node may do. :func:`policy_document` is the only way
this program writes a policy, and it refuses a statement that allows every
action of a service (or every action) on every resource.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

import pulumi
import pulumi_aws as aws

VERSION = "2012-10-17"
# IAM caps role names at 64 characters and name prefixes at 38 (the provider
# appends a 26-character unique suffix).
ROLE_NAME_PREFIX_MAX = 38


class PolicyError(ValueError):
    """A policy statement this program refuses to write."""


def statement(sid: str, actions: Sequence[str], resources: Sequence[str],
              condition: dict[str, Any] | None = None) -> dict[str, Any]:
    """One Allow statement.

    Parameters:
        sid: a name saying why the statement exists.
        actions: the exact actions allowed.
        resources: the ARNs they are allowed on.
        condition: an optional IAM condition block.
    """
    result: dict[str, Any] = {"Sid": sid, "Effect": "Allow", "Action": sorted(actions),
                              "Resource": sorted(resources)}
    if condition:
        result["Condition"] = condition
    return result


def policy_document(statements: Sequence[dict[str, Any]]) -> str:
    """The JSON policy document for ``statements`` (keys sorted, so the text is stable).

    Raises:
        PolicyError: a statement allows a wildcard action on the ``*`` resource.
    """
    for item in statements:
        actions = item["Action"]
        resources = item["Resource"]
        wild_action = any(a == "*" or a.endswith(":*") for a in actions)
        if item["Effect"] == "Allow" and wild_action and "*" in resources:
            raise PolicyError(f"statement {item['Sid']!r} allows {actions} on every resource")
    return json.dumps({"Version": VERSION, "Statement": list(statements)}, sort_keys=True)


def assume_role_policy(service: str) -> str:
    """A trust policy letting ``service`` (e.g. ec2.amazonaws.com) assume the role."""
    return json.dumps({"Version": VERSION, "Statement": [{
        "Effect": "Allow", "Action": "sts:AssumeRole", "Principal": {"Service": service},
    }]}, sort_keys=True)


def role_name_prefix(name: str) -> str:
    """A readable role-name prefix for ``name`` that fits IAM's limit."""
    return f"sb-{name}"[:ROLE_NAME_PREFIX_MAX - 1] + "-"


def instance_profile(name: str, policy: pulumi.Input[str], tags: dict[str, str],
                     parent: pulumi.Resource) -> aws.iam.InstanceProfile:
    """An EC2 role with exactly ``policy`` as its only permissions, and its instance profile.

    Parameters:
        name: the logical name prefix for the three resources.
        policy: the inline policy document (from :func:`policy_document`).
        tags: tags for the role and profile.
        parent: the component that owns them.
    """
    child = pulumi.ResourceOptions(parent=parent)
    role = aws.iam.Role(f"{name}-role", name_prefix=role_name_prefix(name),
                        assume_role_policy=assume_role_policy("ec2.amazonaws.com"),
                        tags=tags, opts=child)
    aws.iam.RolePolicy(f"{name}-policy", role=role.id, policy=policy, opts=child)
    return aws.iam.InstanceProfile(f"{name}-profile", role=role.name, tags=tags, opts=child)
