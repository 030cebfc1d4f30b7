"""Object storage: file:// on a temp dir, s3:// against moto in-process."""

from __future__ import annotations

import hashlib
import io
import os
import tracemalloc
from collections.abc import Iterator

import boto3
import pytest
from botocore.exceptions import ClientError
from moto import mock_aws

from streamboss.agent import objects
from streamboss.agent.objects import ObjectInfo, ObjectStoreError

MIB = 1024 * 1024
ALL_BYTES = bytes(range(256)) * 1000


class GeneratedStream(io.RawIOBase):
    """A file object fed by a generator: nothing bigger than one block exists at once."""

    def __init__(self, blocks: Iterator[bytes]) -> None:
        super().__init__()
        self._blocks = blocks
        self._pending = b""

    def readable(self) -> bool:
        return True

    def read(self, size: int | None = -1) -> bytes:
        if size is None or size < 0:
            size = 1 << 62
        out = []
        have = 0
        while have < size:
            if not self._pending:
                self._pending = next(self._blocks, b"")
                if not self._pending:
                    break
            take = self._pending[: size - have]
            self._pending = self._pending[len(take):]
            out.append(take)
            have += len(take)
        return b"".join(out)


def blocks(total: int, block: int, digest: hashlib._Hash | None = None,
           fail_after: int | None = None) -> Iterator[bytes]:
    sent = 0
    i = 0
    while sent < total:
        if fail_after is not None and sent >= fail_after:
            raise RuntimeError("source broke mid-stream")
        data = bytes([i % 256]) * min(block, total - sent)
        if digest is not None:
            digest.update(data)
        sent += len(data)
        i += 1
        yield data


def file_url(path: os.PathLike[str] | str) -> str:
    return "file://" + os.fspath(path)


# ---------------------------------------------------------------- file://


def test_file_round_trip_all_byte_values(tmp_path):
    url = file_url(tmp_path / "obj.bin")
    info = objects.put(url, io.BytesIO(ALL_BYTES), "application/octet-stream")
    assert info == ObjectInfo(url, len(ALL_BYTES), hashlib.sha256(ALL_BYTES).hexdigest(),
                              "application/octet-stream")
    with objects.open_read(url) as fh:
        assert fh.read() == ALL_BYTES
    assert b"".join(objects.iter_chunks(url, chunk_size=1000)) == ALL_BYTES
    assert all(len(c) <= 1000 for c in objects.iter_chunks(url, chunk_size=1000))
    stat = objects.stat(url)
    assert stat is not None
    assert (stat.size, stat.sha256) == (info.size, info.sha256)
    objects.verify(url, info.sha256)
    objects.verify(url, info.sha256.upper())
    objects.delete(url)
    assert objects.stat(url) is None
    objects.delete(url)  # idempotent


def test_file_empty_object(tmp_path):
    url = file_url(tmp_path / "empty")
    info = objects.put(url, io.BytesIO(b""))
    assert (info.size, info.sha256) == (0, hashlib.sha256(b"").hexdigest())
    assert list(objects.iter_chunks(url)) == []


def test_file_large_stream_memory_bounded(tmp_path):
    total = 50 * MIB
    expected = hashlib.sha256()
    url = file_url(tmp_path / "big.bin")
    tracemalloc.start()
    try:
        # The generator-backed source itself holds ~2 chunks while joining a read.
        info = objects.put(url, GeneratedStream(blocks(total, MIB, expected)),
                           chunk_size=4 * MIB)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert info.size == total == os.path.getsize(tmp_path / "big.bin")
    assert info.sha256 == expected.hexdigest()
    assert peak < 20 * MIB, f"peak {peak / MIB:.1f} MiB for a {total / MIB:.0f} MiB object"
    tracemalloc.start()
    try:
        objects.verify(url, expected.hexdigest(), chunk_size=MIB)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 20 * MIB


