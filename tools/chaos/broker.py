"""The harness's hand on RabbitMQ: publishing inputs, the management API, the broker restart.

The harness declares only its own queues (the durable subscription on the
chain's output and its copy of the dead letters); everything else is the
manager's. At the end it deletes every queue and exchange whose name holds the
run's prefix, which no other run or test can share.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import time
from urllib.parse import quote, unquote, urlsplit

import httpx
import pika
import pika.exceptions

from streamboss.agent.headers import output_properties
from streamboss.agent.naming import dead_stream, stream_exchange
from streamboss.manager.publisher import ConfirmedPublisher, PublishError

from .chain import Chain

MANAGEMENT_PORT = 15672
SOURCE = "/streamboss/tools/chaos"
# How long a restarted broker may take to accept AMQP and management calls again.
BROKER_START_TIMEOUT = 180.0
RABBITMQCTL_TIMEOUT = 180.0
# A broker busy creating or deleting many quorum queues (other users of a shared
# broker) can miss an AMQP handshake for seconds; the harness tries again.
CONNECT_ATTEMPTS = 4
DELETE_TIMEOUT = 60.0
# What RabbitMQ 3.10's file handle cache was seen to count per quorum queue.
HANDLES_PER_QUORUM_QUEUE = 3


class BrokerError(RuntimeError):
    """The broker or its management API did not do what the harness needs."""


class Admin:
    """A blocking AMQP connection (reopened when lost) and the management API."""

    def __init__(self, url: str) -> None:
        self.url = url
        parts = urlsplit(url)
        self.host = parts.hostname or "127.0.0.1"
        self.port = parts.port or 5672
        self.vhost = unquote(parts.path[1:]) if len(parts.path) > 1 else "/"
        auth = (unquote(parts.username or "guest"), unquote(parts.password or "guest"))
        scheme = "https" if parts.scheme == "amqps" else "http"
        self.http = httpx.Client(base_url=f"{scheme}://{self.host}:{MANAGEMENT_PORT}",
                                 auth=auth, timeout=10)
        self._connection: pika.BlockingConnection | None = None

    # -- AMQP ---------------------------------------------------------------------

    def channel(self) -> pika.adapters.blocking_connection.BlockingChannel:
        """A channel on the admin connection, opened again if lost.

        Raises:
            BrokerError: four handshakes in a row failed.
        """
        if self._connection is None or not self._connection.is_open:
            params = pika.URLParameters(self.url)
            params.client_properties = {"connection_name": "streamboss-chaos-admin"}
            for attempt in range(CONNECT_ATTEMPTS):
                try:
                    self._connection = pika.BlockingConnection(params)
                    break
                # pika's connection workflow errors are not all AMQPErrors.
                except Exception as exc:
                    if attempt == CONNECT_ATTEMPTS - 1:
                        raise BrokerError(f"cannot connect to the broker: "
                                          f"{type(exc).__name__}: {exc}") from None
                    time.sleep(1.0)
        assert self._connection is not None
        return self._connection.channel()

    def reset(self) -> None:
        if self._connection is not None:
            with contextlib.suppress(Exception):
                self._connection.close()
        self._connection = None

    def subscribe(self, chain: Chain) -> None:
        """Declare the harness's durable queues before anything is published.

        The subscription on the output holds every output from the first one on,
        whatever happens to the consumer; the dead-letter copy is bound to the
        three operations' dead-letter streams (declared here as well, idempotently,
        as the manager declares them).
        """
        channel = self.channel()
        try:
            channel.queue_declare(chain.output_queue, durable=True)
            channel.queue_bind(chain.output_queue, stream_exchange(chain.tail), "#")
            channel.queue_declare(chain.dead_queue, durable=True)
            for operation in chain.operations:
                exchange = stream_exchange(dead_stream(operation))
                channel.exchange_declare(exchange, "topic", durable=True)
                channel.queue_bind(chain.dead_queue, exchange, "#")
        finally:
            with contextlib.suppress(Exception):
                channel.close()

    def publish(self, stream: str, bodies: list[bytes]) -> tuple[int, str | None]:
        """Publish ``bodies`` with publisher confirms.

        Returns:
            ``(confirmed, error)``: how many of the first bodies the broker confirmed
            (on one channel to one queue it confirms in order), and why it stopped
            short (a lost connection, a refusal), or None.
        """
        publisher = ConfirmedPublisher(self.url, stream, window=500)
        messages = ((body, output_properties(stream, SOURCE, None)) for body in bodies)
        try:
            return publisher.run(messages), None
        except PublishError as exc:
            return publisher.confirmed, str(exc)

    # -- management API --------------------------------------------------------------

    def management_up(self) -> bool:
        try:
            return self.http.get("/api/overview", timeout=3).status_code == 200
        except httpx.HTTPError:
            return False

    def amqp_up(self) -> bool:
        try:
            self.reset()
            self.channel().close()
            return True
        except (BrokerError, pika.exceptions.AMQPError, OSError):
            self.reset()
            return False

    def connection_for_port(self, port: int) -> str | None:
        """The management API's name of the connection whose client side is ``port``."""
        response = self.http.get("/api/connections",
                                 params={"columns": "name,peer_port,peer_host"})
        response.raise_for_status()
        for connection in response.json():
            if connection.get("peer_port") == port:
                return str(connection["name"])
        return None

    def close_connection(self, name: str) -> bool:
        """``DELETE /api/connections/{name}``, as an operator would; whether it was closed."""
        response = self.http.delete(f"/api/connections/{quote(name, safe='')}",
                                    headers={"X-Reason": "streamboss chaos run"})
        return response.status_code in (200, 204)

    def file_handle_pressure(self) -> str | None:
        """A warning when restarting the broker may stall it, or None.

        RabbitMQ's file handle cache (limit: the broker's open-file limit less a
        reserve) counts about three handles per quorum queue: 310 quorum queues used
        936 of 927 on a broker limited to 1024 files, and from then on every new
        connection and queue waited for a handle. A restart reopens every quorum
        queue at once, so a broker near that line may not come back usable.
        """
        try:
            nodes = self.http.get("/api/nodes", params={"columns": "fd_total"}).json()
            queues = self.http.get(f"/api/queues/{quote(self.vhost, safe='')}",
                                   params={"columns": "type"}, timeout=DELETE_TIMEOUT).json()
        except (httpx.HTTPError, ValueError):
            return None
        limit = min((n.get("fd_total") or 0 for n in nodes), default=0)
        quorum = sum(1 for q in queues if q.get("type") == "quorum")
        if limit and quorum * HANDLES_PER_QUORUM_QUEUE >= 0.8 * limit:
            return (f"the broker holds {quorum} quorum queues and may open only {limit} files: "
                    "after the restart its file handle cache may run out and stall every "
                    "client; raise its open-file limit (ulimit -n, LimitNOFILE) or delete "
                    "unused queues first")
        return None

    def names_with(self, kind: str, text: str) -> list[str]:
        """Queues or exchanges (``kind``) of the vhost whose name contains ``text``."""
        response = self.http.get(f"/api/{kind}/{quote(self.vhost, safe='')}",
                                 params={"columns": "name"}, timeout=DELETE_TIMEOUT)
        response.raise_for_status()
        return [item["name"] for item in response.json() if text in item["name"]]

    def delete_run(self, prefix: str) -> list[str]:
        """Delete every queue and exchange whose name holds ``prefix``.

        Returns:
            the names that could not be deleted (a quorum queue's deletion can take
            long on a busy broker; each gets ``DELETE_TIMEOUT``).
        """
        vhost = quote(self.vhost, safe="")
        left = []
        for kind in ("queues", "exchanges"):
            for name in self.names_with(kind, prefix):
                try:
                    response = self.http.delete(f"/api/{kind}/{vhost}/{quote(name, safe='')}",
                                                timeout=DELETE_TIMEOUT)
                    if response.status_code not in (200, 204, 404):
                        left.append(name)
                except httpx.HTTPError:
                    left.append(name)
        return left

    def close(self) -> None:
        self.reset()
        self.http.close()


