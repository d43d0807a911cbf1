"""Azurite for the tests that need a real Table service: started once per session, stopped after.

Imported by conftest. Azurite is installed by ``make setup`` (``npm ci``); without it the fixture
fails with that instruction instead of skipping, so the shared budget is never left untested.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from standins.azurite import Azurite, AzuriteMissing
from standins.storage_proxy import StorageProxy


@pytest.fixture(scope="session")
def azurite() -> Iterator[Azurite]:
    try:
        emulator = Azurite()
    except AzuriteMissing as missing:
        pytest.fail(str(missing), pytrace=False)
    with emulator:
        yield emulator


@pytest.fixture
def storage_proxy(azurite: Azurite) -> Iterator[StorageProxy]:
    """A fault-injecting proxy in front of the session's Azurite, forwarding until told otherwise."""
    with StorageProxy(azurite.port) as proxy:
        yield proxy
