"""``streamboss manager`` and ``streamboss up``: the API, the reconciler and a dispatcher."""

from __future__ import annotations

import fcntl
import ipaddress
import logging
import os
import signal
import socket
import sys
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

import uvicorn

from streamboss.agent.config import BROKER_URL_ENV, ConfigError, consumer_timeout_limit, redact
from streamboss.agent.isolation import (
    CHILD_USER_ENV,
    ChildIsolation,
    IsolationError,
    child_isolation,
    make_non_dumpable,
)

from . import api_token
from .api import Manager, create_app
from .broker import Broker, ManagementURLError, management_endpoint
from .client import DEFAULT_HOST, DEFAULT_PORT, TOKEN_ENV
from .connections import DEFAULT_SOURCE, Connections
from .dispatch_aws import AwsDispatcher
from .dispatch_local import LocalDispatcher
from .http_guard import GuardConfigError, GuardPolicy, parse_allowed_hosts, parse_max_body
from .paths import archives_dir, objects_dir
from .private_files import open_private, private_dir
from .pulumi_stack import PulumiStack, PulumiUnavailable, check_stack_name, default_project_dir
from .reconciler import Reconciler
from .store import Store

log = logging.getLogger(__name__)

# Where `archive-stream` puts segments unless told otherwise.
ARCHIVE_STORE_ENV = "STREAMBOSS_ARCHIVE_STORE"


class ServerError(RuntimeError):
    """The manager cannot start; the message says why and what to do."""


@dataclass(frozen=True)
class ServerConfig:
    state_dir: Path
    broker_url: str
    host: str = DEFAULT_HOST
    port: int = DEFAULT_PORT
    dispatcher: str = "local"
    # The Pulumi stack (ORG/PROJECT/STACK) and the directory holding Pulumi.yaml,
    # for the aws dispatcher only.
    stack: str | None = None
    project_dir: Path | None = None
    # Host names beyond loopback the API answers to (--allowed-host), and the request
    # body limit in bytes (--max-request-bytes; None: STREAMBOSS_MAX_REQUEST_BYTES or 1 MiB).
    allowed_hosts: tuple[str, ...] = ()
    max_request_bytes: int | None = None
    # RabbitMQ's management API (--management-url); None: STREAMBOSS_MANAGEMENT_URL, else
    # beside the broker. Where the broker URL came from, for status.
    management_url: str | None = None
    broker_source: str = BROKER_URL_ENV
    # aws only: whether this manager updates the stack (--no-deploy: `pulumi up` runs
    # elsewhere; the manager node publishes the metrics and reads the groups).
    deploy: bool = True


@dataclass(frozen=True)
class ExternalStack:
    """A stack this manager names but never updates (--no-deploy): it needs no Pulumi CLI."""

    name: str

    def apply(self, config: object, on_phase: object = None) -> dict[str, object]:
        raise PulumiUnavailable(f"--no-deploy: stack {self.name} is updated elsewhere")


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def token_for(host: str) -> str | None:
    """The bearer token from ``STREAMBOSS_TOKEN``; None means: generate one (loopback).

    Raises:
        ServerError: a non-loopback bind without ``STREAMBOSS_TOKEN``: clients on other
            machines need a token the operator chose and handed out.
    """
    token = os.environ.get(TOKEN_ENV) or None
    if token is None and not is_loopback(host):
        raise ServerError(f"binding the manager to {host} requires a token: set {TOKEN_ENV} "
                          "(clients send it as a bearer token)")
    return token


def guard_policy(config: ServerConfig, token: str) -> GuardPolicy:
    """What the HTTP guard lets in (see manager/http_guard.py).

    Raises:
        ServerError: a malformed --allowed-host or body limit.
    """
    try:
        return GuardPolicy.for_bind(config.host, token, parse_allowed_hosts(config.allowed_hosts),
                                    parse_max_body(config.max_request_bytes))
    except GuardConfigError as exc:
        raise ServerError(str(exc)) from None


