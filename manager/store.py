"""The declaration store: SQLite in the state directory, one file, WAL.

Every declaration is validated before anything is written, and each change is
one transaction, so a refused declaration leaves nothing half written.

Many threads use one store: the API's handlers (a thread pool), the
reconciler and the AWS dispatcher's threads. Each thread gets a connection of
its own, and writes take one lock; see :class:`Store`.
"""

from __future__ import annotations

import json
import sqlite3
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import fields
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from streamboss.agent.config import ConfigError, parse_definition
from streamboss.agent.naming import InvalidName, check_name

from .model import (
    DEFAULT_SEGMENT_BYTES,
    DEFAULT_SEGMENT_SECONDS,
    Archive,
    Definition,
    Operation,
    ScalingPolicy,
    Stream,
)
from .private_files import FILE_MODE, private_dir, private_file, tighten

# A segment smaller than this would make an object per handful of messages.
MIN_SEGMENT_BYTES = 4096

DB_NAME = "streamboss.db"
# The files SQLite keeps beside the database in WAL mode.
WAL_SUFFIXES = ("-wal", "-shm", "-journal")
# How long a write waits for the writes before it. Writes are short, but some
# hold the transaction open across a broker round trip (topology before commit),
# and a broker that is slow to answer must not turn a queue of writers into
# errors: longer than the broker client's own connect and socket timeouts.
WRITE_WAIT = 30.0

SCHEMA = """
CREATE TABLE IF NOT EXISTS streams (
    name TEXT PRIMARY KEY,
    created_at TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS definitions (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    name TEXT NOT NULL,
    version INTEGER NOT NULL,
    body TEXT NOT NULL,
    created_at TEXT NOT NULL,
    UNIQUE (name, version)
);
CREATE TABLE IF NOT EXISTS operations (
    name TEXT PRIMARY KEY,
    definition_id INTEGER NOT NULL REFERENCES definitions(id),
    input TEXT NOT NULL REFERENCES streams(name),
    output TEXT NOT NULL REFERENCES streams(name),
    policy TEXT NOT NULL,
    created_at TEXT NOT NULL
);
-- No foreign key to streams: a stopped archive outlives its stream, and can
-- still be replayed onto another one.
CREATE TABLE IF NOT EXISTS archives (
    stream TEXT PRIMARY KEY,
    store TEXT NOT NULL,
    segment_bytes INTEGER NOT NULL,
    segment_seconds REAL NOT NULL,
    active INTEGER NOT NULL,
    created_at TEXT NOT NULL,
    stopped_at TEXT
);
"""


class StoreError(ValueError):
    """A declaration refused; ``status`` is the HTTP status that says why."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


# The largest id SQLite stores: a larger number names no definition.
MAX_ID = 2**63 - 1


def _is_id(ref: str) -> bool:
    """Whether ``ref`` is a definition id (ASCII digits; '²' is a digit to str.isdigit)."""
    return ref.isascii() and ref.isdigit()


def definition_id(ref: str) -> int | None:
    """``ref`` as a definition id, or None when it is a name or out of SQLite's range."""
    if not _is_id(ref):
        return None
    ident = int(ref)
    return ident if ident <= MAX_ID else None


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _name(kind: str, name: str) -> str:
    try:
        return check_name(kind, name)
    except InvalidName as exc:
        raise StoreError(str(exc)) from None


