"""What the manager uses, named and checked for ``status``: the broker, the management
API and the archive store.

On a node, each comes from the environment its user data and unit give the manager
(``STREAMBOSS_BROKER_URL``, resolved by streamboss-env from the SSM parameter the user
data names; ``STREAMBOSS_MANAGEMENT_URL``; ``STREAMBOSS_ARCHIVE_STORE``). A name lost on
the way does not fail: it leaves a default pointing somewhere else (the management API
on 15671 beside an Amazon MQ broker that serves it on 443, so demand is never observed).
``status`` therefore shows the URL the manager really uses (credentials redacted), where
it came from, and whether it answers now.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pika
import pika.exceptions

from streamboss.agent import objects
from streamboss.agent.broker import CONNECT_ERRORS, _root_cause
from streamboss.agent.config import BROKER_URL_ENV, redact
from streamboss.agent.tls import BrokerTLSError, connection_parameters

from .broker import Broker

# A probe that does not answer within this long counts as unreachable: status must
# come back in seconds even when a host is blackholed.
PROBE_TIMEOUT = 3.0
# Probes cost a connection each (AMQP, HTTPS, S3): repeated status calls within this
# long share one round of them.
PROBE_TTL = 5.0
# Where a value came from when nothing named it.
DEFAULT_SOURCE = "default"

ANSWERS = "answers"


@dataclass(frozen=True)
class Endpoint:
    """One thing the manager uses.

    Attributes:
        url: the URL, credentials redacted.
        source: the option or variable it came from (or ``default``).
        state: ``answers``, ``refused: REASON`` or ``unreachable: REASON`` (one line).
    """

    url: str
    source: str
    state: str


def probe_broker(url: str) -> str:
    """Whether the broker at ``url`` accepts an AMQP connection now (opened and closed)."""
    try:
        params = connection_parameters(url)
    except BrokerTLSError as exc:
        return f"refused: {exc}"
    params.connection_attempts = 1
    params.retry_delay = 0
    params.socket_timeout = PROBE_TIMEOUT
    params.stack_timeout = PROBE_TIMEOUT * 2
    params.blocked_connection_timeout = PROBE_TIMEOUT
    params.client_properties = {"connection_name": "streamboss-manager-status"}
    try:
        pika.BlockingConnection(params).close()
    except (pika.exceptions.ProbableAuthenticationError,
            pika.exceptions.ProbableAccessDeniedError):
        return f"refused: the user, password or vhost (check {BROKER_URL_ENV})"
    except CONNECT_ERRORS as exc:
        lines = _root_cause(exc).splitlines()
        return f"unreachable: {lines[0] if lines else type(exc).__name__}"
    return ANSWERS


def probe_archive_store(store: str) -> str:
    """Whether the manager can list (s3://) or write (file://) its archive store now."""
    parts = urlsplit(store)
    if parts.scheme == "file":
        path = Path(parts.path)
        existing = next((p for p in (path, *path.parents) if p.exists()), None)
        if existing is None or not existing.is_dir():
            return f"refused: {path} is not a directory"
        if not os.access(existing, os.W_OK | os.X_OK):
            return f"refused: {existing} is not writable by the manager"
        return ANSWERS
    if parts.scheme == "s3":
        return _probe_bucket(parts.netloc, parts.path.lstrip("/"))
    return f"refused: {parts.scheme or 'no'} scheme (use s3:// or file://)"


def _probe_bucket(bucket: str, prefix: str) -> str:
    import boto3
    from botocore.config import Config
    from botocore.exceptions import BotoCoreError, ClientError, NoCredentialsError

    # A session of its own: boto3's default one keeps the credentials it first found, and
    # the probe must say what is true now.
    client = boto3.session.Session().client(
        "s3", endpoint_url=os.environ.get(objects.ENDPOINT_ENV) or None,
        config=Config(connect_timeout=PROBE_TIMEOUT, read_timeout=PROBE_TIMEOUT,
                      retries={"max_attempts": 1, "mode": "standard"}))
    try:
        # What the archiver's role may do on the bucket (s3:ListBucket), nothing more.
        client.list_objects_v2(Bucket=bucket, Prefix=prefix, MaxKeys=1)
    except ClientError as exc:
        error = exc.response.get("Error", {})
        return f"refused: {error.get('Code', 'error')} on bucket {bucket}"
    except NoCredentialsError:
        return "refused: no AWS credentials (the instance role, or the usual AWS chain)"
    except BotoCoreError as exc:
        return f"unreachable: {str(exc).splitlines()[0]}"
    return ANSWERS


class Connections:
    """The status block naming the broker, management API and archive store.

    Parameters:
        broker: the manager's broker handle (its URL and management API).
        broker_source: where the broker URL came from.
        archive_store: the default archive store.
        archive_source: where it came from.
        clock: monotonic seconds.
    """

    def __init__(self, broker: Broker, broker_source: str, archive_store: str,
                 archive_source: str, clock: Callable[[], float] = time.monotonic) -> None:
        self.broker = broker
        self.broker_source = broker_source
        self.archive_store = archive_store
        self.archive_source = archive_source
        self.clock = clock
        self._lock = threading.Lock()
        self._view: dict[str, Any] | None = None
        self._at = float("-inf")

    def view(self) -> dict[str, Any]:
        """``{"broker": Endpoint, "management": Endpoint, "archive_store": Endpoint}`` as
        JSON objects, probed at most every PROBE_TTL seconds."""
        with self._lock:
            if self._view is None or self.clock() - self._at >= PROBE_TTL:
                self._view = self._probe()
                self._at = self.clock()
            return self._view

    def _probe(self) -> dict[str, Any]:
        # Side by side: one blackholed host costs PROBE_TIMEOUT, not three of them.
        with ThreadPoolExecutor(3, thread_name_prefix="status-probe") as pool:
            broker = pool.submit(probe_broker, self.broker.url)
            management = pool.submit(self.broker.management_state)
            archive = pool.submit(probe_archive_store, self.archive_store)
            return {
                "broker": asdict(Endpoint(redact(self.broker.url), self.broker_source,
                                          broker.result())),
                "management": asdict(Endpoint(self.broker.management_url,
                                              self.broker.management_source,
                                              management.result())),
                "archive_store": asdict(Endpoint(redact(self.archive_store),
                                                 self.archive_source, archive.result())),
            }
