"""The OpenAPI document tells the truth: schemathesis, every check it has, against a real
manager on the real broker, finds nothing.

schemathesis generates requests from ``/openapi.json`` (valid ones and, for each
rule the document states, ones that break it) and checks every answer: no 5xx,
only documented status codes, content types and bodies; schema-valid data
accepted and invalid data refused; the token required where the document says
so; no undocumented method answered. ``schemathesis.toml`` at the root holds the
one allowance: the 400s of rules JSON Schema cannot state.

Safety: the manager under test is ``tests/inert_manager.py``, the same manager
whose local dispatcher starts no process, so none of the commands the fuzzer
writes into definitions can run here (an attempt would stop that manager, which
the test notices). Every name the fuzzer sent is remembered; at the end the
test deletes what it declared and then requires that no exchange or queue of
any of those names is left on the broker (quorum queues hold file handles).

Bounded for CI: ``STREAMBOSS_FUZZ_EXAMPLES`` examples per operation in the
fuzzing phase (default 40), a fixed seed (``STREAMBOSS_FUZZ_SEED`` to explore
others), stateful runs of a few short scenarios.
"""

from __future__ import annotations

import os
import secrets
import time
import tomllib
from collections import Counter
from collections.abc import Iterator
from typing import Any

import httpx
import hypothesis
import pika
import pytest
import schemathesis
from hypothesis.stateful import run_state_machine_as_test

from streamboss.agent.naming import NAME_PATTERN
from streamboss.manager.api import Manager, create_app

from .conftest import (
    PYTHON,
    ROOT,
    ManagerPool,
    ManagerProcess,
    pids_with_argument,
    wait_until,
)

EXAMPLES = int(os.environ.get("STREAMBOSS_FUZZ_EXAMPLES", "40"))
SEED = int(os.environ.get("STREAMBOSS_FUZZ_SEED", "20261202"))
STATEFUL_SCENARIOS = 10
# The manager under test takes this token (generated tokens are tested elsewhere): the
# schema is built when the module is collected, before any manager runs.
TOKEN = secrets.token_urlsafe(32)
STATEFUL_STEPS = 8
MANAGEMENT = "http://127.0.0.1:15672/api"
# How the manager names what a stream, operation or archive has on the broker.
QUEUE_PREFIXES = ("sb.op.", "sb.solo.", "sb.dead.", "sb.sub.archive.")
RETRY_PREFIX = "sb.retry."
STREAM_PREFIX = "sb.stream."


class Record:
    """What the fuzzer sent and got: every name it used, and the answers by status."""

    def __init__(self) -> None:
        self.names: set[str] = set()
        self.statuses: Counter[str] = Counter()
        self.created: Counter[str] = Counter()

    def note(self, case: schemathesis.Case) -> None:
        for value in (case.path_parameters or {}, case.query or {}, case.body):
            self._collect(value, depth=0)

    def _collect(self, value: Any, depth: int) -> None:
        if isinstance(value, str):
            if NAME_PATTERN.fullmatch(value):
                self.names.add(value)
        elif isinstance(value, dict) and depth < 3:
            for item in value.values():
                self._collect(item, depth + 1)
        elif isinstance(value, list) and depth < 3:
            for item in value:
                self._collect(item, depth + 1)

    def answered(self, case: schemathesis.Case, status: int) -> None:
        label = f"{case.method.upper()} {case.path}"
        self.statuses[f"{label} {status}"] += 1
        if case.method.upper() == "POST" and status == 201:
            self.created[label] += 1


def broker_leftovers(names: set[str]) -> list[tuple[str, str]]:
    """(kind, name) of every exchange and queue on the broker that one of ``names`` owns."""
    auth = ("guest", "guest")
    exchanges = [e["name"] for e in httpx.get(f"{MANAGEMENT}/exchanges/%2F?columns=name",
                                              auth=auth, timeout=10).json()]
    queues = [q["name"] for q in httpx.get(f"{MANAGEMENT}/queues/%2F?columns=name",
                                           auth=auth, timeout=10).json()]
    found: list[tuple[str, str]] = []
    for exchange in exchanges:
        if exchange.startswith(STREAM_PREFIX):
            stream = exchange[len(STREAM_PREFIX):]
            if stream in names or (stream.endswith(".dead") and stream[:-5] in names):
                found.append(("exchange", exchange))
    for queue in queues:
        owner = next((queue[len(p):] for p in QUEUE_PREFIXES if queue.startswith(p)), None)
        if owner is None and queue.startswith(RETRY_PREFIX):
            owner = queue[len(RETRY_PREFIX):].rsplit(".", 1)[0]
        if owner is not None and owner in names:
            found.append(("queue", queue))
    return found


