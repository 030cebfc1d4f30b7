"""The agent transforms streams correctly in both modes and both framings.

Every test runs a real agent process against the real RabbitMQ.
"""

from __future__ import annotations

import json
import random
import re
import shutil
import struct
import subprocess
import zlib
from datetime import UTC, datetime
from pathlib import Path

import pytest

from .conftest import PYTHON
from .requirements import require

ALL_BYTES = bytes(range(256))

# The seed's Python filter: pancakes become waffles, line by line.
WAFFLE = """
    import sys
    for line in sys.stdin:
        sys.stdout.write(line.replace("pancake", "waffle"))
"""

# A length-framed service: 4-byte big-endian length + bytes in, the bytes reversed out.
LENGTH_REVERSE = """
    import struct, sys
    read, write = sys.stdin.buffer.read, sys.stdout.buffer.write
    while True:
        head = read(4)
        if len(head) < 4:
            break
        (size,) = struct.unpack(">I", head)
        body = read(size)
        write(struct.pack(">I", size) + body[::-1])
        sys.stdout.buffer.flush()
"""

REVERSE_BYTES = (f"{PYTHON} -c \"import sys; "
                 "sys.stdout.buffer.write(sys.stdin.buffer.read()[::-1])\"")


def by_parent(messages: list) -> dict[str, bytes]:
    result = {message.parent: message.body for message in messages}
    assert len(result) == len(messages), "an input produced more than one output"
    return result


# -- per-message -----------------------------------------------------------------


def test_per_message_seed_tr_uppercases(broker, streams, names, agent) -> None:
    source, sink = streams("in", "out")
    agent(names("upper"), source, sink, "--exec", "tr [a-z] [A-Z]")
    out = broker.capture(sink)
    bodies = [b"hello world", b"mixed Case 123", b"", b"multi\nline\nbody"]
    ids = broker.publish(source, bodies)
    got = by_parent(out.collect(3))
    # the empty body produces empty output, which is not published
    assert got == {ids[0]: b"HELLO WORLD", ids[1]: b"MIXED CASE 123",
                   ids[3]: b"MULTI\nLINE\nBODY"}
    assert out.collect_until_quiet(quiet=1.0) == []


def test_per_message_passes_all_byte_values_through_cat(broker, streams, names, agent) -> None:
    source, sink = streams("in", "out")
    agent(names("cat"), source, sink, "--exec", "cat")
    out = broker.capture(sink)
    rng = random.Random(7)
    bodies = [ALL_BYTES, ALL_BYTES * 64, rng.randbytes(100_000), b"\x00", b"\n\n\r\n"]
    ids = broker.publish(source, bodies)
    assert by_parent(out.collect(len(bodies))) == dict(zip(ids, bodies, strict=True))


def test_per_message_reverses_random_binary(broker, streams, names, agent) -> None:
    source, sink = streams("in", "out")
    agent(names("rev"), source, sink, "--exec", REVERSE_BYTES)
    out = broker.capture(sink)
    rng = random.Random(11)
    bodies = [ALL_BYTES] + [rng.randbytes(rng.randrange(1, 5000)) for _ in range(20)]
    ids = broker.publish(source, bodies)
    assert by_parent(out.collect(len(bodies))) == {
        ident: body[::-1] for ident, body in zip(ids, bodies, strict=True)}


def test_per_message_waffle_filter(broker, streams, names, agent, script) -> None:
    source, sink = streams("in", "out")
    agent(names("waffle"), source, sink, "--exec", script("waffle", WAFFLE))
    out = broker.capture(sink)
    ids = broker.publish(source, [b"i like pancake", b"pancake\npancakes\nbacon\n", b"eggs"])
    assert by_parent(out.collect(3)) == {
        ids[0]: b"i like waffle", ids[1]: b"waffle\nwaffles\nbacon\n", ids[2]: b"eggs"}


def test_per_message_shell_pipeline(broker, streams, names, agent) -> None:
    source, sink = streams("in", "out")
    agent(names("sh"), source, sink, "--shell", "--exec", "tr a-z A-Z | rev")
    out = broker.capture(sink)
    ids = broker.publish(source, [b"abc def"])
    assert by_parent(out.collect(1)) == {ids[0]: b"FED CBA"}


