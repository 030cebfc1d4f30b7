"""The manager's HTTP side against a stranger: a web page (DNS rebinding, a foreign
``Origin``), a local process without the token, oversized and ill-typed bodies.

Every refusal is checked twice: the answer (a 4xx with a one-line ``detail``) and
that nothing changed, in the store (``list``) and on the broker.
"""

from __future__ import annotations

import json
import os
import stat
import subprocess
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from streamboss.manager import api_token
from streamboss.manager.validation_text import one_line

from .conftest import MANAGER, ManagerPool, ManagerProcess, free_port, run_cli, stream_exchange
from .module_manager import manager_names, module_manager  # noqa: F401 (fixtures)

# A body well over the 1 MiB default limit.
TWO_MIB = 2 * 1024 * 1024


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def post_stream(manager: ManagerProcess, name: str, **headers: str) -> httpx.Response:
    """``POST /v1/streams`` over raw HTTP with the token and ``headers``."""
    return httpx.post(f"{manager.url}/v1/streams", json={"name": name}, timeout=10,
                      headers={**manager.headers(), **headers})


def assert_refused(response: httpx.Response, status: int, *words: str) -> None:
    assert response.status_code == status, (response.status_code, response.text)
    detail = response.json()["detail"]
    assert isinstance(detail, str) and "\n" not in detail, detail
    for word in words:
        assert word in detail, (word, detail)


def assert_no_stream(manager: ManagerProcess, broker, name: str) -> None:
    assert name not in {s["name"] for s in manager.declarations()["streams"]}
    assert not broker.exchange_exists(stream_exchange(name))


# -- Host: DNS rebinding ------------------------------------------------------------------


@pytest.mark.parametrize("host", ["rebind.example.com", "rebind.example.com:{port}",
                                  "127.0.0.1.nip.io:{port}", "localhost.evil.test",
                                  "[::2]:{port}", "evil.test:bad"])
def test_a_foreign_host_changes_nothing(manager: ManagerProcess, names, broker,
                                        host: str) -> None:
    """The issue's probe: a page that rebinds its name to 127.0.0.1 sends its own name as
    Host. Refused even with the token, and no stream appears anywhere."""
    stream = names("rebind")
    response = post_stream(manager, stream, Host=host.format(port=manager.port))
    assert_refused(response, 400, "Host", "--allowed-host")
    assert_no_stream(manager, broker, stream)
    for path in ("/v1/health", "/v1/streams", "/openapi.json"):
        read = httpx.get(manager.url + path, headers={**manager.headers(), "Host": host.format(
            port=manager.port)}, timeout=10)
        assert read.status_code == 400, (path, read.text)


@pytest.mark.parametrize("host", ["127.0.0.1:{port}", "localhost:{port}", "LOCALHOST",
                                  "[::1]:{port}", "127.0.0.2"])
def test_loopback_names_are_answered(manager: ManagerProcess, names, host: str) -> None:
    stream = names("loop")
    response = post_stream(manager, stream, Host=host.format(port=manager.port))
    assert response.status_code == 201, response.text
    assert stream in {s["name"] for s in manager.declarations()["streams"]}


# -- Origin: a page of another origin -------------------------------------------------------


@pytest.mark.parametrize("headers", [
    {"Origin": "http://evil.example.com"},
    {"Origin": "http://localhost:3000"},  # another local web app: same site, other origin
    {"Origin": "https://127.0.0.1"},
    {"Origin": "null"},  # a sandboxed frame or a file:// page
    {"Origin": "http://127.0.0.1:{port}@evil.test"},
    {"Sec-Fetch-Site": "cross-site"},
    {"Sec-Fetch-Site": "same-site"},
], ids=["evil", "other-port", "other-scheme-port", "null", "userinfo", "cross-site",
        "same-site"])
def test_a_foreign_origin_changes_nothing(manager: ManagerProcess, names, broker,
                                          headers: dict[str, str]) -> None:
    stream, kept = names("origin"), names("kept")
    manager.ok("create-stream", kept)
    headers = {k: v.format(port=manager.port) for k, v in headers.items()}
    assert_refused(post_stream(manager, stream, **headers), 403, "web page")
    assert_no_stream(manager, broker, stream)
    deleted = httpx.delete(f"{manager.url}/v1/streams/{kept}", timeout=10,
                           headers={**manager.headers(), **headers})
    assert_refused(deleted, 403)
    assert kept in {s["name"] for s in manager.declarations()["streams"]}
    assert broker.exchange_exists(stream_exchange(kept))
    # Reading is not state-changing: a page cannot read the answer anyway (no CORS).
    listed = httpx.get(f"{manager.url}/v1/streams", timeout=10,
                       headers={**manager.headers(), **headers})
    assert listed.status_code == 200


