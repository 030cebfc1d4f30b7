"""The manager says what it uses: ``status`` (CLI and ``GET /v1/status``) names the broker,
the management API and the archive store, where each came from, and whether each
answers; credentials never show. Real managers, the real broker and its management API.
"""

from __future__ import annotations

import json
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from streamboss.manager.broker import (
    MANAGEMENT_FROM_BROKER_URL,
    MANAGEMENT_FROM_OPTION,
    MANAGEMENT_URL_ENV,
    Broker,
    ManagementURLError,
    management_endpoint,
)
from streamboss.manager.connections import probe_archive_store

from .conftest import MANAGEMENT_PORT, MANAGER, ManagerPool, free_port

MANAGEMENT = f"http://127.0.0.1:{MANAGEMENT_PORT}"
ADMIN = ("guest", "guest")


def connections(manager: Any) -> dict[str, Any]:
    return json.loads(manager.ok("status", "-o", "json"))["connections"]


@pytest.fixture
def broker_user() -> Iterator[Any]:
    """``broker_user(tags)`` -> (name, password) of a new user of the test broker with
    full permissions on "/" (a password no other string in the test holds); deleted at
    teardown."""
    made: list[str] = []

    def make(tags: str) -> tuple[str, str]:
        name, password = f"sb-e-{uuid.uuid4().hex[:8]}", f"pw-{uuid.uuid4().hex}"
        api = f"{MANAGEMENT}/api"
        assert httpx.put(f"{api}/users/{name}", auth=ADMIN, json={
            "password": password, "tags": tags}).status_code in (201, 204)
        made.append(name)
        assert httpx.put(f"{api}/permissions/%2F/{name}", auth=ADMIN, json={
            "configure": ".*", "write": ".*", "read": ".*"}).status_code in (201, 204)
        return name, password

    try:
        yield make
    finally:
        for name in made:
            httpx.delete(f"{MANAGEMENT}/api/users/{name}", auth=ADMIN)


def test_the_option_wins_over_the_variable_and_status_says_it_answers(managers: ManagerPool):
    dead = f"http://127.0.0.1:{free_port()}"
    manager = managers.new()
    manager.extra_env[MANAGEMENT_URL_ENV] = dead
    manager.manager_args = ["--management-url", MANAGEMENT]
    manager.start()
    shown = connections(manager)
    assert shown["management"] == {"url": MANAGEMENT, "source": "--management-url",
                                   "state": "answers"}
    assert shown["broker"]["source"] == "STREAMBOSS_BROKER_URL"
    assert shown["broker"]["state"] == "answers"
    assert shown["archive_store"] == {"url": f"file://{manager.state_dir / 'archive'}",
                                      "source": "default", "state": "answers"}
    table = manager.ok("status")
    assert f"management:    {MANAGEMENT} (from --management-url): answers" in table
    assert "broker:        amqp://guest:***@127.0.0.1:5672/%2F (from STREAMBOSS_BROKER_URL)" \
           ": answers" in table


def test_the_variable_alone_is_used_and_a_dead_one_is_unreachable(managers: ManagerPool):
    dead = f"http://127.0.0.1:{free_port()}"
    manager = managers.new()
    manager.extra_env[MANAGEMENT_URL_ENV] = dead
    manager.start()
    shown = connections(manager)["management"]
    assert (shown["url"], shown["source"]) == (dead, MANAGEMENT_URL_ENV)
    assert shown["state"].startswith("unreachable: "), shown
    assert "\n" not in shown["state"]
    assert f"management:    {dead} (from {MANAGEMENT_URL_ENV}): unreachable: " \
           in manager.ok("status")