def test_per_message_window_of_one_keeps_order(broker, streams, names, agent) -> None:
    source, sink = streams("in", "out")
    agent(names("ordered"), source, sink, "--exec", "tr a-z A-Z",
          "--prefetch", "1", "--concurrency", "1")
    out = broker.capture(sink)
    bodies = [f"record {i:03d} abc".encode() for i in range(40)]
    broker.publish(source, bodies)
    assert [m.body for m in out.collect(40)] == [b.upper() for b in bodies]


def test_per_message_concurrent_children_lose_nothing(broker, streams, names, agent) -> None:
    source, sink = streams("in", "out")
    agent(names("many"), source, sink, "--exec", "tr a-z A-Z", "--concurrency", "4")
    out = broker.capture(sink)
    bodies = [f"message number {i}".encode() for i in range(300)]
    ids = broker.publish(source, bodies)
    assert by_parent(out.collect(300)) == {
        ident: body.upper() for ident, body in zip(ids, bodies, strict=True)}


def test_empty_output_is_not_published_and_input_is_acked(broker, streams, names,
                                                          agent, script) -> None:
    source, sink = streams("in", "out")
    operation = names("keep")
    keep = script("keep", """
        import sys
        data = sys.stdin.read()
        if "keep" in data:
            sys.stdout.write(data)
    """)
    process = agent(operation, source, sink, "--exec", keep)
    out = broker.capture(sink)
    ids = broker.publish(source, [b"drop me", b"keep me", b"drop too", b"keep too"])
    got = out.collect(2)
    assert by_parent(got) == {ids[1]: b"keep me", ids[3]: b"keep too"}
    assert process.terminate() == 0
    assert out.collect_until_quiet(quiet=0.5) == []
    # had the dropped inputs not been acked, they would be back in the queue now
    assert broker.queue_depth(f"sb.op.{operation}") == 0


# -- service ---------------------------------------------------------------------


def test_service_waffle_filter_line_framing(broker, streams, names, agent, script) -> None:
    source, sink = streams("in", "out")
    process = agent(names("waffle"), source, sink, "--mode", "service",
                    "--exec", script("waffle", WAFFLE))
    out = broker.capture(sink)
    bodies = [f"pancake number {i} with pancake syrup".encode() for i in range(200)]
    ids = broker.publish(source, bodies)
    got = out.collect(200)
    # one child, records answered in order
    assert [m.body for m in got] == [b.replace(b"pancake", b"waffle") for b in bodies]
    assert [m.parent for m in got] == ids
    assert process.log().count("started service process") == 1


def test_service_length_framing_binary(broker, streams, names, agent, script) -> None:
    source, sink = streams("in", "out")
    agent(names("lenrev"), source, sink, "--mode", "service", "--framing", "length",
          "--exec", script("reverse", LENGTH_REVERSE))
    out = broker.capture(sink)
    rng = random.Random(3)
    bodies = [ALL_BYTES, ALL_BYTES * 300, b"\n", b"a\nb\nc"] + \
        [rng.randbytes(rng.randrange(1, 20_000)) for _ in range(60)]
    ids = broker.publish(source, bodies)
    got = out.collect(len(bodies))
    assert [m.parent for m in got] == ids
    assert [m.body for m in got] == [body[::-1] for body in bodies]


def test_service_length_in_line_out(broker, streams, names, agent, script) -> None:
    source, sink = streams("in", "out")
    hexer = script("hexer", """
        import struct, sys
        while True:
            head = sys.stdin.buffer.read(4)
            if len(head) < 4:
                break
            body = sys.stdin.buffer.read(struct.unpack(">I", head)[0])
            print(body.hex())
    """)
    agent(names("hex"), source, sink, "--mode", "service", "--framing", "length",
          "--output-framing", "line", "--exec", hexer)
    out = broker.capture(sink)
    bodies = [ALL_BYTES, b"\n\n", b"\x00"]
    ids = broker.publish(source, bodies)
    assert by_parent(out.collect(3)) == {
        ident: body.hex().encode() for ident, body in zip(ids, bodies, strict=True)}


def test_service_line_in_length_out(broker, streams, names, agent, script) -> None:
    source, sink = streams("in", "out")
    splitter = script("splitter", """
        import struct, sys
        for line in sys.stdin.buffer:
            # one output record holding newlines, which only length framing can carry
            body = line.rstrip(b"\\n").replace(b",", b"\\n")
            sys.stdout.buffer.write(struct.pack(">I", len(body)) + body)
            sys.stdout.buffer.flush()
    """)
    agent(names("split"), source, sink, "--mode", "service", "--framing", "line",
          "--output-framing", "length", "--exec", splitter)
    out = broker.capture(sink)
    ids = broker.publish(source, [b"a,b,c", b"no commas"])
    assert by_parent(out.collect(2)) == {ids[0]: b"a\nb\nc", ids[1]: b"no commas"}


