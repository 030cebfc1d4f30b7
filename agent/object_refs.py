"""Object references resolved only inside the configured object stores.

Anyone who may publish to a stream may put any URL in a message's object
reference (``sb-object-url``). A reader — an agent, or ``consume --fetch`` —
opens it only when it lies inside a store it is configured with: its object
store (``STREAMBOSS_OBJECT_STORE``) plus the prefixes of ``STREAMBOSS_OBJECT_ALLOW``
(comma-separated URLs). With none configured, every reference is refused.

- ``file://``: the path is normalised and must lie under a store's directory;
  below that directory every component is opened relative to its parent without
  following symbolic links (``O_NOFOLLOW`` from a directory descriptor, so a
  link swapped in between a check and the open is refused too), and only a
  regular file with a single link is read (a FIFO is opened non-blocking, so the
  open itself never waits, then refused like a device; a hard link would bring a
  file from elsewhere into the store).
- ``s3://``: only a configured bucket, and within it only keys under the
  configured prefix (``s3://media/in`` admits ``in/...``, not ``inbox/...``).
- Reads stop at the size the reference declares: an object larger or smaller
  than that is refused, so a reference never reads more than it says.

A refusal says which rule refused the reference and repeats the URL the
message gave, never anything about what is there (its content, size or
digest): a dead letter is read by whoever may read the dead-letter stream.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import posixpath
import stat
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import BinaryIO

from . import objects
from .headers import ObjectReference

# The rules, as the refusals name them (each follows the URL in a dead letter's reason).
OUTSIDE = "object reference outside the configured stores"
SYMLINK = "object reference through a symbolic link"
NOT_REGULAR = "object reference to something that is not a regular file"
# A hard link makes a file from outside the store appear inside it (without
# protected_hardlinks, even one its owner never shared): objects are written once,
# by rename, so a stored object has one link.
HARDLINK = "object reference to a file with more than one hard link"
LARGER = "object larger than its declared size"
SMALLER = "object smaller than its declared size"
NO_SIZE = "object reference without a declared size (sb-object-size)"
NO_DIGEST = "object reference without a sha256 (sb-object-sha256)"
MISMATCH = "object digest mismatch: its content does not hash to the reference's sha256"


class ReferenceRefused(Exception):
    """A reference that is never resolved, however often it is tried.

    The message is ``"URL: rule"``: the URL as the message gave it and the rule
    that refused it, nothing read from the store.
    """


@dataclass(frozen=True)
class StorePrefix:
    """One place references may point into.

    Attributes:
        url: as configured, for messages.
        scheme: ``file`` or ``s3``.
        root: the directory (normalised absolute path) or the bucket.
        key_prefix: for ``s3``, the key prefix without slashes at its ends ("" for
            the whole bucket).
    """

    url: str
    scheme: str
    root: str
    key_prefix: str = ""


def parse_prefix(url: str, what: str = "object store") -> StorePrefix:
    """A configured store or allow-list entry as a :class:`StorePrefix`.

    Parameters:
        url: ``file:///abs/dir`` or ``s3://bucket[/prefix]``.
        what: what the URL is, for the message ("object store", "archive store").

    Raises:
        ValueError: one line naming the entry and the form it should take.
    """
    text = url.strip()
    if text.startswith("s3://"):
        bucket, _, key = text[len("s3://"):].partition("/")
        key = key.strip("/")
        if not bucket or "?" in text or "#" in text or ".." in key.split("/"):
            raise ValueError(f"{what} {url!r}: name a bucket and an optional key "
                             "prefix, as in s3://bucket/prefix")
        return StorePrefix(text, "s3", bucket, key)
    try:
        scheme, _, path = objects.split_url(text)
    except objects.ObjectStoreError as exc:
        raise ValueError(f"{what} {url!r}: {exc}") from None
    if scheme != "file" or "\0" in path:
        raise ValueError(f"{what} {url!r}: use file:///abs/dir or s3://bucket/prefix")
    return StorePrefix(text, "file", _normalise(path))


def parse_allow(text: str | Iterable[str] | None) -> tuple[str, ...]:
    """The entries of an allow-list: a comma-separated string or a list of URLs."""
    if text is None:
        return ()
    items = text.split(",") if isinstance(text, str) else [str(item) for item in text]
    return tuple(item.strip() for item in items if item.strip())


def _normalise(path: str) -> str:
    # Lexical normalisation is sound here: no symbolic link below a store's
    # directory is ever followed, so "a/link/../b" cannot mean anything but "a/b".
    # normpath keeps a leading "//" (POSIX leaves it implementation-defined).
    return "/" + posixpath.normpath(path).lstrip("/")


class ObjectStores:
    """The stores an agent (or ``consume --fetch``) may read references from."""

    def __init__(self, prefixes: Iterable[StorePrefix]) -> None:
        self.prefixes = tuple(prefixes)

    @classmethod
    def configured(cls, store: str | None, allow: Iterable[str] = ()) -> ObjectStores:
        """The object store (if any) plus the allow-list entries.

        Raises:
            ValueError: an entry that is not a ``file://`` or ``s3://`` URL prefix.
        """
        urls = ([store] if store else []) + list(allow)
        return cls(parse_prefix(url) for url in urls)

    def describe(self) -> str:
        """The configured prefixes, for a one-line message."""
        return ", ".join(p.url for p in self.prefixes) or "none"

    def locate(self, url: str) -> tuple[StorePrefix, list[str]]:
        """Where ``url`` lies: the store and the path components (or key) below it.

        Nothing is touched: the decision is made on the URL alone, so a refused
        reference learns nothing about what exists outside the stores.

        Raises:
            ReferenceRefused: a malformed URL, or one outside every store.
        """
        try:
            scheme, bucket, path = objects.split_url(url)
        except objects.ObjectStoreError as exc:
            raise ReferenceRefused(str(exc)) from None
        if not self.prefixes:
            raise ReferenceRefused(f"{url}: {OUTSIDE} (none is configured: set "
                                   "STREAMBOSS_OBJECT_STORE)")
        if scheme == "file":
            if "\0" in path:
                raise ReferenceRefused(f"{url}: {OUTSIDE}")
            normal = _normalise(path)
            best: StorePrefix | None = None
            for prefix in self.prefixes:
                if prefix.scheme != "file" or not _under(normal, prefix.root):
                    continue
                if best is None or len(prefix.root) > len(best.root):
                    best = prefix  # the deepest store: its directory is opened as given
            if best is None:
                raise ReferenceRefused(f"{url}: {OUTSIDE}")
            parts = [p for p in normal[len(best.root):].split("/") if p]
            if not parts:
                raise ReferenceRefused(f"{url}: {NOT_REGULAR}")
            return best, parts
        segments = path.split("/")
        if "." in segments or ".." in segments:
            # S3 keys are literal, but an endpoint or proxy may resolve dot segments.
            raise ReferenceRefused(f"{url}: {OUTSIDE}")
        for prefix in self.prefixes:
            if prefix.scheme == "s3" and prefix.root == bucket and (
                    not prefix.key_prefix or path.startswith(prefix.key_prefix + "/")):
                return prefix, [path]
        raise ReferenceRefused(f"{url}: {OUTSIDE}")


def _under(path: str, root: str) -> bool:
    return root == "/" or path == root or path.startswith(root + "/")


def prefix_within(inner: StorePrefix, outer: StorePrefix) -> bool:
    """Whether everything under ``inner`` lies under ``outer`` (the same place counts)."""
    if inner.scheme != outer.scheme:
        return False
    if inner.scheme == "file":
        return _under(inner.root, outer.root)
    return inner.root == outer.root and (
        not outer.key_prefix or inner.key_prefix == outer.key_prefix
        or inner.key_prefix.startswith(outer.key_prefix + "/"))


# ---------------------------------------------------------------- opening


def _refused_component(dir_fd: int, name: str, url: str, exc: OSError) -> Exception:
    """What a failed open of ``name`` below ``dir_fd`` means, as a refusal or an error."""
    with contextlib.suppress(OSError):
        if stat.S_ISLNK(os.stat(name, dir_fd=dir_fd, follow_symlinks=False).st_mode):
            return ReferenceRefused(f"{url}: {SYMLINK}")
    if exc.errno == errno.ELOOP:
        return ReferenceRefused(f"{url}: {SYMLINK}")
    if exc.errno in (errno.ENOENT, errno.ENOTDIR):
        return objects.ObjectStoreError(f"{url}: no such object", url)
    if exc.errno in (errno.ENXIO, errno.EISDIR):
        return ReferenceRefused(f"{url}: {NOT_REGULAR}")
    return objects.ObjectStoreError(f"{url}: cannot read: {exc.strerror or exc}", url)


def _check_file(url: str, found: os.stat_result) -> None:
    """Refuse anything but a regular file with a single link."""
    if stat.S_ISLNK(found.st_mode):
        raise ReferenceRefused(f"{url}: {SYMLINK}")
    if not stat.S_ISREG(found.st_mode):
        # Checked before the open too: opening a device can have effects of its own.
        raise ReferenceRefused(f"{url}: {NOT_REGULAR}")
    if found.st_nlink != 1:
        raise ReferenceRefused(f"{url}: {HARDLINK}")


def _open_file(url: str, prefix: StorePrefix, parts: list[str]) -> tuple[BinaryIO, int]:
    """Open a regular file below ``prefix``'s directory without following any link."""
    try:
        # The store's own directory is the operator's to configure: a link there is
        # followed (it may live on another volume); nothing below it is.
        fd = os.open(prefix.root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError as exc:
        if exc.errno in (errno.ENOENT, errno.ENOTDIR):
            raise objects.ObjectStoreError(f"{url}: no such object", url) from None
        raise objects.ObjectStoreError(f"{url}: cannot read the store: "
                                       f"{exc.strerror or exc}", url) from None
    try:
        for name in parts[:-1]:
            try:
                inner = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW
                                | os.O_CLOEXEC, dir_fd=fd)
            except OSError as exc:
                raise _refused_component(fd, name, url, exc) from None
            os.close(fd)
            fd = inner
        name = parts[-1]
        try:
            found = os.stat(name, dir_fd=fd, follow_symlinks=False)
        except OSError as exc:
            raise _refused_component(fd, name, url, exc) from None
        _check_file(url, found)
        try:
            # Non-blocking: if a FIFO was swapped in since the check, opening it does
            # not wait for a writer; the fstat below then refuses it.
            file_fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK
                              | os.O_NOCTTY | os.O_CLOEXEC, dir_fd=fd)
        except OSError as exc:
            raise _refused_component(fd, name, url, exc) from None
    finally:
        os.close(fd)
    try:
        opened = os.fstat(file_fd)
        _check_file(url, opened)
        os.set_blocking(file_fd, True)
        return os.fdopen(file_fd, "rb", buffering=0), opened.st_size
    except BaseException:
        os.close(file_fd)
        raise


