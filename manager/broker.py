"""The manager's view of and hand on the broker.

Topology is declared over AMQP (the same names the agent uses). Demand needs
to know which queues are bound to a stream, which AMQP cannot list: that comes
from RabbitMQ's management HTTP API, and each queue's depth and consumer
count from an AMQP passive declare (immediate, where the management API's
statistics lag by seconds). Scaling needs more than a passive declare tells:
the messages delivered to agents and not yet acknowledged, which only the
management API counts; one listing of every queue per reconciler pass gives
them (and the rates), a few seconds stale.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import os
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote, unquote, urlsplit, urlunsplit

import httpx
import pika
import pika.exceptions
from pika.adapters.blocking_connection import BlockingChannel

from streamboss.agent.broker import CONNECT_ERRORS, explain_close
from streamboss.agent.config import redact
from streamboss.agent.naming import (
    OPERATION_PREFIX,
    RETRY_PREFIX,
    archive_queue,
    dead_queue,
    dead_stream,
    operation_queue,
    operation_queue_arguments,
    solo_queue,
    stream_exchange,
)
from streamboss.agent.tls import TLS_SCHEME, connection_parameters, management_verify

log = logging.getLogger(__name__)

# RabbitMQ's management API: plain HTTP beside amqp://, HTTPS (its management.ssl
# listener) beside amqps://, unless STREAMBOSS_MANAGEMENT_URL names it (Amazon MQ: 443).
MANAGEMENT_PORT = 15672
MANAGEMENT_TLS_PORT = 15671
MANAGEMENT_URL_ENV = "STREAMBOSS_MANAGEMENT_URL"
# A hung management API must not stall the reconciler's pass for long.
MANAGEMENT_TIMEOUT = 3.0


class BrokerUnavailable(RuntimeError):
    """The broker (or its management API) cannot be reached; the message says where."""


@dataclass(frozen=True)
class QueueState:
    messages: int
    consumers: int
    # Another connection's exclusive queue: its depth is hidden from us, but it
    # lives exactly as long as the connection that consumes from it.
    locked: bool = False


def passive_declare(channel: BlockingChannel, queue: str) -> QueueState | None:
    """Ready messages and consumers of ``queue`` now (an AMQP passive declare); None
    when it does not exist, and then the broker has closed ``channel``.

    Raises:
        pika.exceptions.ChannelClosedByBroker: any other refusal (a 405: another
            connection's exclusive queue).
    """
    try:
        frame = channel.queue_declare(queue, passive=True)
    except pika.exceptions.ChannelClosedByBroker as exc:
        if exc.reply_code == 404:
            return None
        raise
    return QueueState(frame.method.message_count, frame.method.consumer_count)


@dataclass(frozen=True)
class QueueCounts:
    """One queue as the management API lists it: statistics a few seconds old.

    ``ready`` and ``unacked`` are None when the broker has no statistics for the
    queue yet (a queue declared since its last statistics round)."""

    ready: int | None
    unacked: int | None
    consumers: int
    rate_in: float
    rate_out: float


# What one listing asks for: without `columns` the management API sends every
# field of every queue (backing-queue internals, garbage-collection figures),
# which on a busy vhost is megabytes per reconciler pass.
LISTING_COLUMNS = ("name,messages_ready,messages_unacknowledged,consumers,"
                   "message_stats.publish_details.rate,message_stats.ack_details.rate")


@dataclass(frozen=True)
class QueueDeclaration:
    """How a queue was declared, as the management API reports it."""

    type: str
    arguments: dict[str, Any]
    durable: bool
    auto_delete: bool
    exclusive: bool

    def matches(self, arguments: dict[str, Any]) -> bool:
        """Whether this is the durable queue that declaring with ``arguments`` makes.

        Exact, where a redeclare only compares the arguments the broker checks.
        """
        return (self.durable and not self.auto_delete and not self.exclusive
                and self.type == arguments.get("x-queue-type", "classic")
                and self.arguments == arguments)


@dataclass(frozen=True)
class Subscriber:
    """A queue bound to a stream."""

    queue: str
    consumers: int
    exclusive: bool

    @property
    def operation(self) -> str | None:
        """The operation this queue feeds, if it is an operation's queue."""
        if self.queue.startswith(OPERATION_PREFIX):
            return self.queue[len(OPERATION_PREFIX):]
        return None


# Where the management API's URL came from, as ``status`` names it.
MANAGEMENT_FROM_OPTION = "--management-url"
MANAGEMENT_FROM_BROKER_URL = "beside the broker URL"


class ManagementURLError(ValueError):
    """A management URL that cannot work; the message names it (credentials redacted)."""


def check_management_url(url: str) -> str:
    """``url`` if it can name RabbitMQ's management API: http(s)://HOST[:PORT][/PATH].

    Raises:
        ManagementURLError: another scheme, no host, a query or fragment, a bad port.
    """
    parts = urlsplit(url)
    try:
        parts.port  # noqa: B018 - a non-numeric or out-of-range port raises here
    except ValueError:
        raise ManagementURLError(f"management URL {redact(url)} has a bad port: use "
                                 "https://HOST[:PORT]") from None
    if parts.scheme not in ("http", "https") or not parts.hostname or parts.query \
            or parts.fragment:
        raise ManagementURLError(f"management URL {redact(url)} is not http(s)://HOST[:PORT]: "
                                 f"set {MANAGEMENT_URL_ENV} or --management-url to RabbitMQ's "
                                 "management API (Amazon MQ: https://HOST)")
    return url


def without_credentials(url: str) -> tuple[str, tuple[str, str] | None]:
    """``url`` without its userinfo, and the user and password it carried (if any)."""
    parts = urlsplit(url)
    if parts.username is None and parts.password is None:
        return url, None
    netloc = parts.netloc.rsplit("@", 1)[1]
    return (urlunsplit(parts._replace(netloc=netloc)),
            (unquote(parts.username or ""), unquote(parts.password or "")))


def management_endpoint(broker_url: str, option: str | None = None) -> tuple[str, str]:
    """The management API's URL and where it came from: ``option`` (--management-url),
    else ``STREAMBOSS_MANAGEMENT_URL``, else beside the broker (:func:`default_management_url`).

    Raises:
        ManagementURLError: the chosen URL cannot name a management API.
    """
    if option:
        return check_management_url(option), MANAGEMENT_FROM_OPTION
    if os.environ.get(MANAGEMENT_URL_ENV):
        return check_management_url(os.environ[MANAGEMENT_URL_ENV]), MANAGEMENT_URL_ENV
    return default_management_url(broker_url), MANAGEMENT_FROM_BROKER_URL


def management_state(response_or_error: httpx.Response | Exception) -> str:
    """One line saying whether the management API answered a GET of ``/api/overview``:
    ``answers``, ``refused: ...`` or ``unreachable: ...``."""
    if isinstance(response_or_error, Exception):
        reason = str(response_or_error).strip().splitlines()
        return f"unreachable: {reason[0] if reason else type(response_or_error).__name__}"
    code = response_or_error.status_code
    if code == 200:
        return "answers"
    if code in (401, 403):
        # RabbitMQ answers 401 to a wrong password and to a user without a management tag.
        return f"refused: {code}, check the broker user's password and its management tag"
    return f"refused: HTTP {code}, is {MANAGEMENT_URL_ENV} RabbitMQ's management API?"


def default_management_url(url: str) -> str:
    """The management API beside the broker at ``url``: https on 15671 for amqps://
    (RabbitMQ's TLS listener for it), http on 15672 for amqp://."""
    parts = urlsplit(url)
    host = parts.hostname or "127.0.0.1"
    if ":" in host:
        host = f"[{host}]"
    if parts.scheme == TLS_SCHEME:
        return f"https://{host}:{MANAGEMENT_TLS_PORT}"
    return f"http://{host}:{MANAGEMENT_PORT}"


class Broker:
    """A blocking AMQP connection plus the management API, reopened when lost."""

    def __init__(self, url: str, management_url: str | None = None) -> None:
        """Parameters:
            url: the AMQP URL (its credentials are the management API's too, as on
                Amazon MQ, where the broker user is the console's user).
            management_url: the management API (``--management-url``); None:
                ``STREAMBOSS_MANAGEMENT_URL``, else beside the broker.

        Raises:
            ManagementURLError: the management URL cannot name a management API.
        """
        self.url = url
        parts = urlsplit(url)
        self.vhost = unquote(parts.path[1:]) if len(parts.path) > 1 else "/"
        self._auth = (unquote(parts.username or "guest"), unquote(parts.password or "guest"))
        chosen, self.management_source = management_endpoint(url, management_url)
        # Credentials in the management URL itself (another user for the API) win; the
        # URL kept, shown and put in messages never holds them.
        self.management_url, own = without_credentials(chosen)
        if own is not None:
            self._auth = own
        self._connection: pika.BlockingConnection | None = None
        self._channel: BlockingChannel | None = None
        # The API is verified like the broker: STREAMBOSS_BROKER_CA, else the system's CAs.
        verify = management_verify() if self.management_url.startswith("https:") else True
        self._http = httpx.Client(base_url=self.management_url, auth=self._auth,
                                  timeout=MANAGEMENT_TIMEOUT, verify=verify)

    def close(self) -> None:
        self._http.close()
        self.reset()

    def reset(self) -> None:
        """Drop the AMQP connection; the next call opens a fresh one."""
        if self._connection is not None and self._connection.is_open:
            with contextlib.suppress(pika.exceptions.AMQPError):
                self._connection.close()
        self._connection = self._channel = None

    def channel(self) -> BlockingChannel:
        """An open channel, reconnecting if needed.

        Raises:
            BrokerUnavailable: the broker cannot be reached.
        """
        if self._channel is not None and self._channel.is_open:
            return self._channel
        if self._connection is None or not self._connection.is_open:
            try:
                params = connection_parameters(self.url)
                params.client_properties = {"connection_name": "streamboss-manager"}
                self._connection = pika.BlockingConnection(params)
            except CONNECT_ERRORS as exc:
                raise BrokerUnavailable(explain_close(exc, self.url, opening=True)) from None
        self._channel = self._connection.channel()
        return self._channel

    # -- topology ------------------------------------------------------------

    def ensure_stream(self, name: str) -> None:
        self.channel().exchange_declare(stream_exchange(name), "topic", durable=True)

    def delete_stream(self, name: str) -> None:
        self.channel().exchange_delete(stream_exchange(name))

    def ensure_operation(self, name: str, input_stream: str) -> bool:
        """The operation's queues as the wire contract declares them: the dead-letter
        stream and its kept queue, then ``sb.op.<name>`` bound to its input and
        ``sb.solo.<name>``, both quorum queues.

        Returns:
            False when ``sb.op``/``sb.solo`` exists with other arguments (a classic
            queue of the previous release): it is left as it is, not bound, for
            :mod:`.queue_migration` to move; True when everything is declared.
        """
        self.ensure_dead_queue(name, dead_queue(name))
        arguments = operation_queue_arguments(name)
        if not self.declare_queue(operation_queue(name), arguments):
            return False
        self.channel().queue_bind(operation_queue(name), stream_exchange(input_stream), "#")
        return self.declare_queue(solo_queue(name), arguments)

    def ensure_dead_queue(self, operation: str, queue: str) -> None:
        """Keep ``operation``'s dead letters in ``queue``: a stream drops what nobody holds."""
        channel = self.channel()
        channel.exchange_declare(stream_exchange(dead_stream(operation)), "topic", durable=True)
        channel.queue_declare(queue, durable=True)
        channel.queue_bind(queue, stream_exchange(dead_stream(operation)), "#")

    def declare_queue(self, queue: str, arguments: dict[str, Any]) -> bool:
        """Declare durable ``queue`` with ``arguments``; False, changing nothing, when
        a queue of that name exists with other ones (the broker's 406)."""
        try:
            self.channel().queue_declare(queue, durable=True, arguments=arguments)
        except pika.exceptions.ChannelClosedByBroker as exc:
            self._channel = None
            if exc.reply_code != 406:
                raise
            return False
        return True

    def delete_operation(self, name: str, dead_queue: str, also: Iterable[str] = ()) -> bool:
        """Remove the operation's queues (input, solo, every retry queue, and the
        queues named in ``also``), and its dead-letter queue and stream when empty.

        Returns:
            False when the retry queues could not be listed (the management API is
            away, which the reconciler reports): call again later; everything else
            is done, and doing it again is harmless.
        """
        try:
            retries = self.retry_queues(name)
        except BrokerUnavailable:
            retries = None
        channel = self.channel()
        for queue in (*(retries or ()), operation_queue(name), solo_queue(name), *also):
            channel.queue_delete(queue)
        try:
            channel.queue_delete(dead_queue, if_empty=True)
        except pika.exceptions.ChannelClosedByBroker as exc:
            # 406: dead letters are waiting; someone should read them before they go.
            self._channel = None
            if exc.reply_code != 406:
                raise
        else:
            channel.exchange_delete(stream_exchange(dead_stream(name)))
        return retries is not None

    def retry_queues(self, operation: str) -> list[str]:
        """The ``sb.retry.<operation>.<ms>`` queues agents declared, by listing them:
        their delays are the agents' to choose. Only digits after the prefix, so
        operation ``a`` never claims ``a.b``'s.

        Raises:
            BrokerUnavailable: the management API cannot be reached.
        """
        prefix = f"{RETRY_PREFIX}{operation}."
        listed = self._management_json(f"/api/queues/{quote(self.vhost, safe='')}",
                                       {"columns": "name", "disable_stats": "true"})
        return sorted(q["name"] for q in listed or ()
                      if q["name"].startswith(prefix) and q["name"][len(prefix):].isdigit())

    def queue_declaration(self, queue: str) -> QueueDeclaration | None:
        """How ``queue`` was declared (type and arguments); None when it does not exist.

        Raises:
            BrokerUnavailable: the management API cannot be reached.
        """
        body = self._management_json(
            f"/api/queues/{quote(self.vhost, safe='')}/{quote(queue, safe='')}")
        if body is None:
            return None
        return QueueDeclaration(str(body.get("type", "classic")), dict(body.get("arguments") or {}),
                                bool(body.get("durable")), bool(body.get("auto_delete")),
                                bool(body.get("exclusive")))

    def _management_json(self, path: str, params: dict[str, str] | None = None) -> Any:
        """The management API's answer for ``path``; None on 404.

        Raises:
            BrokerUnavailable: it cannot be reached or refuses us.
        """
        try:
            response = self._http.get(path, params=params)
        except httpx.HTTPError as exc:
            raise BrokerUnavailable(
                f"cannot reach RabbitMQ's management API at {self.management_url} ({exc}): "
                "enable it with `rabbitmq-plugins enable rabbitmq_management`") from None
        if response.status_code == 404:
            return None
        if response.status_code != 200:
            raise BrokerUnavailable(f"management API answered {response.status_code} for "
                                    f"{path}: check the broker user's management tag")
        return response.json()

    def ensure_archive(self, stream: str) -> None:
        """The archive's durable subscription, bound to every message of ``stream``."""
        channel = self.channel()
        channel.queue_declare(archive_queue(stream), durable=True)
        channel.queue_bind(archive_queue(stream), stream_exchange(stream), "#")

    def unbind_archive(self, stream: str) -> None:
        """Stop new messages reaching the archive; what it holds can still be drained."""
        channel = self.channel()
        try:
            channel.queue_unbind(archive_queue(stream), stream_exchange(stream), "#")
        except pika.exceptions.ChannelClosedByBroker as exc:
            self._channel = None
            if exc.reply_code != 404:  # the queue or the stream is gone already
                raise

    def delete_archive(self, stream: str) -> bool:
        """Delete the archive's subscription if it is empty; return whether it was."""
        try:
            self.channel().queue_delete(archive_queue(stream), if_empty=True)
        except pika.exceptions.ChannelClosedByBroker as exc:
            self._channel = None
            if exc.reply_code != 406:  # 406: a message came back (an archiver died)
                raise
            return False
        return True

    # -- observation -----------------------------------------------------------

    def queue_state(self, queue: str) -> QueueState | None:
        """Depth and consumers of ``queue``; None when it does not exist."""
        try:
            state = passive_declare(self.channel(), queue)
        except pika.exceptions.ChannelClosedByBroker as exc:
            self._channel = None
            if exc.reply_code == 405:
                return QueueState(0, 1, locked=True)
            raise
        if state is None:
            self._channel = None
        return state

    def subscribers(self, stream: str) -> list[Subscriber]:
        """Every queue bound to ``stream``, with its consumer count.

        Raises:
            BrokerUnavailable: the management API cannot be reached.
        """
        path = f"/api/exchanges/{quote(self.vhost, safe='')}/" \
               f"{quote(stream_exchange(stream), safe='')}/bindings/source"
        try:
            response = self._http.get(path)
        except httpx.HTTPError as exc:
            raise BrokerUnavailable(
                f"cannot reach RabbitMQ's management API at {self.management_url} ({exc}): "
                "enable it with `rabbitmq-plugins enable rabbitmq_management`") from None
        if response.status_code == 404:
            return []
        if response.status_code != 200:
            raise BrokerUnavailable(f"management API answered {response.status_code} for "
                                    f"{path}: check the broker user's management tag")
        found: dict[str, Subscriber] = {}
        for binding in response.json():
            if binding.get("destination_type") != "queue":
                continue
            queue = binding["destination"]
            if queue in found:
                continue
            state = self.queue_state(queue)
            if state is None:
                continue
            found[queue] = Subscriber(queue, state.consumers, state.locked)
        return list(found.values())

    def queue_listing(self) -> dict[str, QueueCounts] | None:
        """Every queue of the vhost by name, in one management API call: ready and
        unacknowledged messages, consumers, and messages/s in and acked out.

        One call per reconciler pass, whatever the number of operations; the
        figures are the broker's statistics, a few seconds behind.

        Returns:
            None when the management API cannot say (away, refused, not JSON).
        """
        path = f"/api/queues/{quote(self.vhost, safe='')}"
        try:
            response = self._http.get(path, params={"columns": LISTING_COLUMNS})
            body = response.json() if response.status_code == 200 else None
        except (httpx.HTTPError, ValueError):
            return None
        if not isinstance(body, list):
            return None
        listing: dict[str, QueueCounts] = {}
        for entry in body:
            if not isinstance(entry, dict) or not isinstance(entry.get("name"), str):
                continue
            stats = entry.get("message_stats") or {}
            listing[entry["name"]] = QueueCounts(
                _count(entry.get("messages_ready")),
                _count(entry.get("messages_unacknowledged")),
                _count(entry.get("consumers")) or 0,
                _rate(stats, "publish_details"), _rate(stats, "ack_details"))
        return listing

    def server_version(self) -> tuple[int, ...] | None:
        """The broker's version from the AMQP handshake (``server_properties``), e.g.
        (3, 10, 8); None when it does not say.

        Raises:
            BrokerUnavailable: the broker cannot be reached.
        """
        self.channel()
        # pika keeps the handshake's properties on the connection it wraps.
        impl = getattr(self._connection, "_impl", None)
        properties = getattr(impl, "server_properties", None) or {}
        return parse_version(properties.get("version"))

    def put_policy(self, name: str, body: dict[str, Any]) -> None:
        """Create or replace the vhost's policy ``name``.

        Raises:
            BrokerUnavailable: the management API cannot be reached or refuses it.
        """
        path = f"/api/policies/{quote(self.vhost, safe='')}/{quote(name, safe='')}"
        try:
            response = self._http.put(path, json=body)
        except httpx.HTTPError as exc:
            raise BrokerUnavailable(
                f"cannot reach RabbitMQ's management API at {self.management_url} ({exc}) "
                f"to set policy {name}") from None
        if response.status_code not in (200, 201, 204):
            raise BrokerUnavailable(f"management API refused policy {name} "
                                    f"({response.status_code}: {response.text[:200]})")

    def delete_policy(self, name: str) -> None:
        """Delete the vhost's policy ``name`` if it exists (best effort: a policy left
        behind matches only queues of a deleted operation)."""
        path = f"/api/policies/{quote(self.vhost, safe='')}/{quote(name, safe='')}"
        with contextlib.suppress(httpx.HTTPError):
            self._http.delete(path)

    def management_available(self) -> bool:
        return self.management_state() == "answers"

    def management_state(self) -> str:
        """Whether the management API answers this manager now, in one line (see
        :func:`management_state`)."""
        try:
            return management_state(self._http.get("/api/overview"))
        except httpx.HTTPError as exc:
            return management_state(exc)


def _count(value: Any) -> int | None:
    """A message count from the management API, or None when it has none yet."""
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _rate(stats: Any, key: str) -> float:
    details = stats.get(key) if isinstance(stats, dict) else None
    rate = details.get("rate") if isinstance(details, dict) else None
    return float(rate) if isinstance(rate, int | float) else 0.0


def parse_version(text: Any) -> tuple[int, ...] | None:
    """``"3.12.4"`` -> (3, 12, 4); None for anything else."""
    if isinstance(text, bytes):
        text = text.decode(errors="replace")
    if not isinstance(text, str):
        return None
    parts: list[int] = []
    for piece in text.split("."):
        digits = "".join(itertools.takewhile(str.isdigit, piece))
        if not digits:
            break
        parts.append(int(digits))
        if len(digits) < len(piece):  # "0-rc.1": the rest is a label
            break
    return tuple(parts) or None
