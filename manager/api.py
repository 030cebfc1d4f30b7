"""The manager's HTTP+JSON API under ``/v1`` (OpenAPI at ``/openapi.json``).

Declarations are validated by the store; the broker topology they need is
created before the store commits, so a declaration the broker cannot carry is
not written, and a stream or operation exists on the broker by the time the
call returns (nothing published right after is lost).
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable
from typing import Annotated, Any, Literal

import pika.exceptions
from fastapi import Body, Depends, FastAPI, HTTPException, Path, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse
from fastapi.routing import APIRoute
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match

from streamboss.agent import objects
from streamboss.agent.archive import ArchiveError, ArchiveIndex
from streamboss.agent.config import DEFAULT_CONSUMER_TIMEOUT, ConfigError, parse_definition

from . import api_token, consumer_timeout
from .api_models import (
    NAME_SCHEMA,
    PUBLIC,
    READ,
    WRITE,
    ArchiveIn,
    OperationIn,
    StreamIn,
    check_definition_body,
    errors,
    schema_components,
)
from .archive_stores import ArchiveStoreRefused, check_archive_store
from .broker import Broker, BrokerUnavailable
from .connections import Connections
from .graph import render_graph
from .http_guard import GuardPolicy, HttpGuard
from .model import Archive
from .reconciler import Reconciler
from .routes import dead_letters as dead_letter_routes
from .routes import stack_config as stack_config_routes
from .store import Store, StoreError

# A name in a path: the pattern is the schema's; the store answers 404 for any other.
NamePath = Annotated[str, Path(json_schema_extra=NAME_SCHEMA)]
# Declares the token in the OpenAPI document; HttpGuard and authorize() check it.
BEARER = HTTPBearer(auto_error=False, description="the manager's token: STREAMBOSS_TOKEN, or "
                    "the one it generated in its state directory")
# The definition routes read their body themselves (see checked_definition); this is
# the schema it is checked against.
DEFINITION_BODY = {"requestBody": {"required": True, "content": {"application/json": {
    "schema": {"$ref": "#/components/schemas/DefinitionBody"}}}}}


def checked_definition(body: Any) -> dict[str, Any]:
    """``body`` as the schema reads it (see check_definition_body), if it is a process
    definition the schema allows.

    Raises:
        StoreError: (400) one line naming the field: parse_definition's words for the
            usual mistakes (no exec, an unknown field), else the schema's.
    """
    try:
        return check_definition_body(body)
    except ValueError as exc:
        try:
            parse_definition(body)
        except ConfigError as friendly:
            raise StoreError(str(friendly)) from None
        except (TypeError, ValueError, OverflowError):
            pass  # types parse_definition was never meant to see: the schema's words
        raise StoreError(str(exc)) from None


class Manager:
    """What the API works on: the store, a broker handle for topology, the reconciler."""

    def __init__(self, store: Store, broker: Broker, reconciler: Reconciler | None,
                 token: str | None, dispatcher_name: str = "local",
                 archive_store: str = "",
                 dispatcher_view: Callable[[], dict[str, Any]] | None = None,
                 consumer_timeout: float = DEFAULT_CONSUMER_TIMEOUT,
                 connections: Connections | None = None) -> None:
        self.archive_store = archive_store
        # The broker, management API and archive store this manager uses, for /v1/status.
        self.connections = connections
        # The broker's consumer_timeout in seconds (STREAMBOSS_BROKER_CONSUMER_TIMEOUT):
        # what a definition's agents may hold one delivery for on brokers before 3.12.
        self.consumer_timeout = consumer_timeout
        # The dispatcher's own state for /v1/status (aws: the stack update and the
        # CloudWatch side); None for the local dispatcher.
        self.dispatcher_view = dispatcher_view
        self.store = store
        self.broker = broker
        self.reconciler = reconciler
        self.token = token
        self.dispatcher_name = dispatcher_name
        self.broker_lock = threading.Lock()

    def on_broker(self, action: Callable[[Broker], None]) -> None:
        """Run ``action`` on the broker, one caller at a time (pika is not thread-safe)."""
        with self.broker_lock:
            for attempt in (1, 2):
                try:
                    action(self.broker)
                    return
                except pika.exceptions.ChannelClosedByBroker as exc:
                    # The broker answered and refused (a queue declared with other
                    # arguments, a stream deleted behind our back): the same again
                    # would be refused again, and it is not the broker being away.
                    self.broker.reset()
                    raise StoreError(f"the broker refused the topology: {exc.reply_code} "
                                     f"{exc.reply_text}", 409) from None
                except pika.exceptions.AMQPError as exc:
                    # A connection the broker dropped since the last call: retry on a
                    # fresh one once before telling the caller.
                    self.broker.reset()
                    if attempt == 2:
                        raise BrokerUnavailable(
                            f"broker error ({exc.__class__.__name__}): is RabbitMQ "
                            "running? try again") from None

    def changed(self, deleted_operations: list[str] | None = None) -> None:
        if self.reconciler is not None:
            if deleted_operations:
                self.reconciler.retire(deleted_operations)
            self.reconciler.wake()

    def broker_version(self) -> tuple[int, ...] | None:
        """The broker's version, or None when it cannot be reached or does not say."""
        found: list[tuple[int, ...] | None] = []
        try:
            self.on_broker(lambda b: found.append(b.server_version()))
        except BrokerUnavailable:
            return None
        return found[0] if found else None

    def check_consumer_timeout(self, data: Any) -> None:
        """Refuse a definition that could hold a delivery past the broker's consumer
        timeout, unless the broker can lift it per queue (3.12+: the operation's
        policy does, at create-operation). The broker is asked only when it matters.

        Raises:
            StoreError: (400) the one-line refusal.
        """
        try:
            definition = parse_definition(data)
        except ConfigError:
            return  # malformed: the store refuses it with its own message
        reason = consumer_timeout.refusal(definition, self.consumer_timeout)
        if reason is None:
            return
        if consumer_timeout.per_queue_supported(self.broker_version()) and \
                definition.timeout is not None:
            return
        raise StoreError(reason)


