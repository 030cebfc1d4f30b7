"""The operations a stack runs: stack config ``streamboss:operations``, parsed and checked.

The manager writes this value (``manager/stack_config.py``: a list of objects
sorted by name); a person may write it by hand in ``Pulumi.<stack>.yaml`` as a
list or as a map keyed by operation name. Everything is checked here, before
any resource is declared, so a bad value fails ``pulumi up`` with one line that
names the operation and the field instead of a half-applied stack. Pure Python:
no Pulumi import, so the checks are testable (and usable) without it.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any

# The manager's naming rule (DESIGN.md, "The control plane"): operation and
# stream names become queue, exchange and AWS resource names.
NAME_PATTERN = re.compile(r"[a-z0-9][a-z0-9._-]{0,62}")

# A CloudWatch alarm may look back at most one day (evaluation periods x
# period), and the idle alarm's look-back is the idle period.
MAX_IDLE_SECONDS = 86_400

# The scale-in alarm looks back over the scale-in cooldown, so the same one-day
# limit applies; it also catches a unit mix-up (milliseconds given as seconds).
MAX_COOLDOWN_SECONDS = 86_400

REQUIRED_FIELDS = ("name", "input", "output", "definition", "min", "max",
                   "target_backlog_per_agent", "scale_out_cooldown", "scale_in_cooldown",
                   "idle_seconds")
OPTIONAL_FIELDS = ("image", "instance_type", "warm_pool")

# How the manager writes an env value in ``operations`` (manager/model.py MASKED):
# the value itself is in the secret ``operationsEnv``.
MASKED = "<secret>"


class OperationConfigError(ValueError):
    """A bad ``operations`` value; the message is one line naming the operation and field."""


@dataclass(frozen=True)
class OperationSpec:
    """One operation as its agent pool needs it.

    Attributes:
        name: the operation's name (queue ``sb.op.<name>``).
        input: the stream the operation consumes.
        output: the stream it publishes to.
        definition: the process definition object the agent runs (exec, mode, ...).
        min: agents kept even when nothing is wanted.
        max: agents at most.
        target_backlog_per_agent: waiting messages per agent the pool aims for.
        scale_out_cooldown: seconds a new agent needs before it counts (warm-up).
        scale_in_cooldown: seconds between two scale-in steps.
        idle_seconds: how long an unwanted operation keeps its agents.
        image: an AMI id (``ami-...``) or AMI name; None for the stream-agent image.
        instance_type: EC2 instance type; None for the stack's agent default.
        warm_pool: stopped instances the pool keeps ready (0: no warm pool).
    """

    name: str
    input: str
    output: str
    definition: dict[str, Any] = field(hash=False)
    min: int
    max: int
    target_backlog_per_agent: float
    scale_out_cooldown: float
    scale_in_cooldown: float
    idle_seconds: float
    image: str | None = None
    instance_type: str | None = None
    warm_pool: int = 0


def parse_operations(value: Any) -> list[OperationSpec]:
    """Parse the ``operations`` config value into specs, sorted by name.

    Parameters:
        value: a list of operation objects, or a map of name to object (the
            object's own ``name``, if present, must match its key); None or an
            empty list declares no operation.

    Raises:
        OperationConfigError: a value of the wrong shape, an unknown or missing
            field, a bad name or number, min above max, or a duplicate name.
    """
    if value is None:
        return []
    if isinstance(value, dict):
        entries = []
        for key, entry in value.items():
            if isinstance(entry, dict) and "name" not in entry:
                entry = {**entry, "name": key}
            elif isinstance(entry, dict) and entry["name"] != key:
                raise OperationConfigError(
                    f"operations.{key}: 'name' is {entry['name']!r} but the key is {key!r}")
            entries.append(entry)
    elif isinstance(value, list):
        entries = value
    else:
        raise OperationConfigError(
            f"operations must be a list of objects or a map by name, got {type(value).__name__}")
    specs: dict[str, OperationSpec] = {}
    for index, entry in enumerate(entries):
        spec = _parse_one(index, entry)
        if spec.name in specs:
            raise OperationConfigError(f"operation {spec.name!r} is declared twice")
        specs[spec.name] = spec
    return [specs[name] for name in sorted(specs)]


def _parse_one(index: int, entry: Any) -> OperationSpec:
    if not isinstance(entry, dict):
        raise OperationConfigError(f"operations[{index}] must be an object, got {entry!r}")
    raw_name = entry.get("name")
    label = f"operation {raw_name!r}" if isinstance(raw_name, str) else f"operations[{index}]"
    unknown = sorted(set(entry) - set(REQUIRED_FIELDS) - set(OPTIONAL_FIELDS))
    if unknown:
        raise OperationConfigError(
            f"{label}: unknown field(s) {', '.join(unknown)}; allowed are "
            f"{', '.join(REQUIRED_FIELDS + OPTIONAL_FIELDS)}")
    missing = [key for key in REQUIRED_FIELDS if key not in entry]
    if missing:
        raise OperationConfigError(f"{label}: missing field(s) {', '.join(missing)}")
    name = _name(label, "name", entry["name"])
    label = f"operation {name!r}"
    definition = entry["definition"]
    if not isinstance(definition, dict):
        raise OperationConfigError(f"{label}: 'definition' must be an object with 'exec'")
    command = definition.get("exec")
    if not (isinstance(command, str) and command.strip()) and not (
            isinstance(command, list) and command and all(isinstance(a, str) for a in command)):
        raise OperationConfigError(f"{label}: 'definition' needs 'exec', the command to run")
    low = _int(label, "min", entry["min"], minimum=0)
    high = _int(label, "max", entry["max"], minimum=1)
    if low > high:
        raise OperationConfigError(f"{label}: 'min' {low} is greater than 'max' {high}")
    warm = _int(label, "warm_pool", entry.get("warm_pool", 0), minimum=0)
    if warm > high:
        raise OperationConfigError(
            f"{label}: 'warm_pool' {warm} is greater than 'max' {high}: the pool never "
            "uses more warm instances than max")
    return OperationSpec(
        name=name,
        input=_name(label, "input", entry["input"]),
        output=_name(label, "output", entry["output"]),
        definition=definition,
        min=low,
        max=high,
        target_backlog_per_agent=_number(label, "target_backlog_per_agent",
                                         entry["target_backlog_per_agent"], minimum=1),
        scale_out_cooldown=_number(label, "scale_out_cooldown", entry["scale_out_cooldown"],
                                   minimum=0, maximum=MAX_COOLDOWN_SECONDS),
        scale_in_cooldown=_number(label, "scale_in_cooldown", entry["scale_in_cooldown"],
                                  minimum=0, maximum=MAX_COOLDOWN_SECONDS),
        idle_seconds=_number(label, "idle_seconds", entry["idle_seconds"], minimum=0,
                             maximum=MAX_IDLE_SECONDS),
        image=_optional_text(label, "image", entry.get("image")),
        instance_type=_optional_text(label, "instance_type", entry.get("instance_type")),
        warm_pool=warm,
    )


def _name(label: str, key: str, value: Any) -> str:
    if not isinstance(value, str) or not NAME_PATTERN.fullmatch(value):
        raise OperationConfigError(
            f"{label}: {key!r} {value!r} is not a valid name ([a-z0-9][a-z0-9._-]{{0,62}})")
    return value


def _int(label: str, key: str, value: Any, *, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise OperationConfigError(f"{label}: {key!r} must be a whole number, got {value!r}")
    if value < minimum:
        raise OperationConfigError(f"{label}: {key!r} must be at least {minimum}, got {value}")
    return value


def _number(label: str, key: str, value: Any, *, minimum: float,
            maximum: float = math.inf) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise OperationConfigError(f"{label}: {key!r} must be a number, got {value!r}")
    if value < minimum:
        raise OperationConfigError(f"{label}: {key!r} must be at least {minimum:g}, got {value!r}")
    if value > maximum:
        raise OperationConfigError(f"{label}: {key!r} must be at most {maximum:g}, got {value!r}")
    return value


def _optional_text(label: str, key: str, value: Any) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str) or not value.strip():
        raise OperationConfigError(f"{label}: {key!r} must be a non-empty string, got {value!r}")
    return value


def operation_env(spec: OperationSpec, secret_env: Any) -> dict[str, Any]:
    """``spec``'s env: its definition's names, each value from ``operationsEnv``.

    Parameters:
        spec: the operation.
        secret_env: the secret ``operationsEnv`` value, ``{operation: {name: value}}``
            (None: no operation has env values there).

    Returns:
        the values by name; a value written in ``operations`` itself (by hand,
        not masked) is kept unless ``operationsEnv`` has one.

    Raises:
        OperationConfigError: a malformed value, or a masked name without a value.
            The message names operations and names, never a value.
    """
    label = f"operation {spec.name!r}"
    plain = spec.definition.get("env") or {}
    if not isinstance(plain, dict):
        raise OperationConfigError(f"{label}: definition 'env' must map names to values")
    if secret_env is None:
        secret_env = {}
    if not isinstance(secret_env, dict):
        raise OperationConfigError("operationsEnv must map operation names to their env")
    secret = secret_env.get(spec.name) or {}
    if not isinstance(secret, dict) or not all(
            isinstance(k, str) and isinstance(v, str | int | float | bool)
            for k, v in secret.items()):
        raise OperationConfigError(f"operationsEnv.{spec.name} must map names to values")
    missing = sorted(name for name, value in plain.items()
                     if value == MASKED and name not in secret)
    if missing:
        raise OperationConfigError(
            f"{label}: env {', '.join(missing)} has no value in operationsEnv: let the "
            "manager write the stack config, or `pulumi config set --secret "
            "streamboss:operationsEnv` with its value")
    return {**{name: value for name, value in plain.items() if value != MASKED}, **secret}
