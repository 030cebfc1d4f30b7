"""Each process the manager starts gets its own role's broker user.

A self-hosted broker (ansible/roles/rabbitmq) has one user per role; the stream
manager role hands the manager the agents' and archivers' URLs in
STREAMBOSS_AGENT_BROKER_URL and STREAMBOSS_ARCHIVER_BROKER_URL. The local dispatcher
gives an agent the agent URL and an archiver the archiver URL as their
STREAMBOSS_BROKER_URL, and neither child inherits the other variables. Proved with
real children: users the broker does not know, so each refusal line names (redacted)
the user the child really used.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from streamboss.manager.dispatch_local import (
    AGENT_BROKER_URL_ENV,
    ARCHIVER_BROKER_URL_ENV,
    LocalDispatcher,
)
from streamboss.manager.model import Archive, Definition, Operation

from .conftest import wait_until


def _log(path: Path) -> str:
    return path.read_text() if path.exists() else ""


@pytest.mark.parametrize("own_urls", [True, False])
def test_agents_and_archivers_get_their_own_roles_broker_user(tmp_path, monkeypatch,
                                                              broker_url, own_urls):
    run = tmp_path.name[-8:].replace("_", "-").lower()
    agent_user, archiver_user = f"t-agent-user-{run}", f"t-archiver-user-{run}"
    manager_url = f"amqp://t-manager-user-{run}:pw-m@127.0.0.1:5672/%2F"
    if own_urls:
        monkeypatch.setenv(AGENT_BROKER_URL_ENV, f"amqp://{agent_user}:pw-a@127.0.0.1:5672/%2F")
        monkeypatch.setenv(ARCHIVER_BROKER_URL_ENV,
                           f"amqp://{archiver_user}:pw-r@127.0.0.1:5672/%2F")
    state = tmp_path / "state"
    dispatcher = LocalDispatcher(state, manager_url)
    definition = Definition(1, "d", 1, {"exec": "cat"}, "")
    operation = Operation("t-users-op", 1, "t-users-in", "t-users-out")
    archive = Archive("t-users-in", f"file://{tmp_path / 'archive'}")
    try:
        dispatcher.scale(operation, definition, 1)
        dispatcher.run_archiver(archive, True)
        logs = {"agent": state / "logs" / "t-users-op.log",
                "archiver": state / "logs" / "archive@t-users-in.log"}
        wait_until(lambda: all("error" in _log(p) for p in logs.values()), 60,
                   "both children refused by the broker")
    finally:
        dispatcher.stop_all(timeout=20)
    agent_log, archiver_log = _log(logs["agent"]), _log(logs["archiver"])
    if own_urls:
        assert f"{agent_user}:***@" in agent_log and archiver_user not in agent_log, agent_log
        assert f"{archiver_user}:***@" in archiver_log and agent_user not in archiver_log
        assert "t-manager-user" not in agent_log + archiver_log
    else:
        # Without them, both use the manager's URL, as before.
        assert f"t-manager-user-{run}:***@" in agent_log
        assert f"t-manager-user-{run}:***@" in archiver_log
    for text in (agent_log, archiver_log):
        assert "pw-a" not in text and "pw-r" not in text and "pw-m" not in text
