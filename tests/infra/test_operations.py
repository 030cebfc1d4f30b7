"""The program's parser for ``streamboss:operations``: what it accepts and how it refuses."""

from __future__ import annotations

import copy
from typing import Any

import pytest

from infra.operations import OperationConfigError, OperationSpec, parse_operations

ENTRY: dict[str, Any] = {
    "name": "resize", "input": "images", "output": "thumbs",
    "definition": {"exec": "convert - -resize 50% -", "mode": "per-message"},
    "min": 0, "max": 10, "target_backlog_per_agent": 20,
    "scale_out_cooldown": 120, "scale_in_cooldown": 600.5, "idle_seconds": 1800,
}


def entry(**changes: Any) -> dict[str, Any]:
    result = copy.deepcopy(ENTRY)
    for key, value in changes.items():
        if value is None:
            result.pop(key, None)
        else:
            result[key] = value
    return result


def test_a_list_entry_becomes_a_spec():
    (spec,) = parse_operations([entry(image="ami-0abc", instance_type="c6i.large")])
    assert spec == OperationSpec(
        name="resize", input="images", output="thumbs", definition=ENTRY["definition"],
        min=0, max=10, target_backlog_per_agent=20, scale_out_cooldown=120,
        scale_in_cooldown=600.5, idle_seconds=1800, image="ami-0abc", instance_type="c6i.large")


def test_a_map_by_name_is_accepted_and_sorted():
    value = {"b-op": entry(name=None), "a-op": entry(name="a-op")}
    assert [s.name for s in parse_operations(value)] == ["a-op", "b-op"]


def test_nothing_declared_is_no_operation():
    assert parse_operations(None) == []
    assert parse_operations([]) == []


@pytest.mark.parametrize(("value", "message"), [
    ([entry(min=5, max=2)], "operation 'resize': 'min' 5 is greater than 'max' 2"),
    ([entry(max=0)], "operation 'resize': 'max' must be at least 1, got 0"),
    ([entry(min=-1)], "operation 'resize': 'min' must be at least 0, got -1"),
    ([entry(min=1.5)], "operation 'resize': 'min' must be a whole number, got 1.5"),
    ([entry(max=True)], "operation 'resize': 'max' must be a whole number, got True"),
    ([entry(target_backlog_per_agent=0)],
     "operation 'resize': 'target_backlog_per_agent' must be at least 1, got 0"),
    ([entry(scale_in_cooldown="10")],
     "operation 'resize': 'scale_in_cooldown' must be a number, got '10'"),
    ([entry(idle_seconds=86_401)],
     "operation 'resize': 'idle_seconds' must be at most 86400, got 86401"),
    ([entry(scale_in_cooldown=86_401)],
     "operation 'resize': 'scale_in_cooldown' must be at most 86400, got 86401"),
    ([entry(scale_out_cooldown=float("inf"))],
     "operation 'resize': 'scale_out_cooldown' must be a number, got inf"),
    ([entry(name="Resize")], "operation 'Resize': 'name' 'Resize' is not a valid name"),
    ([entry(input="in put")], "operation 'resize': 'input' 'in put' is not a valid name"),
    ([entry(definition={"mode": "service"})],
     "operation 'resize': 'definition' needs 'exec', the command to run"),
    ([entry(definition="tr a-z A-Z")],
     "operation 'resize': 'definition' must be an object with 'exec'"),
    ([entry(image="")], "operation 'resize': 'image' must be a non-empty string"),
    ([entry(maximum=3)], "operation 'resize': unknown field(s) maximum; allowed are"),
    ([entry(idle_seconds=None)], "operation 'resize': missing field(s) idle_seconds"),
    ([entry(), entry()], "operation 'resize' is declared twice"),
    ([42], "operations[0] must be an object, got 42"),
    ("resize", "operations must be a list of objects or a map by name, got str"),
    ({"resize": entry(name="other")}, "operations.resize: 'name' is 'other' but the key is"),
])
def test_a_bad_value_fails_with_one_line_naming_operation_and_field(value, message):
    with pytest.raises(OperationConfigError) as caught:
        parse_operations(value)
    text = str(caught.value)
    assert text.startswith(message)
    assert "\n" not in text
