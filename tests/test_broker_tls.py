"""amqps:// and the management API over https, verified against STREAMBOSS_BROKER_CA.

A TLS terminator on loopback (tests/tls_proxy.py) stands in front of the shared
broker's plain ports with a certificate from a throwaway CA, so real agents,
managers and pika connections meet real TLS without the shared broker being
reconfigured. What is proved: with the CA they work; without it, with another
CA, or under a host name the certificate does not name, they refuse the broker
before a single AMQP byte is sent, in one line that names the setting to fix.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pika
import pytest

from streamboss.agent.broker import CONNECT_ERRORS, explain_close
from streamboss.agent.tls import (
    BROKER_CA_ENV,
    BrokerTLSError,
    check_broker_tls,
    connection_parameters,
)
from streamboss.manager.broker import Broker as ManagerBroker
from streamboss.manager.broker import default_management_url

from .certificates import make_authority, make_server_certificate
from .conftest import MANAGER, run_cli
from .tls_proxy import TLSProxy

AMQP_UPSTREAM = ("127.0.0.1", 5672)
MANAGEMENT_UPSTREAM = ("127.0.0.1", 15672)


@dataclass(frozen=True)
class TLSBroker:
    """The shared broker behind TLS: the CA that signed its certificate (for
    ``localhost`` only), a CA that did not, and the two proxies."""

    ca: Path
    other_ca: Path
    amqp: TLSProxy
    management: TLSProxy

    def url(self, host: str = "localhost") -> str:
        return f"amqps://guest:guest@{host}:{self.amqp.port}/%2F"

    @property
    def management_url(self) -> str:
        return f"https://localhost:{self.management.port}"


@pytest.fixture(scope="module")
def tls_broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TLSBroker]:
    directory = tmp_path_factory.mktemp("tls")
    authority = make_authority(directory, "broker-ca")
    other = make_authority(directory, "other-ca")
    server = make_server_certificate(authority, directory, "broker", ("localhost",))
    amqp = TLSProxy(server.cert, server.key, AMQP_UPSTREAM)
    management = TLSProxy(server.cert, server.key, MANAGEMENT_UPSTREAM)
    try:
        yield TLSBroker(authority.cert, other.cert, amqp, management)
    finally:
        amqp.close()
        management.close()


@pytest.fixture(autouse=True)
def no_ca_from_outside(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(BROKER_CA_ENV, raising=False)


def connect(url: str) -> pika.BlockingConnection:
    parameters = connection_parameters(url)
    parameters.connection_attempts = 1
    parameters.socket_timeout = 5
    return pika.BlockingConnection(parameters)


def refusal(url: str) -> str:
    """The one line a refused connection to ``url`` gives (and that it was refused)."""
    with pytest.raises(CONNECT_ERRORS) as caught:
        connect(url).close()
    return explain_close(caught.value, url, opening=True)


# -- pika, as the agent and the manager build their connections ------------------------


def test_with_the_brokers_ca_an_amqps_connection_opens_and_is_encrypted(tls_broker,
                                                                        monkeypatch):
    monkeypatch.setenv(BROKER_CA_ENV, str(tls_broker.ca))
    before = tls_broker.amqp.relayed
    connection = connect(tls_broker.url())
    try:
        channel = connection.channel()
        channel.exchange_declare("amq.topic", exchange_type="topic", passive=True)
    finally:
        connection.close()
    assert tls_broker.amqp.relayed == before + 1, "the connection went through the TLS listener"


def test_without_the_ca_the_brokers_certificate_is_refused(tls_broker):
    before = (tls_broker.amqp.relayed, tls_broker.amqp.refused_handshakes)
    line = refusal(tls_broker.url())
    assert "certificate that does not verify" in line and BROKER_CA_ENV in line, line
    assert "guest:***@" in line and "guest:guest" not in line
    # The client ended the handshake: nothing was relayed to the broker, not even a login.
    assert tls_broker.amqp.relayed == before[0]
    assert tls_broker.amqp.refused_handshakes == before[1] + 1


def test_a_ca_that_did_not_sign_the_certificate_is_refused(tls_broker, monkeypatch):
    monkeypatch.setenv(BROKER_CA_ENV, str(tls_broker.other_ca))
    before = tls_broker.amqp.relayed
    assert "does not verify" in refusal(tls_broker.url())
    assert tls_broker.amqp.relayed == before


def test_a_host_name_the_certificate_does_not_name_is_refused(tls_broker, monkeypatch):
    # The right CA, but the certificate names localhost and the URL says 127.0.0.1.
    monkeypatch.setenv(BROKER_CA_ENV, str(tls_broker.ca))
    line = refusal(tls_broker.url("127.0.0.1"))
    assert "does not verify" in line and "127.0.0.1" in line, line


def test_a_ca_for_a_plain_url_or_a_ca_file_that_is_not_one_is_refused(tmp_path, monkeypatch):
    monkeypatch.setenv(BROKER_CA_ENV, str(tmp_path / "missing.crt"))
    with pytest.raises(BrokerTLSError, match=r"missing\.crt, which does not exist"):
        check_broker_tls("amqps://u:p@broker:5671/v")
    not_pem = tmp_path / "not-a-ca.crt"
    not_pem.write_text("hello\n")
    monkeypatch.setenv(BROKER_CA_ENV, str(not_pem))
    with pytest.raises(BrokerTLSError, match="cannot be loaded as PEM CA certificates"):
        connection_parameters("amqps://u:p@broker:5671/v")
    monkeypatch.setenv(BROKER_CA_ENV, str(not_pem))
    with pytest.raises(BrokerTLSError, match="not amqps://"):
        check_broker_tls("amqp://u:p@broker:5672/v")
    monkeypatch.delenv(BROKER_CA_ENV)
    check_broker_tls("amqp://u:p@broker:5672/v")  # no CA, plain URL: nothing to refuse


def test_amqps_verifies_even_without_a_ca_setting():
    # No STREAMBOSS_BROKER_CA: the system's CAs, and still certificate and host name checks.
    parameters = connection_parameters("amqps://u:p@broker.example:5671/v")
    context = parameters.ssl_options.context
    assert context.verify_mode.name == "CERT_REQUIRED" and context.check_hostname
    assert parameters.ssl_options.server_hostname == "broker.example"
    assert context.minimum_version.name == "TLSv1_2"
    assert connection_parameters("amqp://u:p@broker:5672/v").ssl_options is None


# -- the stream agent and the manager over TLS -----------------------------------------


def test_a_stream_agent_transforms_messages_over_amqps(tls_broker, broker, streams, names,
                                                       agent):
    source, sink = streams("in", "out")
    before = tls_broker.amqp.relayed
    agent(names("tls"), source, sink, "--exec", "tr a-z A-Z",
          env={"STREAMBOSS_BROKER_URL": tls_broker.url(), BROKER_CA_ENV: str(tls_broker.ca)})
    assert tls_broker.amqp.relayed == before + 1, "the agent connected through TLS"
    out = broker.capture(sink)
    ids = broker.publish(source, [b"over tls", b"verified"])
    got = {m.parent: m.body for m in out.collect(2)}
    assert got == {ids[0]: b"OVER TLS", ids[1]: b"VERIFIED"}


def test_a_stream_agent_refuses_a_broker_it_cannot_verify_in_one_line(tls_broker, names,
                                                                      agent, streams):
    source, sink = streams("in", "out")
    process = agent(names("tls"), source, sink, "--exec", "cat", ready=False,
                    env={"STREAMBOSS_BROKER_URL": tls_broker.url()})
    assert process.proc.wait(timeout=30) == 2
    errors = [line for line in process.log().splitlines() if "error" in line]
    assert len(errors) == 1 and "does not verify" in errors[0] and BROKER_CA_ENV in errors[0]
    assert "Traceback" not in process.log() and "guest:guest" not in process.log()


def test_a_stream_agent_with_a_ca_for_a_plain_url_stops_before_connecting(names, agent,
                                                                          streams, tmp_path):
    source, sink = streams("in", "out")
    ca = tmp_path / "ca.crt"
    ca.write_text("")
    process = agent(names("tls"), source, sink, "--exec", "cat", ready=False,
                    env={BROKER_CA_ENV: str(ca)})
    assert process.proc.wait(timeout=30) == 2
    assert "not amqps://" in process.log() and "Traceback" not in process.log()


def test_the_cli_names_a_bad_ca_in_one_line(tmp_path):
    result = run_cli([*MANAGER, "consume", "anything", "--count", "1"],
                     env={BROKER_CA_ENV: str(tmp_path / "nope.crt"),
                          "STREAMBOSS_BROKER_URL": "amqps://u:p@broker.invalid:5671/v"})
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0 and "nope.crt" in result.stderr


def test_the_manager_uses_amqps_and_the_management_api_over_https_with_the_ca(tls_broker,
                                                                              monkeypatch):
    assert default_management_url("amqps://u:p@broker-1:5671/v") == "https://broker-1:15671"
    assert default_management_url("amqp://u:p@broker-1/v") == "http://broker-1:15672"
    monkeypatch.setenv("STREAMBOSS_MANAGEMENT_URL", tls_broker.management_url)
    monkeypatch.setenv(BROKER_CA_ENV, str(tls_broker.ca))
    manager = ManagerBroker(tls_broker.url())
    try:
        assert manager.management_url == tls_broker.management_url
        assert manager.management_available()
        assert manager.queue_state("sb.no-such-queue-tls") is None  # over amqps
        assert manager.server_version() is not None
    finally:
        manager.close()
    monkeypatch.setenv(BROKER_CA_ENV, str(tls_broker.other_ca))
    before = tls_broker.management.relayed
    manager = ManagerBroker(tls_broker.url())
    try:
        assert not manager.management_available(), "an https API it cannot verify is refused"
    finally:
        manager.close()
    assert tls_broker.management.relayed == before