def test_credentials_never_show_and_a_user_without_the_management_tag_is_refused(
        managers: ManagerPool, broker_user):
    """The broker URL's user is the management API's (Amazon MQ): its password appears in
    no status line, no JSON and no log line; a user the API refuses is named as such."""
    name, password = broker_user("")  # AMQP only: the management API refuses it
    manager = managers.new()
    manager.broker_url = f"amqp://{name}:{password}@127.0.0.1:5672/%2F"
    manager.extra_env[MANAGEMENT_URL_ENV] = MANAGEMENT
    manager.start()
    document = manager.ok("status", "-o", "json")
    table = manager.cli("status")
    shown = json.loads(document)["connections"]
    assert shown["broker"] == {"url": f"amqp://{name}:***@127.0.0.1:5672/%2F",
                               "source": "STREAMBOSS_BROKER_URL", "state": "answers"}
    assert shown["management"]["state"] == \
        "refused: 401, check the broker user's password and its management tag"
    assert "refused: 401" in table.stdout
    manager.stop()
    for text in (document, table.stdout, table.stderr, manager.log()):
        assert password not in text


def test_credentials_in_the_management_url_are_used_and_not_shown(
        managers: ManagerPool, broker_user):
    """A management URL may carry a user of its own (a monitoring user beside an AMQP-only
    one): that user is the API's, and the URL is shown without it."""
    name, password = broker_user("monitoring")
    manager = managers.new()
    manager.manager_args = ["--management-url",
                            f"http://{name}:{password}@127.0.0.1:{MANAGEMENT_PORT}"]
    manager.start()
    document = manager.ok("status", "-o", "json")
    shown = json.loads(document)["connections"]["management"]
    assert shown == {"url": MANAGEMENT, "source": "--management-url", "state": "answers"}
    manager.stop()
    assert password not in document and password not in manager.log()


def test_a_malformed_management_url_is_one_line_and_exit_2(tmp_path: Path):
    for bad in ("ftp://user:secret@host", "https://", "https://host:99999", "host:443"):
        result = subprocess.run(
            [*MANAGER, "manager", "--state-dir", str(tmp_path / "state"), "--port",
             str(free_port()), "--management-url", bad],
            capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)
        assert result.returncode == 2, (bad, result.stderr)
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and "management URL" in lines[0], (bad, lines)
        assert "secret" not in result.stderr


def test_which_management_url_the_broker_handle_takes(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.delenv(MANAGEMENT_URL_ENV, raising=False)
    amqp = "amqp://u:p@broker.example:5672/%2F"
    assert management_endpoint(amqp) == ("http://broker.example:15672",
                                         MANAGEMENT_FROM_BROKER_URL)
    assert management_endpoint("amqps://u:p@b.example:5671/%2F")[0] == \
        "https://b.example:15671"
    monkeypatch.setenv(MANAGEMENT_URL_ENV, "https://b-1.mq.eu-west-1.amazonaws.com")
    assert management_endpoint(amqp) == ("https://b-1.mq.eu-west-1.amazonaws.com",
                                         MANAGEMENT_URL_ENV)
    assert management_endpoint(amqp, "https://other:8443") == ("https://other:8443",
                                                               MANAGEMENT_FROM_OPTION)
    handle = Broker(amqp, "https://mon:s3cret@other:8443/rabbit")
    try:
        assert handle.management_url == "https://other:8443/rabbit"
        assert handle._auth == ("mon", "s3cret")
    finally:
        handle.close()
    monkeypatch.setenv(MANAGEMENT_URL_ENV, "tcp://nope")
    with pytest.raises(ManagementURLError, match=MANAGEMENT_URL_ENV):
        management_endpoint(amqp)


def test_the_archive_store_probe_says_why_a_store_does_not_answer(
        moto_server, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    for key, value in moto_server.env.items():
        monkeypatch.setenv(key, value)
    bucket = moto_server.bucket("archive")
    assert probe_archive_store(f"s3://{bucket}/archives") == "answers"
    assert probe_archive_store("s3://no-such-bucket-e12") == \
        "refused: NoSuchBucket on bucket no-such-bucket-e12"
    for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.delenv(key)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    assert probe_archive_store(f"s3://{bucket}").startswith("refused: no AWS credentials")
    monkeypatch.setenv("STREAMBOSS_S3_ENDPOINT_URL", f"http://127.0.0.1:{free_port()}")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    assert probe_archive_store(f"s3://{bucket}").startswith("unreachable: ")
    assert probe_archive_store(f"file://{tmp_path}/archive") == "answers"
    (tmp_path / "plain").write_text("")
    assert probe_archive_store(f"file://{tmp_path}/plain/archive").startswith("refused: ")
