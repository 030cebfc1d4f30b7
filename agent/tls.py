"""TLS to the broker: ``amqps://`` connections and the management API over https.

An ``amqps://`` broker URL always verifies the broker's certificate and host name,
against the CA file ``STREAMBOSS_BROKER_CA`` names (a self-hosted broker's own CA,
which the rabbitmq role makes) or else the system's CAs (Amazon MQ's public
certificates). There is no setting that turns verification off: a broker whose
certificate does not verify is refused, with a line that says which setting to fix.
The management API (``https://``) is verified the same way.
"""

from __future__ import annotations

import os
import ssl
from urllib.parse import urlsplit

import pika

BROKER_CA_ENV = "STREAMBOSS_BROKER_CA"
TLS_SCHEME = "amqps"


class BrokerTLSError(ValueError):
    """A TLS setting that cannot work; the message names the setting and the fix."""


def broker_ca() -> str | None:
    """The CA file from ``STREAMBOSS_BROKER_CA``; None when unset or empty."""
    return os.environ.get(BROKER_CA_ENV) or None


def tls_context(ca_file: str | None = None) -> ssl.SSLContext:
    """A client context that verifies the peer's certificate and host name (TLS 1.2+)
    against ``ca_file``, or the system's CAs without one.

    Raises:
        BrokerTLSError: ``ca_file`` is missing or holds no PEM certificate.
    """
    try:
        context = ssl.create_default_context(cafile=ca_file)
    except FileNotFoundError:
        raise BrokerTLSError(f"{BROKER_CA_ENV} names {ca_file}, which does not exist: "
                             "point it at the broker's CA certificate (PEM)") from None
    except (OSError, ssl.SSLError) as exc:
        reason = getattr(exc, "strerror", None) or getattr(exc, "reason", None) or exc
        raise BrokerTLSError(f"{BROKER_CA_ENV} names {ca_file}, which cannot be loaded as "
                             f"PEM CA certificates ({reason}): point it at the broker's CA "
                             "certificate") from None
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    return context


def check_broker_tls(url: str) -> None:
    """Refuse a TLS setting that would be silently ignored or cannot be loaded.

    Raises:
        BrokerTLSError: ``STREAMBOSS_BROKER_CA`` is set for a plain ``amqp://`` URL
            (the connection would not be encrypted at all), or cannot be loaded.
    """
    ca = broker_ca()
    if ca is None:
        return
    if urlsplit(url).scheme != TLS_SCHEME:
        raise BrokerTLSError(f"{BROKER_CA_ENV} is set but the broker URL is not amqps:// "
                             "(it would not be encrypted): use amqps://HOST:5671/VHOST")
    tls_context(ca)


def connection_parameters(url: str) -> pika.URLParameters:
    """pika's parameters for ``url``; an ``amqps://`` URL verifies the broker's
    certificate and host name against ``STREAMBOSS_BROKER_CA`` (or the system's CAs).

    Raises:
        BrokerTLSError: see :func:`check_broker_tls`.
    """
    check_broker_tls(url)
    params = pika.URLParameters(url)
    if params.ssl_options is not None:
        # pika's own amqps default also verifies; ours adds the CA file and the TLS floor.
        params.ssl_options = pika.SSLOptions(tls_context(broker_ca()), server_hostname=params.host)
    return params


def management_verify() -> ssl.SSLContext:
    """What the management API's https client verifies the broker with (httpx ``verify``).

    Raises:
        BrokerTLSError: ``STREAMBOSS_BROKER_CA`` cannot be loaded.
    """
    return tls_context(broker_ca())