def test_file_put_is_atomic_when_source_fails(tmp_path):
    url = file_url(tmp_path / "obj.bin")
    objects.put(url, io.BytesIO(b"old content"))
    source = GeneratedStream(blocks(10 * MIB, MIB, fail_after=3 * MIB))
    with pytest.raises(RuntimeError, match="mid-stream"):
        objects.put(url, source, chunk_size=MIB)
    assert os.listdir(tmp_path) == ["obj.bin"]  # no partial temp file left
    assert (tmp_path / "obj.bin").read_bytes() == b"old content"


def test_file_missing_object(tmp_path):
    url = file_url(tmp_path / "nope")
    assert objects.stat(url) is None
    with pytest.raises(ObjectStoreError, match="no such object") as err:
        objects.open_read(url)
    assert url in str(err.value)
    with pytest.raises(ObjectStoreError, match="no such object"):
        objects.verify(url, "00")


def test_file_keys_with_slashes_make_their_directories(tmp_path):
    url = file_url(tmp_path / "stream" / "run" / "obj")
    info = objects.put(url, io.BytesIO(b"x"))
    assert (tmp_path / "stream" / "run" / "obj").read_bytes() == b"x"
    assert info.size == 1


def test_file_under_a_regular_file_is_refused(tmp_path):
    (tmp_path / "plain").write_bytes(b"not a directory")
    url = file_url(tmp_path / "plain" / "obj")
    with pytest.raises(ObjectStoreError, match="cannot write") as err:
        objects.put(url, io.BytesIO(b"x"))
    assert url in str(err.value)


@pytest.mark.parametrize("url", ["file://relative/path", "file:relative/path"])
def test_file_relative_path_rejected(url):
    with pytest.raises(ObjectStoreError, match="absolute path") as err:
        objects.put(url, io.BytesIO(b"x"))
    assert url in str(err.value)


@pytest.mark.parametrize("url", ["http://example.com/x", "/abs/path/no/scheme", "gs://b/k"])
def test_unsupported_scheme(url):
    with pytest.raises(ObjectStoreError, match="unsupported URL scheme") as err:
        objects.stat(url)
    assert url in str(err.value)
    assert "\n" not in str(err.value)


def test_file_digest_mismatch(tmp_path):
    url = file_url(tmp_path / "obj")
    objects.put(url, io.BytesIO(b"abc"))
    with pytest.raises(ObjectStoreError, match="digest mismatch"):
        objects.verify(url, hashlib.sha256(b"abd").hexdigest())


# ---------------------------------------------------------------- s3://


@pytest.fixture
def s3(monkeypatch):
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_SESSION_TOKEN", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.delenv("AWS_PROFILE", raising=False)
    monkeypatch.delenv(objects.ENDPOINT_ENV, raising=False)
    with mock_aws():
        client = boto3.client("s3", region_name="us-east-1")
        client.create_bucket(Bucket="media")
        yield client


def test_s3_round_trip(s3):
    url = "s3://media/in/obj.bin"
    info = objects.put(url, io.BytesIO(ALL_BYTES), "image/png")
    sha = hashlib.sha256(ALL_BYTES).hexdigest()
    assert info == ObjectInfo(url, len(ALL_BYTES), sha, "image/png")
    head = s3.head_object(Bucket="media", Key="in/obj.bin")
    assert head["Metadata"] == {"sha256": sha}
    assert head["ContentType"] == "image/png"
    assert [o["Key"] for o in s3.list_objects_v2(Bucket="media")["Contents"]] == ["in/obj.bin"]
    assert objects.stat(url) == info
    with objects.open_read(url) as body:
        assert body.read() == ALL_BYTES
    assert b"".join(objects.iter_chunks(url, chunk_size=4096)) == ALL_BYTES
    objects.verify(url, sha)
    objects.delete(url)
    assert objects.stat(url) is None


