"""Record framing on a service child's pipes: line and 4-byte big-endian length."""

from __future__ import annotations

import random
import struct

import pytest

from streamboss.agent.framing import FRAMINGS, MAX_RECORD, Decoder, FramingError, encode

ALL_BYTES = bytes(range(256))


def length_frame(body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + body


def feed_in_chunks(decoder: Decoder, data: bytes, sizes: list[int]) -> list[bytes]:
    records: list[bytes] = []
    at = 0
    for size in sizes:
        records += decoder.feed(data[at : at + size])
        at += size
    records += decoder.feed(data[at:])
    return records


def test_both_framings_are_offered() -> None:
    assert set(FRAMINGS) == {"line", "length"}


# -- line ------------------------------------------------------------------------


def test_line_encode_appends_one_newline() -> None:
    assert encode("line", b"hello world") == b"hello world\n"
    assert encode("line", b"") == b"\n"


@pytest.mark.parametrize("body", [b"a\nb", b"\n", b"trailing\n", b"\x00\n\xff"])
def test_line_encode_refuses_a_body_with_a_newline(body: bytes) -> None:
    with pytest.raises(FramingError, match="newline"):
        encode("line", body)


def test_line_decoder_splits_records_in_one_chunk() -> None:
    decoder = Decoder("line")
    assert decoder.feed(b"one\ntwo\n\nfour\n") == [b"one", b"two", b"", b"four"]
    assert decoder.pending == 0


def test_line_decoder_joins_a_record_split_across_chunks() -> None:
    decoder = Decoder("line")
    assert decoder.feed(b"hel") == []
    assert decoder.pending == 3
    assert decoder.feed(b"lo wo") == []
    assert decoder.feed(b"rld\nnext") == [b"hello world"]
    assert decoder.pending == 4
    assert decoder.feed(b"\n") == [b"next"]
    assert decoder.pending == 0


def test_line_decoder_byte_by_byte() -> None:
    data = b"alpha\nbeta\r\n\x00gamma\xff\n"
    decoder = Decoder("line")
    records = feed_in_chunks(decoder, data, [1] * len(data))
    assert records == [b"alpha", b"beta\r", b"\x00gamma\xff"]


def test_line_framing_carries_every_byte_but_newline() -> None:
    body = bytes(b for b in ALL_BYTES if b != 0x0A)
    assert Decoder("line").feed(encode("line", body)) == [body]


def test_line_decoder_reset_drops_a_partial_record() -> None:
    decoder = Decoder("line")
    decoder.feed(b"half a rec")
    decoder.reset()
    assert decoder.pending == 0
    assert decoder.feed(b"whole\n") == [b"whole"]


# -- length ----------------------------------------------------------------------


def test_length_encode_is_big_endian_prefix() -> None:
    assert encode("length", b"abc") == b"\x00\x00\x00\x03abc"
    assert encode("length", b"") == b"\x00\x00\x00\x00"
    assert encode("length", b"x" * 258)[:4] == b"\x00\x00\x01\x02"


def test_length_encode_carries_newlines() -> None:
    assert encode("length", b"a\nb\n") == b"\x00\x00\x00\x04a\nb\n"


def test_length_roundtrip_all_byte_values_and_empty_records() -> None:
    bodies = [ALL_BYTES, b"", b"\n", ALL_BYTES[::-1], b"\x00\x00\x00\x05"]
    data = b"".join(encode("length", body) for body in bodies)
    assert Decoder("length").feed(data) == bodies


@pytest.mark.parametrize("split", range(1, 12))
def test_length_decoder_record_split_at_every_point(split: int) -> None:
    # splits fall inside the prefix (1-3), at its end (4) and inside the body
    data = length_frame(b"0123456") + length_frame(b"xy")
    decoder = Decoder("length")
    first = decoder.feed(data[:split])
    rest = decoder.feed(data[split:])
    assert first + rest == [b"0123456", b"xy"]
    assert decoder.pending == 0


def test_length_decoder_random_binary_in_random_chunks() -> None:
    rng = random.Random(20240611)
    bodies = [rng.randbytes(rng.randrange(0, 3000)) for _ in range(200)]
    data = b"".join(encode("length", body) for body in bodies)
    sizes = [rng.randrange(1, 700) for _ in range(len(data) // 350)]
    decoder = Decoder("length")
    assert feed_in_chunks(decoder, data, sizes) == bodies
    assert decoder.pending == 0


def test_length_decoder_keeps_a_partial_record_pending() -> None:
    decoder = Decoder("length")
    assert decoder.feed(b"\x00\x00\x00\x0ahello") == []
    assert decoder.pending == 9
    decoder.reset()
    assert decoder.pending == 0
    assert decoder.feed(length_frame(b"fresh")) == [b"fresh"]


def test_length_decoder_refuses_an_absurd_prefix() -> None:
    decoder = Decoder("length")
    with pytest.raises(FramingError, match="exceeds"):
        decoder.feed(struct.pack(">I", MAX_RECORD + 1) + b"junk")


def test_length_decoder_refuses_ascii_mistaken_for_a_prefix() -> None:
    # a line-writing child behind --output-framing length: "hello\n" reads as 1.7 GB
    with pytest.raises(FramingError):
        Decoder("length").feed(b"hello world\n")