class OpenedObject:
    """A referenced object opened inside the stores, read at most to its declared size.

    :meth:`chunks` yields its content and, once the end is reached, checks that it
    was exactly the declared size and (when the reference has one) that it hashes to
    the declared sha256. :attr:`sha256` is the digest of what was read.
    """

    def __init__(self, reference: ObjectReference, body: BinaryIO, size: int) -> None:
        self.reference = reference
        self.size = size
        self._body = body
        self._hash = hashlib.sha256()
        self.complete = False

    @property
    def sha256(self) -> str:
        return self._hash.hexdigest()

    def chunks(self, chunk_size: int) -> Iterator[bytes]:
        """The content in chunks of at most ``chunk_size`` bytes.

        Raises:
            ReferenceRefused: more or fewer bytes than declared, or another digest.
            ObjectStoreError: a read failed midway.
        """
        url = self.reference.url
        remaining = self.size
        while True:
            try:
                # One byte past the declared size tells "larger" from "exactly".
                chunk = self._body.read(min(chunk_size, remaining + 1))
            except objects.read_errors() as exc:
                raise objects.ObjectStoreError(f"{url}: read failed midway: "
                                               f"{type(exc).__name__}", url) from None
            if not chunk:
                break
            if len(chunk) > remaining:
                raise ReferenceRefused(f"{url}: {LARGER}")
            remaining -= len(chunk)
            self._hash.update(chunk)
            yield chunk
        if remaining:
            raise ReferenceRefused(f"{url}: {SMALLER}")
        expected = self.reference.sha256
        if expected and self._hash.hexdigest() != expected:
            raise ReferenceRefused(f"{url}: {MISMATCH} {expected}")
        self.complete = True

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self._body.close()


