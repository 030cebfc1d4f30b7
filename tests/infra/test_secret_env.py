"""A definition's env values on AWS: a Pulumi secret from the manager to the agent node.

The manager writes them masked into ``streamboss:operations`` and as the secret
``streamboss:operationsEnv`` (on the Pulumi CLI's stdin, never its argv); the
program reads that secret and puts the values into the agents' user data,
which is a secret too, written on the node as 0600 files.
"""

from __future__ import annotations

import base64
import json
import os
import sys
from pathlib import Path
from typing import Any

import pulumi
import pytest

from infra.__main__ import build
from infra.operations import OperationConfigError, operation_env, parse_operations
from infra.user_data import agent_user_data, manager_user_data
from streamboss.manager.model import MASKED, Definition, Operation
from streamboss.manager.pulumi_stack import ConfigSetError, PulumiStack, write_secret_config
from streamboss.manager.stack_config import ENV_CONFIG_KEY, StackConfig, stack_config

from .conftest import PASSWORD, SECRET_KEYS, TOKEN, is_secret, plain, sample_declarations

VALUE = "env-value-that-must-stay-secret-7f3a"


def declarations_with_env() -> tuple[list[Operation], dict[int, Definition]]:
    operations, definitions = sample_declarations()
    upper = definitions[1]
    definitions[1] = Definition(upper.id, upper.name, upper.version,
                                {**upper.body, "env": {"API_KEY": VALUE, "LEVEL": "3"}}, "")
    return operations, definitions


# -- the manager's side: two values, one of them secret ---------------------------------------


def test_env_values_leave_the_plain_config_and_go_to_the_secret_one():
    config = stack_config(*declarations_with_env())
    assert VALUE not in config.operations
    upper = next(e for e in json.loads(config.operations) if e["name"] == "upper")
    assert upper["definition"]["env"] == {"API_KEY": MASKED, "LEVEL": MASKED}
    assert json.loads(config.env) == {"upper": {"API_KEY": VALUE, "LEVEL": "3"}}
    assert VALUE not in repr(config)
    # The digest shown in status is of the plain value only.
    assert config.digest == StackConfig(config.operations, "{}").digest


def test_the_texts_are_byte_identical_for_the_same_declarations():
    operations, definitions = declarations_with_env()
    first = stack_config(operations, definitions)
    again = stack_config(list(reversed(operations)), dict(reversed(list(definitions.items()))))
    assert (again.operations.encode(), again.env.encode()) == (first.operations.encode(),
                                                               first.env.encode())
    assert again == first


def test_a_changed_env_value_changes_only_the_secret_value():
    operations, definitions = declarations_with_env()
    before = stack_config(operations, definitions)
    upper = definitions[1]
    definitions[1] = Definition(upper.id, upper.name, upper.version,
                                {**upper.body, "env": {"API_KEY": "rotated", "LEVEL": "3"}}, "")
    after = stack_config(operations, definitions)
    assert after.operations == before.operations
    assert after.env != before.env and after != before  # so the dispatcher applies it


class Recorder:
    """A fake ``pulumi.automation`` with the secret writer PulumiStack takes."""

    def __init__(self) -> None:
        self.calls: list[tuple[Any, ...]] = []

    class ConfigValue:
        def __init__(self, value: str, secret: bool = False) -> None:
            self.value, self.secret = value, secret

    def select_stack(self, stack_name: str, work_dir: str) -> Recorder:
        return self

    def set_config(self, key: str, value: Any, path: bool = False) -> None:
        self.calls.append(("set_config", key, value.value, value.secret))

    def set_secret(self, stack: str, key: str, value: str) -> None:
        self.calls.append(("set_secret", key, value))

    def preview(self, **_kwargs: Any) -> Any:
        return None

    def up(self, **_kwargs: Any) -> Any:
        return None


