"""Object references are resolved only inside the configured stores (issue #11).

Anyone who may publish may name any URL in a message's object reference. Real
agents on the real broker are sent references to files outside their store
(/etc/passwd, their own /proc/self/environ), through symbolic links, through
`..`, a hard link, to /dev/zero, a FIFO, an object larger than it says, and
buckets they were not given. Each is dead-lettered once, naming the rule, and nothing of the target
(markers planted in it, its digest, its size) reaches an output, a dead letter or
the agent's log. A control reference inside the store shows that the same
programs would have carried a target's content to each of those places.

Also here: `consume --fetch` writes only inside its directory under names it makes,
reads only from the user's stores, and prints the sha256 it computed for a reference
without one; the manager refuses an archive store outside its prefixes.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import threading
import uuid
from pathlib import Path
from typing import Any

import pytest

from streamboss.agent import object_refs
from streamboss.agent.headers import ObjectReference
from streamboss.agent.object_refs import ObjectStores, OpenedObject
from streamboss.agent.process import StderrTail
from streamboss.agent.runners import per_message
from streamboss.agent.runners.per_message import ObjectFeed, Watchdog, run_once

from .conftest import PYTHON, Broker, Message, MotoServer
from .test_archive_replay import one_line_error
from .test_claim_check import wait_for_queue_bound

FAKE_SHA = "ab" * 32


def reference(url: str, sha256: str | None, size: int | None) -> dict[str, Any]:
    headers: dict[str, Any] = {"sb-object-url": url,
                               "sb-object-content-type": "application/octet-stream"}
    if sha256 is not None:
        headers["sb-object-sha256"] = sha256
    if size is not None:
        headers["sb-object-size"] = size
    return headers


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def text_of(message: Message) -> str:
    """Everything a reader of ``message`` sees: body and every header."""
    return message.body.decode(errors="replace") + repr(message.headers)


# -- agents ---------------------------------------------------------------------------


def test_references_outside_the_stores_are_dead_lettered_and_nothing_of_them_leaks(
        broker: Broker, streams, names, agent, script, tmp_path: Path,
        moto_server: MotoServer) -> None:
    store, outside = tmp_path / "store", tmp_path / "outside"
    store.mkdir()
    outside.mkdir()
    run = uuid.uuid4().hex
    secret = f"outside-secret-{run}".encode()
    (outside / "secret.txt").write_bytes(secret)
    env_secret = f"environ-secret-{run}"
    passwd = Path("/etc/passwd").read_bytes()
    passwd_line = passwd.splitlines()[0].decode()
    # A size no timestamp or id in a message could contain by chance.
    larger = (f"larger-secret-{run}-".encode() * 30_000)[:1_234_567]
    (store / "larger.bin").write_bytes(larger)
    control = f"control-{run}".encode()
    (store / "control.txt").write_bytes(control)
    (store / "to-secret").symlink_to(outside / "secret.txt")
    (store / "to-environ").symlink_to("/proc/self/environ")
    (store / "linkdir").symlink_to(outside, target_is_directory=True)
    os.link(outside / "secret.txt", store / "hardlink")
    os.mkfifo(store / "fifo")
    client = moto_server.client()
    foreign, allowed = moto_server.bucket("foreign"), moto_server.bucket("allowed")
    s3_secret = f"s3-secret-{run}".encode()
    client.put_object(Bucket=foreign, Key="in/secret.txt", Body=s3_secret)
    client.put_object(Bucket=allowed, Key="other/secret.txt", Body=s3_secret)

    stored = f"file://{store}"
    cases: list[tuple[str, dict[str, Any], str]] = [
        # Refused before anything is opened, even with the right size and digest.
        ("passwd", reference("file:///etc/passwd", sha(passwd), len(passwd)),
         object_refs.OUTSIDE),
        ("environ", reference("file:///proc/self/environ", FAKE_SHA, 4096),
         object_refs.OUTSIDE),
        ("dotdot", reference(f"{stored}/../outside/secret.txt", FAKE_SHA, len(secret)),
         object_refs.OUTSIDE),
        ("encoded-dotdot", reference(f"{stored}/%2e%2e/outside/secret.txt", FAKE_SHA,
                                     len(secret)), object_refs.OUTSIDE),
        ("symlink", reference(f"{stored}/to-secret", sha(secret), len(secret)),
         object_refs.SYMLINK),
        ("symlink-environ", reference(f"{stored}/to-environ", FAKE_SHA, 4096),
         object_refs.SYMLINK),
        ("symlinked-dir", reference(f"{stored}/linkdir/secret.txt", sha(secret),
                                    len(secret)), object_refs.SYMLINK),
        ("hardlink", reference(f"{stored}/hardlink", sha(secret), len(secret)),
         object_refs.HARDLINK),
        # /dev is admitted (STREAMBOSS_OBJECT_ALLOW below), so the file-type rule refuses.
        ("dev-zero", reference("file:///dev/zero", FAKE_SHA, 1 << 30),
         object_refs.NOT_REGULAR),
        ("fifo", reference(f"{stored}/fifo", FAKE_SHA, 10), object_refs.NOT_REGULAR),
        ("directory", reference(f"{stored}/", FAKE_SHA, 10), object_refs.NOT_REGULAR),
        ("larger", reference(f"{stored}/larger.bin", sha(larger[:1000]), 1000),
         object_refs.LARGER),
        ("no-size", reference(f"{stored}/control.txt", sha(control), None),
         object_refs.NO_SIZE),
        ("no-digest", reference(f"{stored}/control.txt", None, len(control)),
         object_refs.NO_DIGEST),
        ("foreign-bucket", reference(f"s3://{foreign}/in/secret.txt", sha(s3_secret),
                                     len(s3_secret)), object_refs.OUTSIDE),
        ("other-prefix", reference(f"s3://{allowed}/other/secret.txt", sha(s3_secret),
                                   len(s3_secret)), object_refs.OUTSIDE),
    ]
    # What must never be seen: each target's content, digest (where the reference did
    # not carry it itself) and the larger object's real size.
    forbidden = [secret.decode(), env_secret, passwd_line, larger[:40].decode(),
                 s3_secret.decode(), sha(larger), str(len(larger))]

    source, sink = streams("refs", "out")
    echo_op, fail_op = names("echo"), names("fail")
    env = {**moto_server.env, "STREAMBOSS_OBJECT_STORE": stored,
           "STREAMBOSS_OBJECT_ALLOW": f"file:///dev,s3://{allowed}/in",
           "STREAMBOSS_TEST_SECRET": env_secret}
    # One program would publish what it reads, the other put it in its dead letter's
    # stderr; both log their stderr. One child at a time: a read that hung would
    # hold up everything after it, the control included.
    echo = script("echo", """
        import sys
        data = sys.stdin.buffer.read()
        sys.stdout.buffer.write(data)
        sys.stderr.buffer.write(data + b"\\n")
    """)
    fail = script("fail", """
        import sys
        sys.stderr.buffer.write(sys.stdin.buffer.read() + b"\\n")
        sys.exit(1)
    """)
    echo_agent = agent(echo_op, source, sink, "--exec", echo, "--concurrency", "1", env=env)
    fail_agent = agent(fail_op, source, sink, "--exec", fail, "--concurrency", "1",
                       "--max-attempts", "1", env=env)
    out = broker.capture(sink)
    echo_dead = broker.capture(f"{echo_op}.dead")
    fail_dead = broker.capture(f"{fail_op}.dead")

    ids = {}
    for case, headers, _rule in cases:
        [ids[case]] = broker.publish(source, [headers["sb-object-url"].encode()],
                                     headers=headers)
    [control_id] = broker.publish(source, [f"{stored}/control.txt".encode()],
                                  headers=reference(f"{stored}/control.txt", sha(control),
                                                    len(control)))

    # The control went through: both programs would have shown a target's content.
    [output] = out.collect(1)
    assert output.parent == control_id and output.body == control
    echo_letters = {m.parent: m for m in echo_dead.collect(len(cases))}
    fail_letters = {m.parent: m for m in fail_dead.collect(len(cases) + 1)}
    assert control.decode() in fail_letters[control_id].header("sb-dead-stderr")
    assert control.decode() in echo_agent.log() and control.decode() in fail_agent.log()

    for case, _headers, rule in cases:
        for letter in (echo_letters[ids[case]], fail_letters[ids[case]]):
            reason = letter.header("sb-dead-reason")
            assert reason.startswith("bad input: ") and rule in reason, (case, reason)
            assert letter.header("sb-dead-attempts") == 1, case  # never retried
            assert letter.header("sb-dead-stderr") == "", case  # no child ever ran
    seen = [text_of(m) for m in [output, *echo_letters.values(), *fail_letters.values()]]
    seen += [echo_agent.log(), fail_agent.log()]
    for marker in forbidden:
        assert not any(marker in text for text in seen), marker
    assert out.collect_until_quiet(quiet=1.0) == []


def test_the_digest_mismatch_reason_does_not_tell_the_digest(broker: Broker, streams, names,
                                                             agent, tmp_path: Path) -> None:
    source, sink = streams("in", "out")
    operation = names("mismatch")
    store = tmp_path / "store"
    store.mkdir()
    content = f"guess-me-{uuid.uuid4().hex}".encode()
    (store / "object").write_bytes(content)
    agent(operation, source, sink, "--exec", "cat",
          env={"STREAMBOSS_OBJECT_STORE": f"file://{store}"})
    dead = broker.capture(f"{operation}.dead")
    out = broker.capture(sink)
    url = f"file://{store}/object"
    broker.publish(source, [url.encode()], headers=reference(url, FAKE_SHA, len(content)))
    [letter] = dead.collect(1)
    assert object_refs.MISMATCH in letter.header("sb-dead-reason")
    assert sha(content) not in text_of(letter)
    assert content.decode() not in text_of(letter)
    assert out.collect_until_quiet(quiet=1.0) == []


def test_an_agent_with_no_store_refuses_every_reference(broker: Broker, streams, names, agent,
                                                        tmp_path: Path) -> None:
    source, sink = streams("in", "out")
    operation = names("nostore")
    stored = tmp_path / "object"
    stored.write_bytes(b"x")
    env = {k: "" for k in ("STREAMBOSS_OBJECT_STORE", "STREAMBOSS_OBJECT_ALLOW")}
    agent(operation, source, sink, "--exec", "cat", env=env)
    dead = broker.capture(f"{operation}.dead")
    url = f"file://{stored}"
    broker.publish(source, [url.encode()], headers=reference(url, sha(b"x"), 1))
    [letter] = dead.collect(1)
    assert object_refs.OUTSIDE in letter.header("sb-dead-reason")
    assert "STREAMBOSS_OBJECT_STORE" in letter.header("sb-dead-reason")


def test_a_bad_allow_list_stops_the_agent_in_one_line(tmp_path: Path) -> None:
    result = subprocess.run(
        [PYTHON, "-m", "streamboss.agent", "--operation", "op", "--input", "a", "--output",
         "b", "--exec", "cat"], capture_output=True, text=True, timeout=60,
        env={**os.environ, "STREAMBOSS_OBJECT_ALLOW": "ftp://host/x"})
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "STREAMBOSS_OBJECT_ALLOW" in lines[0], result.stderr


# -- the feeder -------------------------------------------------------------------------


class EndlessBody:
    """A store read that always has more (up to a huge declared size): counts reads."""

    def __init__(self) -> None:
        self.reads = 0

    def read(self, size: int) -> bytes:
        self.reads += 1
        return b"\0" * size

    def close(self) -> None:
        pass


def feed_over(body: Any, size: int) -> ObjectFeed:
    ref = ObjectReference("file:///store/object", FAKE_SHA, size)
    return ObjectFeed(OpenedObject(ref, body, size))


def run_bounded(argv: list[str], feed: ObjectFeed) -> per_message.Result:
    """run_once in a thread, so a feeder that never stops fails the test instead of
    hanging it (the bound is not a speed claim)."""
    results: list[per_message.Result] = []
    thread = threading.Thread(target=lambda: results.append(run_once(
        argv, dict(os.environ), feed, 60.0, StderrTail("test"), set(), Watchdog())),
        daemon=True)
    thread.start()
    thread.join(120)
    assert not thread.is_alive(), "run_once did not return"
    return results[0]


def test_the_feeder_stops_reading_when_the_child_exits() -> None:
    body = EndlessBody()
    feed = feed_over(body, 1 << 40)  # a terabyte: verifying to the end would never end
    result = run_bounded(["head", "-c", "1"], feed)
    assert result.returncode == 0 and result.stdout == b"\0"
    assert not feed.opened.complete and feed.error is None and feed.refused is None
    assert body.reads < 100, body.reads  # about a pipe's worth, not the object


def test_run_once_does_not_wait_for_a_store_read_that_never_returns(monkeypatch) -> None:
    monkeypatch.setattr(per_message, "FEEDER_GRACE", 0.5)
    read_end, write_end = os.pipe()  # nobody writes: every read blocks
    body = os.fdopen(read_end, "rb", buffering=0)
    feed = feed_over(body, 10)
    try:
        result = run_bounded(["true"], feed)
        assert result.returncode == 0
        assert feed.error is not None and "did not answer" in feed.error
    finally:
        os.write(write_end, b"x" * 11)  # lets the stuck read return, and its thread end
        os.close(write_end)


def test_locate_decides_on_the_url_alone(tmp_path: Path) -> None:
    stores = ObjectStores.configured(f"file://{tmp_path}/store", ["s3://media/in"])
    prefix, parts = stores.locate(f"file://{tmp_path}/store/a/../b/c")
    assert prefix.root == f"{tmp_path}/store" and parts == ["b", "c"]
    for url in (f"file://{tmp_path}/store/../x", f"file://{tmp_path}/storex/y",
                "file:////etc/passwd", "s3://media/inbox/x", "s3://media/in/../x",
                "s3://other/in/x", "s3://media/in"):
        with pytest.raises(object_refs.ReferenceRefused, match="outside the configured"):
            stores.locate(url)
    assert stores.locate("s3://media/in/a/b")[1] == ["in/a/b"]
    with pytest.raises(object_refs.ReferenceRefused, match="unsupported URL scheme"):
        stores.locate("http://example.com/x")
    with pytest.raises(ValueError, match="name a bucket"):
        ObjectStores.configured("s3://", [])


# -- consume --fetch ------------------------------------------------------------------


def fetch(broker_url: str, stream: str, directory: Path, count: int, store: Path,
          publish: Any) -> subprocess.CompletedProcess[str]:
    consumer = subprocess.Popen(
        [PYTHON, "-m", "streamboss.manager", "consume", stream, "--count", str(count),
         "--timeout", "30", "--fetch", str(directory)], stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True,
        env={**os.environ, "STREAMBOSS_BROKER_URL": broker_url,
             "STREAMBOSS_OBJECT_STORE": f"file://{store}", "STREAMBOSS_OBJECT_ALLOW": ""})
    wait_for_queue_bound(stream, consumer)
    publish()
    stdout, stderr = consumer.communicate(timeout=90)
    return subprocess.CompletedProcess(consumer.args, consumer.returncode, stdout, stderr)


def test_fetch_writes_only_inside_its_directory_under_names_it_makes(
        broker: Broker, broker_url: str, streams, tmp_path: Path) -> None:
    [stream] = streams("fetch")
    store, target = tmp_path / "store", tmp_path / "deep" / "fetched"
    store.mkdir()
    content = b"an object"
    (store / "evil").write_bytes(content)
    url = f"file://{store}/evil"
    before = sorted(p.name for p in tmp_path.iterdir())

    def publish() -> None:
        # The id and the URL's name are the publisher's: neither names the file.
        broker.publish(stream, [b"x"], ids=["../../escaped"],
                       headers=reference(url, sha(content), len(content)))
        broker.publish(stream, [b"y"], ids=["/tmp/absolute"],
                       headers=reference(url, None, len(content)))

    result = fetch(broker_url, stream, target, 2, store, publish)
    assert result.returncode == 0, result.stderr
    paths = [Path(line) for line in result.stdout.splitlines()]
    assert len(paths) == 2 and all(p.parent == target for p in paths)
    assert sorted(p.name for p in target.iterdir()) == sorted(p.name for p in paths)
    assert all("escaped" not in p.name and "evil" not in p.name and "absolute" not in p.name
               for p in paths)
    assert all(p.read_bytes() == content for p in paths)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted({*before, "deep"})
    # The reference without a digest: checked by its size, the digest computed is shown.
    [note] = [line for line in result.stderr.splitlines() if "sha256" in line]
    assert sha(content) in note and "only its size was checked" in note
    assert (target.stat().st_mode & 0o077) == 0


@pytest.mark.parametrize("case", ["outside", "symlink", "mismatch", "wrong-size"])
def test_fetch_skips_a_hostile_reference_in_one_line_leaves_nothing_and_goes_on(
        broker: Broker, broker_url: str, streams, tmp_path: Path, case: str) -> None:
    [stream] = streams("fetch")
    store, outside, target = tmp_path / "store", tmp_path / "outside", tmp_path / "fetched"
    store.mkdir()
    outside.mkdir()
    secret = f"fetch-secret-{uuid.uuid4().hex}".encode()
    (outside / "secret").write_bytes(secret)
    (store / "link").symlink_to(outside / "secret")
    (store / "object").write_bytes(secret)
    headers, rule = {
        "outside": (reference(f"file://{outside}/secret", sha(secret), len(secret)),
                    object_refs.OUTSIDE),
        "symlink": (reference(f"file://{store}/link", sha(secret), len(secret)),
                    object_refs.SYMLINK),
        "mismatch": (reference(f"file://{store}/object", FAKE_SHA, len(secret)),
                     object_refs.MISMATCH),
        "wrong-size": (reference(f"file://{store}/object", None, len(secret) - 1),
                       object_refs.LARGER),
    }[case]
    good = b"a good object after it"
    (store / "good").write_bytes(good)

    def publish() -> None:
        broker.publish(stream, [b"x"], ids=["hostile"], headers=headers)
        broker.publish(stream, [b"y"], headers=reference(f"file://{store}/good", sha(good),
                                                         len(good)))

    result = fetch(broker_url, stream, target, 2, store, publish)
    # One hostile message does not stop the consumer; the exit status says one was skipped.
    line = one_line_error(result)
    assert result.returncode == 1 and rule in line and "skipped message hostile" in line, line
    assert secret.decode() not in line and sha(secret) not in line
    [path] = [Path(p) for p in result.stdout.splitlines()]
    assert list(target.iterdir()) == [path]  # nothing half written of the hostile one
    assert path.read_bytes() == good


# -- archive stores -------------------------------------------------------------------


def test_an_archive_store_outside_the_managers_prefixes_is_refused(
        managers, tmp_path: Path) -> None:
    allowed = tmp_path / "shared-archive"
    manager = managers.new()
    manager.extra_env = {"STREAMBOSS_ARCHIVE_ALLOW": f"file://{allowed}"}
    manager.start()
    stream = managers.name("arch")
    manager.ok("create-stream", stream)
    for store in ("file:///etc", f"file://{allowed}/../elsewhere",
                  f"file://{allowed}-sibling", f"file://{tmp_path}", "s3://some-bucket/x"):
        line = one_line_error(manager.cli("archive-stream", stream, "--store", store))
        assert "outside the manager's archive prefixes" in line or "'..'" in line, line
        response = manager.api("POST", "/v1/archives", json={"stream": stream,
                                                              "store": store})
        assert response.status_code == 400, response.text
    line = one_line_error(manager.cli("archive-stream", stream, "--store", "file:///etc"))
    assert f"file://{allowed}" in line and f"file://{manager.state_dir / 'archive'}" in line
    assert not (tmp_path / "elsewhere").exists()
    assert not any(a["stream"] == stream for a in manager.declarations()["archives"])
    # Under an allowed prefix it is accepted.
    manager.ok("archive-stream", stream, "--store", f"file://{allowed}/{stream}-archive")
    assert any(a["stream"] == stream for a in manager.declarations()["archives"])
