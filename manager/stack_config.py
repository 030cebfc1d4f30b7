"""The manager's declarations as the AWS stack's configuration.

The AWS dispatcher maps the declared operations onto the Pulumi stack (one
agent pool per operation, ``infra/``) by setting one structured config value,
:data:`CONFIG_KEY`, and running ``pulumi up``. This module computes that value.

It is exact and stable: the same declarations give byte-identical text, in
whatever order they arrive, so an unchanged declaration set is an unchanged
stack config and ``pulumi up`` has nothing to do. Pure Python (no Pulumi), so
the manager can use it on a machine without the Pulumi SDK.

The shape, one object per operation, sorted by name::

    {"name", "input", "output", "definition", "min", "max",
     "target_backlog_per_agent", "scale_out_cooldown", "scale_in_cooldown",
     "idle_seconds", ["image"], ["warm_pool"]}

``warm_pool`` appears only when it is above 0, so the text of declarations
without one is what it was before the field existed (no needless update).

``infra/operations.py`` parses exactly this shape.

A definition's ``env`` values are secrets: in ``streamboss:operations`` they
are masked (``<secret>``, the names stay), and the real values go to the
secret config value :data:`ENV_CONFIG_KEY` (``{operation: {name: value}}``),
which Pulumi stores encrypted and the program reads as a secret. Both texts
together are one :class:`StackConfig`.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from .model import Definition, Operation, masked_body

# Pulumi config keys are "<namespace>:<key>"; the namespace is the project name
# in Pulumi.yaml.
CONFIG_NAMESPACE = "streamboss"
OPERATIONS_KEY = "operations"
CONFIG_KEY = f"{CONFIG_NAMESPACE}:{OPERATIONS_KEY}"
# The secret config value holding the operations' env values (infra/settings.py).
ENV_KEY = "operationsEnv"
ENV_CONFIG_KEY = f"{CONFIG_NAMESPACE}:{ENV_KEY}"


class StackConfigError(ValueError):
    """Declarations that cannot be mapped; the message names the operation."""


def operations_config(operations: Iterable[Operation],
                      definitions: Mapping[int, Definition]) -> list[dict[str, Any]]:
    """Map declared operations to the stack config value, sorted by operation name.

    Parameters:
        operations: the declared operations, in any order.
        definitions: process definitions by id; every operation's
            ``definition_id`` must be here.

    Returns:
        One plain dict per operation (JSON types only). ``image`` is present only
        when the definition names one; seconds are ints when they are whole, so
        5 and 5.0 give the same text.

    Raises:
        StackConfigError: an operation names a missing definition, or two
            operations share a name.
    """
    entries: dict[str, dict[str, Any]] = {}
    for op in operations:
        if op.name in entries:
            raise StackConfigError(f"operation {op.name!r} is declared twice")
        definition = definitions.get(op.definition_id)
        if definition is None:
            raise StackConfigError(
                f"operation {op.name!r}: process definition {op.definition_id} is not declared")
        policy = op.policy
        # A copy through JSON: the value must hold JSON types only, and nothing
        # the caller changes later may change what was returned. The env values
        # are masked: they travel in the secret value (operations_env).
        body = json.loads(json.dumps(masked_body(definition.body)))
        entry: dict[str, Any] = {
            "name": op.name,
            "input": op.input,
            "output": op.output,
            "definition": body,
            "min": int(policy.min),
            "max": int(policy.max),
            "target_backlog_per_agent": _number(policy.target_backlog_per_agent),
            "scale_out_cooldown": _number(policy.scale_out_cooldown),
            "scale_in_cooldown": _number(policy.scale_in_cooldown),
            "idle_seconds": _number(policy.idle_seconds),
        }
        image = body.get("image")
        if image:
            entry["image"] = image
        if policy.warm_pool:
            entry["warm_pool"] = int(policy.warm_pool)
        entries[op.name] = entry
    return [entries[name] for name in sorted(entries)]


def operations_env(operations: Iterable[Operation],
                   definitions: Mapping[int, Definition]) -> dict[str, dict[str, Any]]:
    """The env values of the operations' definitions, by operation name; operations
    whose definition has no env are left out.

    Raises:
        StackConfigError: an operation names a missing definition.
    """
    found: dict[str, dict[str, Any]] = {}
    for op in operations:
        definition = definitions.get(op.definition_id)
        if definition is None:
            raise StackConfigError(
                f"operation {op.name!r}: process definition {op.definition_id} is not declared")
        env = definition.body.get("env")
        if isinstance(env, dict) and env:
            found[op.name] = json.loads(json.dumps(env))
    return found


@dataclass(frozen=True)
class StackConfig:
    """What the stack is given: the operations (plain) and their env values (secret).

    Equal declarations give equal values; :attr:`digest` identifies the plain
    part only, because a digest of a short secret could be guessed from.
    """

    operations: str
    env: str = field(default="{}", repr=False)

    @property
    def digest(self) -> str:
        """sha256 of ``streamboss:operations`` as written (what ``pulumi config get``
        shows), never of the secret values."""
        return hashlib.sha256(self.operations.encode()).hexdigest()


def stack_config(operations: Iterable[Operation],
                 definitions: Mapping[int, Definition]) -> StackConfig:
    """Both config values for the declarations, rendered.

    Raises:
        StackConfigError: see :func:`operations_config`.
    """
    declared = list(operations)
    return StackConfig(render(operations_config(declared, definitions)),
                       render(operations_env(declared, definitions)))


def render(config: Any) -> str:
    """Canonical JSON text of a config value: sorted keys, fixed separators, ASCII only.

    Equal values always render to identical bytes, whatever their dicts' order.
    """
    return json.dumps(config, sort_keys=True, separators=(",", ":"), ensure_ascii=True,
                      allow_nan=False)


def _number(value: float) -> int | float:
    # Declarations arrive as ints or floats depending on where they came from
    # (CLI, JSON, SQLite); one spelling per value keeps the text stable.
    number = float(value)
    return int(number) if number.is_integer() else number