def open_reference(reference: ObjectReference, stores: ObjectStores, *,
                   require_digest: bool, endpoint_url: str | None = None) -> OpenedObject:
    """Open what ``reference`` names, if the rules allow it; nothing is read yet
    beyond the object's metadata.

    Parameters:
        reference: the message's object reference.
        stores: where references may point.
        require_digest: refuse a reference without a sha256 (agents: a reference
            is verified by its digest; ``consume --fetch`` verifies by size alone).
        endpoint_url: S3-compatible endpoint; default ``STREAMBOSS_S3_ENDPOINT_URL``.

    Raises:
        ReferenceRefused: outside the stores, a link, not a regular file, no declared
            size (or sha256), or a size other than the declared one.
        ObjectStoreError: the store could not be read (missing object, credentials).
    """
    url = reference.url
    prefix, parts = stores.locate(url)
    if reference.size is None:
        raise ReferenceRefused(f"{url}: {NO_SIZE}")
    if require_digest and not reference.sha256:
        raise ReferenceRefused(f"{url}: {NO_DIGEST}")
    if prefix.scheme == "file":
        body, actual = _open_file(url, prefix, parts)
    else:
        body, actual = objects.open_s3(url, endpoint_url=endpoint_url)
    if actual != reference.size:
        with contextlib.suppress(Exception):
            body.close()
        raise ReferenceRefused(f"{url}: {LARGER if actual > reference.size else SMALLER}")
    return OpenedObject(reference, body, reference.size)