def test_the_managers_own_origin_may_change_declarations(manager: ManagerProcess,
                                                         names) -> None:
    """The API page (/docs) sends the manager's own origin with its requests."""
    first, second = names("same"), names("same")
    own = post_stream(manager, first, Origin=f"http://127.0.0.1:{manager.port}",
                      **{"Sec-Fetch-Site": "same-origin"})
    assert own.status_code == 201, own.text
    by_name = post_stream(manager, second, Origin=f"http://localhost:{manager.port}",
                          Host=f"localhost:{manager.port}")
    assert by_name.status_code == 201, by_name.text
    assert {first, second} <= {s["name"] for s in manager.declarations()["streams"]}


# -- the generated token ------------------------------------------------------------------


def test_without_the_token_the_api_answers_401(manager: ManagerProcess, names,
                                               broker) -> None:
    """A manager started with no STREAMBOSS_TOKEN made one and wants it over HTTP."""
    assert manager.token is None
    stream = names("tokenless")
    for method, path, body in [("GET", "/v1/streams", None), ("GET", "/v1/status", None),
                               ("GET", "/v1/definitions/1", None),
                               ("POST", "/v1/streams", {"name": stream}),
                               ("DELETE", f"/v1/streams/{stream}", None),
                               ("POST", "/api/process_definition/",
                                {"definition": {"exec": "cat", "name": "x"}})]:
        for headers in ({}, {"Authorization": "Bearer not-the-token"},
                        {"Authorization": "Basic eDp5"}, {"Authorization": "Bearer"}):
            response = httpx.request(method, manager.url + path, json=body, timeout=10,
                                     headers=headers)
            assert_refused(response, 401, "STREAMBOSS_TOKEN")
            assert response.headers["www-authenticate"] == "Bearer"
    assert_no_stream(manager, broker, stream)
    # Only the health check and the API's description are public.
    for path in ("/v1/health", "/openapi.json", "/docs"):
        assert httpx.get(manager.url + path, timeout=10).status_code == 200, path


def test_the_generated_token_is_private_and_secret(manager: ManagerProcess) -> None:
    token_path = manager.state_dir / "manager.token"
    token = token_path.read_text().strip()
    assert len(token) >= 40
    assert mode(token_path) == 0o600 and mode(manager.state_dir) == 0o700
    pointer = Path(manager.env()["XDG_STATE_HOME"]) / "streamboss" / "tokens" / str(
        manager.port)
    assert mode(pointer) == 0o600 and mode(pointer.parent) == 0o700
    assert pointer.read_text().strip() == str(token_path)
    # Never in the log, nor on the command line of the manager or its children.
    assert token not in manager.log()
    assert manager.proc is not None
    cmdline = Path(f"/proc/{manager.proc.pid}/cmdline").read_bytes()
    assert token.encode() not in cmdline
    # Nor in an error message of the CLI.
    wrong = manager.cli("list", env={"STREAMBOSS_TOKEN": "wrong"})
    assert wrong.returncode == 2 and token not in wrong.stderr + wrong.stdout


