"""The manager's HTTP+JSON API under ``/v1`` (OpenAPI at ``/openapi.json``).

Declarations are validated by the store; the broker topology they need is
created before the store commits, so a declaration the broker cannot carry is
not written, and a stream or operation exists on the broker by the time the
call returns (nothing published right after is lost).
"""

from __future__ import annotations

import base64
import contextlib
import hmac
import threading
from collections.abc import Callable
from typing import Annotated, Any, Literal

import pika.exceptions
from fastapi import Body, Depends, FastAPI, HTTPException, Query, Request
from fastapi.responses import JSONResponse, PlainTextResponse
from pydantic import BaseModel, Field

from streamboss.agent import objects
from streamboss.agent.archive import ArchiveError, ArchiveIndex
from streamboss.agent.config import DEFAULT_CONSUMER_TIMEOUT, ConfigError, parse_definition

from . import consumer_timeout
from .archive_stores import ArchiveStoreRefused, check_archive_store
from .broker import Broker, BrokerUnavailable
from .graph import render_graph
from .model import Archive
from .reconciler import Reconciler
from .routes import dead_letters as dead_letter_routes
from .store import Store, StoreError


class StreamIn(BaseModel):
    name: str


class OperationIn(BaseModel):
    name: str
    definition: str = Field(description="definition id or name (newest version)")
    input: str
    output: str
    policy: dict[str, Any] = Field(default_factory=dict)


class ArchiveIn(BaseModel):
    stream: str
    store: str | None = Field(default=None, description="URL prefix; default the manager's")
    segment_bytes: int | None = None
    segment_seconds: float | None = None


class Manager:
    """What the API works on: the store, a broker handle for topology, the reconciler."""

    def __init__(self, store: Store, broker: Broker, reconciler: Reconciler | None,
                 token: str | None, dispatcher_name: str = "local",
                 archive_store: str = "",
                 dispatcher_view: Callable[[], dict[str, Any]] | None = None,
                 consumer_timeout: float = DEFAULT_CONSUMER_TIMEOUT) -> None:
        self.archive_store = archive_store
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


def create_app(manager: Manager) -> FastAPI:
    app = FastAPI(title="streamboss manager", version="1", openapi_url="/openapi.json")

    def authorize(request: Request) -> None:
        if manager.token is None:
            return
        header = request.headers.get("authorization", "")
        scheme, _, value = header.partition(" ")
        supplied = ""
        if scheme.lower() == "bearer":
            supplied = value.strip()
        elif scheme.lower() == "basic":
            # The seed's registration call sends HTTP basic auth; the token is the password.
            try:
                supplied = base64.b64decode(value).decode().partition(":")[2]
            except ValueError:
                supplied = ""
        if not hmac.compare_digest(supplied.encode(), manager.token.encode()):
            raise HTTPException(401, "missing or wrong token: set STREAMBOSS_TOKEN",
                                headers={"WWW-Authenticate": "Bearer"})

    @app.exception_handler(StoreError)
    def store_error(_request: Request, exc: StoreError) -> JSONResponse:
        return JSONResponse({"detail": str(exc)}, status_code=exc.status)

    @app.exception_handler(BrokerUnavailable)
    def broker_error(_request: Request, exc: BrokerUnavailable) -> JSONResponse:
        return JSONResponse({"detail": str(exc)}, status_code=503)

    v1 = [Depends(authorize)]

    # -- streams -----------------------------------------------------------------

    @app.get("/v1/streams", dependencies=v1)
    def list_streams() -> list[dict[str, Any]]:
        return [{"name": s.name, "created_at": s.created_at} for s in manager.store.streams()]

    @app.post("/v1/streams", dependencies=v1, status_code=201)
    def create_stream(stream: StreamIn) -> dict[str, Any]:
        manager.store.check_stream_name(stream.name)
        manager.on_broker(lambda b: b.ensure_stream(stream.name))
        created, new = manager.store.create_stream(stream.name)
        manager.changed()
        return {"name": created.name, "created_at": created.created_at, "created": new}

    @app.delete("/v1/streams/{name}", dependencies=v1)
    def delete_stream(name: str, force: bool = False) -> dict[str, Any]:
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

    @app.get("/v1/definitions", dependencies=v1)
    def list_definitions() -> list[dict[str, Any]]:
        return [d.to_dict() for d in manager.store.definitions()]

    @app.post("/v1/definitions", dependencies=v1, status_code=201)
    def define_process(body: Annotated[Any, Body()],
                       name: Annotated[str | None, Query()] = None) -> dict[str, Any]:
        manager.check_consumer_timeout(body)
        return manager.store.define_process(body, name=name).to_dict()

    @app.get("/v1/definitions/{ref}", dependencies=v1)
    def get_definition(ref: str) -> dict[str, Any]:
        definition = manager.store.get_definition(ref)
        if definition is None:
            raise StoreError(f"process definition {ref!r} does not exist", 404)
        return definition.to_dict()

    @app.delete("/v1/definitions/{ref}", dependencies=v1)
    def delete_process(ref: str, force: bool = False) -> dict[str, Any]:
        removed = manager.store.delete_process(ref, force=force)
        manager.changed(removed)
        return {"deleted": ref, "operations_deleted": removed}

    @app.post("/api/process_definition/", dependencies=v1, include_in_schema=False)
    def seed_define_process(body: Annotated[Any, Body()]) -> dict[str, Any]:
        # The seed's own registration call, answered the way its tools expect.
        manager.check_consumer_timeout(body)
        definition = manager.store.define_process(body)
        return {"id": definition.id, "name": definition.name}

    # -- operations --------------------------------------------------------------

    @app.get("/v1/operations", dependencies=v1)
    def list_operations() -> list[dict[str, Any]]:
        return [op.to_dict() for op in manager.store.operations()]

    @app.post("/v1/operations", dependencies=v1, status_code=201)
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
            op.name, op.definition, op.input, op.output, op.policy,
            before_commit=lambda: manager.on_broker(topology))
        manager.changed()
        return created.to_dict()

    @app.delete("/v1/operations/{name}", dependencies=v1)
    def delete_operation(name: str) -> dict[str, Any]:
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

    @app.get("/v1/archives", dependencies=v1)
    def list_archives() -> list[dict[str, Any]]:
        return [archive_view(a) for a in manager.store.archives()]

    @app.get("/v1/archives/{stream}", dependencies=v1)
    def get_archive(stream: str) -> dict[str, Any]:
        archive = manager.store.get_archive(stream)
        if archive is None:
            raise StoreError(f"stream {stream!r} has never been archived: start with "
                             f"`streamboss archive-stream {stream}`", 404)
        return archive_view(archive)

    @app.post("/v1/archives", dependencies=v1, status_code=201)
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

    @app.delete("/v1/archives/{stream}", dependencies=v1)
    def stop_archive(stream: str) -> dict[str, Any]:
        archive = manager.store.stop_archive(stream)
        manager.changed()
        return archive_view(archive)

    # -- observation -------------------------------------------------------------

    @app.get("/v1/status", dependencies=v1)
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
        }

    @app.get("/v1/graph", dependencies=v1, response_class=PlainTextResponse)
    def graph(format: Literal["mermaid", "dot"] = "mermaid") -> str:
        return render_graph(manager.store.streams(), manager.store.operations(), format)

    @app.get("/v1/health")
    def health() -> dict[str, str]:
        return {"status": "ok"}

    app.include_router(dead_letter_routes.router(manager), dependencies=v1)
    return app
