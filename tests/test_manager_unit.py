"""The manager's policy and declarations without a broker: scaling decisions, the
store's validation and persistence, and which operations are wanted."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from streamboss.manager.broker import Subscriber
from streamboss.manager.model import Operation, ScalingPolicy
from streamboss.manager.reconciler import wanted_operations
from streamboss.manager.scaling import ScaleState, decide
from streamboss.manager.store import Store, StoreError, find_cycle, parse_policy

SEED = {"definition": {"exec": "tr [a-z] [A-Z]", "application": "x", "name": "upper"}}


def policy(**values: float) -> ScalingPolicy:
    return ScalingPolicy(**values)  # type: ignore[arg-type]


# -- scaling.decide ----------------------------------------------------------------


@pytest.mark.parametrize("minimum, expected", [(0, 1), (1, 1), (2, 2)])
def test_wanted_means_at_least_max_of_min_and_one(minimum: int, expected: int) -> None:
    state = ScaleState()
    assert decide(policy(min=minimum, max=4), state, True, 0, now=100.0) == expected
    assert state.desired == expected


@pytest.mark.parametrize("backlog, maximum, expected", [
    (1, 4, 1), (1000, 4, 1), (1001, 4, 2), (2500, 4, 3), (20_000, 3, 3), (20_000, 10, 10),
])
def test_backlog_sets_ceil_backlog_over_target_capped_at_max(backlog: int, maximum: int,
                                                             expected: int) -> None:
    state = ScaleState()
    count = decide(policy(max=maximum, target_backlog_per_agent=1000), state, True, backlog,
                   now=100.0)
    assert count == expected


def test_max_zero_never_runs_an_agent() -> None:
    assert decide(policy(min=0, max=0), ScaleState(), True, 5000, now=1.0) == 0


def test_never_wanted_means_zero() -> None:
    state = ScaleState()
    assert decide(policy(min=2), state, False, 50_000, now=100.0) == 0


def test_wake_from_zero_ignores_the_scale_out_cooldown() -> None:
    rules = policy(max=4, scale_out_cooldown=60, scale_in_cooldown=60, idle_seconds=1)
    state = ScaleState()
    assert decide(rules, state, True, 0, now=100.0) == 1
    assert decide(rules, state, False, 0, now=101.5) == 0  # idle long enough
    # Wanted again a moment later, well inside every cooldown: straight to the backlog's
    # count, no waiting.
    assert decide(rules, state, True, 3500, now=102.0) == 4


def test_scale_out_waits_for_its_cooldown() -> None:
    rules = policy(max=4, target_backlog_per_agent=100, scale_out_cooldown=5)
    state = ScaleState()
    assert decide(rules, state, True, 0, now=10.0) == 1
    assert decide(rules, state, True, 400, now=12.0) == 1   # 2 s after the wake: too soon
    assert decide(rules, state, True, 400, now=14.99) == 1
    assert decide(rules, state, True, 400, now=15.0) == 4   # cooldown over
    assert decide(rules, state, True, 10_000, now=16.0) == 4  # capped at max


def test_scale_in_waits_for_its_cooldown_after_any_change() -> None:
    rules = policy(max=4, target_backlog_per_agent=100, scale_out_cooldown=0,
                   scale_in_cooldown=30)
    state = ScaleState()
    assert decide(rules, state, True, 400, now=0.0) == 4
    # The backlog is gone, but the last scale-out was less than 30 s ago.
    assert decide(rules, state, True, 0, now=10.0) == 4
    assert decide(rules, state, True, 0, now=29.9) == 4
    assert decide(rules, state, True, 150, now=30.0) == 2
    # And the next scale-in waits another 30 s after that one.
    assert decide(rules, state, True, 0, now=45.0) == 2
    assert decide(rules, state, True, 0, now=60.0) == 1


def test_scale_out_may_follow_a_scale_in_without_waiting_for_scale_in_cooldown() -> None:
    rules = policy(max=4, target_backlog_per_agent=100, scale_out_cooldown=1,
                   scale_in_cooldown=30)
    state = ScaleState()
    assert decide(rules, state, True, 400, now=0.0) == 4
    assert decide(rules, state, True, 0, now=31.0) == 1
    assert decide(rules, state, True, 300, now=33.0) == 3


def test_idle_to_zero_only_after_idle_seconds() -> None:
    rules = policy(min=2, idle_seconds=60, scale_in_cooldown=600)
    state = ScaleState()
    assert decide(rules, state, True, 0, now=1000.0) == 2
    # The last consumer left: the agents stay warm for idle_seconds ...
    assert decide(rules, state, False, 0, now=1001.0) == 2
    assert decide(rules, state, False, 0, now=1059.9) == 2
    # ... then all go at once, whatever the scale-in cooldown says.
    assert decide(rules, state, False, 0, now=1060.0) == 0
    assert decide(rules, state, False, 0, now=1061.0) == 0


def test_wanted_again_during_the_idle_period_keeps_the_agents() -> None:
    rules = policy(idle_seconds=10)
    state = ScaleState()
    assert decide(rules, state, True, 0, now=0.0) == 1
    assert decide(rules, state, False, 0, now=9.0) == 1
    assert decide(rules, state, True, 0, now=9.5) == 1
    # The idle clock starts again from the last time it was wanted.
    assert decide(rules, state, False, 0, now=18.0) == 1
    assert decide(rules, state, False, 0, now=19.5) == 0


def test_idle_backlog_does_not_wake_an_unwanted_operation() -> None:
    rules = policy(idle_seconds=1)
    state = ScaleState()
    for now in (0.0, 5.0, 10.0):
        assert decide(rules, state, False, 20_000, now) == 0


# -- store: validation ---------------------------------------------------------------


@pytest.fixture
def store(tmp_path: Path) -> Store:
    opened = Store(tmp_path / "state")
    yield opened
    opened.close()


def everything(store: Store) -> dict[str, list]:
    return {"streams": [(s.name, s.created_at) for s in store.streams()],
            "definitions": [d.to_dict() for d in store.definitions()],
            "operations": [o.to_dict() for o in store.operations()]}


@pytest.mark.parametrize("name", [
    "Bad Name", "UPPER", "", "-leading-dash", ".dot", "has/slash", "a" * 64, "sp ace", "ü",
])
def test_invalid_stream_names_are_refused(store: Store, name: str) -> None:
    with pytest.raises(StoreError) as refused:
        store.create_stream(name)
    assert repr(name) in str(refused.value)
    assert "a-z" in str(refused.value)
    assert store.streams() == []


@pytest.mark.parametrize("name", ["a", "0", "a" * 63, "my.stream_1-x"])
def test_valid_stream_names(store: Store, name: str) -> None:
    stream, created = store.create_stream(name)
    assert (stream.name, created) == (name, True)


def test_create_stream_is_idempotent(store: Store) -> None:
    first, created = store.create_stream("words")
    again, created_again = store.create_stream("words")
    assert (created, created_again) == (True, False)
    assert first == again
    assert [s.name for s in store.streams()] == ["words"]


def test_definitions_are_versioned_by_name(store: Store) -> None:
    one = store.define_process(SEED)
    two = store.define_process({"definition": {**SEED["definition"], "exec": "tr a-z A-Z"}})
    other = store.define_process({"exec": "cat", "name": "copy", "mode": "service"})
    assert (one.name, one.version) == ("upper", 1)
    assert (two.name, two.version) == ("upper", 2)
    assert (other.name, other.version) == ("copy", 1)
    assert len({one.id, two.id, other.id}) == 3
    # By name: the newest version; by id: exactly that one.
    assert store.get_definition("upper") == two
    assert store.get_definition(str(one.id)) == one
    assert store.get_definition(one.id).body["exec"] == "tr [a-z] [A-Z]"
    assert store.get_definition("nothing") is None
    assert store.get_definition("999") is None


def test_the_seed_definition_is_kept_as_given(store: Store) -> None:
    stored = store.define_process(SEED)
    assert stored.body == SEED["definition"]


def test_name_parameter_names_a_nameless_definition(store: Store) -> None:
    assert store.define_process({"exec": "cat"}, name="copy").name == "copy"
    with pytest.raises(StoreError, match="needs a 'name'"):
        store.define_process({"exec": "cat"})


@pytest.mark.parametrize("data, words", [
    ({"definition": {"application": "x", "name": "upper"}}, ["missing 'exec'"]),
    ({"definition": {"exec": "", "name": "upper"}}, ["missing 'exec'"]),
    ({"exec": "cat", "name": "x", "retries": 3}, ["unknown field", "retries"]),
    ({"exec": "cat", "name": "x", "mode": "batch"}, ["batch"]),
    ({"exec": "cat", "name": "Bad Name"}, ["'Bad Name'", "invalid"]),
])
def test_malformed_definitions_are_refused(store: Store, data: dict, words: list[str]) -> None:
    with pytest.raises(StoreError) as refused:
        store.define_process(data)
    for word in words:
        assert word in str(refused.value)
    assert store.definitions() == []


def test_create_operation_creates_a_missing_output_stream(store: Store) -> None:
    store.create_stream("in")
    definition = store.define_process(SEED)
    op = store.create_operation("up", str(definition.id), "in", "out", {"max": 2})
    assert (op.input, op.output, op.definition_id) == ("in", "out", definition.id)
    assert op.policy == ScalingPolicy(max=2)
    assert [s.name for s in store.streams()] == ["in", "out"]
    # The definition may be named too (its newest version).
    assert store.create_operation("up2", "upper", "out", "shout").definition_id == definition.id


@pytest.mark.parametrize("args, status, words", [
    (("op", "upper", "nowhere", "out"), 404, ["input stream 'nowhere' does not exist",
                                              "create-stream nowhere"]),
    (("op", "nosuchdef", "in", "out"), 404, ["'nosuchdef' does not exist", "define-process"]),
    (("op", "999", "in", "out"), 404, ["'999' does not exist"]),
    (("Bad Op", "upper", "in", "out"), 400, ["operation name 'Bad Op' is invalid"]),
    (("op", "upper", "in", "Out"), 400, ["output stream name 'Out' is invalid"]),
])
def test_bad_operations_are_refused_and_change_nothing(store: Store, args: tuple,
                                                       status: int, words: list[str]) -> None:
    store.create_stream("in")
    store.define_process(SEED)
    before = everything(store)
    with pytest.raises(StoreError) as refused:
        store.create_operation(*args)
    assert refused.value.status == status
    for word in words:
        assert word in str(refused.value)
    assert everything(store) == before  # not even the new output stream


def test_an_operation_name_is_taken_once(store: Store) -> None:
    store.create_stream("in")
    store.define_process(SEED)
    store.create_operation("op", "upper", "in", "out")
    with pytest.raises(StoreError, match="already exists") as refused:
        store.create_operation("op", "upper", "in", "other")
    assert refused.value.status == 409
    assert store.get_stream("other") is None


@pytest.mark.parametrize("values, words", [
    ({"min": 3, "max": 2}, ["min (3) is above max (2)"]),
    ({"max": -1}, ["max must not be negative"]),
    ({"target_backlog_per_agent": 0}, ["at least 1"]),
    ({"min": 1.5}, ["min must be a whole number"]),
    ({"idle_seconds": "soon"}, ["idle_seconds must be a number"]),
    ({"idle": 5}, ["unknown scaling policy field", "idle", "idle_seconds"]),
])
def test_bad_policies_are_refused(store: Store, values: dict, words: list[str]) -> None:
    store.create_stream("in")
    store.define_process(SEED)
    with pytest.raises(StoreError) as refused:
        store.create_operation("op", "upper", "in", "out", values)
    for word in words:
        assert word in str(refused.value)
    assert store.operations() == []


def test_policy_defaults_and_hyphenated_fields() -> None:
    assert parse_policy(None) == ScalingPolicy()
    assert parse_policy({"scale-in-cooldown": 2, "max": None}) == ScalingPolicy(
        scale_in_cooldown=2)


def test_a_refusal_by_the_broker_writes_nothing(store: Store) -> None:
    store.create_stream("in")
    store.define_process(SEED)
    before = everything(store)

    def broker_away() -> None:
        raise RuntimeError("broker away")

    with pytest.raises(RuntimeError):
        store.create_operation("op", "upper", "in", "out", before_commit=broker_away)
    assert everything(store) == before


# -- store: cycles -------------------------------------------------------------------


def chain(store: Store, *links: tuple[str, str, str]) -> None:
    store.define_process(SEED)
    for name, source, sink in links:
        store.create_stream(source)
        store.create_operation(name, "upper", source, sink)


def test_a_cycle_is_refused_and_spelled_out(store: Store) -> None:
    chain(store, ("ab", "a", "b"), ("bc", "b", "c"))
    before = everything(store)
    with pytest.raises(StoreError) as refused:
        store.create_operation("ca", "upper", "c", "a")
    assert refused.value.status == 409
    assert str(refused.value) == ("operation 'ca' would make a cycle: "
                                  "c -[ca]-> a -[ab]-> b -[bc]-> c")
    assert everything(store) == before


def test_two_operations_in_opposite_directions_are_a_cycle(store: Store) -> None:
    chain(store, ("ab", "a", "b"))
    with pytest.raises(StoreError, match=r"b -\[ba\]-> a -\[ab\]-> b"):
        store.create_operation("ba", "upper", "b", "a")


def test_an_operation_into_its_own_input_is_a_cycle(store: Store) -> None:
    chain(store, ("ab", "a", "b"))
    with pytest.raises(StoreError, match=r"cycle: b -\[bb\]-> b$"):
        store.create_operation("bb", "upper", "b", "b")


def test_diamonds_and_fan_out_are_not_cycles(store: Store) -> None:
    chain(store, ("ab", "a", "b"), ("ac", "a", "c"), ("bd", "b", "d"))
    store.create_operation("cd", "upper", "c", "d")
    store.create_operation("ab2", "upper", "a", "b")
    assert len(store.operations()) == 5


def test_find_cycle_without_the_store() -> None:
    edges = [("a", "x", "b"), ("b", "y", "c"), ("c", "z", "d")]
    assert find_cycle(edges, ("d", "w", "e")) is None
    assert find_cycle(edges, ("d", "w", "a")) == "d -[w]-> a -[x]-> b -[y]-> c -[z]-> d"
    assert find_cycle(edges, ("c", "w", "b")) == "c -[w]-> b -[y]-> c"


# -- store: deleting -----------------------------------------------------------------


def test_a_stream_in_use_is_kept_without_force(store: Store) -> None:
    chain(store, ("ab", "a", "b"), ("bc", "b", "c"), ("xy", "x", "y"))
    before = everything(store)
    with pytest.raises(StoreError) as refused:
        store.delete_stream("b")
    assert refused.value.status == 409
    assert "ab, bc" in str(refused.value) and "--force" in str(refused.value)
    assert everything(store) == before


def test_force_deletes_the_stream_with_the_operations_using_it(store: Store) -> None:
    chain(store, ("ab", "a", "b"), ("bc", "b", "c"), ("xy", "x", "y"))
    assert store.delete_stream("b", force=True) == ["ab", "bc"]
    assert [o.name for o in store.operations()] == ["xy"]
    assert [s.name for s in store.streams()] == ["a", "c", "x", "y"]


def test_a_stream_nobody_uses_goes_without_force(store: Store) -> None:
    store.create_stream("lonely")
    assert store.delete_stream("lonely") == []
    assert store.streams() == []
    with pytest.raises(StoreError) as refused:
        store.delete_stream("lonely")
    assert refused.value.status == 404


def test_deleting_a_definition_in_use(store: Store) -> None:
    chain(store, ("ab", "a", "b"))
    store.define_process(SEED)  # version 2, unused
    with pytest.raises(StoreError) as refused:
        store.delete_process("upper")
    assert refused.value.status == 409 and "ab" in str(refused.value)
    # The unused version alone may go; by name, every version goes (with --force).
    assert store.delete_process("2") == []
    assert store.delete_process("upper", force=True) == ["ab"]
    assert store.definitions() == [] and store.operations() == []
    with pytest.raises(StoreError) as missing:
        store.delete_process("upper")
    assert missing.value.status == 404


def test_deleting_an_unknown_operation(store: Store) -> None:
    with pytest.raises(StoreError) as refused:
        store.delete_operation("ghost")
    assert refused.value.status == 404


# -- store: persistence ----------------------------------------------------------------


def test_declarations_survive_reopening_the_store(tmp_path: Path) -> None:
    first = Store(tmp_path / "state")
    chain(first, ("ab", "a", "b"), ("bc", "b", "c"))
    first.define_process(SEED)
    first.create_operation("tuned", "1", "a", "t", {"min": 1, "max": 3,
                                                    "target_backlog_per_agent": 50,
                                                    "idle_seconds": 2.5})
    first.delete_stream("c", force=True)
    before = everything(first)
    first.close()

    again = Store(tmp_path / "state")
    try:
        assert everything(again) == before
        assert again.get_operation("tuned").policy == ScalingPolicy(
            min=1, max=3, target_backlog_per_agent=50, idle_seconds=2.5)
        # Versions continue where they were.
        assert again.define_process(SEED).version == 3
    finally:
        again.close()
    assert json.loads(json.dumps(before))  # plain JSON-able data, as the API returns it


# -- reconciler.wanted_operations ------------------------------------------------------


def op(name: str, source: str, sink: str) -> Operation:
    return Operation(name, 1, source, sink)


def consumer(queue: str = "amq.gen-1", consumers: int = 1) -> Subscriber:
    return Subscriber(queue, consumers, exclusive=True)


def feeds(operation: str) -> Subscriber:
    """The queue of ``operation``, bound to its input stream (no agents: no consumers)."""
    return Subscriber(f"sb.op.{operation}", 0, exclusive=False)


CHAIN = [op("one", "s0", "s1"), op("two", "s1", "s2"), op("three", "s2", "s3")]


def test_a_chain_wakes_backwards_from_one_consumer() -> None:
    subscribers = {"s1": [feeds("two")], "s2": [feeds("three")], "s3": [consumer()]}
    assert wanted_operations(CHAIN, subscribers) == {"one", "two", "three"}


def test_a_chain_without_a_consumer_sleeps() -> None:
    subscribers = {"s1": [feeds("two")], "s2": [feeds("three")],
                   "s3": [Subscriber("leftover", 0, exclusive=False)]}
    assert wanted_operations(CHAIN, subscribers) == set()


def test_a_consumer_in_the_middle_wakes_only_upstream() -> None:
    subscribers = {"s1": [feeds("two"), consumer()], "s2": [feeds("three")], "s3": []}
    assert wanted_operations(CHAIN, subscribers) == {"one"}


def test_a_durable_subscription_is_demand_while_its_consumer_is_away() -> None:
    subscribers = {"s1": [feeds("two")], "s2": [feeds("three")],
                   "s3": [Subscriber("sb.sub.archive", 0, exclusive=False)]}
    assert wanted_operations(CHAIN, subscribers) == {"one", "two", "three"}


def test_an_unknown_operations_queue_counts_by_its_consumers() -> None:
    ops = [op("one", "s0", "s1")]
    assert wanted_operations(ops, {"s1": [feeds("elsewhere")]}) == set()
    busy = Subscriber("sb.op.elsewhere", 2, exclusive=False)
    assert wanted_operations(ops, {"s1": [busy]}) == {"one"}


def test_fan_in_and_fan_out() -> None:
    ops = [op("left", "a", "m"), op("right", "b", "m"), op("up", "m", "x"),
           op("down", "m", "y")]
    subscribers = {"m": [feeds("up"), feeds("down")], "x": [], "y": [consumer()]}
    assert wanted_operations(ops, subscribers) == {"left", "right", "down"}


@pytest.mark.parametrize("order", ["consumer first", "operation first"])
def test_a_cycle_neither_hangs_nor_depends_on_listing_order(order: str) -> None:
    """The store refuses cycles; should one reach the reconciler anyway (a database
    edited by hand), the answer still terminates and does not depend on the order the
    management API happens to list the bindings in."""
    ops = [op("x", "s1", "s2"), op("y", "s2", "s1")]
    listed = [consumer(), feeds("y")]
    if order == "operation first":
        listed.reverse()
    subscribers = {"s1": [feeds("x")], "s2": listed}
    assert wanted_operations(ops, subscribers) == {"x", "y"}
    # And without any consumer the loop is not demand by itself.
    assert wanted_operations(ops, {"s1": [feeds("x")], "s2": [feeds("y")]}) == set()
