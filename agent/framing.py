"""Record framing on a service process's pipes.

``line``: one record per ``\\n``-terminated line; a record holding a newline
cannot be framed. ``length``: a 4-byte big-endian length, then that many
bytes; binary-safe.
"""

from __future__ import annotations

import struct
from typing import Literal

Framing = Literal["line", "length"]
FRAMINGS: tuple[str, ...] = ("line", "length")

_LENGTH = struct.Struct(">I")
# The broker refuses bodies over 128 MiB by default; a length prefix above
# this is a corrupt stream, not a record.
MAX_RECORD = 512 * 1024 * 1024


class FramingError(ValueError):
    """A record that the chosen framing cannot carry, or a corrupt stream."""


def encode(framing: str, body: bytes) -> bytes:
    """Frame one record for a process's stdin.

    Raises:
        FramingError: a line-framed body that contains a newline.
    """
    if framing == "line":
        if b"\n" in body:
            raise FramingError("body contains a newline, which line framing cannot carry")
        return body + b"\n"
    return _LENGTH.pack(len(body)) + body


class Decoder:
    """Splits a process's stdout into records as bytes arrive."""

    def __init__(self, framing: str) -> None:
        self.framing = framing
        self._buffer = bytearray()

    def feed(self, chunk: bytes) -> list[bytes]:
        """Add ``chunk`` and return every record it completes, in order.

        Raises:
            FramingError: a length prefix larger than ``MAX_RECORD``.
        """
        buffer = self._buffer
        buffer += chunk
        records: list[bytes] = []
        if self.framing == "line":
            start = 0
            while True:
                end = buffer.find(b"\n", start)
                if end < 0:
                    break
                records.append(bytes(buffer[start:end]))
                start = end + 1
            del buffer[:start]
            return records
        start = 0
        available = len(buffer)
        while available - start >= 4:
            (size,) = _LENGTH.unpack_from(buffer, start)
            if size > MAX_RECORD:
                raise FramingError(f"length prefix {size} exceeds {MAX_RECORD} bytes")
            if available - start - 4 < size:
                break
            records.append(bytes(buffer[start + 4 : start + 4 + size]))
            start += 4 + size
        del buffer[:start]
        return records

    @property
    def pending(self) -> int:
        """Bytes received that do not yet form a whole record."""
        return len(self._buffer)

    def reset(self) -> None:
        """Forget a partial record (after the process that wrote it died)."""
        self._buffer.clear()