def local_token(config: ServerConfig) -> str:
    """The token this manager generated (once; kept in its state directory), with the
    pointer the CLI on this machine follows to it.

    Raises:
        ServerError: the state directory cannot hold it.
    """
    try:
        token = api_token.load_or_create(config.state_dir)
    except OSError as exc:
        raise ServerError(f"cannot keep the API token in {config.state_dir} "
                          f"({exc.strerror or exc}): pass a writable --state-dir or set "
                          f"{TOKEN_ENV}") from None
    try:
        api_token.publish_pointer(config.port, config.state_dir)
    except OSError as exc:
        # The CLI still finds the token in the state directory when it runs from the
        # manager's directory (or with --state-dir / STREAMBOSS_STATE_DIR).
        log.warning("cannot leave a pointer to the API token in %s (%s): the CLI finds the "
                    "token only through the state directory", api_token.pointer_dir(),
                    exc.strerror or exc)
    return token


def check_child_settings() -> ChildIsolation:
    """The child settings (``STREAMBOSS_PASS_ENV``, ``STREAMBOSS_CHILD_USER``) the local
    agents inherit, checked now: an agent refusing them would only exit and be restarted.

    Raises:
        ServerError: a credential to pass through, a bad name, an unusable user.
    """
    try:
        return child_isolation({})
    except IsolationError as exc:
        raise ServerError(str(exc)) from None


def warn_about_programs(children: ChildIsolation) -> None:
    """Say it when the programs agents run will be root: non-dumpable does not keep root
    out of the agents' and the manager's memory and environment."""
    if children.user is None and os.geteuid() == 0:
        print(f"warning: running as root without {CHILD_USER_ENV}: the programs agents run "
              "are root too and can read every secret of this machine; set "
              f"{CHILD_USER_ENV}=nobody (or a user of their own)", file=sys.stderr, flush=True)


def check_port_free(host: str, port: int) -> None:
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as exc:
            raise ServerError(f"cannot listen on {host}:{port} ({exc.strerror}): is another "
                              "manager running? pick another --port") from None


def _stop_on_sigterm(_signum: int, _frame: object) -> None:
    raise SystemExit(0)


def lock_state_dir(state_dir: Path) -> TextIO:
    """Hold the state directory for this manager: two managers on one directory
    would each start a set of agents.

    Raises:
        ServerError: another live manager holds it.
    """
    private_dir(state_dir)
    # 0600 like everything in the state directory.
    handle = os.fdopen(open_private(state_dir / "manager.lock", os.O_RDWR | os.O_APPEND), "a+")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        holder = handle.read().strip() or "unknown"
        handle.close()
        raise ServerError(f"another manager (pid {holder}) uses the state directory "
                          f"{state_dir}: stop it or pass another --state-dir") from None
    handle.seek(0)
    handle.truncate()
    handle.write(f"{os.getpid()}\n")
    handle.flush()
    return handle


def aws_stack(config: ServerConfig) -> PulumiStack | ExternalStack:
    """The stack the aws dispatcher updates, checked: CLI, SDK, stack name, program;
    with --no-deploy only its name (the agent groups' tag is its last part).

    Raises:
        ServerError: no --stack, a malformed one, no Pulumi CLI or SDK, no Pulumi.yaml.
    """
    if not config.stack:
        raise ServerError("--dispatcher aws needs --stack ORG/PROJECT/STACK (env "
                          "STREAMBOSS_STACK)")
    if not config.deploy:
        try:
            return ExternalStack(check_stack_name(config.stack))
        except ValueError as exc:
            raise ServerError(str(exc)) from None
    try:
        stack = PulumiStack(check_stack_name(config.stack),
                            config.project_dir or default_project_dir())
        stack.check()
    except (PulumiUnavailable, ValueError) as exc:
        raise ServerError(str(exc)) from None
    return stack


