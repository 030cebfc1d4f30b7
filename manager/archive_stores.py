"""Where a caller may have the manager's archivers write: under its configured prefixes.

An archiver runs as the manager, so the archive store a caller names
(``archive-stream --store``, ``POST /v1/archives`` ``store``) must lie under the
manager's own archive store (``STREAMBOSS_ARCHIVE_STORE``, default
``file://<state>/archive``) or a prefix of ``STREAMBOSS_ARCHIVE_ALLOW``
(comma-separated ``file:///dir`` / ``s3://bucket[/prefix]``). Otherwise anyone who
may call the API could have the manager write segments into any directory or
bucket it can reach, and read back what an "index" there says.
"""

from __future__ import annotations

import os

from streamboss.agent import objects
from streamboss.agent.object_refs import parse_allow, parse_prefix, prefix_within

ARCHIVE_ALLOW_ENV = "STREAMBOSS_ARCHIVE_ALLOW"


class ArchiveStoreRefused(ValueError):
    """The store is malformed or outside the allowed prefixes; one line naming them."""


def allowed_prefixes(default_store: str) -> list[str]:
    """The manager's archive store and the prefixes of ``STREAMBOSS_ARCHIVE_ALLOW``."""
    return [default_store, *parse_allow(os.environ.get(ARCHIVE_ALLOW_ENV))]


def check_archive_store(store: str, default_store: str) -> None:
    """Refuse an archive store outside the manager's prefixes.

    Raises:
        ArchiveStoreRefused: a malformed URL, a path with ``.``/``..`` components, or
            a store under none of :func:`allowed_prefixes`.
    """
    try:
        wanted = parse_prefix(store, "archive store")
    except ValueError as exc:
        raise ArchiveStoreRefused(str(exc)) from None
    if wanted.scheme == "file" and \
            (objects.split_url(store)[2].rstrip("/") or "/") != wanted.root:
        # "file:///allowed/../elsewhere": refused rather than rewritten, so the store
        # recorded is the one the caller wrote.
        raise ArchiveStoreRefused(f"archive store {store!r}: write the directory without "
                                  "'.', '..' or '//' in its path")
    allowed = allowed_prefixes(default_store)
    for prefix in allowed:
        try:
            if prefix_within(wanted, parse_prefix(prefix, "archive store")):
                return
        except ValueError:
            continue  # a bad allow-list entry admits nothing
    raise ArchiveStoreRefused(f"archive store {store!r} is outside the manager's archive "
                              f"prefixes ({', '.join(allowed)}); use one of them, or add a "
                              f"prefix to {ARCHIVE_ALLOW_ENV} where the manager runs")
