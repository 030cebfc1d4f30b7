"""Large objects by reference: `stream-file` uploads and publishes a claim check, and a
per-message agent streams the object into its program, verified against its sha256."""

from __future__ import annotations

import hashlib
import os
import subprocess
import time
from pathlib import Path

import httpx

from .conftest import PYTHON

OBJECT_HEADERS = ("sb-object-url", "sb-object-size", "sb-object-sha256",
                  "sb-object-content-type")


def streamboss(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([PYTHON, "-m", "streamboss.manager", *args], capture_output=True,
                          text=True, timeout=120, env={**os.environ, **(env or {})})


def write_random(path: Path, size: int) -> str:
    digest = hashlib.sha256()
    with path.open("wb") as out:
        remaining = size
        while remaining:
            chunk = os.urandom(min(remaining, 1 << 20))
            digest.update(chunk)
            out.write(chunk)
            remaining -= len(chunk)
    return digest.hexdigest()


def reference(url: str, sha256: str, size: int) -> dict[str, object]:
    return {"sb-object-url": url, "sb-object-sha256": sha256, "sb-object-size": size,
            "sb-object-content-type": "application/octet-stream"}


def test_a_50_mb_file_through_stream_file_into_sha256sum(broker, broker_url, streams, names,
                                                         agent, tmp_path: Path) -> None:
    source, sink = streams("files", "digests")
    operation = names("sha")
    store = f"file://{tmp_path / 'objects'}"
    agent(operation, source, sink, "--exec", "sha256sum", env={"STREAMBOSS_OBJECT_STORE": store})
    out = broker.capture(sink)
    references = broker.capture(source)
    big = tmp_path / "big.bin"
    expected = write_random(big, 50 * 1000 * 1000)
    result = streamboss("stream-file", source, str(big), "--store", store,
                        env={"STREAMBOSS_BROKER_URL": broker_url})
    assert result.returncode == 0, result.stderr
    [claim] = references.collect(1)
    assert all(claim.header(name) is not None for name in OBJECT_HEADERS)
    assert claim.header("sb-object-sha256") == expected
    assert claim.header("sb-object-size") == 50 * 1000 * 1000
    assert claim.header("sb-object-url").startswith(store + f"/{source}/")
    assert len(claim.body) < 1000  # the broker carries the claim check, not the object
    [digest] = out.collect(1)
    assert digest.body.split()[0].decode() == expected
    assert digest.parent == claim.header("sb-id")


def test_a_corrupted_object_is_dead_lettered_with_its_reason(broker, streams, names, agent,
                                                             tmp_path: Path) -> None:
    source, sink = streams("in", "out")
    operation = names("verify")
    agent(operation, source, sink, "--exec", "wc -c", "--max-attempts", "3",
          env={"STREAMBOSS_OBJECT_STORE": f"file://{tmp_path}"})
    out = broker.capture(sink)
    dead = broker.capture(f"{operation}.dead")
    stored = tmp_path / "object.bin"
    stored.write_bytes(b"the original bytes")
    claimed = hashlib.sha256(b"the original bytes").hexdigest()
    stored.write_bytes(b"the tampered bytes")  # corrupted in storage, same size
    url = f"file://{stored}"
    [ident] = broker.publish(source, [url.encode()], headers=reference(url, claimed, 18))
    [letter] = dead.collect(1)
    assert "digest mismatch" in letter.header("sb-dead-reason")
    assert url in letter.header("sb-dead-reason")
    # The digest of what is there is never told: it would confirm a guessed content.
    assert hashlib.sha256(b"the tampered bytes").hexdigest() not in repr(letter.headers)
    assert letter.header("sb-parent") == ident
    assert letter.header("sb-object-url") == url  # the claim check is kept for a retry
    assert letter.header("sb-dead-attempts") == 1  # a corrupt object does not heal
    assert out.collect_until_quiet(quiet=1.0) == []


def test_a_missing_object_is_dead_lettered_with_its_reason(broker, streams, names, agent,
                                                           tmp_path: Path) -> None:
    source, sink = streams("in", "out")
    operation = names("missing")
    agent(operation, source, sink, "--exec", "wc -c",
          env={"STREAMBOSS_OBJECT_STORE": f"file://{tmp_path}"})
    out = broker.capture(sink)
    dead = broker.capture(f"{operation}.dead")
    url = f"file://{tmp_path / 'gone.bin'}"
    broker.publish(source, [url.encode()], headers=reference(url, "0" * 64, 5))
    [letter] = dead.collect(1)
    assert "no such object" in letter.header("sb-dead-reason")
    assert out.collect_until_quiet(quiet=1.0) == []


def test_an_ordinary_message_is_not_a_reference(broker, streams, names, agent) -> None:
    source, sink = streams("in", "out")
    operation = names("plain")
    agent(operation, source, sink, "--exec", "wc -c")
    out = broker.capture(sink)
    broker.publish(source, [b"file:///etc/passwd"])
    [message] = out.collect(1)
    assert message.body.strip() == b"18"  # the body itself, not the file it names


def test_a_service_operation_refuses_references_clearly(broker, streams, names, agent,
                                                        tmp_path: Path) -> None:
    source, sink = streams("in", "out")
    operation = names("svc")
    agent(operation, source, sink, "--mode", "service", "--exec", "cat")
    dead = broker.capture(f"{operation}.dead")
    stored = tmp_path / "o.bin"
    stored.write_bytes(b"x")
    url = f"file://{stored}"
    broker.publish(source, [url.encode()],
                   headers=reference(url, hashlib.sha256(b"x").hexdigest(), 1))
    [letter] = dead.collect(1)
    assert "per-message mode" in letter.header("sb-dead-reason")


def test_stream_file_bad_input_publishes_nothing(broker, broker_url, streams,
                                                 tmp_path: Path) -> None:
    [source] = streams("files")
    references = broker.capture(source)
    env = {"STREAMBOSS_BROKER_URL": broker_url}
    real = tmp_path / "real.bin"
    real.write_bytes(b"data")
    store = f"file://{tmp_path / 'objects'}"
    cases = [
        (["stream-file", source, str(tmp_path / "absent.bin"), "--store", store],
         "cannot read"),
        (["stream-file", "no-such-stream-x1", str(real), "--store", store], "does not exist"),
        (["stream-file", source, str(real), "--store", "ftp://host/x"], "ftp"),
    ]
    for args, words in cases:
        result = streamboss(*args, env=env)
        lines = [line for line in result.stderr.splitlines() if line.strip()
                 and not line.startswith("uploading")]
        assert result.returncode == 2, result.stderr
        assert len(lines) == 1 and words in lines[0], result.stderr
    # Unreadable credentials for S3: one line, nothing published, no secret shown.
    result = streamboss("stream-file", source, str(real), "--store", "s3://some-bucket",
                        env={**env, "AWS_ACCESS_KEY_ID": "", "AWS_SECRET_ACCESS_KEY": "",
                             "AWS_SHARED_CREDENTIALS_FILE": str(tmp_path / "none"),
                             "AWS_CONFIG_FILE": str(tmp_path / "none"),
                             "AWS_EC2_METADATA_DISABLED": "true"})
    assert result.returncode == 2 and "credentials" in result.stderr, result.stderr
    assert references.collect_until_quiet(quiet=1.0) == []
    assert not (tmp_path / "objects").exists() or not any((tmp_path / "objects").rglob("*.bin"))


def test_a_large_output_becomes_a_reference_that_consume_fetch_restores(
        broker, broker_url, streams, names, agent, script, tmp_path: Path) -> None:
    source, sink = streams("in", "out")
    operation = names("grow")
    # Every input byte becomes 10,000 output bytes: far above the 1,000-byte threshold.
    command = script("grow", """
        import sys
        data = sys.stdin.buffer.read()
        sys.stdout.buffer.write(bytes(b ^ 0x5A for b in data) * 10_000)
    """)
    objects_dir = tmp_path / "objects"
    agent(operation, source, sink, "--exec", command, "--output-threshold", "1000",
          env={"STREAMBOSS_OBJECT_STORE": f"file://{objects_dir}"})
    fetched = tmp_path / "fetched"
    consumer = subprocess.Popen(
        [PYTHON, "-m", "streamboss.manager", "consume", sink, "--count", "2", "--timeout",
         "60", "--fetch", str(fetched)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True, env={**os.environ, "STREAMBOSS_BROKER_URL": broker_url,
                        "STREAMBOSS_OBJECT_STORE": f"file://{objects_dir}"})
    wait_for_queue_bound(sink, consumer)
    out = broker.capture(sink)
    small = bytes(range(256))
    broker.publish(source, [small, b"x"])
    stdout, stderr = consumer.communicate(timeout=90)
    assert consumer.returncode == 0, stderr
    paths = [Path(line) for line in stdout.splitlines()]
    assert len(paths) == 2 and all(p.parent == fetched for p in paths)
    restored = sorted(p.read_bytes() for p in paths)
    expected = sorted([bytes(b ^ 0x5A for b in small) * 10_000,
                       bytes(b ^ 0x5A for b in b"x") * 10_000])
    assert restored == expected
    claims = out.collect(2)
    assert all(m.header("sb-object-url").startswith(f"file://{objects_dir}/") for m in claims)
    assert all(len(m.body) < 1000 for m in claims)


def wait_for_queue_bound(stream: str, consumer: subprocess.Popen) -> None:
    """Wait until `consume` has bound its server-named queue to ``stream``."""
    deadline = time.monotonic() + 30
    exchange = f"sb.stream.{stream}"
    while time.monotonic() < deadline:
        assert consumer.poll() is None, consumer.stderr.read() if consumer.stderr else ""
        bindings = httpx.get(f"http://127.0.0.1:15672/api/exchanges/%2F/{exchange}/bindings/"
                             "source", auth=("guest", "guest"), timeout=5).json()
        if sum(1 for b in bindings if b["destination"].startswith("amq.gen")) >= 1:
            return
        time.sleep(0.1)
    raise AssertionError("consume did not bind its queue")


def test_a_program_that_reads_only_the_start_gets_the_start_of_the_object(
        broker, streams, names, agent, tmp_path: Path) -> None:
    """As with a plain body: `head` succeeds. The feeder stops when `head` stops reading,
    so the rest of the object (and its digest) is never read."""
    source, sink = streams("in", "out")
    operation = names("head")
    agent(operation, source, sink, "--exec", "head -c 4",
          env={"STREAMBOSS_OBJECT_STORE": f"file://{tmp_path}"})
    out = broker.capture(sink)
    stored = tmp_path / "big.bin"
    digest = write_random(stored, 8 * 1024 * 1024)  # far more than a pipe holds
    url = f"file://{stored}"
    broker.publish(source, [url.encode()], headers=reference(url, digest, 8 * 1024 * 1024))
    [message] = out.collect(1)
    assert message.body == stored.read_bytes()[:4]