def parse_policy(values: dict[str, Any] | None) -> ScalingPolicy:
    """Validate a scaling policy given as a partial dict over the defaults.

    Raises:
        StoreError: an unknown field, a negative number, or min > max.
    """
    values = {k.replace("-", "_"): v for k, v in (values or {}).items() if v is not None}
    known = {f.name for f in fields(ScalingPolicy)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise StoreError(f"unknown scaling policy field(s) {', '.join(unknown)}: "
                         f"allowed are {', '.join(sorted(known))}")
    defaults = ScalingPolicy()
    merged: dict[str, Any] = {}
    for name in known:
        value = values.get(name, getattr(defaults, name))
        integer = name in ("min", "max", "target_backlog_per_agent", "warm_pool")
        if isinstance(value, bool) or not isinstance(value, int | float) or (
                integer and not isinstance(value, int)):
            raise StoreError(f"scaling policy {name} must be a "
                             f"{'whole number' if integer else 'number'}, got {value!r}")
        if value < 0:
            raise StoreError(f"scaling policy {name} must not be negative, got {value!r}")
        merged[name] = value
    if merged["target_backlog_per_agent"] < 1:
        raise StoreError("scaling policy target_backlog_per_agent must be at least 1")
    if merged["min"] > merged["max"]:
        raise StoreError(f"scaling policy min ({merged['min']}) is above max ({merged['max']})")
    if merged["warm_pool"] > merged["max"]:
        raise StoreError(f"scaling policy warm_pool ({merged['warm_pool']}) is above max "
                         f"({merged['max']}): a pool never uses more warm instances than max")
    return ScalingPolicy(**merged)


class Store:
    """Streams, process definitions and operations, validated and persisted."""

    # One connection per thread, and one lock for writes, because:
    # - a connection shares its open transaction with every thread that uses it:
    #   with one shared connection, the reconciler would read an operation that
    #   an API call has inserted but not yet committed (its topology is applied
    #   before the commit, and may still be refused), and two API calls would
    #   each BEGIN on the same connection ("cannot start a transaction within a
    #   transaction", a 500). A connection of its own gives each thread, under
    #   WAL, only committed rows, and readers never wait for a writer, not even
    #   one holding its transaction across a broker round trip.
    # - the lock queues this process's writers in order instead of leaving them
    #   to SQLite's busy handler, which polls and gives up with "database is
    #   locked"; the busy timeout still covers another process on the file.
    def __init__(self, state_dir: Path) -> None:
        private_dir(state_dir)
        self.path = state_dir / DB_NAME
        # The database holds definitions' env values. SQLite creates a missing file
        # (and later its -wal and -shm) with the umask's mode, but gives -wal and
        # -shm the database file's own mode: so the database is made 0600 before
        # SQLite opens it, and files left looser by an older release are tightened.
        private_file(self.path)
        for suffix in WAL_SUFFIXES:
            tighten(self.path.with_name(self.path.name + suffix), FILE_MODE)
        self._local = threading.local()
        self._write_lock = threading.Lock()
        # Every connection opened, by thread, so close() can close them all and a
        # thread that has ended does not keep its connection open.
        self._connections: dict[int, tuple[threading.Thread, sqlite3.Connection]] = {}
        self._connections_lock = threading.Lock()
        self._closed = False
        db = self._db
        db.execute("PRAGMA journal_mode=WAL")
        db.executescript(SCHEMA)

    @property
    def _db(self) -> sqlite3.Connection:
        """This thread's connection, opened on first use."""
        db: sqlite3.Connection | None = getattr(self._local, "db", None)
        if db is None:
            db = self._open()
            self._local.db = db
        return db

    def _open(self) -> sqlite3.Connection:
        if self._closed:
            raise RuntimeError("the store is closed")
        # check_same_thread=False only so that close() (on another thread) may close
        # it; each connection is used by the thread that opened it.
        db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False,
                             timeout=WRITE_WAIT)
        db.row_factory = sqlite3.Row
        db.execute("PRAGMA foreign_keys=ON")
        with self._connections_lock:
            for ident, (thread, old) in list(self._connections.items()):
                if not thread.is_alive():
                    old.close()
                    del self._connections[ident]
            self._connections[threading.get_ident()] = (threading.current_thread(), db)
        return db

    def close(self) -> None:
        with self._connections_lock:
            self._closed = True
            for _thread, db in self._connections.values():
                db.close()
            self._connections.clear()

    @contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        """One write transaction; other threads see none of it until it commits.

        Raises:
            StoreError: (503) the writes before this one took longer than WRITE_WAIT.
        """
        if not self._write_lock.acquire(timeout=WRITE_WAIT):
            raise StoreError(f"the declaration store is busy (a change has waited over "
                             f"{WRITE_WAIT:g}s for the ones before it): try again", 503)
        try:
            db = self._db
            db.execute("BEGIN IMMEDIATE")
            try:
                yield db
                db.execute("COMMIT")
            except BaseException:
                # A failed COMMIT may leave the transaction open: never leave this
                # thread's connection inside one.
                if db.in_transaction:
                    db.execute("ROLLBACK")
                raise
        finally:
            self._write_lock.release()

    # -- streams ---------------------------------------------------------------

    @staticmethod
    def check_stream_name(name: str) -> None:
        """Raises: StoreError for a name the broker naming cannot carry."""
        _name("stream", name)

    def create_stream(self, name: str) -> tuple[Stream, bool]:
        """Create ``name`` if it is new; return it and whether it was created."""
        _name("stream", name)
        with self._write() as db:
            created = self._ensure_stream(db, name)
        stream = self.get_stream(name)
        assert stream is not None
        return stream, created

    @staticmethod
    def _ensure_stream(db: sqlite3.Connection, name: str) -> bool:
        cursor = db.execute("INSERT OR IGNORE INTO streams (name, created_at) VALUES (?, ?)",
                            (name, _now()))
        return cursor.rowcount == 1

    def get_stream(self, name: str) -> Stream | None:
        row = self._db.execute("SELECT * FROM streams WHERE name = ?", (name,)).fetchone()
        return Stream(row["name"], row["created_at"]) if row else None

    def streams(self) -> list[Stream]:
        rows = self._db.execute("SELECT * FROM streams ORDER BY name").fetchall()
        return [Stream(r["name"], r["created_at"]) for r in rows]

    def delete_stream(self, name: str, force: bool = False,
                      before_commit: Callable[[], None] | None = None) -> list[str]:
        """Delete a stream; with ``force`` also the operations that use it and stop its
        archive (the archive's segments stay replayable).

        ``before_commit`` runs inside the transaction once the deletion is allowed;
        if it raises, nothing is deleted.

        Returns:
            the names of the operations deleted with it.
        Raises:
            StoreError: the stream does not exist (404) or is in use without ``force`` (409).
        """
        with self._write() as db:
            if not db.execute("SELECT 1 FROM streams WHERE name = ?", (name,)).fetchone():
                raise StoreError(f"stream {name!r} does not exist", 404)
            users = [r["name"] for r in db.execute(
                "SELECT name FROM operations WHERE input = ? OR output = ? ORDER BY name",
                (name, name))]
            if users and not force:
                raise StoreError(
                    f"stream {name!r} is used by operation(s) {', '.join(users)}: delete them "
                    "first or pass --force to delete them with it", 409)
            archived = db.execute("SELECT 1 FROM archives WHERE stream = ? AND active = 1",
                                  (name,)).fetchone()
            if archived and not force:
                raise StoreError(
                    f"stream {name!r} is being archived: `streamboss stop-archive {name}` "
                    "first or pass --force", 409)
            db.execute("UPDATE archives SET active = 0, stopped_at = ? "
                       "WHERE stream = ? AND active = 1", (_now(), name))
            db.execute("DELETE FROM operations WHERE input = ? OR output = ?", (name, name))
            db.execute("DELETE FROM streams WHERE name = ?", (name,))
            if before_commit is not None:
                before_commit()
        return users

    # -- process definitions --------------------------------------------------

    def define_process(self, data: Any, name: str | None = None) -> Definition:
        """Store a new definition (a new version when the name exists).

        Raises:
            StoreError: a malformed definition or a missing/invalid name.
        """
        try:
            parsed = parse_definition(data)
        except ConfigError as exc:
            raise StoreError(str(exc)) from None
        body = data["definition"] if isinstance(data.get("definition"), dict) else data
        body = {k.replace("-", "_"): v for k, v in body.items()}
        # An empty ?name= is a bad name, not a missing one.
        def_name = name if name is not None else parsed.name
        if not def_name:
            raise StoreError("process definition needs a 'name' (or pass --name)")
        _name("process definition", def_name)
        body["name"] = def_name
        with self._write() as db:
            row = db.execute("SELECT MAX(version) AS v FROM definitions WHERE name = ?",
                             (def_name,)).fetchone()
            version = (row["v"] or 0) + 1
            cursor = db.execute(
                "INSERT INTO definitions (name, version, body, created_at) VALUES (?, ?, ?, ?)",
                (def_name, version, json.dumps(body, sort_keys=True), _now()))
            ident = cursor.lastrowid
        definition = self.get_definition(str(ident))
        assert definition is not None
        return definition

    @staticmethod
    def _definition(row: sqlite3.Row) -> Definition:
        return Definition(row["id"], row["name"], row["version"], json.loads(row["body"]),
                          row["created_at"])

    def get_definition(self, ref: str | int) -> Definition | None:
        """A definition by numeric id, or the newest version of a name."""
        ref = str(ref)
        ident = definition_id(ref)
        if ident is not None:
            row = self._db.execute("SELECT * FROM definitions WHERE id = ?", (ident,)).fetchone()
        elif _is_id(ref):
            return None  # an id beyond any SQLite holds
        else:
            row = self._db.execute(
                "SELECT * FROM definitions WHERE name = ? ORDER BY version DESC LIMIT 1",
                (ref,)).fetchone()
        return self._definition(row) if row else None

    def definitions(self) -> list[Definition]:
        rows = self._db.execute("SELECT * FROM definitions ORDER BY id").fetchall()
        return [self._definition(r) for r in rows]

    def delete_process(self, ref: str, force: bool = False) -> list[str]:
        """Delete a definition (every version, when named); ``force`` also drops its operations.

        Raises:
            StoreError: unknown (404) or in use without ``force`` (409).
        """
        with self._write() as db:
            if _is_id(ref):
                ident = definition_id(ref)
                ids = [r["id"] for r in db.execute("SELECT id FROM definitions WHERE id = ?",
                                                   (ident,))] if ident is not None else []
            else:
                ids = [r["id"] for r in db.execute("SELECT id FROM definitions WHERE name = ?",
                                                   (ref,))]
            if not ids:
                raise StoreError(f"process definition {ref!r} does not exist", 404)
            marks = ",".join("?" * len(ids))
            users = [r["name"] for r in db.execute(
                f"SELECT name FROM operations WHERE definition_id IN ({marks}) ORDER BY name",
                ids)]
            if users and not force:
                raise StoreError(
                    f"process definition {ref!r} is used by operation(s) {', '.join(users)}: "
                    "delete them first or pass --force", 409)
            db.execute(f"DELETE FROM operations WHERE definition_id IN ({marks})", ids)
            db.execute(f"DELETE FROM definitions WHERE id IN ({marks})", ids)
        return users

    # -- operations ------------------------------------------------------------

    @staticmethod
    def _operation(row: sqlite3.Row) -> Operation:
        return Operation(row["name"], row["definition_id"], row["input"], row["output"],
                         ScalingPolicy(**json.loads(row["policy"])), row["created_at"])

    def create_operation(self, name: str, definition_ref: str, input_stream: str,
                         output_stream: str, policy: dict[str, Any] | None = None,
                         before_commit: Callable[[], None] | None = None) -> Operation:
        """Declare an operation; its output stream is created when new.

        ``before_commit`` runs once everything is validated, inside the
        transaction: if it raises (the broker is away), nothing is written.

        Raises:
            StoreError: invalid names, unknown input or definition (404), an existing
                operation (409), a cycle (409) or a bad policy.
        """
        _name("operation", name)
        _name("input stream", input_stream)
        _name("output stream", output_stream)
        scaling = parse_policy(policy)
        with self._write() as db:
            if db.execute("SELECT 1 FROM operations WHERE name = ?", (name,)).fetchone():
                raise StoreError(f"operation {name!r} already exists: delete it first", 409)
            if not db.execute("SELECT 1 FROM streams WHERE name = ?",
                              (input_stream,)).fetchone():
                raise StoreError(f"input stream {input_stream!r} does not exist: create it "
                                 f"with `streamboss create-stream {input_stream}`", 404)
            definition = self.get_definition(definition_ref)
            if definition is None:
                raise StoreError(f"process definition {definition_ref!r} does not exist: "
                                 "define it with `streamboss define-process FILE`", 404)
            edges = [(r["input"], r["name"], r["output"])
                     for r in db.execute("SELECT name, input, output FROM operations")]
            cycle = find_cycle(edges, (input_stream, name, output_stream))
            if cycle:
                raise StoreError(f"operation {name!r} would make a cycle: {cycle}", 409)
            self._ensure_stream(db, output_stream)
            db.execute(
                "INSERT INTO operations (name, definition_id, input, output, policy, created_at)"
                " VALUES (?, ?, ?, ?, ?, ?)",
                (name, definition.id, input_stream, output_stream,
                 json.dumps(scaling.to_dict()), _now()))
            if before_commit is not None:
                before_commit()
        operation = self.get_operation(name)
        assert operation is not None
        return operation

    def get_operation(self, name: str) -> Operation | None:
        row = self._db.execute("SELECT * FROM operations WHERE name = ?", (name,)).fetchone()
        return self._operation(row) if row else None

    def operations(self) -> list[Operation]:
        rows = self._db.execute("SELECT * FROM operations ORDER BY name").fetchall()
        return [self._operation(r) for r in rows]

    def delete_operation(self, name: str) -> None:
        """Raises: StoreError (404) when there is no such operation."""
        with self._write() as db:
            if db.execute("DELETE FROM operations WHERE name = ?", (name,)).rowcount == 0:
                raise StoreError(f"operation {name!r} does not exist", 404)

    # -- archives --------------------------------------------------------------

    @staticmethod
    def _archive(row: sqlite3.Row) -> Archive:
        return Archive(row["stream"], row["store"], row["segment_bytes"],
                       row["segment_seconds"], bool(row["active"]), row["created_at"],
                       row["stopped_at"])

    def start_archive(self, stream: str, store: str, segment_bytes: int | None = None,
                      segment_seconds: float | None = None,
                      before_commit: Callable[[Archive], None] | None = None,
                      ) -> tuple[Archive, bool]:
        """Archive ``stream`` into ``store`` (a URL prefix); restart a stopped archive.

        Idempotent for an active archive with the same store. ``before_commit``
        gets the archive to be written and runs inside the transaction: if it
        raises (the store or the broker is unusable), nothing is written.

        Returns:
            the archive and whether it was (re)started by this call.
        Raises:
            StoreError: unknown stream (404), already archived elsewhere (409),
                bad segment limits.
        """
        _name("stream", stream)
        size = DEFAULT_SEGMENT_BYTES if segment_bytes is None else segment_bytes
        age = DEFAULT_SEGMENT_SECONDS if segment_seconds is None else segment_seconds
        if isinstance(size, bool) or not isinstance(size, int) or size < MIN_SEGMENT_BYTES:
            raise StoreError(f"segment size must be a whole number of at least "
                             f"{MIN_SEGMENT_BYTES} bytes, got {size!r}")
        if isinstance(age, bool) or not isinstance(age, int | float) or age <= 0:
            raise StoreError(f"segment age must be a positive number of seconds, got {age!r}")
        with self._write() as db:
            if not db.execute("SELECT 1 FROM streams WHERE name = ?", (stream,)).fetchone():
                raise StoreError(f"stream {stream!r} does not exist: create it with "
                                 f"`streamboss create-stream {stream}`", 404)
            row = db.execute("SELECT * FROM archives WHERE stream = ?", (stream,)).fetchone()
            current = self._archive(row) if row else None
            if current is not None and current.active:
                if current.store.rstrip("/") != store.rstrip("/"):
                    raise StoreError(
                        f"stream {stream!r} is already archived to {current.store}: "
                        f"`streamboss stop-archive {stream}` first to archive elsewhere", 409)
                return current, False
            archive = Archive(stream, store, size, float(age), True,
                              current.created_at if current else _now(), None)
            db.execute(
                "INSERT OR REPLACE INTO archives (stream, store, segment_bytes, "
                "segment_seconds, active, created_at, stopped_at) VALUES (?, ?, ?, ?, 1, ?, NULL)",
                (stream, store, size, float(age), archive.created_at))
            if before_commit is not None:
                before_commit(archive)
        return archive, True

    def stop_archive(self, stream: str) -> Archive:
        """Stop archiving ``stream``; its segments stay where they are.

        Raises:
            StoreError: the stream is not being archived (404).
        """
        with self._write() as db:
            if db.execute("UPDATE archives SET active = 0, stopped_at = ? "
                          "WHERE stream = ? AND active = 1", (_now(), stream)).rowcount == 0:
                raise StoreError(f"stream {stream!r} is not being archived", 404)
        archive = self.get_archive(stream)
        assert archive is not None
        return archive

    def get_archive(self, stream: str) -> Archive | None:
        row = self._db.execute("SELECT * FROM archives WHERE stream = ?", (stream,)).fetchone()
        return self._archive(row) if row else None

    def archives(self) -> list[Archive]:
        rows = self._db.execute("SELECT * FROM archives ORDER BY stream").fetchall()
        return [self._archive(r) for r in rows]


def find_cycle(edges: list[tuple[str, str, str]], new: tuple[str, str, str]) -> str | None:
    """Return the cycle that ``new`` (input, operation, output) would close, spelled out.

    A cycle exists when ``new``'s output reaches its input through existing operations.
    """
    source, op_name, sink = new
    following: dict[str, list[tuple[str, str]]] = {}
    for stream_in, name, stream_out in edges:
        following.setdefault(stream_in, []).append((name, stream_out))
    # Depth-first from the new output, remembering how each stream was reached.
    path: dict[str, tuple[str, str] | None] = {sink: None}
    stack = [sink]
    while stack:
        stream = stack.pop()
        if stream == source:
            hops: list[str] = []
            while path[stream] is not None:
                previous, via = path[stream]  # type: ignore[misc]
                hops.append(f"-[{via}]-> {stream}")
                stream = previous
            route = " ".join(reversed(hops))
            return f"{source} -[{op_name}]-> {sink}" + (f" {route}" if route else "")
        for via, nxt in following.get(stream, []):
            if nxt not in path:
                path[nxt] = (stream, via)
                stack.append(nxt)
    return None
