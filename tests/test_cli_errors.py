"""Bad configuration fails fast with one line on stderr and a non-zero exit."""

from __future__ import annotations

import json
import socket
import sys
from pathlib import Path

import pytest

from .conftest import BROKER_URL, PYTHON, run_cli

BIN = Path(sys.executable).parent
AGENT = [PYTHON, "-m", "streamboss.agent"]


def one_line(stderr: str) -> str:
    """The whole of stderr is one line; return it."""
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1, f"expected a one-line error, got:\n{stderr}"
    assert "Traceback" not in stderr
    return lines[0]


def agent_error(result) -> str:
    """A refused configuration: exit status 2 and one ``stream-agent: error:`` line."""
    assert result.returncode == 2, (result.returncode, result.stderr)
    assert result.stdout == ""
    line = one_line(result.stderr)
    assert line.startswith("stream-agent: error: "), line
    return line


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture
def agent_cli(broker_url: str):
    def run(*args: str, env: dict[str, str] | None = None):
        return run_cli([*AGENT, *args], env={"STREAMBOSS_BROKER_URL": broker_url, **(env or {})})

    return run


def test_missing_exec(agent_cli) -> None:
    result = agent_cli("--operation", "op", "--input", "a", "--output", "b")
    line = agent_error(result)
    assert "missing 'exec'" in line


def test_missing_operation_and_streams(agent_cli) -> None:
    result = agent_cli("--exec", "cat")
    line = agent_error(result)
    assert "--operation" in line and "--input" in line and "--output" in line


def test_unknown_mode_flag(agent_cli) -> None:
    result = agent_cli("--operation", "op", "--input", "a", "--output", "b", "--exec", "cat",
                       "--mode", "batch")
    line = agent_error(result)
    assert "batch" in line and "per-message" in line and "service" in line


def test_unknown_framing_flag(agent_cli) -> None:
    result = agent_cli("--operation", "op", "--input", "a", "--output", "b", "--exec", "cat",
                       "--mode", "service", "--framing", "json")
    line = agent_error(result)
    assert "json" in line and "line" in line and "length" in line


@pytest.mark.parametrize("field, value, words", [
    ("mode", "batch", ["unknown mode", "batch", "per-message", "service"]),
    ("framing", "json", ["unknown framing", "json", "line", "length"]),
    ("output_framing", "xml", ["unknown output_framing", "xml"]),
    ("retries", 3, ["unknown field", "retries"]),
])
def test_bad_definition_file(agent_cli, tmp_path: Path, field: str, value: object,
                             words: list[str]) -> None:
    definition = tmp_path / "bad.json"
    definition.write_text(json.dumps({"definition": {"exec": "cat", field: value}}))
    result = agent_cli("--operation", "op", "--input", "a", "--output", "b",
                       "--definition", str(definition))
    line = agent_error(result)
    for word in words:
        assert word in line


def test_malformed_config_file(agent_cli, tmp_path: Path) -> None:
    config = tmp_path / "agent.toml"
    config.write_text("[operation\nname = 'x'\n")
    result = agent_cli("--config", str(config), "--exec", "cat")
    assert "not valid TOML" in agent_error(result)


def test_invalid_stream_name(agent_cli) -> None:
    result = agent_cli("--operation", "op", "--input", "Breakfast", "--output", "b",
                       "--exec", "cat")
    line = agent_error(result)
    assert "input stream name 'Breakfast' is invalid" in line


def test_unknown_program(agent_cli) -> None:
    result = agent_cli("--operation", "op", "--input", "a", "--output", "b",
                       "--exec", "no-such-program-3f9a --flag")
    line = agent_error(result)
    assert "no-such-program-3f9a" in line


def test_unreachable_broker_hides_the_password(tmp_path: Path) -> None:
    url = f"amqp://guest:hunter2-secret@127.0.0.1:{closed_port()}/%2F"
    result = run_cli([*AGENT, "--operation", "op", "--input", "a", "--output", "b",
                      "--exec", "cat"], env={"STREAMBOSS_BROKER_URL": url})
    line = agent_error(result)
    assert "cannot reach the broker" in line
    assert "STREAMBOSS_BROKER_URL" in line
    assert "hunter2-secret" not in result.stderr + result.stdout