def test_the_stack_gets_the_values_as_a_secret_and_nowhere_else(tmp_path: Path):
    config = stack_config(*declarations_with_env())
    auto = Recorder()
    PulumiStack("o/p/s", tmp_path, auto, auto.set_secret).apply(config)
    assert auto.calls == [("set_config", "streamboss:operations", config.operations, False),
                          ("set_secret", ENV_CONFIG_KEY, config.env)]
    plain_calls = [c for c in auto.calls if c[0] == "set_config"]
    assert VALUE not in json.dumps(plain_calls)


STAND_IN = """#!{python}
import json, sys
record = {{"argv": sys.argv[1:], "stdin": sys.stdin.read()}}
with open({log!r}, "a") as log:
    log.write(json.dumps(record) + "\\n")
if "--fail" in {flags!r}:
    print("error: passphrase must be set with PULUMI_CONFIG_PASSPHRASE", file=sys.stderr)
    sys.exit(255)
"""


def stand_in_cli(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, *flags: str) -> Path:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    log = tmp_path / "calls.jsonl"
    cli = bin_dir / "pulumi"
    cli.write_text(STAND_IN.format(python=sys.executable, log=str(log), flags=list(flags)))
    cli.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    return log


def test_the_secret_goes_to_the_cli_on_stdin_never_in_its_arguments(tmp_path: Path,
                                                                       monkeypatch):
    log = stand_in_cli(tmp_path, monkeypatch)
    text = stack_config(*declarations_with_env()).env
    write_secret_config(tmp_path, "acme/streamboss/dev", ENV_CONFIG_KEY, text)
    (call,) = [json.loads(line) for line in log.read_text().splitlines()]
    assert call["argv"] == ["config", "set", ENV_CONFIG_KEY, "--secret", "--stack",
                            "acme/streamboss/dev"]
    assert call["stdin"] == text
    assert VALUE not in json.dumps(call["argv"])


def test_a_refused_secret_is_pulumis_error_line_without_the_value(tmp_path: Path, monkeypatch):
    stand_in_cli(tmp_path, monkeypatch, "--fail")
    config = stack_config(*declarations_with_env())
    with pytest.raises(Exception) as caught:
        PulumiStack("o/p/s", tmp_path, Recorder()).apply(config)
    assert "config failed: error: passphrase must be set" in str(caught.value)
    assert VALUE not in str(caught.value)
    with pytest.raises(ConfigSetError) as direct:
        write_secret_config(tmp_path, "o/p/s", ENV_CONFIG_KEY, config.env)
    assert VALUE not in str(direct.value)


# -- the program: the secret read as one and kept one -------------------------------------------


def program_config(env_text: str | None) -> dict[str, str]:
    config = stack_config(*declarations_with_env())
    values = {"streamboss:brokerPassword": PASSWORD, "streamboss:managerToken": TOKEN,
              "streamboss:operations": config.operations}
    if env_text is not None:
        values[ENV_CONFIG_KEY] = env_text
    return values


def run_with(stack, values: dict[str, str]) -> None:
    pulumi.runtime.set_all_config(values, [*SECRET_KEYS, ENV_CONFIG_KEY])
    stack.run(lambda: build(pulumi.Config()).broker.endpoint)


def agent_files(template: Any) -> dict[str, dict[str, Any]]:
    text = base64.b64decode(plain(template.inputs["userData"])).decode()
    document = json.loads(text.partition("\n")[2])
    return {Path(f["path"]).name: f for f in document["write_files"]}


def test_agents_get_the_real_values_in_secret_user_data(stack):
    run_with(stack, program_config(stack_config(*declarations_with_env()).env))
    template = stack.named("agents-upper-lt")
    assert is_secret(template.inputs["userData"])
    files = agent_files(template)
    agent = json.loads(files["agent.json"]["content"])
    assert agent["definition"]["env"] == {"API_KEY": VALUE, "LEVEL": "3"}
    # The files on the node: 0600, the env file root's, the agent's config its user's.
    assert {name: (f["owner"], f["permissions"]) for name, f in files.items()} == {
        "agent.json": ("streamboss:streamboss", "0600"), "agent.env": ("root:root", "0600"),
        "lifecycle.env": ("root:root", "0600")}
    # Nowhere in clear: every input that holds the value holds it as a secret.
    for item in stack.declared:
        assert VALUE not in json.dumps(strip(item.inputs)), item.name
    # The other operations have no env at all.
    count = json.loads(agent_files(stack.named("agents-count-lt"))["agent.json"]["content"])
    assert "env" not in count["definition"]


