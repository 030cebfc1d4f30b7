"""The chaos run (``tools/chaos``) at a small N, as CI runs it: every kind of fault at
least once -- agents killed, an agent's connection closed through the management
API, the manager restarted with SIGTERM and with SIGKILL, the broker restarted, an
agent-killing message -- and still nothing lost, the poison dead-lettered within
max_attempts. The run restarts the shared broker: other users of it see their
connections drop for a few seconds.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from .requirements import require

ROOT = Path(__file__).resolve().parents[1]
# Small enough for CI, large enough that every fault lands on a loaded chain.
MESSAGES = 2000
# A failed run must still end well inside pytest's own timeout.
RUN_TIMEOUT = 240

pytestmark = pytest.mark.slow


def _rabbitmqctl_problem() -> str | None:
    if shutil.which("rabbitmqctl") is None:
        return "rabbitmqctl is not installed here (the chaos run restarts the broker with it)"
    # Its own session, killed whole on a timeout: the script's Erlang VM would outlive it.
    process = subprocess.Popen(["rabbitmqctl", "-q", "status"], stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        code = process.wait(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
        return "rabbitmqctl status did not answer within 60 s: is the broker healthy?"
    if code != 0:
        return "rabbitmqctl cannot reach the broker as this user (run the tests as root)"
    return None


def test_nothing_is_lost_under_every_kind_of_fault(tmp_path: Path) -> None:
    problem = _rabbitmqctl_problem()
    require(problem is None, problem or "")
    figures = tmp_path / "chaos.json"
    argv = [sys.executable, str(ROOT / "tools" / "chaos" / "run.py"),
            "--messages", str(MESSAGES), "--kills", "2", "--closes", "1",
            "--manager-restarts", "2", "--broker-restarts", "1",
            "--fault-gap", "20", "--wait", "90",
            "--work-dir", str(tmp_path / "work"), "--json", str(figures)]
    result = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True,
                            timeout=RUN_TIMEOUT)
    output = f"{result.stdout}\n{result.stderr[-3000:]}"
    print(result.stdout)  # the run's report: `pytest -rP` shows it for a passing run
    assert figures.exists(), output
    summary = json.loads(figures.read_text())

    assert summary["lost"] == 0, output
    assert summary["distinct_delivered"] == MESSAGES, output
    poison = summary["poison"]
    assert poison["dead_lettered"], output
    assert poison["sb_dead_attempts"] is not None, output
    assert 1 <= poison["sb_dead_attempts"] <= poison["max_attempts"], output
    assert poison["program_runs"] <= poison["max_attempts"], output
    planned, done = summary["faults_planned"], summary["faults_done"]
    assert all(planned[kind] >= 1 for kind in ("kill", "close", "manager", "broker",
                                               "poison")), planned
    assert done == planned, output
    assert [f["target"] for f in summary["faults"] if f["kind"] == "manager"] \
        == ["SIGTERM", "SIGKILL"]
    assert summary["wrong_bodies"] == 0, output
    assert result.returncode == 0, output
