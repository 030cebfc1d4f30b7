"""The manager's declarations as stack config: exact, stable, and what infra/ reads."""

from __future__ import annotations

import json
import random
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from infra.operations import parse_operations
from infra.settings import OPERATIONS_KEY
from streamboss.manager.model import Definition, Operation, ScalingPolicy
from streamboss.manager.stack_config import (
    CONFIG_KEY,
    StackConfigError,
    operations_config,
    render,
)

from .conftest import sample_declarations

ROOT = Path(__file__).resolve().parents[2]


def test_one_operation_maps_to_exactly_this_entry():
    definition = Definition(7, "upper", 2, {"exec": "tr a-z A-Z", "mode": "service",
                                            "name": "upper"}, "2026-11-23T00:00:00Z")
    operation = Operation("upper", 7, "raw", "shout",
                          ScalingPolicy(min=1, max=3, target_backlog_per_agent=500,
                                        scale_out_cooldown=5.0, scale_in_cooldown=30.5,
                                        idle_seconds=60.0), "2026-11-23T00:00:01Z")

    config = operations_config([operation], {7: definition})

    assert config == [{
        "name": "upper", "input": "raw", "output": "shout",
        "definition": {"exec": "tr a-z A-Z", "mode": "service", "name": "upper"},
        "min": 1, "max": 3, "target_backlog_per_agent": 500,
        "scale_out_cooldown": 5, "scale_in_cooldown": 30.5, "idle_seconds": 60,
    }]
    assert render(config) == (
        '[{"definition":{"exec":"tr a-z A-Z","mode":"service","name":"upper"},'
        '"idle_seconds":60,"input":"raw","max":3,"min":1,"name":"upper","output":"shout",'
        '"scale_in_cooldown":30.5,"scale_out_cooldown":5,"target_backlog_per_agent":500}]')


def test_same_declarations_give_byte_identical_text_in_any_order():
    operations, definitions = sample_declarations()
    first = render(operations_config(operations, definitions)).encode()
    for seed in range(5):
        shuffled = operations[:]
        random.Random(seed).shuffle(shuffled)
        reordered_defs = dict(reversed(list(definitions.items())))
        assert render(operations_config(shuffled, reordered_defs)).encode() == first


def test_entries_are_sorted_by_name():
    config = operations_config(*sample_declarations())
    assert [entry["name"] for entry in config] == ["count", "resize", "upper"]


def test_key_order_inside_a_definition_does_not_change_the_text():
    body = {"exec": "wc -c", "mode": "per-message", "env": {"B": "2", "A": "1"}}
    reordered = {"env": {"A": "1", "B": "2"}, "mode": "per-message", "exec": "wc -c"}
    texts = {render(operations_config([Operation("count", 1, "a", "b")],
                                      {1: Definition(1, "count", 1, b, "")}))
             for b in (body, reordered)}
    assert len(texts) == 1


def test_whole_and_fractional_seconds_spell_one_way():
    def text(seconds: float) -> str:
        policy = ScalingPolicy(scale_out_cooldown=seconds, scale_in_cooldown=seconds,
                               idle_seconds=seconds)
        return render(operations_config([Operation("op", 1, "a", "b", policy)],
                                        {1: Definition(1, "d", 1, {"exec": "cat"}, "")}))

    assert text(5) == text(5.0)
    assert '"idle_seconds":5,' in text(5.0)
    assert '"idle_seconds":2.5,' in text(2.5)


def test_timestamps_and_definition_versions_do_not_leak_into_the_config():
    operations, definitions = sample_declarations()
    later = [Operation(o.name, o.definition_id, o.input, o.output, o.policy, "2030-01-01")
             for o in operations]
    bumped = {k: Definition(d.id, d.name, d.version + 1, d.body, "2030-01-01")
              for k, d in definitions.items()}
    assert render(operations_config(later, bumped)) == render(
        operations_config(operations, definitions))


