"""Definitions against the broker's consumer timeout.

RabbitMQ closes the channel of a consumer holding one delivery unacknowledged
longer than its consumer_timeout (30 min by default). How long an agent can hold
one follows from the definition: one run of at most ``timeout`` (a failed run is
republished, not redelivered), plus, per-message, the runs ahead of it in the
agent's window. Before RabbitMQ 3.12 (this machine's broker is 3.10) the manager
refuses a definition that could outlast the limit; from 3.12 it sets a
``consumer-timeout`` policy on the operation's queues instead. That branch is
tested here only as far as the policy it builds and the version it reads: no
3.12 broker runs here.
"""

from __future__ import annotations

import re
import subprocess

import pytest

from streamboss.agent.config import (
    CONSUMER_TIMEOUT_ENV,
    ConfigError,
    check_consumer_timeout,
    consumer_timeout_limit,
    delivery_hold,
    parse_definition,
)
from streamboss.manager.broker import Broker, parse_version
from streamboss.manager.consumer_timeout import per_queue_supported, policy

from .conftest import MANAGER, PYTHON, ManagerPool, free_port, op_queue, run_cli

EXIT_ERROR = 2


def definition(**fields: object) -> object:
    return parse_definition({"exec": "cat", **fields})


# -- the rule ---------------------------------------------------------------------------


def test_how_long_a_delivery_can_be_held() -> None:
    # Per-message: 16 deliveries for 4 children: the last waits for 3 runs, then its own.
    assert delivery_hold(definition(timeout=60), window=16, concurrency=4) == 240
    assert delivery_hold(definition(timeout=60), window=4, concurrency=4) == 60
    assert delivery_hold(definition(timeout=60), window=5, concurrency=4) == 120
    # Service: each record is timed at the head of the line.
    assert delivery_hold(definition(timeout=60, mode="service"), window=200,
                         concurrency=1) == 60
    assert delivery_hold(definition(timeout=None), window=1, concurrency=1) is None


def test_the_defaults_fit_rabbitmqs_default_consumer_timeout() -> None:
    check_consumer_timeout(definition(), 1800)
    check_consumer_timeout(definition(mode="service"), 1800)


@pytest.mark.parametrize("fields, window, concurrency, words", [
    ({"timeout": 2000, "mode": "service"}, 200, 1,
     ["'timeout' 2000s is above the broker's consumer timeout of 1800s",
      "set timeout to at most 1800"]),
    ({"timeout": 600}, 16, 4,
     ["'timeout' 600s can hold a message 2400s (4 runs: a window of 16 messages for 4 "
      "children)", "consumer timeout of 1800s", "set timeout to at most 450"]),
    ({"timeout": None}, 16, 4, ["'timeout' is unset (no limit)", "over 1800s",
                                "set timeout to at most 1800 seconds"]),
])
def test_a_definition_that_could_outlast_it_is_refused_in_one_line(
        fields: dict, window: int, concurrency: int, words: list[str]) -> None:
    with pytest.raises(ConfigError) as refused:
        check_consumer_timeout(definition(**fields), 1800, window, concurrency)
    message = str(refused.value)
    assert "\n" not in message
    for word in [*words, f"set {CONSUMER_TIMEOUT_ENV} to it"]:
        assert word in message, message


def test_the_limit_comes_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(CONSUMER_TIMEOUT_ENV, raising=False)
    assert consumer_timeout_limit() == 1800
    monkeypatch.setenv(CONSUMER_TIMEOUT_ENV, "3600")
    assert consumer_timeout_limit() == 3600
    for bad in ("soon", "0", "-5", "inf", "nan"):
        monkeypatch.setenv(CONSUMER_TIMEOUT_ENV, bad)
        with pytest.raises(ConfigError, match=f"{CONSUMER_TIMEOUT_ENV} must be the broker's "
                                              "consumer timeout in seconds"):
            consumer_timeout_limit()


# -- RabbitMQ 3.12+: a policy instead (not run against such a broker here) ---------------


@pytest.mark.parametrize("text, version, supported", [
    ("3.10.8", (3, 10, 8), False), ("3.11.28", (3, 11, 28), False),
    ("3.12.0", (3, 12, 0), True), ("3.13.7", (3, 13, 7), True),
    ("4.0.0-rc.1", (4, 0, 0), True), (b"3.12.4", (3, 12, 4), True), (None, None, False),
    ("garbage", None, False),
])
def test_which_brokers_take_a_per_queue_consumer_timeout(text: object, version: object,
                                                         supported: bool) -> None:
    assert parse_version(text) == version
    assert per_queue_supported(parse_version(text)) is supported


def test_the_policy_covers_exactly_the_operations_consumed_queues() -> None:
    body = policy("a.b", definition(timeout=600), 1800)
    assert body is not None
    pattern = re.compile(body["pattern"])
    assert [q for q in ("sb.op.a.b", "sb.solo.a.b", "sb.op.a.bc", "sb.op.aXb",
                        "sb.retry.a.b.1000", "sb.dead.a.b", "x.sb.op.a.b")
            if pattern.search(q)] == ["sb.op.a.b", "sb.solo.a.b"]
    assert body["apply-to"] == "queues"
    # Its longest hold (4 runs of 600 s on this machine's defaults, or more on fewer
    # cores) plus a minute.
    hold = delivery_hold(definition(timeout=600), *_defaults(definition(timeout=600)))
    assert body["definition"] == {"consumer-timeout": int((hold + 60) * 1000)}
    assert policy("a.b", definition(timeout=60), 1800) is None
    assert policy("a.b", definition(timeout=None), 1800) is None