def serve(config: ServerConfig, banner: bool = False) -> None:
    """Run the manager in the foreground until SIGINT/SIGTERM; stop every agent it started.

    Raises:
        ServerError: bad bind, busy port, an unknown dispatcher, or (aws) a stack
            that cannot be updated from here (see :func:`aws_stack`).
    """
    # The manager holds the broker URL, its token and every definition's env values: no
    # process of its user (a program its local agents run) may read its memory or its
    # /proc/<pid>/environ.
    make_non_dumpable()
    # Before anything binds, locks or starts: a manager that cannot update its
    # stack must say so now, not in a log line minutes later.
    stack = aws_stack(config) if config.dispatcher == "aws" else None
    if config.dispatcher not in ("local", "aws"):
        raise ServerError(f"unknown dispatcher {config.dispatcher!r}: use local or aws")
    token = token_for(config.host)
    # Checked before anything is written: a typo in a host name is the operator's to fix.
    guard_policy(config, token or "")
    try:
        consumer_timeout = consumer_timeout_limit()
    except ConfigError as exc:
        raise ServerError(str(exc)) from None
    children = check_child_settings()
    try:  # a malformed --management-url or STREAMBOSS_MANAGEMENT_URL: one line, exit 2
        management_endpoint(config.broker_url, config.management_url)
    except ManagementURLError as exc:
        raise ServerError(str(exc)) from None
    check_port_free(config.host, config.port)
    lock = lock_state_dir(config.state_dir)
    # Once it is sure to start: a refusal stays one line.
    warn_about_programs(children)
    generated = token is None
    if token is None:
        token = local_token(config)
    else:
        # A pointer left for this port by an earlier manager with a generated token
        # would send the CLI a token this one does not take.
        api_token.withdraw_pointer(config.port)
    store = Store(config.state_dir)
    local = LocalDispatcher(config.state_dir, config.broker_url)
    dispatcher: LocalDispatcher | AwsDispatcher = local
    if stack is not None:
        dispatcher = AwsDispatcher(store, stack, local, deploys=config.deploy)
    replaced = dispatcher.replace_previous()
    if replaced:
        log.info("stopped %d agent(s) left by a previous manager", replaced)
    reconciler = Reconciler(store, Broker(config.broker_url, config.management_url), dispatcher)
    archive_store = os.environ.get(ARCHIVE_STORE_ENV) or f"file://{archives_dir(config.state_dir)}"
    api_broker = Broker(config.broker_url, config.management_url)
    connections = Connections(api_broker, config.broker_source, archive_store,
                              ARCHIVE_STORE_ENV if os.environ.get(ARCHIVE_STORE_ENV)
                              else DEFAULT_SOURCE)
    manager = Manager(store, api_broker, reconciler, token, config.dispatcher,
                      archive_store,
                      dispatcher.describe if isinstance(dispatcher, AwsDispatcher) else None,
                      consumer_timeout, connections)
    # Said once at start, so the journal shows what the node's environment gave it.
    log.info("broker %s (from %s); management API %s (from %s); archive store %s (from %s)",
             redact(config.broker_url), config.broker_source, api_broker.management_url,
             api_broker.management_source, redact(archive_store), connections.archive_source)
    app = create_app(manager, guard_policy(config, token))
    url = f"http://{config.host}:{config.port}"
    if banner:
        objects = objects_dir(config.state_dir)
        objects.mkdir(parents=True, exist_ok=True)
        print(f"streamboss is up\n"
              f"  manager API   {url}/v1   (OpenAPI: {url}/docs)\n"
              f"  broker        {redact(config.broker_url)}\n"
              f"  management    {api_broker.management_url}\n"
              f"  state         {config.state_dir}\n"
              f"  objects       file://{objects}\n"
              f"  archives      {archive_store}\n"
              f"  agent logs    {config.state_dir / 'logs'}\n"
              f"  API token     "
              + (f"{api_token.token_file(config.state_dir)} (the CLI on this machine "
                 f"reads it)\n" if generated else f"from {TOKEN_ENV}\n") +
              f"In another shell: export STREAMBOSS_URL={url}; streamboss --help\n"
              f"Ctrl-C stops the manager and every agent it started.", flush=True)
    if threading.current_thread() is threading.main_thread():
        # uvicorn handles SIGTERM itself, then re-raises it once the server has shut down.
        # With the default disposition that kills the process before the `finally` below
        # runs, orphaning every agent: turn it into an exit that drains them first.
        signal.signal(signal.SIGTERM, _stop_on_sigterm)
    try:
        if isinstance(dispatcher, AwsDispatcher) and stack is not None:
            dispatcher.start()
            if isinstance(stack, PulumiStack):
                log.info("dispatching to the Pulumi stack %s (program in %s)", stack.name,
                         stack.project_dir)
            else:
                log.info("publishing the scaling metrics of the Pulumi stack %s, whose "
                         "updates run elsewhere (--no-deploy)", stack.name)
        reconciler.start()
        uvicorn.run(app, host=config.host, port=config.port, log_level="warning",
                    access_log=False)
    finally:
        reconciler.stop()
        dispatcher.stop_all()
        manager.broker.close()
        reconciler.broker.close()
        store.close()
        if generated:
            api_token.withdraw_pointer(config.port, config.state_dir)
        lock.close()