def test_wrong_password_hides_the_password(broker_url: str) -> None:
    url = broker_url.replace("guest:guest@", "guest:wrong-pw-77@")
    assert "wrong-pw-77" in url
    result = run_cli([*AGENT, "--operation", "op", "--input", "a", "--output", "b",
                      "--exec", "cat"], env={"STREAMBOSS_BROKER_URL": url})
    line = agent_error(result)
    assert "credentials" in line
    assert "wrong-pw-77" not in result.stderr + result.stdout


def test_input_stream_does_not_exist(agent_cli, broker, names, streams) -> None:
    [sink] = streams("out")
    missing = names("nowhere")
    operation = names("op")
    broker.forget_operation(operation)
    result = agent_cli("--operation", operation, "--input", missing, "--output", sink,
                       "--exec", "cat")
    line = agent_error(result)
    assert "input stream" in line and missing in line
    # a typo in a stream name leaves no stray queue behind
    assert broker.queue_depth(f"sb.op.{operation}") is None


def test_output_stream_does_not_exist(agent_cli, broker, names, streams) -> None:
    [source] = streams("in")
    missing = names("nowhere")
    operation = names("op")
    broker.forget_operation(operation)
    result = agent_cli("--operation", operation, "--input", source, "--output", missing,
                       "--exec", "cat")
    line = agent_error(result)
    assert "output stream" in line and missing in line
    assert broker.queue_depth(f"sb.op.{operation}") is None


def test_broker_url_never_appears_in_argv_help() -> None:
    result = run_cli([str(BIN / "stream-agent"), "--help"])
    assert "--broker" not in result.stdout
    assert "STREAMBOSS_BROKER_URL" in result.stdout


@pytest.mark.parametrize("argv", [
    [str(BIN / "stream-agent"), "--help"],
    [str(BIN / "streamboss"), "agent", "--help"],
    [*AGENT, "--help"],
])
def test_help(argv: list[str]) -> None:
    result = run_cli(argv)
    assert result.returncode == 0, result.stderr
    for option in ("--operation", "--input", "--output", "--exec", "--mode", "--framing",
                   "--output-framing", "--timeout", "--max-attempts", "--prefetch",
                   "--definition", "--config", "--drain-timeout"):
        assert option in result.stdout
    assert "Usage:" in result.stdout


def test_streamboss_agent_runs_an_operation(broker, streams, names) -> None:
    """``streamboss agent`` is the same command: it reaches the broker and checks streams."""
    [source] = streams("in")
    missing = names("absent")
    operation = names("op")
    broker.forget_operation(operation)
    result = run_cli([str(BIN / "streamboss"), "agent", "--operation", operation,
                      "--input", source, "--output", missing, "--exec", "cat"],
                     env={"STREAMBOSS_BROKER_URL": BROKER_URL})
    assert result.returncode == 2
    assert missing in one_line(result.stderr)


def test_unknown_option(agent_cli) -> None:
    line = agent_error(agent_cli("--operation", "op", "--retries", "3"))
    assert "--retries" in line


def test_streamboss_agent_usage_error_is_one_line() -> None:
    result = run_cli([str(BIN / "streamboss"), "agent", "--operation", "op", "--input", "a",
                      "--output", "b", "--exec", "cat", "--mode", "batch"])
    assert result.returncode == 2
    line = one_line(result.stderr)
    assert "batch" in line and "per-message" in line


def test_a_broker_that_never_answers_is_one_line(tmp_path: Path) -> None:
    """A port that accepts connections but never speaks AMQP (a wedged broker, a wrong
    service): pika's handshake timeout is not an AMQP error, and was a traceback."""
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(8)
    try:
        port = silent.getsockname()[1]
        url = f"amqp://guest:hunter3-secret@127.0.0.1:{port}/%2F?stack_timeout=2"
        result = run_cli([str(BIN / "streamboss"), "publish", "somewhere", "hello"],
                         env={"STREAMBOSS_BROKER_URL": url})
    finally:
        silent.close()
    assert result.returncode == 2, result.stderr
    [line] = result.stderr.strip().splitlines()
    assert "cannot reach the broker" in line and "Traceback" not in result.stderr
    assert "hunter3-secret" not in result.stderr
