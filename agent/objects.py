"""Object storage shared by stream agents and the manager.

One small interface over two kinds of URL:

- ``file:///abs/path``: a local file (the embedded default). Writes go to a
  temporary file in the same directory, are fsynced, then renamed into place,
  so a reader never sees a partial object.
- ``s3://bucket/key``: any S3-compatible store through boto3. The endpoint
  comes from the ``endpoint_url`` argument, else ``STREAMBOSS_S3_ENDPOINT_URL``,
  else AWS. Credentials come from boto3's usual chain (environment, profile,
  instance role) and never appear in arguments, messages or logs.

Everything streams: :func:`put` hashes and counts as it copies, and
:func:`open_read` / :func:`iter_chunks` hand out bounded reads, so no call
holds a whole large object in memory.

Example::

    info = objects.put("s3://media/in/cat.png", fh, "image/png")
    objects.verify(info.url, info.sha256)
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import mimetypes
import os
import tempfile
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, BinaryIO, cast
from urllib.parse import unquote, urlsplit

ENDPOINT_ENV = "STREAMBOSS_S3_ENDPOINT_URL"
DEFAULT_CHUNK_SIZE = 8 * 1024 * 1024
# S3 refuses multipart parts under 5 MiB (except the last one).
MIN_PART_SIZE = 5 * 1024 * 1024
# Parts uploaded at once, and held in memory at once (boto3 buffers each part,
# and the HTTP layer about as much again): ~35 MiB with 8 MiB parts, whatever the
# object's size. Measured against a loopback endpoint, 2 was as fast as 4.
UPLOAD_THREADS = 2
HASH_BUFFER = 1024 * 1024
# S3 allows 10,000 parts per upload; a margin for rounding.
MAX_PARTS = 9_000
SHA256_METADATA = "sha256"

_CREDENTIAL_CODES = frozenset(
    {"InvalidAccessKeyId", "SignatureDoesNotMatch", "InvalidToken", "ExpiredToken"}
)
_DENIED_CODES = frozenset({"AccessDenied", "403", "Forbidden", "AllAccessDisabled"})
_MISSING_KEY_CODES = frozenset({"NoSuchKey", "404", "NotFound"})


@dataclass(frozen=True)
class ObjectInfo:
    """What is known about a stored object.

    Attributes:
        url: the object's URL.
        size: its length in bytes.
        sha256: lowercase hex SHA-256 of its content; empty when an S3 object
            was written by something else and carries no recorded digest.
        content_type: its MIME type, if known.
    """

    url: str
    size: int
    sha256: str
    content_type: str | None


class ObjectStoreError(Exception):
    """A storage operation failed; the message is one actionable line naming the URL."""

    def __init__(self, message: str, url: str | None = None) -> None:
        super().__init__(message)
        self.url = url


# ---------------------------------------------------------------- URLs


@dataclass(frozen=True)
class _FileTarget:
    path: str


@dataclass(frozen=True)
class _S3Target:
    bucket: str
    key: str


def _parse(url: str) -> _FileTarget | _S3Target:
    parts = urlsplit(url)
    if parts.scheme == "file":
        if parts.netloc not in ("", "localhost") or not parts.path.startswith("/"):
            raise ObjectStoreError(
                f"{url}: a file URL needs an absolute path, as in file:///abs/path", url
            )
        return _FileTarget(unquote(parts.path))
    if parts.scheme == "s3":
        key = parts.path[1:] if parts.path.startswith("/") else parts.path
        if not parts.netloc or not key:
            raise ObjectStoreError(f"{url}: an S3 URL needs a bucket and a key, as in "
                                   "s3://bucket/key", url)
        return _S3Target(parts.netloc, key)
    raise ObjectStoreError(
        f"{url}: unsupported URL scheme {parts.scheme!r}; use file:///abs/path or "
        "s3://bucket/key", url
    )


def split_url(url: str) -> tuple[str, str, str]:
    """``("file", "", path)`` or ``("s3", bucket, key)`` for a valid object URL; the
    file path is percent-decoded, as opened.

    Raises:
        ObjectStoreError: a malformed URL or another scheme, in one line.
    """
    target = _parse(url)
    if isinstance(target, _FileTarget):
        return "file", "", target.path
    return "s3", target.bucket, target.key


# ---------------------------------------------------------------- S3 plumbing


def _s3_client(endpoint_url: str | None, url: str) -> Any:
    """An S3 client; unreadable AWS configuration is reported against ``url``."""
    import boto3
    from botocore.exceptions import BotoCoreError

    endpoint = endpoint_url or os.environ.get(ENDPOINT_ENV) or None
    try:
        return boto3.client("s3", endpoint_url=endpoint)
    except BotoCoreError as exc:
        raise _s3_error(exc, url, "") from None


def _s3_error(exc: Exception, url: str, bucket: str) -> ObjectStoreError:
    """Translate a botocore failure into one line that names the URL, never credentials."""
    from botocore.exceptions import (
        ClientError,
        ConfigParseError,
        EndpointConnectionError,
        NoCredentialsError,
        PartialCredentialsError,
        ProfileNotFound,
    )

    if isinstance(exc, ConfigParseError | ProfileNotFound):
        return ObjectStoreError(
            f"{url}: cannot read the AWS credentials or config ({exc}); fix the file, or "
            "set AWS_PROFILE / AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY", url
        )
    if isinstance(exc, NoCredentialsError | PartialCredentialsError):
        return ObjectStoreError(
            f"{url}: no usable S3 credentials; set AWS_ACCESS_KEY_ID and "
            "AWS_SECRET_ACCESS_KEY, AWS_PROFILE, or give the host an instance role", url
        )
    if isinstance(exc, EndpointConnectionError):
        return ObjectStoreError(
            f"{url}: cannot reach the S3 endpoint; check endpoint_url / {ENDPOINT_ENV}", url
        )
    if isinstance(exc, ClientError):
        code = str(exc.response.get("Error", {}).get("Code", ""))
        if code == "NoSuchBucket":
            return ObjectStoreError(
                f"{url}: bucket {bucket!r} does not exist (or not at this endpoint)", url
            )
        if code in _MISSING_KEY_CODES:
            return ObjectStoreError(f"{url}: no such object", url)
        if code in _CREDENTIAL_CODES:
            return ObjectStoreError(
                f"{url}: S3 rejected the credentials ({code}); check the access key, "
                "secret and region of the configured profile", url
            )
        if code in _DENIED_CODES:
            return ObjectStoreError(
                f"{url}: access denied; the credentials lack permission on bucket "
                f"{bucket!r}", url
            )
        return ObjectStoreError(f"{url}: S3 error {code or 'unknown'}", url)
    return ObjectStoreError(f"{url}: {type(exc).__name__}: {exc}", url)


def _botocore_errors() -> tuple[type[Exception], ...]:
    from botocore.exceptions import BotoCoreError, ClientError

    return (BotoCoreError, ClientError)


def _bucket_exists(client: Any, bucket: str) -> bool:
    from botocore.exceptions import ClientError

    try:
        client.head_bucket(Bucket=bucket)
    except ClientError as exc:
        code = str(exc.response.get("Error", {}).get("Code", ""))
        if code in ("404", "NoSuchBucket", "NotFound"):
            return False
        raise
    return True


class _HashingReader(io.RawIOBase):
    """A forward-only file object that hashes and counts what is read through it.

    Deliberately not seekable, so boto3 streams it part by part instead of
    trying to size or re-read it.
    """

    def __init__(self, source: BinaryIO) -> None:
        super().__init__()
        self._source = source
        self.digest = hashlib.sha256()
        self.size = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return False

    def read(self, size: int | None = -1) -> bytes:
        data = self._source.read(-1 if size is None else size)
        if data:
            self.digest.update(data)
            self.size += len(data)
        return data or b""

    def readinto(self, buffer: Any) -> int:
        data = self.read(len(buffer))
        buffer[: len(data)] = data
        return len(data)


class _Borrowed(io.RawIOBase):
    """A seekable source lent to boto3, which closes what it uploads: the caller's
    file stays open."""

    def __init__(self, source: BinaryIO) -> None:
        super().__init__()
        self._source = source

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def read(self, size: int | None = -1) -> bytes:
        return self._source.read(-1 if size is None else size)

    def readinto(self, buffer: Any) -> int:
        data = self._source.read(len(buffer))
        buffer[: len(data)] = data
        return len(data)

    def seek(self, offset: int, whence: int = os.SEEK_SET) -> int:
        return self._source.seek(offset, whence)

    def tell(self) -> int:
        return self._source.tell()


# ---------------------------------------------------------------- API


def put(
    url: str,
    source: BinaryIO,
    content_type: str | None = None,
    *,
    endpoint_url: str | None = None,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    progress: Callable[[int], None] | None = None,
) -> ObjectInfo:
    """Stream ``source`` to ``url``, computing its size and SHA-256 on the way.

    The object appears whole or not at all: a ``file://`` object is written to a
    temporary file beside it, fsynced and renamed. For ``s3://`` a seekable
    source (a file) is hashed first and uploaded (multipart above ``chunk_size``)
    with its digest as ``sha256`` metadata, and refused if it changed meanwhile;
    a stream that cannot be read twice is uploaded under a temporary key, then
    copied server-side to ``url`` with the digest.

    Parameters:
        url: destination, ``file:///abs/path`` or ``s3://bucket/key``.
        source: a binary file object, read until EOF; it is not closed.
        content_type: MIME type to record (S3 ``ContentType``).
        endpoint_url: S3-compatible endpoint; default ``STREAMBOSS_S3_ENDPOINT_URL``.
        chunk_size: read size, and S3 multipart threshold and part size
            (raised to S3's 5 MiB minimum).
        progress: called with the number of bytes just stored (from upload
            threads for S3).

    Returns:
        The stored object's :class:`ObjectInfo`.

    Raises:
        ObjectStoreError: bad URL, unknown bucket, unusable credentials, or an
            I/O failure (for ``file://`` an ``OSError`` from ``source`` too).
            Other exceptions raised by ``source`` propagate unchanged; either
            way no partial object is left behind.
    """
    if chunk_size <= 0:
        raise ValueError("chunk_size must be positive")
    target = _parse(url)
    if isinstance(target, _FileTarget):
        return _put_file(url, target.path, source, content_type, chunk_size, progress)
    start = _position(source)
    if start is not None:
        return _put_s3_seekable(url, target, source, start, content_type, endpoint_url,
                                chunk_size, progress)
    return _put_s3(url, target, source, content_type, endpoint_url, chunk_size, progress)


def _position(source: BinaryIO) -> int | None:
    """Where a seekable source stands; None when it can be read only once."""
    try:
        return source.tell() if source.seekable() else None
    except (OSError, ValueError, AttributeError):
        return None


def _fingerprint(source: BinaryIO) -> tuple[int, int] | None:
    """(size, mtime) of the file behind ``source``, to notice a change during upload."""
    try:
        stat = os.fstat(source.fileno())
    except (OSError, ValueError, AttributeError, io.UnsupportedOperation):
        return None
    return stat.st_size, stat.st_mtime_ns


def _transfer_config(chunk_size: int, size: int | None = None) -> Any:
    """Upload settings; with the object's ``size`` known, the smallest parts S3 allows
    (memory is parts in flight times part size), grown to stay under its part limit."""
    from boto3.s3.transfer import TransferConfig

    if size is None:
        part = max(chunk_size, MIN_PART_SIZE)
    else:
        part = max(MIN_PART_SIZE, -(-size // MAX_PARTS))
    config = TransferConfig(
        multipart_threshold=part, multipart_chunksize=part, max_concurrency=UPLOAD_THREADS,
        use_threads=True,
    )
    # boto3's TransferConfig does not take this s3transfer setting, but passes it on.
    config.max_in_memory_upload_chunks = UPLOAD_THREADS
    return config


def _put_file(
    url: str, path: str, source: BinaryIO, content_type: str | None, chunk_size: int,
    progress: Callable[[int], None] | None = None,
) -> ObjectInfo:
    directory, name = os.path.split(path)
    if not name:
        raise ObjectStoreError(f"{url}: a file URL must name a file, not a directory", url)
    digest = hashlib.sha256()
    size = 0
    try:
        # Keys hold slashes, as in S3: the directories are made as needed.
        os.makedirs(directory, mode=0o700, exist_ok=True)
        fd, temp = tempfile.mkstemp(prefix=f".{name}.", suffix=".partial", dir=directory)
    except OSError as exc:
        raise ObjectStoreError(f"{url}: cannot write in {directory}: {exc.strerror}", url) from exc
    try:
        with os.fdopen(fd, "wb") as out:
            while chunk := source.read(chunk_size):
                digest.update(chunk)
                size += len(chunk)
                out.write(chunk)
                if progress is not None:
                    progress(len(chunk))
            out.flush()
            os.fsync(out.fileno())
        os.replace(temp, path)
    except BaseException as exc:
        with contextlib.suppress(OSError):
            os.unlink(temp)
        if isinstance(exc, OSError):
            raise ObjectStoreError(f"{url}: write failed: {exc.strerror or exc}", url) from exc
        raise
    with contextlib.suppress(OSError):
        dir_fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    return ObjectInfo(url, size, digest.hexdigest(), content_type)


def _put_s3_seekable(
    url: str,
    target: _S3Target,
    source: BinaryIO,
    start: int,
    content_type: str | None,
    endpoint_url: str | None,
    chunk_size: int,
    progress: Callable[[int], None] | None,
) -> ObjectInfo:
    # Reading a local file twice costs far less than S3 copying the object.
    before = _fingerprint(source)
    digest = hashlib.sha256()
    size = 0
    # One reused buffer: fresh multi-MiB reads would each be a new allocation.
    buffer = bytearray(HASH_BUFFER)
    view = memoryview(buffer)
    while count := source.readinto(buffer):  # type: ignore[attr-defined]
        digest.update(view[:count])
        size += count
    source.seek(start)
    sha256 = digest.hexdigest()
    client = _s3_client(endpoint_url, url)
    extra: dict[str, Any] = {"Metadata": {SHA256_METADATA: sha256}}
    if content_type:
        extra["ContentType"] = content_type
    try:
        client.upload_fileobj(_Borrowed(source), target.bucket, target.key, ExtraArgs=extra,
                              Config=_transfer_config(chunk_size, size), Callback=progress)
    except _botocore_errors() as exc:
        raise _s3_error(exc, url, target.bucket) from exc
    if _fingerprint(source) != before or source.tell() - start != size:
        with contextlib.suppress(Exception):
            client.delete_object(Bucket=target.bucket, Key=target.key)
        raise ObjectStoreError(f"{url}: the source changed while it was uploaded; nothing "
                               "was stored", url)
    return ObjectInfo(url, size, sha256, content_type)


def _put_s3(
    url: str,
    target: _S3Target,
    source: BinaryIO,
    content_type: str | None,
    endpoint_url: str | None,
    chunk_size: int,
    progress: Callable[[int], None] | None = None,
) -> ObjectInfo:
    config = _transfer_config(chunk_size)
    client = _s3_client(endpoint_url, url)
    reader = _HashingReader(source)
    staging = f"{target.key}.partial-{uuid.uuid4().hex}"
    extra: dict[str, Any] = {"ContentType": content_type} if content_type else {}
    uploaded = False
    try:
        client.upload_fileobj(reader, target.bucket, staging, ExtraArgs=extra, Config=config,
                              Callback=progress)
        uploaded = True
        sha256 = reader.digest.hexdigest()
        # Metadata is fixed when an upload starts, before the digest is known,
        # so the finished object is copied server-side to its name with it.
        client.copy(
            {"Bucket": target.bucket, "Key": staging},
            target.bucket,
            target.key,
            ExtraArgs={
                **extra,
                "Metadata": {SHA256_METADATA: sha256},
                "MetadataDirective": "REPLACE",
            },
            Config=config,
        )
    except _botocore_errors() as exc:
        raise _s3_error(exc, url, target.bucket) from exc
    finally:
        if uploaded:
            with contextlib.suppress(Exception):
                client.delete_object(Bucket=target.bucket, Key=staging)
    return ObjectInfo(url, reader.size, sha256, content_type)


def open_read(url: str, *, endpoint_url: str | None = None) -> BinaryIO:
    """Open an object for streaming reads; the caller closes it.

    Parameters:
        url: ``file:///abs/path`` or ``s3://bucket/key``.
        endpoint_url: S3-compatible endpoint; default ``STREAMBOSS_S3_ENDPOINT_URL``.

    Returns:
        A binary file object; ``read(n)`` returns at most ``n`` bytes.

    Raises:
        ObjectStoreError: bad URL, missing object or bucket, unusable credentials.
    """
    target = _parse(url)
    if isinstance(target, _FileTarget):
        try:
            return open(target.path, "rb")
        except FileNotFoundError as exc:
            raise ObjectStoreError(f"{url}: no such object", url) from exc
        except OSError as exc:
            raise ObjectStoreError(f"{url}: cannot read: {exc.strerror or exc}", url) from exc
    client = _s3_client(endpoint_url, url)
    try:
        response = client.get_object(Bucket=target.bucket, Key=target.key)
    except _botocore_errors() as exc:
        raise _s3_error(exc, url, target.bucket) from exc
    return cast(BinaryIO, response["Body"])


def open_s3(url: str, *, endpoint_url: str | None = None) -> tuple[BinaryIO, int]:
    """Open an ``s3://`` object for streaming reads: ``(body, content_length)``; the
    caller closes the body. Nothing is read before the caller asks.

    Raises:
        ObjectStoreError: not an S3 URL, missing object or bucket, unusable credentials.
    """
    target = _parse(url)
    if not isinstance(target, _S3Target):
        raise ObjectStoreError(f"{url}: not an s3:// URL", url)
    client = _s3_client(endpoint_url, url)
    try:
        response = client.get_object(Bucket=target.bucket, Key=target.key)
    except _botocore_errors() as exc:
        raise _s3_error(exc, url, target.bucket) from exc
    return cast(BinaryIO, response["Body"]), int(response["ContentLength"])


def read_errors() -> tuple[type[Exception], ...]:
    """What a read from an opened object may raise midway (OS and botocore errors)."""
    return (OSError, *_botocore_errors())


def iter_chunks(
    url: str, chunk_size: int = DEFAULT_CHUNK_SIZE, *, endpoint_url: str | None = None
) -> Iterator[bytes]:
    """Yield an object's content in chunks of at most ``chunk_size`` bytes.

    Parameters:
        url: ``file:///abs/path`` or ``s3://bucket/key``.
        chunk_size: largest chunk yielded.
        endpoint_url: S3-compatible endpoint; default ``STREAMBOSS_S3_ENDPOINT_URL``.

    Returns:
        An iterator of non-empty byte strings, in order.

    Raises:
        ObjectStoreError: as :func:`open_read`, or when a read fails midway.
    """
    with open_read(url, endpoint_url=endpoint_url) as body:
        while True:
            try:
                chunk = body.read(chunk_size)
            except (OSError, *_botocore_errors()) as exc:
                raise ObjectStoreError(f"{url}: read failed midway: {exc}", url) from exc
            if not chunk:
                return
            yield chunk


def stat(url: str, *, endpoint_url: str | None = None) -> ObjectInfo | None:
    """Describe an object, or return ``None`` if it does not exist.

    For ``file://`` the digest is computed by reading the file and the content
    type is guessed from its name; for ``s3://`` both come from the object's
    headers (``sha256`` metadata, ``ContentType``) without reading it.

    Parameters:
        url: ``file:///abs/path`` or ``s3://bucket/key``.
        endpoint_url: S3-compatible endpoint; default ``STREAMBOSS_S3_ENDPOINT_URL``.

    Returns:
        The object's :class:`ObjectInfo`, or ``None`` when it is missing.

    Raises:
        ObjectStoreError: bad URL, unknown bucket, unusable credentials.
    """
    target = _parse(url)
    if isinstance(target, _FileTarget):
        if not os.path.isfile(target.path):
            return None
        digest = hashlib.sha256()
        size = 0
        for chunk in iter_chunks(url):
            digest.update(chunk)
            size += len(chunk)
        return ObjectInfo(url, size, digest.hexdigest(), mimetypes.guess_type(target.path)[0])
    from botocore.exceptions import ClientError

    client = _s3_client(endpoint_url, url)
    try:
        head = client.head_object(Bucket=target.bucket, Key=target.key)
    except ClientError as exc:
        code = str(exc.response.get("Error", {}).get("Code", ""))
        try:
            if code in _MISSING_KEY_CODES and _bucket_exists(client, target.bucket):
                return None
            if code in _MISSING_KEY_CODES:
                exc.response["Error"]["Code"] = "NoSuchBucket"
        except _botocore_errors() as inner:
            raise _s3_error(inner, url, target.bucket) from exc
        raise _s3_error(exc, url, target.bucket) from exc
    except _botocore_errors() as exc:
        raise _s3_error(exc, url, target.bucket) from exc
    return ObjectInfo(
        url,
        int(head["ContentLength"]),
        head.get("Metadata", {}).get(SHA256_METADATA, ""),
        head.get("ContentType"),
    )


def delete(url: str, *, endpoint_url: str | None = None) -> None:
    """Delete an object; deleting a missing object is not an error.

    Parameters:
        url: ``file:///abs/path`` or ``s3://bucket/key``.
        endpoint_url: S3-compatible endpoint; default ``STREAMBOSS_S3_ENDPOINT_URL``.

    Raises:
        ObjectStoreError: bad URL, unknown bucket, unusable credentials, or the
            object cannot be removed.
    """
    target = _parse(url)
    if isinstance(target, _FileTarget):
        try:
            os.unlink(target.path)
        except FileNotFoundError:
            return
        except OSError as exc:
            raise ObjectStoreError(f"{url}: cannot delete: {exc.strerror or exc}", url) from exc
        return
    client = _s3_client(endpoint_url, url)
    try:
        client.delete_object(Bucket=target.bucket, Key=target.key)
    except _botocore_errors() as exc:
        raise _s3_error(exc, url, target.bucket) from exc


def verify(
    url: str,
    expected_sha256: str,
    *,
    endpoint_url: str | None = None,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> None:
    """Check that an object's content hashes to ``expected_sha256``, streaming it.

    Parameters:
        url: ``file:///abs/path`` or ``s3://bucket/key``.
        expected_sha256: hex SHA-256 (case-insensitive), e.g. from :class:`ObjectInfo`.
        endpoint_url: S3-compatible endpoint; default ``STREAMBOSS_S3_ENDPOINT_URL``.
        chunk_size: read size.

    Raises:
        ObjectStoreError: ``digest mismatch`` when the content differs, or as
            :func:`open_read`.
    """
    digest = hashlib.sha256()
    for chunk in iter_chunks(url, chunk_size, endpoint_url=endpoint_url):
        digest.update(chunk)
    if digest.hexdigest() != expected_sha256.strip().lower():
        # The digest computed is not named: it would tell a caller who named the
        # object what it holds (a guessed file's digest confirms its content).
        raise ObjectStoreError(
            f"{url}: digest mismatch: the content does not hash to the expected sha256 "
            f"{expected_sha256}; the object is corrupt or was replaced", url
        )