def allowed_methods(app: FastAPI, request: Request) -> list[str]:
    """Every method some route of ``app`` answers on ``request``'s path."""
    methods: set[str] = set()
    for route in app.routes:
        match, _ = route.matches({**request.scope, "method": "GET"})
        if match != Match.NONE and isinstance(route, APIRoute):
            methods |= route.methods or set()
    return sorted(methods)


def create_app(manager: Manager, guard: GuardPolicy | None = None) -> FastAPI:
    """The API over ``manager``, behind :class:`HttpGuard` with ``guard`` (by default:
    loopback names only, ``manager.token`` required, 1 MiB bodies)."""
    app = FastAPI(title="streamboss manager", version="1", openapi_url="/openapi.json")
    app.add_middleware(HttpGuard, policy=guard or GuardPolicy.for_bind("127.0.0.1",
                                                                       manager.token))

    def authorize(request: Request, _credentials: Annotated[
            HTTPAuthorizationCredentials | None, Depends(BEARER)]) -> None:
        # HttpGuard has checked already, before the body was read; this declares the
        # scheme in the OpenAPI document, and holds should a route be reached without it.
        if manager.token is None:
            return
        if not api_token.matches(request.headers.get("authorization", ""), manager.token):
            raise HTTPException(401, "missing or wrong token: set STREAMBOSS_TOKEN",
                                headers={"WWW-Authenticate": "Bearer"})

    describe = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = describe()
            schema.setdefault("components", {}).setdefault("schemas", {}).update(
                schema_components())
        return app.openapi_schema or {}

    app.openapi = openapi  # type: ignore[method-assign]

    @app.exception_handler(StoreError)
    def store_error(_request: Request, exc: StoreError) -> JSONResponse:
        return JSONResponse({"detail": str(exc)}, status_code=exc.status)

    @app.exception_handler(BrokerUnavailable)
    def broker_error(_request: Request, exc: BrokerUnavailable) -> JSONResponse:
        return JSONResponse({"detail": str(exc)}, status_code=503)

    @app.exception_handler(StarletteHTTPException)
    def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        headers = dict(exc.headers or {})
        if exc.status_code == 405:
            # Starlette names the methods of the first route on the path only; each
            # method is a route of its own here, so name them all.
            headers["Allow"] = ", ".join(allowed_methods(app, request))
        return JSONResponse({"detail": str(exc.detail)}, status_code=exc.status_code,
                            headers=headers)

    @app.exception_handler(RequestValidationError)
    def invalid_request(_request: Request, exc: RequestValidationError) -> JSONResponse:
        # FastAPI's own answer echoes each bad value ("input"), which fails on an infinity
        # (a 500) and would repeat whatever was sent (env values included): where and
        # what only.
        errors = [{"type": str(e.get("type", "")), "loc": [str(p) if not isinstance(p, int)
                                                            else p for p in e.get("loc", ())],
                   "msg": str(e.get("msg", ""))} for e in exc.errors()]
        return JSONResponse({"detail": errors}, status_code=422)

    v1 = [Depends(authorize)]

    # -- streams -----------------------------------------------------------------

    @app.get("/v1/streams", dependencies=v1, responses=errors(*READ))
    def list_streams() -> list[dict[str, Any]]:
        return [{"name": s.name, "created_at": s.created_at} for s in manager.store.streams()]

    @app.post("/v1/streams", dependencies=v1, status_code=201,
              responses=errors(*WRITE, 409, 503))
    def create_stream(stream: StreamIn) -> dict[str, Any]:
        manager.store.check_stream_name(stream.name)
        manager.on_broker(lambda b: b.ensure_stream(stream.name))
        created, new = manager.store.create_stream(stream.name)
        manager.changed()
        return {"name": created.name, "created_at": created.created_at, "created": new}

    @app.delete("/v1/streams/{name}", dependencies=v1,
                responses=errors(*WRITE, 404, 409, 503))
    def delete_stream(name: NamePath, force: bool = False) -> dict[str, Any]:
        removed = manager.store.delete_stream(
            name, force=force, before_commit=lambda: manager.on_broker(
                lambda b: b.delete_stream(name)))
        # Once more after the commit: a reconciler pass that read the stream before
        # the commit may have declared it again in between (it checks after
        # declaring, so one of the two deletes comes after its declare).
        manager.on_broker(lambda b: b.delete_stream(name))
        manager.changed(removed)
        return {"deleted": name, "operations_deleted": removed}

    # -- process definitions -----------------------------------------------------

    @app.get("/v1/definitions", dependencies=v1, responses=errors(*READ))
    def list_definitions() -> list[dict[str, Any]]:
        return [d.to_dict() for d in manager.store.definitions()]

    @app.post("/v1/definitions", dependencies=v1, status_code=201,
              responses=errors(*WRITE, 503), openapi_extra=DEFINITION_BODY)
    def define_process(body: Annotated[Any, Body()],
                       name: Annotated[str | None, Query(json_schema_extra=NAME_SCHEMA,
                                                         description="name the definition "
                                                         "(else its 'name' field)")] = None
                       ) -> dict[str, Any]:
        body = checked_definition(body)
        manager.check_consumer_timeout(body)
        return manager.store.define_process(body, name=name).to_dict()

    @app.get("/v1/definitions/{ref}", dependencies=v1, responses=errors(*READ, 404))
    def get_definition(ref: NamePath) -> dict[str, Any]:
        definition = manager.store.get_definition(ref)
        if definition is None:
            raise StoreError(f"process definition {ref!r} does not exist", 404)
        return definition.to_dict()

    @app.delete("/v1/definitions/{ref}", dependencies=v1,
                responses=errors(*WRITE, 404, 409, 503))
    def delete_process(ref: NamePath, force: bool = False) -> dict[str, Any]:
        removed = manager.store.delete_process(ref, force=force)
        manager.changed(removed)
        return {"deleted": ref, "operations_deleted": removed}

    @app.post("/api/process_definition/", dependencies=v1, include_in_schema=False)
    def seed_define_process(body: Annotated[Any, Body()]) -> dict[str, Any]:
        # The seed's own registration call, answered the way its tools expect.
        body = checked_definition(body)
        manager.check_consumer_timeout(body)
        definition = manager.store.define_process(body)
        return {"id": definition.id, "name": definition.name}

    # -- operations --------------------------------------------------------------

    @app.get("/v1/operations", dependencies=v1, responses=errors(*READ))
    def list_operations() -> list[dict[str, Any]]:
        return [op.to_dict() for op in manager.store.operations()]

    @app.post("/v1/operations", dependencies=v1, status_code=201,
              responses=errors(*WRITE, 404, 409, 503))
    def create_operation(op: OperationIn) -> dict[str, Any]:
        def topology(b: Broker) -> None:
            # Inside the store's transaction: the same definition the store resolved.
            # A definition stored under a larger limit (or on a newer broker) is
            # checked again against this broker before anything is declared.
            found = manager.store.get_definition(op.definition)
            definition = consumer_timeout.parsed(found.body) if found else None
            reason = (consumer_timeout.refusal(definition, manager.consumer_timeout)
                      if definition is not None else None)
            lift = None
            if definition is not None and reason is not None:
                if not consumer_timeout.per_queue_supported(b.server_version()):
                    raise StoreError(reason)
                lift = consumer_timeout.policy(op.name, definition, manager.consumer_timeout)
                if lift is None:  # no timeout at all: nothing finite to lift it to
                    raise StoreError(reason)
            b.ensure_stream(op.output)
            b.ensure_operation(op.name, op.input)
            if lift is not None:
                # Before the commit, so no agent consumes before the policy is in place.
                b.put_policy(consumer_timeout.policy_name(op.name), lift)

        created = manager.store.create_operation(
            op.name, op.definition, op.input, op.output,
            op.policy.model_dump(exclude_none=True),
            before_commit=lambda: manager.on_broker(topology))
        manager.changed()
        return created.to_dict()

    @app.delete("/v1/operations/{name}", dependencies=v1,
                responses=errors(*WRITE, 404, 503))
    def delete_operation(name: NamePath) -> dict[str, Any]:
        manager.store.delete_operation(name)
        manager.changed([name])
        if consumer_timeout.per_queue_supported(manager.broker_version()):
            # Its consumer-timeout policy, if it had one; left behind it would match
            # only the queues of an operation of the same name.
            with contextlib.suppress(BrokerUnavailable, StoreError):
                manager.on_broker(lambda b: b.delete_policy(
                    consumer_timeout.policy_name(name)))
        return {"deleted": name}

    # -- archives ----------------------------------------------------------------

    def archive_view(archive: Archive) -> dict[str, Any]:
        view = archive.to_dict()
        state = manager.reconciler.archive_status.get(archive.stream) \
            if manager.reconciler else None
        view["running"] = state.running if state else 0
        view["backlog"] = state.backlog if state else None
        return view

    @app.get("/v1/archives", dependencies=v1, responses=errors(*READ))
    def list_archives() -> list[dict[str, Any]]:
        return [archive_view(a) for a in manager.store.archives()]

    @app.get("/v1/archives/{stream}", dependencies=v1, responses=errors(*READ, 404))
    def get_archive(stream: NamePath) -> dict[str, Any]:
        archive = manager.store.get_archive(stream)
        if archive is None:
            raise StoreError(f"stream {stream!r} has never been archived: start with "
                             f"`streamboss archive-stream {stream}`", 404)
        return archive_view(archive)

    @app.post("/v1/archives", dependencies=v1, status_code=201,
              responses=errors(*WRITE, 404, 409, 503))
    def start_archive(body: ArchiveIn) -> dict[str, Any]:
        def prepare(archive: Archive) -> None:
            # The store is checked before anything is written: a bad URL, a missing
            # bucket or refused credentials is the caller's to fix now, not an
            # archiver's to retry forever.
            try:
                ArchiveIndex.load(archive.store, archive.stream)
            except (ArchiveError, objects.ObjectStoreError) as exc:
                raise StoreError(f"archive store {archive.store}: {exc}") from None
            manager.on_broker(lambda b: b.ensure_archive(archive.stream))

        store = (body.store or manager.archive_store).rstrip("/")
        try:
            # Archivers write as the manager: only under its own archive prefixes.
            check_archive_store(store, manager.archive_store)
        except ArchiveStoreRefused as exc:
            raise StoreError(str(exc)) from None
        archive, started = manager.store.start_archive(
            body.stream, store, body.segment_bytes, body.segment_seconds,
            before_commit=prepare)
        manager.changed()
        return {**archive_view(archive), "started": started}

    @app.delete("/v1/archives/{stream}", dependencies=v1,
                responses=errors(*WRITE, 404, 503))
    def stop_archive(stream: NamePath) -> dict[str, Any]:
        archive = manager.store.stop_archive(stream)
        manager.changed()
        return archive_view(archive)

    # -- observation -------------------------------------------------------------

    @app.get("/v1/status", dependencies=v1, responses=errors(*READ))
    def status() -> dict[str, Any]:
        reconciler = manager.reconciler
        operations = [s.to_dict() for s in reconciler.status.values()] if reconciler else []
        return {
            "dispatcher": manager.dispatcher_name,
            "reconciler_error": reconciler.last_error if reconciler else None,
            "demand_observed": reconciler.management if reconciler else False,
            "operations": operations,
            "archives": [s.to_dict() for s in reconciler.archive_status.values()]
            if reconciler else [],
            "stack": None,
            "cloud": None,
            **(manager.dispatcher_view() if manager.dispatcher_view else {}),
            # What it uses and whether each answers (credentials redacted).
            "connections": manager.connections.view() if manager.connections else None,
        }

    @app.get("/v1/graph", dependencies=v1, response_class=PlainTextResponse,
             responses=errors(*READ))
    def graph(format: Literal["mermaid", "dot"] = "mermaid") -> str:
        return render_graph(manager.store.streams(), manager.store.operations(), format)

    @app.get("/v1/health", responses=errors(*PUBLIC))
    def health() -> dict[str, str]:
        return {"status": "ok"}

    app.include_router(dead_letter_routes.router(manager), dependencies=v1)
    app.include_router(stack_config_routes.router(manager), dependencies=v1)
    return app