def _defaults(parsed: object) -> tuple[int, int]:
    from streamboss.manager.consumer_timeout import agent_defaults

    return agent_defaults(parsed)  # type: ignore[arg-type]


def test_this_broker_says_its_version(broker_url: str) -> None:
    handle = Broker(broker_url)
    try:
        version = handle.server_version()
    finally:
        handle.close()
    assert version is not None and version >= (3, 8)


# -- through a real manager (RabbitMQ 3.10 here: refusals) ------------------------------


def refused(result: subprocess.CompletedProcess[str], *words: str) -> str:
    lines = result.stderr.strip().splitlines()
    assert result.returncode == EXIT_ERROR and len(lines) == 1, (result.returncode,
                                                                 result.stderr)
    for word in words:
        assert word in lines[0], lines[0]
    return lines[0]


def test_define_process_refuses_a_timeout_above_the_brokers(managers: ManagerPool,
                                                            tmp_path) -> None:
    manager = managers.new()
    manager.extra_env[CONSUMER_TIMEOUT_ENV] = "100"
    manager.start()
    long_run = tmp_path / "long.json"
    long_run.write_text('{"exec": "cat", "timeout": 200, "name": "long", "mode": "service"}')
    refused(manager.cli("define-process", str(long_run)), "'timeout' 200s",
            "consumer timeout of 100s", "at most 100", CONSUMER_TIMEOUT_ENV)
    # Per-message, one child: the window of 16 makes 30 s a 480 s hold.
    queued = tmp_path / "queued.json"
    queued.write_text('{"exec": "cat", "timeout": 30, "concurrency": 1, "name": "queued"}')
    refused(manager.cli("define-process", str(queued)), "480s", "16 runs", "at most 6")
    # The seed's own registration call is refused the same way.
    seed = manager.api("POST", "/api/process_definition/", json={"definition": {
        "exec": "cat", "timeout": 200, "name": "seed", "mode": "service"}})
    assert seed.status_code == 400 and "consumer timeout of 100s" in seed.json()["detail"]
    assert manager.api("GET", "/v1/definitions").json() == []
    # What fits is stored.
    fits = tmp_path / "fits.json"
    fits.write_text('{"exec": "cat", "timeout": 5, "concurrency": 4, "name": "fits"}')
    assert manager.cli("define-process", str(fits)).returncode == 0


def test_create_operation_checks_a_stored_definition_against_this_broker(
        managers: ManagerPool, broker, tmp_path) -> None:
    # Defined where the limit was larger; the manager then learns the broker's real one.
    manager = managers.new()
    manager.extra_env[CONSUMER_TIMEOUT_ENV] = "100000"
    manager.start()
    source, operation = managers.name("in"), managers.name("long")
    manager.ok("create-stream", source)
    slow = tmp_path / "slow.json"
    slow.write_text('{"exec": "cat", "timeout": 3000, "name": "slow", "mode": "service"}')
    manager.ok("define-process", str(slow))
    assert manager.stop() == 0
    manager.extra_env[CONSUMER_TIMEOUT_ENV] = "1800"
    manager.start()
    refused(manager.cli("create-operation", operation, "slow", source, managers.name("out")),
            "'timeout' 3000s", "consumer timeout of 1800s", "at most 1800")
    assert manager.api("GET", "/v1/operations").json() == []
    assert broker.queue_depth(op_queue(operation)) is None


def test_a_bad_limit_stops_the_manager_in_one_line(tmp_path) -> None:
    result = run_cli([*MANAGER, "manager", "--port", str(free_port()), "--state-dir",
                      str(tmp_path / "state")], env={CONSUMER_TIMEOUT_ENV: "half an hour"})
    refused(result, CONSUMER_TIMEOUT_ENV, "'half an hour'")
    assert not (tmp_path / "state").exists()


def test_a_standalone_agent_warns(tmp_path) -> None:
    # The broker is unreachable, so the agent stops right after the warning.
    result = run_cli([PYTHON, "-m", "streamboss.agent", "--operation", "op", "--input", "a",
                      "--output", "b", "--exec", "cat", "--timeout", "3000"],
                     env={"STREAMBOSS_BROKER_URL": f"amqp://guest:guest@127.0.0.1:"
                                                   f"{free_port()}/%2F"})
    warnings = [line for line in result.stderr.splitlines() if "warning" in line]
    assert len(warnings) == 1, result.stderr
    assert "'timeout' 3000s" in warnings[0] and "consumer timeout of 1800s" in warnings[0]
    bad = run_cli([PYTHON, "-m", "streamboss.agent", "--operation", "op", "--input", "a",
                   "--output", "b", "--exec", "cat"], env={CONSUMER_TIMEOUT_ENV: "x"})
    refused(bad, CONSUMER_TIMEOUT_ENV)
