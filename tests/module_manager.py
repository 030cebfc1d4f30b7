"""One real manager per test module, and names its pool cleans up after.

A module that talks to a shared manager imports both fixtures::

    from .module_manager import manager_names, module_manager  # noqa: F401 (fixtures)

Its tests then ask for ``manager`` and ``names`` (which, there, replaces
conftest's ``names``: these names are also deleted from the broker with the
manager's declarations).
"""

from __future__ import annotations

from typing import Any

import pytest

from .conftest import ManagerPool, ManagerProcess


@pytest.fixture(scope="module", name="manager")
def module_manager(module_managers: ManagerPool) -> ManagerProcess:
    return module_managers.start()


@pytest.fixture(name="names")
def manager_names(module_managers: ManagerPool) -> Any:
    return module_managers.name