def delete_everything(manager: ManagerProcess) -> None:
    """Remove every declaration of ``manager`` through its API (and so from the broker)."""
    for operation in manager.api("GET", "/v1/operations").json():
        manager.api("DELETE", f"/v1/operations/{operation['name']}")
    for archive in manager.api("GET", "/v1/archives").json():
        if archive["active"]:
            manager.api("DELETE", f"/v1/archives/{archive['stream']}")
    for stream in manager.api("GET", "/v1/streams").json():
        manager.api("DELETE", f"/v1/streams/{stream['name']}", params={"force": True})
    for definition in manager.api("GET", "/v1/definitions").json():
        manager.api("DELETE", f"/v1/definitions/{definition['id']}", params={"force": True})


@pytest.fixture(scope="module")
def record() -> Record:
    return Record()


@pytest.fixture(scope="module")
def inert_manager(module_managers: ManagerPool, broker_url: str,
                  record: Record) -> Iterator[ManagerProcess]:
    manager = module_managers.new(token=TOKEN)
    manager.command = [PYTHON, str(ROOT / "tests" / "inert_manager.py")]
    manager.start()
    try:
        yield manager
    finally:
        problems: list[str] = []
        if not manager.running():
            code = manager.proc.returncode if manager.proc else None
            problems.append(f"the inert manager stopped (exit {code}): did something try "
                            f"to start a process?\n{manager.log()[-2000:]}")
        else:
            delete_everything(manager)
        started = pids_with_argument(str(manager.state_dir / "agents"))
        if started:
            problems.append(f"processes were started: {sorted(started)}")
        # delete-operation retires an operation's queues on the reconciler's next pass.
        try:
            wait_until(lambda: not broker_leftovers(record.names), 60,
                       "the fuzzed declarations' queues and exchanges to go")
        except AssertionError:
            left = broker_leftovers(record.names)
            problems.append(f"left on the broker: {left}")
            _delete(broker_url, left)
        print(f"\nfuzz: {sum(record.statuses.values())} requests, {len(record.names)} names "
              f"used; created {dict(record.created)}")
        assert not problems, "\n".join(problems)


def _delete(broker_url: str, objects: list[tuple[str, str]]) -> None:
    connection = pika.BlockingConnection(pika.URLParameters(broker_url))
    try:
        for kind, name in objects:
            channel = connection.channel()
            if kind == "queue":
                channel.queue_delete(name)
            else:
                channel.exchange_delete(name)
            channel.close()
    finally:
        connection.close()


def the_document() -> dict[str, Any]:
    """The manager's OpenAPI document as create_app makes it. The routes and schemas do
    not depend on what a manager holds, so an app over an empty one describes the same
    API; the test checks that the running manager serves exactly this."""
    empty = Manager(None, None, None, TOKEN)  # type: ignore[arg-type]
    return create_app(empty).openapi()


def fuzz_config() -> schemathesis.Config:
    """The checkout's schemathesis.toml (what `schemathesis run` from here reads), with this
    run's seed, token and example count."""
    settings = tomllib.loads((ROOT / "schemathesis.toml").read_text())
    config = schemathesis.Config.from_dict({**settings, "seed": SEED}, base_dir=str(ROOT))
    project = config.projects.override
    project.update(headers={"Authorization": f"Bearer {TOKEN}"})
    project.generation.update(max_examples=EXAMPLES, database="none")
    project.phases.stateful.max_steps = STATEFUL_STEPS
    return config


# Built when the module is collected, for schemathesis to make one test per operation;
# the calls go to the running manager (its URL is known only then).
DOCUMENT = the_document()
schema = schemathesis.openapi.from_dict(DOCUMENT, config=fuzz_config())


def test_the_running_manager_serves_this_document(inert_manager: ManagerProcess) -> None:
    served = httpx.get(f"{inert_manager.url}/openapi.json", timeout=10)
    assert served.status_code == 200
    assert served.json() == DOCUMENT


@schema.parametrize()
def test_every_answer_is_what_the_document_says(case: schemathesis.Case, record: Record,
                                                inert_manager: ManagerProcess) -> None:
    record.note(case)
    response = case.call_and_validate(base_url=inert_manager.url)
    record.answered(case, response.status_code)


def test_stateful_sequences_keep_the_document_too(record: Record,
                                                  inert_manager: ManagerProcess) -> None:
    """Chains of calls the document's links (or schemathesis's inference) allow: create,
    read, delete, read again (use after free, resources that should exist)."""

    class Machine(schema.as_state_machine()):  # type: ignore[misc]
        def get_call_kwargs(self, case: schemathesis.Case) -> dict[str, Any]:
            return {"base_url": inert_manager.url}

        def before_call(self, case: schemathesis.Case) -> None:
            record.note(case)

        def after_call(self, response: Any, case: schemathesis.Case) -> None:
            super().after_call(response, case)
            record.answered(case, response.status_code)

    started = time.monotonic()
    run_state_machine_as_test(Machine, settings=hypothesis.settings(
        max_examples=STATEFUL_SCENARIOS, stateful_step_count=STATEFUL_STEPS, deadline=None,
        database=None, derandomize=True,
        suppress_health_check=list(hypothesis.HealthCheck)))
    assert inert_manager.running()
    print(f"\nstateful: {STATEFUL_SCENARIOS} scenarios in {time.monotonic() - started:.1f}s")
