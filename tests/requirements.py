"""What a test needs from the machine, and what happens when the machine lacks it.

Outside CI a test whose needs are missing is skipped, and pytest's ``-rs``
(pyproject's ``addopts``) lists each skip with its reason. In CI (``CI=true``,
as ``.ci/run`` sets it) a missing need fails the test instead: a CI run that
skipped the Packer build or the Ansible converge would pass without having
checked them. Every skip in ``tests/`` goes through :func:`require`.
"""

from __future__ import annotations

import os

import pytest

CI_ENV = "CI"


def in_ci() -> bool:
    """Whether this run is CI's (``CI=true``, as CI services and ``.ci/run`` set it)."""
    return os.environ.get(CI_ENV, "").strip().lower() in ("true", "1", "yes")


def require(condition: object, reason: str) -> None:
    """Go on when ``condition`` holds; else skip the test (fail it in CI) with ``reason``.

    ``reason`` says what is missing and how to get it, e.g.
    "needs packer on PATH (apt-get install packer)".
    """
    if condition:
        return
    if in_ci():
        pytest.fail(f"CI=true, so this test may not be skipped: {reason}", pytrace=False)
    pytest.skip(reason)