def test_the_definition_image_becomes_the_pool_image():
    by_name = {e["name"]: e for e in operations_config(*sample_declarations())}
    assert by_name["resize"]["image"] == "ami-0imagemagick"
    assert "image" not in by_name["upper"]


def test_the_result_is_a_copy_of_the_declarations():
    operations, definitions = sample_declarations()
    config = operations_config(operations, definitions)
    definitions[1].body["exec"] = "changed later"
    assert {e["name"]: e for e in config}["upper"]["definition"]["exec"] == "tr a-z A-Z"


def test_changing_one_operation_changes_only_its_entry():
    before = {e["name"]: e for e in operations_config(*sample_declarations())}
    after = {e["name"]: e for e in operations_config(*sample_declarations(resize={"max": 20}))}
    assert [name for name in before if before[name] != after[name]] == ["resize"]
    assert after["resize"]["max"] == 20


def test_a_missing_definition_is_named():
    with pytest.raises(StackConfigError, match=r"operation 'lost': process definition 9 "):
        operations_config([Operation("lost", 9, "a", "b")], {})


def test_a_duplicate_operation_is_refused():
    definitions = {1: Definition(1, "d", 1, {"exec": "cat"}, "")}
    with pytest.raises(StackConfigError, match="'twice' is declared twice"):
        operations_config([Operation("twice", 1, "a", "b"), Operation("twice", 1, "c", "d")],
                          definitions)


def test_render_is_canonical_json():
    text = render({"b": [1, 2.5, "é"], "a": {"z": None, "y": True}})
    assert text == '{"a":{"y":true,"z":null},"b":[1,2.5,"\\u00e9"]}'
    with pytest.raises(ValueError):
        render({"x": float("nan")})


def test_the_config_key_is_the_one_the_program_reads():
    project = (ROOT / "Pulumi.yaml").read_text()
    assert "name: streamboss\n" in project
    assert f"streamboss:{OPERATIONS_KEY}" == CONFIG_KEY


def test_the_program_reads_the_mapping_back_field_for_field():
    config = operations_config(*sample_declarations())
    specs = parse_operations(json.loads(render(config)))
    assert [s.name for s in specs] == [e["name"] for e in config]
    for spec, entry in zip(specs, config, strict=True):
        for key, value in entry.items():
            assert getattr(spec, key) == value, (spec.name, key)


def test_the_shared_modules_import_without_pulumi():
    # The manager imports these on machines without the Pulumi SDK.
    probe = ("import sys; import streamboss.manager.stack_config, infra.metrics, "
             "infra.operations; print(sorted(m for m in sys.modules if 'pulumi' in m))")
    result = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True,
                            text=True, check=True)
    assert result.stdout.strip() == "[]"


# -- warm pools (issue #12) ------------------------------------------------------------------


def test_a_warm_pool_is_carried_to_the_stack_and_parsed_there():
    operations, definitions = sample_declarations(resize={"warm_pool": 2})
    config = operations_config(operations, definitions)
    by_name = {entry["name"]: entry for entry in config}
    assert by_name["resize"]["warm_pool"] == 2
    # Only where declared: the other entries are exactly what they were.
    assert "warm_pool" not in by_name["upper"] and "warm_pool" not in by_name["count"]
    specs = {s.name: s for s in parse_operations(json.loads(render(config)))}
    assert (specs["resize"].warm_pool, specs["upper"].warm_pool) == (2, 0)


def test_declarations_without_a_warm_pool_give_the_text_they_gave_before_it_existed(tmp_path):
    """A policy stored before the field existed (no warm_pool key) loads as 0 and
    renders byte for byte as before: upgrading the manager updates no stack."""
    from streamboss.manager.store import Store

    before = render(operations_config(*sample_declarations()))
    assert "warm_pool" not in before
    store = Store(tmp_path / "state")
    try:
        definition = store.define_process({"definition": {"exec": "cat", "name": "relay"}})
        store.create_stream("a")
        store.create_operation("op", str(definition.id), "a", "b", {"max": 3})
        # As an older manager wrote the row: its policy JSON without warm_pool.
        old_policy = {k: v for k, v in ScalingPolicy(max=3).to_dict().items()
                      if k != "warm_pool"}
        with sqlite3.connect(store.path, isolation_level=None) as older:
            older.execute("UPDATE operations SET policy = ? WHERE name = 'op'",
                          (json.dumps(old_policy),))
        older.close()
        (loaded,) = store.operations()
        assert loaded.policy.warm_pool == 0
        text = render(operations_config([loaded], {d.id: d for d in store.definitions()}))
        assert "warm_pool" not in text
    finally:
        store.close()


