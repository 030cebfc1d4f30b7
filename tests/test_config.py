"""Process definitions and agent configuration: parsing, defaults, one-line errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from streamboss.agent.config import (
    DEFAULT_MAX_ATTEMPTS,
    DEFAULT_SERVICE_PREFETCH,
    DEFAULT_TIMEOUT,
    ConfigError,
    build_config,
    parse_definition,
    read_file,
    redact,
)

SEED = {"definition": {"exec": "tr [a-z] [A-Z]", "application": "tr", "name": "upper"}}


# -- parse_definition ------------------------------------------------------------


def test_seed_form_is_accepted_as_is() -> None:
    definition = parse_definition(SEED)
    assert definition.exec == "tr [a-z] [A-Z]"
    assert definition.application == "tr"
    assert definition.name == "upper"
    assert definition.argv == ["tr", "[a-z]", "[A-Z]"]


def test_seed_form_gets_the_documented_defaults() -> None:
    definition = parse_definition(SEED)
    assert definition.mode == "per-message"
    assert definition.framing == "line"
    assert definition.out_framing == "line"
    assert definition.timeout == DEFAULT_TIMEOUT
    assert definition.max_attempts == DEFAULT_MAX_ATTEMPTS
    assert definition.shell is False


def test_inner_object_equals_seed_form() -> None:
    assert parse_definition(SEED["definition"]) == parse_definition(SEED)


def test_seed_json_text_round_trip() -> None:
    assert parse_definition(json.loads(json.dumps(SEED))).argv[0] == "tr"


def test_fuller_form_with_hyphenated_fields() -> None:
    definition = parse_definition({
        "exec": "python3 -u filter.py", "mode": "service", "framing": "length",
        "output-framing": "line", "timeout": 2.5, "max-attempts": 5,
        "env": {"LANG": "C", "N": 3}, "concurrency": 4,
    })
    assert definition.mode == "service"
    assert definition.framing == "length"
    assert definition.out_framing == "line"
    assert definition.timeout == 2.5
    assert definition.max_attempts == 5
    assert definition.env == {"LANG": "C", "N": "3"}
    assert definition.concurrency == 4


def test_output_framing_defaults_to_input_framing() -> None:
    assert parse_definition({"exec": "cat", "framing": "length"}).out_framing == "length"


def test_exec_is_split_like_a_shell_without_running_one() -> None:
    definition = parse_definition({"exec": "convert - -resize \"50%\" -"})
    assert definition.argv == ["convert", "-", "-resize", "50%", "-"]
    assert parse_definition({"exec": "echo 'a b' $HOME"}).argv == ["echo", "a b", "$HOME"]


def test_shell_runs_the_command_with_sh() -> None:
    definition = parse_definition({"exec": "tr a-z A-Z | rev", "shell": True})
    assert definition.argv == ["/bin/sh", "-c", "tr a-z A-Z | rev"]


def test_exec_may_be_a_list() -> None:
    assert parse_definition({"exec": ["tr", "a b", "c d"]}).argv == ["tr", "a b", "c d"]


@pytest.mark.parametrize("data, message", [
    ({}, "missing 'exec'"),
    ({"definition": {"name": "x"}}, "missing 'exec'"),
    ({"exec": ""}, "missing 'exec'"),
    ({"exec": "   "}, "missing 'exec'"),
    ({"exec": 42}, "'exec' must be a command line or a list of strings, not int"),
    ({"exec": []}, "list must hold strings"),
    ({"exec": ["tr", 1]}, "list must hold strings"),
    ({"exec": "tr 'a-z"}, "cannot be split"),
    ({"exec": "cat", "mode": "batch"}, "unknown mode 'batch'"),
    ({"exec": "cat", "framing": "json"}, "unknown framing 'json'"),
    ({"exec": "cat", "output_framing": "xml"}, "unknown output_framing 'xml'"),
    ({"exec": "cat", "timeout": "soon"}, "timeout must be a number"),
    ({"exec": "cat", "timeout": True}, "timeout must be a number"),
    ({"exec": "cat", "timeout": 0}, "timeout must be at least"),
    ({"exec": "cat", "timeout": -1}, "timeout must be at least"),
    ({"exec": "cat", "max_attempts": 0}, "max_attempts must be at least 1"),
    ({"exec": "cat", "max_attempts": 2.5}, "max_attempts must be a whole number"),
    ({"exec": "cat", "concurrency": 0}, "concurrency must be at least 1"),
    ({"exec": "cat", "env": ["A=1"]}, "'env' must map names to values"),
    ({"exec": "cat", "comand": "x"}, "unknown field\\(s\\) comand"),
    ("tr a-z A-Z", "must be a JSON object"),
    ([{"exec": "cat"}], "must be a JSON object"),
])
def test_bad_definitions_name_the_problem(data: object, message: str) -> None:
    with pytest.raises(ConfigError, match=message) as caught:
        parse_definition(data)
    assert "\n" not in str(caught.value)


def test_unknown_field_error_lists_the_allowed_ones() -> None:
    with pytest.raises(ConfigError) as caught:
        parse_definition({"exec": "cat", "retries": 3})
    assert "retries" in str(caught.value)
    assert "max_attempts" in str(caught.value)


# -- build_config ----------------------------------------------------------------


def build(definition: dict | None = None, file_values: dict | None = None,
          operation: str | None = "upper", source: str | None = "in",
          sink: str | None = "out", **kwargs: object):
    return build_config(operation, source, sink, definition or {"exec": "cat"},
                        file_values or {}, **kwargs)


def test_build_config_names_and_definition() -> None:
    config = build({"exec": "tr a-z A-Z"})
    assert (config.operation, config.input, config.output) == ("upper", "in", "out")
    assert config.definition.argv == ["tr", "a-z", "A-Z"]


def test_missing_names_are_listed_by_flag() -> None:
    with pytest.raises(ConfigError) as caught:
        build(operation=None, sink=None)
    assert "--operation" in str(caught.value)
    assert "--output" in str(caught.value)
    assert "--input" not in str(caught.value)


@pytest.mark.parametrize("operation, source, sink, kind", [
    ("Upper", "in", "out", "operation"),
    ("up per", "in", "out", "operation"),
    ("upper", "-in", "out", "input stream"),
    ("upper", "in", "o" * 64, "output stream"),
    ("upper", "in", "sb/out", "output stream"),
])
def test_invalid_names_are_refused(operation: str, source: str, sink: str, kind: str) -> None:
    with pytest.raises(ConfigError, match=f"{kind} name .* is invalid"):
        build(operation=operation, source=source, sink=sink)


def test_longest_valid_name_is_accepted() -> None:
    assert build(operation="a" * 63).operation == "a" * 63


def test_config_file_supplies_operation_and_definition() -> None:
    config = build_config(None, None, None, {}, {
        "broker_url": "amqp://u:p@broker.example:5672/%2F",
        "operation": {"name": "waffle", "input": "breakfast", "output": "better", "prefetch": 7,
                      "drain_timeout": 3},
        "definition": {"exec": "cat", "mode": "service"},
    })
    assert (config.operation, config.input, config.output) == ("waffle", "breakfast", "better")
    assert config.definition.mode == "service"
    assert config.window == 7
    assert config.drain_timeout == 3.0


def test_config_file_may_hold_the_seed_definition() -> None:
    config = build_config("upper", "in", "out", {}, {"definition": SEED})
    assert config.definition.name == "upper"
    assert config.definition.argv == ["tr", "[a-z]", "[A-Z]"]


def test_command_line_values_override_the_file() -> None:
    config = build_config("cli-op", "in", "out", {"mode": "service", "timeout": 9}, {
        "operation": {"name": "file-op", "input": "x", "output": "y"},
        "definition": {"exec": "cat", "mode": "per-message", "timeout": 1},
    })
    assert config.operation == "cli-op"
    assert config.input == "in"
    assert config.definition.mode == "service"
    assert config.definition.timeout == 9.0


def test_default_window_service_and_per_message() -> None:
    assert build({"exec": "cat", "mode": "service"}).window == DEFAULT_SERVICE_PREFETCH
    per_message = build({"exec": "cat", "concurrency": 3})
    assert per_message.concurrency == 3
    assert per_message.window == 16  # at least 16: acks wait for confirms
    assert build({"exec": "cat", "concurrency": 8}).window == 32
    assert build({"exec": "cat"}, prefetch=11).window == 11


def test_negative_prefetch_is_refused() -> None:
    with pytest.raises(ConfigError, match="prefetch"):
        build(prefetch=-1)


def test_broker_url_environment_beats_the_file(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("STREAMBOSS_BROKER_URL", "amqp://env:pw@envhost:5672/%2F")
    config = build(file_values={"broker_url": "amqp://file:pw@filehost:5672/%2F"})
    assert config.broker_url == "amqp://env:pw@envhost:5672/%2F"
    monkeypatch.delenv("STREAMBOSS_BROKER_URL")
    assert build(file_values={"broker_url": "amqp://f@filehost/%2F"}).broker_url == \
        "amqp://f@filehost/%2F"
    assert build().broker_url == "amqp://guest:guest@127.0.0.1:5672/%2F"


def test_redact_hides_the_password_only() -> None:
    assert redact("amqp://bob:s3cret@rabbit.example:5671/prod") == \
        "amqp://bob:***@rabbit.example:5671/prod"
    assert "s3cret" not in redact("amqps://bob:s3cret@rabbit.example/%2F")
    assert redact("amqp://rabbit.example/%2F") == "amqp://rabbit.example/%2F"


# -- read_file -------------------------------------------------------------------


def test_read_toml_and_json(tmp_path: Path) -> None:
    toml_file = tmp_path / "agent.toml"
    toml_file.write_text('[operation]\nname = "op"\n[definition]\nexec = "cat"\ntimeout = 5\n')
    assert read_file(toml_file) == {"operation": {"name": "op"},
                                    "definition": {"exec": "cat", "timeout": 5}}
    json_file = tmp_path / "seed.json"
    json_file.write_text(json.dumps(SEED))
    assert read_file(json_file) == SEED


@pytest.mark.parametrize("name, text, message", [
    ("bad.toml", "[operation\nname=", "not valid TOML"),
    ("bad.json", "{\"definition\": ", "not valid JSON"),
    ("list.json", "[1, 2]", "object at the top level"),
])
def test_read_file_errors(tmp_path: Path, name: str, text: str, message: str) -> None:
    path = tmp_path / name
    path.write_text(text)
    with pytest.raises(ConfigError, match=message):
        read_file(path)


def test_read_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"cannot read .*nope\.json"):
        read_file(tmp_path / "nope.json")
