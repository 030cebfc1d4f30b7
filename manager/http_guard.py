"""What may reach the manager's API at all, checked before any route runs or any body
is read: the ``Host`` a request names, where a state-changing request comes from,
the token, and how large a body may be.

Why each:

- ``Host``: a web page the operator visits can make the browser send requests to
  127.0.0.1 by pointing a name of its own at it (DNS rebinding); the browser
  then sends that name as ``Host``. A manager that answers only its own names
  (loopback names when bound to loopback, configured ones otherwise) cannot be
  driven that way. An IP literal cannot be rebound, so a manager bound to every
  address also answers any IP literal.
- ``Origin`` and ``Sec-Fetch-Site``: a browser names the page behind every
  cross-origin POST/PUT/PATCH/DELETE; anything but the manager's own origin is
  a page trying to act for the operator. The CLI and curl send neither.
- the token: required on everything but the health check and the API's own
  description, and checked here so that a stranger's request is turned away
  before its body is read.
- the body limit: a declaration is a few kilobytes; the body is counted as it
  arrives (a ``Content-Length`` above the limit is refused before any is read,
  a chunked one as soon as it passes it), so no request can make the manager
  hold more than the limit.
"""

from __future__ import annotations

import ipaddress
import os
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from urllib.parse import urlsplit

from starlette.datastructures import Headers
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from . import api_token

# A declaration is a few KiB; a MiB leaves room for large env maps and the seed's forms.
DEFAULT_MAX_BODY = 1024 * 1024
MAX_BODY_ENV = "STREAMBOSS_MAX_REQUEST_BYTES"
# Below this not even a small definition fits.
MIN_MAX_BODY = 1024
ALLOWED_HOSTS_ENV = "STREAMBOSS_ALLOWED_HOSTS"
UNSAFE_METHODS = frozenset({"POST", "PUT", "PATCH", "DELETE"})
# Readable without the token: the health check, and the API's description and the
# page that shows it (which fetches /openapi.json from the browser, with no token).
PUBLIC_PATHS = frozenset({"/v1/health", "/openapi.json", "/docs", "/docs/oauth2-redirect",
                          "/redoc"})
# What a browser says of a request made by a page of the same origin, or typed by the user.
SAME_ORIGIN_FETCHES = frozenset({"same-origin", "none"})
WILDCARD_BINDS = frozenset({"0.0.0.0", "::", ""})
# How much of a refused Host or Origin an error message repeats.
SHOWN = 80


# A DNS name as a Host header carries it (no wildcards: each name is given).
_HOST_NAME = re.compile(r"(?=.{1,253}$)[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?"
                        r"(\.[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?)*")


class GuardConfigError(ValueError):
    """A host name or body limit the manager cannot be started with (one line)."""


def parse_allowed_hosts(given: Iterable[str], env: str | None = None) -> tuple[str, ...]:
    """``--allowed-host`` values plus ``STREAMBOSS_ALLOWED_HOSTS`` (comma-separated),
    checked and lower-cased.

    Raises:
        GuardConfigError: a value that is not a host name or IP address.
    """
    env = os.environ.get(ALLOWED_HOSTS_ENV, "") if env is None else env
    names: list[str] = []
    for raw in [*given, *env.split(",")]:
        name = raw.strip().lower()
        if not name:
            continue
        bare = name[1:-1] if name.startswith("[") and name.endswith("]") else name
        if not (is_ip_literal(bare) or _HOST_NAME.fullmatch(bare)):
            raise GuardConfigError(
                f"allowed host {raw.strip()[:SHOWN]!r} is not a host name or IP address: give "
                "each name clients use in their URLs, without scheme, port or wildcard "
                f"(--allowed-host or {ALLOWED_HOSTS_ENV})")
        names.append(bare)
    return tuple(dict.fromkeys(names))


def parse_max_body(given: int | None, env: str | None = None) -> int:
    """The body limit: ``--max-request-bytes``, else ``STREAMBOSS_MAX_REQUEST_BYTES``,
    else 1 MiB.

    Raises:
        GuardConfigError: not a whole number of bytes of at least 1 KiB.
    """
    if given is None:
        text = (os.environ.get(MAX_BODY_ENV, "") if env is None else env).strip()
        if not text:
            return DEFAULT_MAX_BODY
        if not (text.isascii() and text.isdigit()):
            raise GuardConfigError(f"{MAX_BODY_ENV}={text[:SHOWN]!r} is not a number of bytes "
                                   f"(default {DEFAULT_MAX_BODY})")
        given = int(text)
    if given < MIN_MAX_BODY:
        raise GuardConfigError(f"a request body limit of {given} bytes is too small for a "
                               f"declaration: give at least {MIN_MAX_BODY}")
    return given


def split_host(value: str) -> tuple[str, int | None] | None:
    """``Host`` header -> (lower-case host, port or None); None when malformed."""
    value = value.strip().lower()
    port_text = ""
    if value.startswith("["):
        host, bracket, rest = value[1:].partition("]")
        if not bracket or (rest and not rest.startswith(":")):
            return None
        port_text = rest[1:]
    else:
        host, _, port_text = value.partition(":") if value.count(":") == 1 else (value, "", "")
    if port_text:
        if not port_text.isascii() or not port_text.isdigit() or int(port_text) > 65535:
            return None
        return (host, int(port_text)) if host else None
    return (host, None) if host else None


