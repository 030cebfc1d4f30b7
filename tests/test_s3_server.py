"""S3 through a moto server on loopback, used by real subprocesses: the CLI uploads, the
manager's agents stream referenced objects into their programs, its archivers write
segments, and replay reads them back. Real RabbitMQ throughout."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from .conftest import Broker, ManagerPool, ManagerProcess, MotoServer, wait_until
from .module_manager import manager_names  # noqa: F401 (fixture)
from .test_archive_replay import BASE, STEP, one_line_error, publish_numbered, rfc3339
from .test_claim_check import write_random

# Over one 8 MiB part, so the upload is multipart; small enough for moto's memory.
FILE_SIZE = 20 * 1000 * 1000
ARCHIVE_TIMEOUT = 60.0


@pytest.fixture(scope="module")
def buckets(moto_server: MotoServer) -> dict[str, str]:
    """The buckets the manager is told about: objects its agents may read, archive
    prefixes its archivers may write."""
    return {"objects": moto_server.bucket("objects"), "archive": moto_server.bucket("archive")}


@pytest.fixture(scope="module")
def manager(module_managers: ManagerPool, moto_server: MotoServer,
            buckets: dict[str, str]) -> ManagerProcess:
    manager = module_managers.new()
    # The agents' own store is file://<state>/objects: the operator admits the bucket
    # stream-file uploads to, and the archive prefixes (one bucket that does not exist,
    # for the refusal below).
    manager.extra_env = {
        **moto_server.env,
        "STREAMBOSS_OBJECT_ALLOW": f"s3://{buckets['objects']}",
        "STREAMBOSS_ARCHIVE_ALLOW": f"s3://{buckets['archive']}/streams,"
                                    "s3://no-such-archive-bucket",
    }
    return manager.start()


def test_stream_file_to_s3_into_a_managed_sha256sum_operation(
        manager: ManagerProcess, moto_server: MotoServer, buckets: dict[str, str],
        broker: Broker, names, tmp_path: Path) -> None:
    source, sink, operation = names("files"), names("digests"), names("sha")
    bucket = buckets["objects"]
    definition = tmp_path / "sha.json"
    definition.write_text(json.dumps({"definition": {"name": operation,
                                                     "exec": "sha256sum"}}))
    manager.ok("create-stream", source)
    manager.ok("define-process", str(definition))
    manager.ok("create-operation", operation, operation, source, sink)
    out = broker.capture(sink)  # a subscriber: the manager starts the operation's agent
    big = tmp_path / "big.bin"
    expected = write_random(big, FILE_SIZE)
    # The seed's shim, with its argument order: STREAMNAME BUCKET FILENAME.
    result = manager.tool("stream_file.py", source, bucket, str(big))
    assert result.returncode == 0, result.stderr
    [digest] = out.collect(1)
    assert digest.body.split()[0].decode() == expected
    keys = [o["Key"] for o in moto_server.client().list_objects_v2(Bucket=bucket)["Contents"]]
    assert len(keys) == 1 and keys[0].startswith(f"{source}/") and keys[0].endswith("big.bin")


def test_archive_to_s3_and_replay_a_window_from_it(
        manager: ManagerProcess, moto_server: MotoServer, buckets: dict[str, str],
        broker: Broker, names) -> None:
    stream, target = names("ticks"), names("ticks-replayed")
    bucket = buckets["archive"]
    store = f"s3://{bucket}/streams"
    manager.ok("create-stream", stream)
    manager.ok("create-stream", target)
    manager.ok("archive-stream", stream, "--store", store, "--segment-seconds", "0.5")
    publish_numbered(broker, stream, range(1000), "s3")

    def archived() -> int:
        listing = moto_server.client().list_objects_v2(Bucket=bucket,
                                                       Prefix=f"streams/{stream}/")
        keys = [o["Key"] for o in listing.get("Contents", [])]
        if f"streams/{stream}/index.jsonl" not in keys:
            return 0
        index = moto_server.client().get_object(
            Bucket=bucket, Key=f"streams/{stream}/index.jsonl")["Body"].read()
        return sum(json.loads(line)["count"] for line in index.splitlines())

    wait_until(lambda: archived() == 1000, ARCHIVE_TIMEOUT, "1,000 messages archived to S3")
    out = broker.capture(target)
    result = manager.cli("replay", stream, "--from", rfc3339(BASE + 100 * STEP),
                         "--until", rfc3339(BASE + 300 * STEP), "--to", target)
    assert result.returncode == 0, result.stderr
    got = out.collect(200)
    assert [m.header("sb-id") for m in got] == [f"s3-{n}" for n in range(100, 300)]
    assert out.collect_until_quiet(quiet=1.0) == []


def test_stream_file_to_an_unknown_bucket_publishes_nothing(
        manager: ManagerProcess, broker: Broker, names, tmp_path: Path) -> None:
    stream = names("nobucket")
    manager.ok("create-stream", stream)
    out = broker.capture(stream)
    small = tmp_path / "small.txt"
    small.write_text("hello\n")
    line = one_line_error(manager.cli("stream-file", stream, str(small), "--store",
                                      "s3://no-such-bucket-here"))
    assert "bucket 'no-such-bucket-here' does not exist" in line
    assert out.collect_until_quiet(quiet=1.0) == []


def test_unreadable_credentials_are_one_line_and_publish_nothing(
        manager: ManagerProcess, broker: Broker, moto_server: MotoServer, names,
        tmp_path: Path) -> None:
    stream = names("badcreds")
    manager.ok("create-stream", stream)
    out = broker.capture(stream)
    broken = tmp_path / "credentials"
    broken.write_text("[default]\nthis is not an ini file\n")
    small = tmp_path / "small.txt"
    small.write_text("hello\n")
    bucket = moto_server.bucket("creds")
    # No keys in the environment, so boto3 reads the (broken) shared credentials file.
    result = manager.cli("stream-file", stream, str(small), "--store", f"s3://{bucket}",
                         env={"AWS_SHARED_CREDENTIALS_FILE": str(broken),
                              "AWS_ACCESS_KEY_ID": "", "AWS_SECRET_ACCESS_KEY": ""})
    line = one_line_error(result)
    assert "cannot read the AWS credentials or config" in line
    assert out.collect_until_quiet(quiet=1.0) == []


def test_archive_stream_to_an_unknown_bucket_is_refused(manager: ManagerProcess,
                                                         names) -> None:
    stream = names("nobucket-archive")
    manager.ok("create-stream", stream)
    line = one_line_error(manager.cli("archive-stream", stream, "--store",
                                      "s3://no-such-archive-bucket"))
    assert "bucket 'no-such-archive-bucket' does not exist" in line
    assert not any(a["stream"] == stream for a in manager.declarations()["archives"])
