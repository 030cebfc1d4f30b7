"""Who may run and reach a manager: binding beyond loopback needs a token the operator
chose (then the API wants it on every call), and one state directory has one manager.
A loopback manager without STREAMBOSS_TOKEN generates one and wants it too: see
tests/test_manager_http_security.py."""

from __future__ import annotations

import httpx
import pytest

from .conftest import MANAGER, ManagerPool, free_port, run_cli

TOKEN = "t0ken-for-tests-5b1e"
SEED = {"definition": {"exec": "tr [a-z] [A-Z]", "application": "x", "name": "upper"}}


def test_a_non_loopback_bind_without_a_token_is_refused(tmp_path, broker_url: str) -> None:
    state = tmp_path / "state"
    result = run_cli([*MANAGER, "manager", "--host", "0.0.0.0", "--port", str(free_port()),
                      "--state-dir", str(state)],
                     env={"STREAMBOSS_BROKER_URL": broker_url, "STREAMBOSS_TOKEN": ""},
                     timeout=30)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode != 0
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("streamboss") and ": error: " in lines[0]
    assert "0.0.0.0" in lines[0] and "STREAMBOSS_TOKEN" in lines[0]


@pytest.fixture(scope="module")
def guarded(module_managers: ManagerPool):
    return module_managers.start(host="0.0.0.0", token=TOKEN)


def test_without_the_token_the_api_answers_401(guarded) -> None:
    for method, path, body in [("GET", "/v1/streams", None), ("GET", "/v1/status", None),
                               ("POST", "/v1/streams", {"name": "never"}),
                               ("POST", "/api/process_definition/", SEED)]:
        response = httpx.request(method, guarded.url + path, json=body, timeout=10)
        assert response.status_code == 401, (path, response.text)
        wrong = httpx.request(method, guarded.url + path, json=body, timeout=10,
                              headers={"Authorization": "Bearer not-the-token"})
        assert wrong.status_code == 401, (path, wrong.text)
    assert "never" not in {s["name"] for s in guarded.api("GET", "/v1/streams").json()}


def test_a_bearer_token_works(guarded, module_managers: ManagerPool) -> None:
    stream = module_managers.name("guarded")
    headers = {"Authorization": f"Bearer {TOKEN}"}
    created = httpx.post(f"{guarded.url}/v1/streams", json={"name": stream}, headers=headers,
                         timeout=10)
    assert created.status_code == 201, created.text
    listed = httpx.get(f"{guarded.url}/v1/streams", headers=headers, timeout=10)
    assert stream in {s["name"] for s in listed.json()}
    # The operator's token is theirs to keep: the manager writes no copy of it.
    assert not (guarded.state_dir / "manager.token").exists()
    assert TOKEN not in guarded.log()


def test_the_seed_call_may_send_the_token_as_basic_auth(guarded) -> None:
    response = httpx.post(f"{guarded.url}/api/process_definition/", json=SEED,
                          auth=("anyone", TOKEN), timeout=10)
    assert response.status_code == 200, response.text
    assert response.json()["name"] == "upper"
    wrong = httpx.post(f"{guarded.url}/api/process_definition/", json=SEED,
                       auth=("anyone", "not-the-token"), timeout=10)
    assert wrong.status_code == 401


def test_the_cli_sends_streamboss_token(guarded, module_managers: ManagerPool) -> None:
    stream = module_managers.name("cli")
    assert guarded.ok("create-stream", stream).strip() == f"stream {stream} created"
    without = guarded.cli("list", "streams", env={"STREAMBOSS_TOKEN": ""})
    lines = without.stderr.strip().splitlines()
    assert without.returncode == 2 and len(lines) == 1, without.stderr
    assert "token" in lines[0] and "STREAMBOSS_TOKEN" in lines[0]
    assert TOKEN not in without.stderr


def test_a_second_manager_on_the_same_state_dir_is_refused(module_managers: ManagerPool,
                                                           broker_url: str) -> None:
    """Two managers on one state directory would each start a set of agents."""
    first = module_managers.start()
    result = run_cli([*MANAGER, "manager", "--port", str(free_port()),
                      "--state-dir", str(first.state_dir)],
                     env={"STREAMBOSS_BROKER_URL": broker_url}, timeout=30)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 2, result.stderr
    assert len(lines) == 1, result.stderr
    assert "another manager" in lines[0] and str(first.state_dir) in lines[0]
    assert first.ok("list", "-o", "json")  # the first one is unharmed