@pytest.mark.parametrize(("policy", "message"), [
    ({"warm_pool": 5, "max": 4}, "warm_pool (5) is above max (4)"),
    ({"warm_pool": -1}, "warm_pool must not be negative"),
    ({"warm_pool": 1.5}, "warm_pool must be a whole number"),
])
def test_the_manager_refuses_a_bad_warm_pool(tmp_path, policy, message):
    from streamboss.manager.store import Store, StoreError

    store = Store(tmp_path / "state")
    try:
        definition = store.define_process({"definition": {"exec": "cat", "name": "relay"}})
        store.create_stream("a")
        with pytest.raises(StoreError, match=message.replace("(", r"\(").replace(")", r"\)")):
            store.create_operation("op", str(definition.id), "a", "b", policy)
    finally:
        store.close()


@pytest.mark.parametrize(("value", "message"), [
    (11, "'warm_pool' 11 is greater than 'max' 10"),
    (-1, "'warm_pool' must be at least 0"),
    (True, "'warm_pool' must be a whole number"),
    ("2", "'warm_pool' must be a whole number"),
])
def test_the_program_refuses_a_bad_warm_pool_in_one_line(value, message):
    from infra.operations import OperationConfigError

    entry = {**operations_config(*sample_declarations())[1], "warm_pool": value}
    assert entry["name"] == "resize"
    with pytest.raises(OperationConfigError, match=message) as caught:
        parse_operations([entry])
    assert "\n" not in str(caught.value)
    assert str(caught.value).startswith("operation 'resize': ")


def test_a_warm_pool_declared_over_http_reaches_the_store_and_the_stack_config(tmp_path):
    """The API takes the field and hands it to the store's checks (the refusal is the
    store's); an accepted one is in the stack config. No broker is needed for either:
    the refusal comes before any topology, the accepted one is stored directly."""
    import warnings

    from streamboss.manager.api import Manager, create_app
    from streamboss.manager.broker import Broker
    from streamboss.manager.stack_config import stack_config
    from streamboss.manager.store import Store

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Starlette's test client deprecation, as it loads
        from fastapi.testclient import TestClient
    store = Store(tmp_path / "state")
    try:
        store.create_stream("a")
        client = TestClient(create_app(Manager(store, Broker("amqp://guest:guest@127.0.0.1:1/"),
                                               None, None)), base_url="http://127.0.0.1")
        assert client.post("/v1/definitions", json={"definition": {
            "exec": "cat", "name": "relay"}}).status_code == 201
        refused = client.post("/v1/operations", json={
            "name": "op2", "definition": "relay", "input": "a", "output": "b",
            "policy": {"max": 3, "warm_pool": 4}})
        assert refused.status_code == 400
        assert refused.json()["detail"] == ("scaling policy warm_pool (4) is above max (3): "
                                            "a pool never uses more warm instances than max")
        for bad in (-1, 1.5, "2", True):
            answer = client.post("/v1/operations", json={
                "name": "op3", "definition": "relay", "input": "a", "output": "b",
                "policy": {"warm_pool": bad}})
            assert answer.status_code in (400, 422), (bad, answer.text)
        store.create_operation("op", "relay", "a", "b", {"max": 3, "warm_pool": 2})
        config = stack_config(store.operations(), {d.id: d for d in store.definitions()})
        (spec,) = parse_operations(json.loads(config.operations))
        assert spec.warm_pool == 2
    finally:
        store.close()