def is_ip_literal(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def is_loopback_host(host: str) -> bool:
    if host in api_token.LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@dataclass(frozen=True)
class GuardPolicy:
    """What the guard lets in.

    ``token`` None leaves the API open (only for a manager in a test process);
    ``allowed_hosts`` are the names beyond loopback the manager answers to.
    """

    token: str | None
    allowed_hosts: frozenset[str] = field(default_factory=frozenset)
    any_ip_literal: bool = False
    max_body: int = DEFAULT_MAX_BODY

    @classmethod
    def for_bind(cls, bind: str, token: str | None, allowed_hosts: Iterable[str] = (),
                 max_body: int = DEFAULT_MAX_BODY) -> GuardPolicy:
        """The policy of a manager bound to ``bind``: loopback names always, the bind
        address itself, the configured names, and any IP literal on a wildcard bind."""
        names = {h.strip().lower().strip("[]") for h in allowed_hosts if h.strip()}
        if bind not in WILDCARD_BINDS:
            names.add(bind.lower().strip("[]"))
        return cls(token, frozenset(names), bind in WILDCARD_BINDS, max_body)

    def host_allowed(self, host: str) -> bool:
        return (is_loopback_host(host) or host in self.allowed_hosts
                or (self.any_ip_literal and is_ip_literal(host)))


def same_origin(origin: str, host: str, port: int | None) -> bool:
    """Whether ``origin`` (the browser's ``Origin``) is the origin the request was sent to
    (``host``/``port`` from its ``Host``), over http or https (a TLS proxy in front)."""
    try:
        parts = urlsplit(origin)
        origin_port = parts.port
    except ValueError:
        return False
    if parts.scheme not in ("http", "https") or not parts.hostname or parts.path \
            or parts.query or parts.username or parts.password:
        return False
    default = 443 if parts.scheme == "https" else 80
    return parts.hostname == host and (origin_port or default) == (port or default)


class BodyTooLarge(Exception):
    """The request's body passed the limit while it was read."""


class HttpGuard:
    """ASGI middleware: refuses what :class:`GuardPolicy` does not let in, with a
    one-line JSON ``detail`` (400 Host, 401 token, 403 origin, 413 body)."""

    def __init__(self, app: ASGIApp, policy: GuardPolicy) -> None:
        self.app = app
        self.policy = policy

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = Headers(scope=scope)
        refusal = self.refusal(scope, headers)
        if refusal is not None:
            await refusal(scope, receive, send)
            return
        if scope["method"] not in UNSAFE_METHODS:
            await self.app(scope, receive, send)
            return
        declared = headers.get("content-length", "")
        if declared.isascii() and declared.isdigit() and int(declared) > self.policy.max_body:
            await self.too_large()(scope, receive, send)
            return
        try:
            messages = await self._read_body(receive)
        except BodyTooLarge:
            await self.too_large()(scope, receive, send)
            return
        await self.app(scope, _replay(messages, receive), send)

    def refusal(self, scope: Scope, headers: Headers) -> JSONResponse | None:
        """The answer to a request that may not pass, or None."""
        raw_host = headers.get("host")
        parsed = split_host(raw_host) if raw_host else None
        if parsed is None or not self.policy.host_allowed(parsed[0]):
            shown = (raw_host or "")[:SHOWN]
            return _refuse(400, f"Host {shown!r} is not a name this manager answers to (a "
                                "page may be trying DNS rebinding): call it by 127.0.0.1 or "
                                "localhost, or start it with --allowed-host NAME")
        if scope["method"] in UNSAFE_METHODS:
            origin = headers.get("origin")
            if origin is not None and not same_origin(origin, *parsed):
                return _refuse(403, f"Origin {origin[:SHOWN]!r} is not this manager's: a web "
                                    "page may not change declarations (the CLI and curl send "
                                    "no Origin)")
            fetch_site = headers.get("sec-fetch-site")
            if fetch_site is not None and fetch_site.lower() not in SAME_ORIGIN_FETCHES:
                return _refuse(403, f"a {fetch_site[:SHOWN]!r} request from a web page may not "
                                    "change declarations")
        token = self.policy.token
        if token is not None and scope["path"] not in PUBLIC_PATHS and \
                not api_token.matches(headers.get("authorization", ""), token):
            return _refuse(401, "missing or wrong token: set STREAMBOSS_TOKEN (on the "
                                "manager's machine the CLI finds the token the manager "
                                "generated by itself)", {"WWW-Authenticate": "Bearer"})
        return None

    def too_large(self) -> JSONResponse:
        # Connection: close, so the rest of a body nobody reads is not taken for the
        # next request on the connection.
        return _refuse(413, f"request body over {self.policy.max_body} bytes: a declaration "
                            f"is far smaller (the limit is {MAX_BODY_ENV})",
                       {"Connection": "close"})

    async def _read_body(self, receive: Receive) -> list[Message]:
        """Every message of the body, counted as it comes in.

        Raises:
            BodyTooLarge: more than the limit arrived.
        """
        messages: list[Message] = []
        size = 0
        while True:
            message = await receive()
            messages.append(message)
            if message["type"] != "http.request":
                return messages  # the client went away: the app sees that as it is
            size += len(message.get("body", b""))
            if size > self.policy.max_body:
                raise BodyTooLarge
            if not message.get("more_body", False):
                return messages


def _replay(messages: list[Message], receive: Receive) -> Receive:
    """A ``receive`` that hands out the body read already, then waits as the real one."""
    pending = list(messages)

    async def replayed() -> Message:
        if pending:
            return pending.pop(0)
        return await receive()

    return replayed


def _refuse(status: int, detail: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"detail": detail}, status_code=status, headers=headers)