def test_s3_multipart(s3, monkeypatch):
    calls: list[str] = []
    make_client = objects._s3_client

    def counting_client(endpoint_url, url):
        client = make_client(endpoint_url, url)
        client.meta.events.register(
            "before-call.s3", lambda model, **_: calls.append(model.name)
        )
        return client

    monkeypatch.setattr(objects, "_s3_client", counting_client)
    expected = hashlib.sha256()
    url = "s3://media/big.bin"
    info = objects.put(url, GeneratedStream(blocks(20 * MIB, MIB, expected)),
                       chunk_size=5 * MIB)
    assert info.size == 20 * MIB
    assert info.sha256 == expected.hexdigest()
    assert calls.count("UploadPart") == 4
    assert "CompleteMultipartUpload" in calls
    head = s3.head_object(Bucket="media", Key="big.bin")
    assert head["ContentLength"] == 20 * MIB
    assert head["Metadata"]["sha256"] == expected.hexdigest()
    assert [o["Key"] for o in s3.list_objects_v2(Bucket="media")["Contents"]] == ["big.bin"]
    objects.verify(url, expected.hexdigest())


def test_s3_unknown_bucket(s3):
    url = "s3://no-such-bucket/k"
    for call in (lambda: objects.put(url, io.BytesIO(b"x")),
                 lambda: objects.open_read(url),
                 lambda: objects.stat(url)):
        with pytest.raises(ObjectStoreError, match="bucket 'no-such-bucket' does not exist") as err:
            call()
        assert url in str(err.value)


def test_s3_missing_key(s3):
    url = "s3://media/missing"
    assert objects.stat(url) is None
    with pytest.raises(ObjectStoreError, match="no such object") as err:
        objects.open_read(url)
    assert url in str(err.value)
    objects.delete(url)  # idempotent, like S3 itself


def test_s3_digest_mismatch(s3):
    url = "s3://media/obj"
    objects.put(url, io.BytesIO(b"abc"))
    s3.put_object(Bucket="media", Key="obj", Body=b"tampered")
    with pytest.raises(ObjectStoreError, match="digest mismatch") as err:
        objects.verify(url, hashlib.sha256(b"abc").hexdigest())
    assert url in str(err.value)


def test_s3_bad_url():
    with pytest.raises(ObjectStoreError, match="bucket and a key"):
        objects.stat("s3://bucket-only")


def test_s3_endpoint_from_env(s3, monkeypatch):
    monkeypatch.setenv(objects.ENDPOINT_ENV, "http://127.0.0.1:9")
    assert objects._s3_client(None, "s3://b/k").meta.endpoint_url == "http://127.0.0.1:9"
    assert objects._s3_client("http://other:1", "s3://b/k").meta.endpoint_url == \
        "http://other:1"


def test_s3_no_credentials(monkeypatch, tmp_path):
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN",
                 "AWS_PROFILE", "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI",
                 "AWS_CONTAINER_CREDENTIALS_FULL_URI", "AWS_WEB_IDENTITY_TOKEN_FILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    url = "s3://media/k"
    with pytest.raises(ObjectStoreError, match="no usable S3 credentials") as err:
        objects.stat(url, endpoint_url="http://127.0.0.1:9")
    assert url in str(err.value)


@pytest.mark.parametrize(("code", "text"), [
    ("InvalidAccessKeyId", "rejected the credentials"),
    ("SignatureDoesNotMatch", "rejected the credentials"),
    ("AccessDenied", "access denied"),
    ("NoSuchBucket", "bucket 'media' does not exist"),
    ("NoSuchKey", "no such object"),
])
def test_s3_error_messages(code, text):
    exc = ClientError({"Error": {"Code": code, "Message": "secret-ish detail"}}, "GetObject")
    err = objects._s3_error(exc, "s3://media/k", "media")
    assert text in str(err)
    assert str(err).startswith("s3://media/k: ")
    assert "secret-ish" not in str(err)
    assert "\n" not in str(err)


def test_s3_put_leaves_nothing_when_source_fails(s3):
    source = GeneratedStream(blocks(20 * MIB, MIB, fail_after=7 * MIB))
    with pytest.raises(RuntimeError, match="mid-stream"):
        objects.put("s3://media/broken", source, chunk_size=5 * MIB)
    assert s3.list_objects_v2(Bucket="media").get("Contents", []) == []
    assert s3.list_multipart_uploads(Bucket="media").get("Uploads", []) == []
