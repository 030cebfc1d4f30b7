"""The test suite says what it could not run.

Without RabbitMQ or its management API the test command stops at once with one
line (instead of each test waiting out its own timeout). A test whose machine
lacks what it needs skips with a reason outside CI and fails in CI.
"""

from __future__ import annotations

import socket
import subprocess
import sys

import pytest

from .conftest import ROOT, free_port
from .requirements import require

# A bound for a broken check, not a speed claim: the check itself waits a few seconds.
PYTEST_TIMEOUT = 120


def run_pytest(broker_url: str) -> subprocess.CompletedProcess[str]:
    """The test command on one broker-free module, against ``broker_url``."""
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
         "tests/test_framing.py"],
        cwd=ROOT, capture_output=True, text=True, timeout=PYTEST_TIMEOUT,
        env={"PATH": "/usr/bin:/bin", "STREAMBOSS_TEST_BROKER_URL": broker_url})


def test_no_broker_stops_the_tests_in_one_line() -> None:
    port = free_port()
    result = run_pytest(f"amqp://guest:guest@127.0.0.1:{port}/%2F")
    assert result.returncode == pytest.ExitCode.INTERRUPTED, result.stdout + result.stderr
    assert result.stdout == ""
    assert result.stderr.strip().splitlines() == [
        f"Exit: cannot run the tests: RabbitMQ is not listening on 127.0.0.1:{port} "
        "(Connection refused): start it with `rabbitmq-server -detached`"]


def test_a_management_api_that_refuses_stops_the_tests_in_one_line() -> None:
    # Something listens where the broker should be; the management API (the real one,
    # on every address) refuses a user it does not know.
    with socket.socket() as listener:
        listener.bind(("127.0.0.3", 0))
        listener.listen()
        port = listener.getsockname()[1]
        result = run_pytest(f"amqp://nobody:wrong@127.0.0.3:{port}/%2F")
    lines = result.stderr.strip().splitlines()
    assert result.returncode == pytest.ExitCode.INTERRUPTED, result.stdout + result.stderr
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("Exit: cannot run the tests: RabbitMQ's management API "
                               "answered 401 to nobody at http://127.0.0.3:15672/api/overview")


def test_a_missing_need_skips_outside_ci_and_fails_in_ci(
        monkeypatch: pytest.MonkeyPatch) -> None:
    require(True, "never shown")
    monkeypatch.delenv("CI", raising=False)
    with pytest.raises(pytest.skip.Exception, match="needs packer on PATH"):
        require(False, "needs packer on PATH (apt-get install packer)")
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception,
                       match="CI=true, so this test may not be skipped: needs packer on PATH"):
        require(False, "needs packer on PATH (apt-get install packer)")