def test_the_program_reads_the_env_as_a_secret_even_when_not_marked(stack):
    values = program_config(stack_config(*declarations_with_env()).env)
    pulumi.runtime.set_all_config(values, SECRET_KEYS)   # operationsEnv not marked secret
    stack.run(lambda: build(pulumi.Config()).broker.endpoint)
    assert is_secret(stack.named("agents-upper-lt").inputs["userData"])


def test_a_masked_value_without_its_secret_fails_naming_the_operation_and_name(stack):
    with pytest.raises(Exception) as caught:
        run_with(stack, program_config(None))
    assert "operation 'upper': env API_KEY, LEVEL has no value in operationsEnv" in str(
        caught.value)


def strip(value: Any) -> Any:
    if is_secret(value):
        return "[secret]"
    if isinstance(value, dict):
        return {k: strip(v) for k, v in value.items()}
    if isinstance(value, list):
        return [strip(v) for v in value]
    return value


# -- the pure parts --------------------------------------------------------------------------


def spec_with(env: Any) -> Any:
    (spec,) = parse_operations([{
        "name": "op", "input": "a", "output": "b", "min": 0, "max": 1,
        "definition": {"exec": "cat", **({"env": env} if env is not None else {})},
        "target_backlog_per_agent": 1, "scale_out_cooldown": 0, "scale_in_cooldown": 0,
        "idle_seconds": 0}])
    return spec


@pytest.mark.parametrize(("env", "secret", "expected"), [
    (None, None, {}),
    ({"A": MASKED}, {"op": {"A": "x"}}, {"A": "x"}),
    ({"A": "by-hand"}, None, {"A": "by-hand"}),
    ({"A": "by-hand"}, {"op": {"A": "secret"}}, {"A": "secret"}),
    ({}, {"op": {"B": "extra"}, "other": {"C": "y"}}, {"B": "extra"}),
])
def test_operation_env_merges_names_and_values(env, secret, expected):
    assert operation_env(spec_with(env), secret) == expected


@pytest.mark.parametrize(("env", "secret", "message"), [
    ({"A": MASKED}, {}, "env A has no value in operationsEnv"),
    ({"A": MASKED}, ["x"], "operationsEnv must map operation names"),
    ({"A": MASKED}, {"op": {"A": {"nested": 1}}}, "operationsEnv.op must map names to values"),
    (["A"], None, "definition 'env' must map names to values"),
])
def test_operation_env_refuses_without_showing_values(env, secret, message):
    with pytest.raises(OperationConfigError) as caught:
        operation_env(spec_with(env), secret)
    assert message in str(caught.value)
    assert "nested" not in str(caught.value)


def test_every_file_user_data_writes_is_0600():
    agent = agent_user_data(operation="op", input_stream="a", output_stream="b",
                            definition={"exec": "cat", "env": {"K": VALUE}},
                            object_store="s3://o/operations", broker_url_parameter="/p",
                            region="eu-west-1")
    manager = manager_user_data(broker_url_parameter="/p", token_parameter="/t",
                                management_url="https://m", archive_store="s3://a",
                                object_store="s3://o/streams", api_port=8181,
                                state_device="/dev/xvdf", region="eu-west-1", stack="dev")
    for text in (agent, manager):
        for written in json.loads(text.partition("\n")[2])["write_files"]:
            assert written["permissions"] == "0600", written["path"]
            if written["path"].endswith(".env"):
                assert written["owner"] == "root:root", written["path"]