def test_the_cli_needs_no_setup(manager: ManagerProcess, names, tmp_path: Path) -> None:
    """No STREAMBOSS_TOKEN, run from another directory than the manager's, by either
    loopback name: the CLI finds the token through the pointer for the port."""
    assert "STREAMBOSS_TOKEN" not in manager.env()
    stream = names("cli")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    result = subprocess.run([*MANAGER, "create-stream", stream], env=manager.env(),
                            cwd=elsewhere, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"stream {stream} created"
    for url in (f"http://localhost:{manager.port}", f"http://127.0.0.1:{manager.port}/"):
        listed = subprocess.run([*MANAGER, "list", "streams", "-o", "json"], cwd=elsewhere,
                                env={**manager.env(), "STREAMBOSS_URL": url},
                                capture_output=True, text=True, timeout=60)
        assert listed.returncode == 0, listed.stderr
        assert stream in {s["name"] for s in json.loads(listed.stdout)}


def test_the_token_survives_a_restart(managers: ManagerPool, names) -> None:
    first = managers.start()
    token = first.bearer()
    first.stop()
    pointer = Path(first.env()["XDG_STATE_HOME"]) / "streamboss" / "tokens" / str(first.port)
    assert not pointer.exists()  # a stopped manager withdraws its pointer
    again = managers.new(state_dir=first.state_dir, port=first.port).start()
    assert again.bearer() == token
    assert again.ok("create-stream", managers.name("again"))


def test_a_token_file_others_could_read_is_replaced(tmp_path: Path) -> None:
    state = tmp_path / "state"
    state.mkdir()
    first = api_token.load_or_create(state)
    assert api_token.load_or_create(state) == first
    path = state / "manager.token"
    os.chmod(path, 0o644)
    second = api_token.load_or_create(state)
    assert second != first and mode(path) == 0o600
    path.unlink()
    target = tmp_path / "planted"
    target.write_text("A" * 43 + "\n")
    os.chmod(target, 0o600)
    path.symlink_to(target)
    third = api_token.load_or_create(state)
    assert third != "A" * 43 and not path.is_symlink() and mode(path) == 0o600


def test_the_local_token_is_never_sent_beyond_loopback(tmp_path: Path) -> None:
    state = tmp_path / "state"
    state.mkdir()
    token = api_token.load_or_create(state)
    assert api_token.find_local("http://127.0.0.1:1", state) == token
    assert api_token.find_local("http://localhost:1", state) == token
    for url in ("http://example.com:8181", "http://127.0.0.1.example.com:8181",
                "http://10.0.0.1:8181"):
        assert api_token.find_local(url, state) is None, url


# -- bodies ----------------------------------------------------------------------------


def test_a_body_over_the_limit_is_refused_before_it_is_read(manager: ManagerProcess,
                                                            broker, names) -> None:
    stream = names("big")
    padded = json.dumps({"name": stream, "pad": "x" * TWO_MIB}).encode()
    response = httpx.post(f"{manager.url}/v1/streams", content=padded, timeout=30,
                          headers={**manager.headers(), "Content-Type": "application/json"})
    assert_refused(response, 413, "1048576", "STREAMBOSS_MAX_REQUEST_BYTES")

    def chunks() -> Iterator[bytes]:  # no Content-Length: counted as it arrives
        for start in range(0, len(padded), 64 * 1024):
            yield padded[start:start + 64 * 1024]

    chunked = httpx.post(f"{manager.url}/v1/definitions", content=chunks(), timeout=30,
                         headers={**manager.headers(), "Content-Type": "application/json"})
    assert_refused(chunked, 413)
    assert_no_stream(manager, broker, stream)
    # The manager is unharmed and a body under the limit is fine.
    assert post_stream(manager, stream).status_code == 201


@pytest.mark.parametrize("path, body, status, words", [
    ("/v1/streams", {"name": 5}, 422, ["name", "valid string"]),
    ("/v1/streams", {"name": None}, 422, ["name"]),
    ("/v1/streams", [{"name": "x"}], 422, []),
    ("/v1/streams", {"name": "ok-name", "extra": 1}, 422, ["extra"]),
    ("/v1/streams", {"name": "a\u0000b"}, 400, ["invalid"]),
    ("/v1/definitions", {"exec": "cat", "name": 5}, 400, ["name", "valid string"]),
    ("/v1/definitions", {"exec": "cat", "name": "n", "max_attempts": "3"}, 400,
     ["max_attempts"]),
    ("/v1/definitions", {"exec": "cat\u0000", "name": "n"}, 400, ["exec", "NUL"]),
    ("/v1/definitions", {"exec": "cat", "name": "n", "env": {"A": [1]}}, 400, ["env.A"]),
    ("/v1/definitions", {"exec": "cat", "name": "n", "env": {"A=B": "c"}}, 400, ["'='"]),
    ("/v1/definitions", {"exec": "cat", "name": "n", "shell": "yes"}, 400, ["shell"]),
    ("/v1/definitions", {"exec": "cat", "name": "n", "concurrency": 10**30}, 400,
     ["concurrency"]),
    ("/v1/definitions", ["exec", "cat"], 400, ["JSON object"]),
    ("/v1/definitions", 5, 400, ["JSON object"]),
    ("/v1/operations", {"name": "o", "definition": 1, "input": "i", "output": "o"}, 422,
     ["definition"]),
    ("/v1/operations", {"name": "o", "definition": "1", "input": "i", "output": "o",
                        "policy": {"min": 10**30}}, 422, ["policy.min"]),
    ("/v1/operations", {"name": "o", "definition": "1", "input": "i", "output": "o",
                        "policy": {"max": "4"}}, 422, ["policy.max"]),
    ("/v1/archives", {"stream": "s", "segment_bytes": 10**30}, 422, ["segment_bytes"]),
    ("/v1/archives", {"stream": "s", "segment_seconds": "60"}, 422, ["segment_seconds"]),
], ids=lambda value: None if not isinstance(value, str | int) else str(value)[:40])
def test_ill_typed_bodies_are_4xx(manager: ManagerProcess, path: str, body: object,
                                  status: int, words: list[str]) -> None:
    before = manager.declarations()
    response = manager.api("POST", path, json=body)
    assert response.status_code == status, response.text
    detail = response.json()["detail"]
    text = one_line(detail) if isinstance(detail, list) else detail
    for word in words:
        assert word in text, (word, text)
    assert manager.declarations() == before


@pytest.mark.parametrize("raw", [b"{\"name\": ", b"\xff\xfe", b"{\"exec\": \"cat\", "
                                 b"\"name\": \"n\", \"timeout\": 1e400}", b"NaN"])
def test_malformed_json_is_4xx(manager: ManagerProcess, raw: bytes) -> None:
    for path in ("/v1/streams", "/v1/definitions", "/v1/operations", "/v1/archives"):
        response = manager.api("POST", path, content=raw,
                               headers={"Content-Type": "application/json"})
        assert 400 <= response.status_code < 500, (path, raw, response.text)


@pytest.mark.parametrize("path", ["/v1/definitions/99999999999999999999999", "/v1/definitions/²",
                                  "/v1/archives/%00", "/v1/dead/%C2%B2"])
def test_odd_path_names_are_404(manager: ManagerProcess, path: str) -> None:
    assert manager.api("GET", path).status_code == 404
    assert manager.api("DELETE", path).status_code in (404, 405)


def test_the_cli_shows_a_validation_error_in_one_line(manager: ManagerProcess) -> None:
    result = manager.cli("create-operation", "o", "1", "in", "out", "--min", "100000")
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 2 and len(lines) == 1, result.stderr
    assert "policy.min" in lines[0] and "less than or equal to 1000" in lines[0]


# -- beyond loopback ---------------------------------------------------------------------

TOKEN = "t0ken-for-http-security-7c2d"


def test_allowed_hosts_beyond_loopback(managers: ManagerPool, broker) -> None:
    manager = managers.new(host="0.0.0.0", token=TOKEN)
    manager.extra_env["STREAMBOSS_ALLOWED_HOSTS"] = "streamboss.test, Other.Test"
    manager.start()
    named, other, literal, refused = (managers.name(p) for p in ("named", "other", "ip",
                                                                   "refused"))
    for stream, host in ((named, f"streamboss.test:{manager.port}"), (other, "other.test"),
                         (literal, f"10.1.2.3:{manager.port}")):
        response = post_stream(manager, stream, Host=host)
        assert response.status_code == 201, (host, response.text)
    assert_refused(post_stream(manager, refused, Host="elsewhere.test"), 400)
    assert_no_stream(manager, broker, refused)
    # The configured origin may change declarations; a page elsewhere may not.
    same = post_stream(manager, managers.name("same"), Host="streamboss.test",
                       Origin="https://streamboss.test")
    assert same.status_code == 201, same.text
    assert_refused(post_stream(manager, refused, Host="streamboss.test",
                               Origin="https://elsewhere.test"), 403)


@pytest.mark.parametrize("argv, env, words", [
    (["--allowed-host", "*"], {}, ["'*'", "--allowed-host"]),
    (["--allowed-host", "http://x.test:80"], {}, ["'http://x.test:80'"]),
    ([], {"STREAMBOSS_ALLOWED_HOSTS": "ok.test,bad name"}, ["'bad name'"]),
    ([], {"STREAMBOSS_MAX_REQUEST_BYTES": "lots"}, ["STREAMBOSS_MAX_REQUEST_BYTES"]),
], ids=["wildcard", "url", "env", "limit"])
def test_bad_guard_settings_are_one_line(tmp_path: Path, broker_url: str, argv: list[str],
                                         env: dict[str, str], words: list[str]) -> None:
    result = run_cli([*MANAGER, "manager", "--port", str(free_port()), "--state-dir",
                      str(tmp_path / "state"), *argv],
                     env={"STREAMBOSS_BROKER_URL": broker_url, "STREAMBOSS_TOKEN": "",
                          "XDG_STATE_HOME": str(tmp_path / "xdg"), **env}, timeout=30)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 2 and len(lines) == 1, result.stderr
    for word in words:
        assert word in lines[0], (word, lines[0])
    assert not (tmp_path / "state" / "manager.token").exists()


def test_the_body_limit_is_configurable(managers: ManagerPool, names) -> None:
    manager = managers.new()
    manager.extra_env["STREAMBOSS_MAX_REQUEST_BYTES"] = "2048"
    manager.start()
    response = manager.api("POST", "/v1/definitions", json={
        "exec": "cat", "name": "padded", "application": "x" * 4000})
    assert_refused(response, 413, "2048")
    assert manager.api("POST", "/v1/definitions", json={"exec": "cat", "name": "small"}
                       ).status_code == 201
