"""``consume --fetch DIR``: the objects that messages reference, written into DIR.

A message is anybody's to write, so nothing in it decides where a file goes or
what it is called: each object gets a name made here (a sequence number and a
random part) and is created inside the directory already opened, with
``O_EXCL`` and ``O_NOFOLLOW``, so neither a name nor a link planted in DIR
sends it elsewhere. What is read is confined like an agent's reads
(:mod:`streamboss.agent.object_refs`): only inside the user's object store
(``STREAMBOSS_OBJECT_STORE``, default ``file://<state>/objects``) and the prefixes
of ``STREAMBOSS_OBJECT_ALLOW``, no further than the declared size. A reference
with a sha256 is verified by it; one without is verified by its size alone, and
the digest computed is reported so the user can compare it. A file that fails
its check is removed: nothing half written stays.
"""

from __future__ import annotations

import contextlib
import os
import uuid
from dataclasses import dataclass
from pathlib import Path

from streamboss.agent.headers import ObjectReference
from streamboss.agent.object_refs import ObjectStores, open_reference

CHUNK = 1024 * 1024


class FetchError(Exception):
    """The directory cannot be used or written; one line naming it."""


@dataclass(frozen=True)
class Fetched:
    """One object written into the directory.

    Attributes:
        path: where it was written.
        sha256: the digest of what was written.
        by_digest: True when checked against the reference's sha256, False when the
            reference had none and only its size was checked.
    """

    path: Path
    sha256: str
    by_digest: bool


class Fetcher:
    """Writes referenced objects into one directory, opened once."""

    def __init__(self, directory: Path, stores: ObjectStores) -> None:
        self.directory = directory
        self.stores = stores
        self._count = 0
        try:
            directory.mkdir(parents=True, exist_ok=True, mode=0o700)
            # Held open: every file is created relative to this directory, whatever
            # happens to its path meanwhile.
            self._dir_fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except OSError as exc:
            raise FetchError(f"--fetch {directory}: cannot use it as a directory: "
                             f"{exc.strerror or exc}") from None

    def close(self) -> None:
        with contextlib.suppress(OSError):
            os.close(self._dir_fd)

    def fetch(self, reference: ObjectReference) -> Fetched:
        """Copy the referenced object into the directory under a fresh name.

        Raises:
            ReferenceRefused: outside the stores, a link, not a regular file, no
                declared size, another size or digest.
            ObjectStoreError: the store cannot be read.
            FetchError: the directory cannot be written.
        """
        opened = open_reference(reference, self.stores, require_digest=False)
        self._count += 1
        name = f"{self._count:06d}-{uuid.uuid4().hex}"
        try:
            fd = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW
                         | os.O_CLOEXEC, 0o600, dir_fd=self._dir_fd)
        except OSError as exc:
            opened.close()
            raise FetchError(f"--fetch {self.directory}: cannot create a file in it: "
                             f"{exc.strerror or exc}") from None
        try:
            with os.fdopen(fd, "wb") as out:
                for chunk in opened.chunks(CHUNK):
                    out.write(chunk)
        except BaseException as exc:
            with contextlib.suppress(OSError):
                os.unlink(name, dir_fd=self._dir_fd)
            if isinstance(exc, OSError):
                raise FetchError(f"--fetch {self.directory}: write failed: "
                                 f"{exc.strerror or exc}") from None
            raise
        finally:
            opened.close()
        return Fetched(self.directory / name, opened.sha256, bool(reference.sha256))