def _ctl(args: list[str], timeout: float) -> subprocess.CompletedProcess[str] | None:
    """Run ``rabbitmqctl ARGS``; None if it did not finish within ``timeout``.

    It runs in a session of its own and the whole session is killed on a timeout:
    ``rabbitmqctl`` is a script that starts an Erlang VM through ``su``, and killing
    the script alone would leave that VM behind.
    """
    process = subprocess.Popen(["rabbitmqctl", *args], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        out, err = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(OSError):
            os.killpg(process.pid, signal.SIGKILL)
        process.communicate()
        return None
    return subprocess.CompletedProcess(process.args, process.returncode, out, err)


def rabbitmqctl_problem() -> str | None:
    """Why the broker cannot be restarted from here, or None when it can."""
    if shutil.which("rabbitmqctl") is None:
        return ("rabbitmqctl not found: run the chaos run on the broker's machine, as a user "
                "allowed to use rabbitmqctl, or pass --broker-restarts 0")
    result = _ctl(["-q", "status"], 60)
    if result is None:
        return "rabbitmqctl status did not answer within 60 s: is the broker healthy?"
    if result.returncode != 0:
        first = (result.stderr or result.stdout).strip().splitlines()[:1]
        return (f"rabbitmqctl status failed ({first[0] if first else result.returncode}): run "
                "as a user allowed to use rabbitmqctl (root or rabbitmq), or pass "
                "--broker-restarts 0")
    return None


def rabbitmqctl(*args: str) -> None:
    """Run ``rabbitmqctl ARGS``.

    Raises:
        BrokerError: it failed or hung; the message holds its last line of output.
    """
    result = _ctl(list(args), RABBITMQCTL_TIMEOUT)
    if result is None:
        raise BrokerError(f"rabbitmqctl {' '.join(args)} hung for "
                          f"{RABBITMQCTL_TIMEOUT:.0f} s")
    if result.returncode != 0:
        text = (result.stderr or result.stdout).strip().splitlines()
        raise BrokerError(f"rabbitmqctl {' '.join(args)} failed: "
                          f"{text[-1] if text else result.returncode}")


def restart_broker(admin: Admin) -> float:
    """``rabbitmqctl stop_app`` then ``start_app``; wait until AMQP and the management
    API answer. Returns the seconds the broker was away.

    ``start_app`` is attempted even if something fails in between: the broker is
    shared, and leaving it stopped would break everyone on it.

    Raises:
        BrokerError: a step failed, or the broker did not come back in time.
    """
    started = time.monotonic()
    admin.reset()
    try:
        rabbitmqctl("stop_app")
    finally:
        rabbitmqctl("start_app")
    deadline = time.monotonic() + BROKER_START_TIMEOUT
    while not (admin.amqp_up() and admin.management_up()):
        if time.monotonic() > deadline:
            raise BrokerError(f"the broker did not accept AMQP and management calls within "
                              f"{BROKER_START_TIMEOUT:.0f} s of start_app")
        time.sleep(0.25)
    return time.monotonic() - started
