"""A TLS terminator on loopback in front of a plain TCP service (the shared broker's
AMQP or management port): what an amqps:// or https:// client meets on a broker
with TLS listeners, without reconfiguring the broker every test shares.

Each accepted connection completes the TLS handshake, then its bytes are relayed
to the upstream port and back. A client that refuses the certificate ends the
handshake; then nothing is ever opened upstream (``relayed`` counts what was).
"""

from __future__ import annotations

import contextlib
import socket
import ssl
import threading
from pathlib import Path

BUFFER = 65536


class TLSProxy:
    """Serves TLS with ``cert``/``key`` on 127.0.0.1:``port`` and relays to ``upstream``."""

    def __init__(self, cert: Path, key: Path, upstream: tuple[str, int]) -> None:
        self.upstream = upstream
        self.context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.context.load_cert_chain(cert, key)
        self._server = socket.create_server(("127.0.0.1", 0))
        self.port: int = self._server.getsockname()[1]
        self.relayed = 0
        self.refused_handshakes = 0
        self._lock = threading.Lock()
        self._sockets: list[socket.socket] = []
        self._closed = False
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self._closed:
            try:
                client, _ = self._server.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(client,), daemon=True).start()

    def _serve(self, client: socket.socket) -> None:
        try:
            secure = self.context.wrap_socket(client, server_side=True)
        except (ssl.SSLError, OSError):
            with self._lock:
                self.refused_handshakes += 1
            client.close()
            return
        try:
            upstream = socket.create_connection(self.upstream, timeout=5)
        except OSError:
            secure.close()
            return
        upstream.settimeout(None)
        with self._lock:
            self.relayed += 1
            self._sockets += [secure, upstream]
        threading.Thread(target=self._pump, args=(upstream, secure), daemon=True).start()
        self._pump(secure, upstream)

    @staticmethod
    def _pump(source: socket.socket, target: socket.socket) -> None:
        try:
            while data := source.recv(BUFFER):
                target.sendall(data)
        except OSError:
            pass
        finally:
            for sock in (source, target):
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)

    def close(self) -> None:
        self._closed = True
        self._server.close()
        with self._lock:
            for sock in self._sockets:
                with contextlib.suppress(OSError):
                    sock.close()