def test_service_empty_answer_is_not_published(broker, streams, names, agent, script) -> None:
    source, sink = streams("in", "out")
    operation = names("grep")
    grep = script("grep", """
        import sys
        for line in sys.stdin:
            print(line.strip() if "keep" in line else "")
    """)
    process = agent(operation, source, sink, "--mode", "service", "--exec", grep)
    out = broker.capture(sink)
    ids = broker.publish(source, [b"keep 1", b"drop 2", b"drop 3", b"keep 4"])
    assert by_parent(out.collect(2)) == {ids[0]: b"keep 1", ids[3]: b"keep 4"}
    assert process.terminate() == 0
    assert out.collect_until_quiet(quiet=0.5) == []
    assert broker.queue_depth(f"sb.op.{operation}") == 0


# -- definitions and config files --------------------------------------------------


def test_seed_definition_file(broker, streams, names, agent, tmp_path: Path) -> None:
    source, sink = streams("in", "out")
    seed = tmp_path / "upper.json"
    seed.write_text(json.dumps(
        {"definition": {"exec": "tr [a-z] [A-Z]", "application": "tr", "name": "upper"}}))
    agent(names("seed"), source, sink, "--definition", str(seed))
    out = broker.capture(sink)
    ids = broker.publish(source, [b"from the seed"])
    assert by_parent(out.collect(1)) == {ids[0]: b"FROM THE SEED"}


def test_toml_config_file(broker, streams, names, agent, script, tmp_path: Path) -> None:
    source, sink = streams("in", "out")
    operation = names("toml")
    config = tmp_path / "agent.toml"
    config.write_text(
        f'[operation]\nname = "{operation}"\ninput = "{source}"\noutput = "{sink}"\n'
        f'[definition]\nexec = "{script("waffle", WAFFLE)}"\nmode = "service"\n')
    process = agent(operation, source, sink, "--config", str(config), name_flags=False)
    out = broker.capture(sink)
    ids = broker.publish(source, [b"pancake day"])
    assert by_parent(out.collect(1)) == {ids[0]: b"waffle day"}
    assert "(service," in process.log()


# -- headers ---------------------------------------------------------------------


def test_output_headers_and_lineage(broker, streams, names, agent) -> None:
    source, sink = streams("in", "out")
    operation = names("hdr")
    agent(operation, source, sink, "--exec", "cat")
    out = broker.capture(sink)
    ids = broker.publish(source, [b"one", b"two"], ids=["parent-one", "parent-two"])
    got = out.collect(2)
    assert sorted(m.parent for m in got) == sorted(ids)
    seen_ids = set()
    for message in got:
        sb_id = message.header("sb-id")
        assert sb_id and sb_id not in ids
        seen_ids.add(sb_id)
        assert message.header("sb-stream") == sink
        produced = message.header("sb-produced-at")
        assert produced.endswith("Z")
        stamp = datetime.strptime(produced, "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=UTC)
        assert abs((datetime.now(UTC) - stamp).total_seconds()) < 3600
        assert message.header("cloudEvents:id") == sb_id
        assert message.header("cloudEvents:source")
        assert operation in message.header("cloudEvents:source")
        assert message.header("cloudEvents:type")
        assert message.header("cloudEvents:specversion") == "1.0"
        assert message.properties.delivery_mode == 2
    assert len(seen_ids) == 2


def test_parent_falls_back_to_message_id(broker, streams, names, agent) -> None:
    source, sink = streams("in", "out")
    agent(names("msgid"), source, sink, "--exec", "cat")
    out = broker.capture(sink)
    broker.publish(source, [b"no sb-id"], ids=["amqp-message-id-1"], use_sb_id=False)
    assert [m.parent for m in out.collect(1)] == ["amqp-message-id-1"]


def test_chained_operations_keep_lineage(broker, streams, names, agent, script) -> None:
    source, middle, sink = streams("in", "mid", "out")
    agent(names("waffle"), source, middle, "--mode", "service", "--exec", script("w", WAFFLE))
    agent(names("upper"), middle, sink, "--exec", "tr a-z A-Z")
    mid_capture = broker.capture(middle)
    out = broker.capture(sink)
    ids = broker.publish(source, [b"pancake stack"])
    mid = mid_capture.collect(1)[0]
    final = out.collect(1)[0]
    assert final.body == b"WAFFLE STACK"
    assert mid.parent == ids[0]
    assert final.parent == mid.header("sb-id")


# -- ImageMagick -----------------------------------------------------------------


def png(width: int, height: int) -> bytes:
    """A small RGB PNG with a gradient, written without any imaging library."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return (struct.pack(">I", len(data)) + kind + data
                + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF))

    raw = b"".join(
        b"\x00" + bytes(c for x in range(width) for c in (x * 4 % 256, y * 4 % 256, 128))
        for y in range(height))
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw))
            + chunk(b"IEND", b""))


def png_size(data: bytes) -> tuple[int, int]:
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    assert data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def real_imagemagick() -> bool:
    if not Path("/usr/bin/convert").exists():
        return False
    try:
        version = subprocess.run(["/usr/bin/convert", "-version"], capture_output=True,
                                 text=True, timeout=30).stdout
    except (OSError, subprocess.TimeoutExpired):
        return False
    return "ImageMagick" in version


@pytest.mark.imagemagick
def test_seed_convert_resizes_png_by_half(broker, streams, names, agent) -> None:
    require(real_imagemagick(),
            "needs ImageMagick at /usr/bin/convert (apt-get install imagemagick)")
    source, sink = streams("images", "thumbs")
    agent(names("resize"), source, sink, "--exec", '/usr/bin/convert - -resize "50%" -')
    out = broker.capture(sink)
    images = [png(64, 40), png(200, 100)]
    ids = broker.publish(source, images)
    got = by_parent(out.collect(2))
    assert png_size(got[ids[0]]) == (32, 20)
    assert png_size(got[ids[1]]) == (100, 50)
    identify = shutil.which("identify")
    if identify:
        described = subprocess.run([identify, "-"], input=got[ids[1]], capture_output=True,
                                   timeout=30, check=True).stdout.decode()
        assert re.search(r"\bPNG 100x50\b", described), described


# -- topology --------------------------------------------------------------------


def test_agent_declares_its_queue_and_dead_letter_stream(broker, streams, names, agent) -> None:
    source, sink = streams("in", "out")
    operation = names("topo")
    assert not broker.exchange_exists(f"sb.stream.{operation}.dead")
    assert broker.queue_depth(f"sb.op.{operation}") is None
    agent(operation, source, sink, "--exec", "cat")
    assert broker.exchange_exists(f"sb.stream.{operation}.dead")
    assert broker.queue_consumers(f"sb.op.{operation}") == 1
    # the queue is bound to every routing key of the input stream
    out = broker.capture(sink)
    ids = broker.publish(source, [b"a"], routing_key="any.key.at.all")
    assert [m.parent for m in out.collect(1)] == ids


def test_queue_outlives_the_agent_and_keeps_the_backlog(broker, streams, names, agent) -> None:
    source, sink = streams("in", "out")
    operation = names("backlog")
    first = agent(operation, source, sink, "--exec", "tr a-z A-Z")
    assert first.terminate() == 0
    out = broker.capture(sink)
    ids = broker.publish(source, [b"while away 1", b"while away 2"])
    assert broker.queue_depth(f"sb.op.{operation}") == 2
    agent(operation, source, sink, "--exec", "tr a-z A-Z")
    assert by_parent(out.collect(2)) == {ids[0]: b"WHILE AWAY 1", ids[1]: b"WHILE AWAY 2"}


def test_two_agents_share_one_operation(broker, streams, names, agent, script) -> None:
    source, sink = streams("in", "out")
    operation = names("shared")
    command = script("waffle", WAFFLE)
    first = agent(operation, source, sink, "--mode", "service", "--exec", command,
                  "--prefetch", "5")
    second = agent(operation, source, sink, "--mode", "service", "--exec", command,
                   "--prefetch", "5")
    assert broker.queue_consumers(f"sb.op.{operation}") == 2
    out = broker.capture(sink)
    bodies = [f"pancake {i}".encode() for i in range(400)]
    ids = broker.publish(source, bodies)
    # competing consumers: every message is handled once, by one of the two
    assert by_parent(out.collect(400)) == {
        ident: body.replace(b"pancake", b"waffle") for ident, body in zip(ids, bodies,
                                                                          strict=True)}
    assert out.collect_until_quiet(quiet=1.0) == []
    assert first.terminate() == 0
    assert second.terminate() == 0
