"""Azurite for the tests that need a real Table service: started once per session, stopped after.

Imported by conftest. Azurite is installed by ``make setup`` (``npm ci``); without it the fixture
fails with that instruction instead of skipping, so the shared budget is never left untested.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import pytest

from standins.azurite import Azurite, AzuriteMissing
from standins.storage_proxy import StorageProxy
from upgrade_handler.ledger import Ledger, open_ledger
from upgrade_handler.settings import Settings

#: The ledger's tests and the rollout command's need a Service Bus setting to read settings, never a bus.
SERVICE_BUS = "Endpoint=sb://unused.invalid/;SharedAccessKeyName=unused;SharedAccessKey=unused"


def settings_for(connection_string: str | None, table: str = "rollouts") -> Settings:
    """The app settings of a deployment whose storage account is ``connection_string`` (none: no ledger)."""
    environment = {"ServiceBusConnection": SERVICE_BUS, "ROLLOUT_TABLE": table}
    if connection_string is not None:
        environment["AzureWebJobsStorage"] = connection_string
    return Settings.from_environment(environment)


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


@pytest.fixture
async def ledgers() -> AsyncIterator[Callable[..., Ledger]]:
    """Opens ledgers as the function does (``open_ledger`` from the settings), closed after the test."""
    made: list[Ledger] = []

    def make(connection_string: str, table: str = "rollouts", **options: Any) -> Ledger:
        ledger = open_ledger(settings_for(connection_string, table), **options)
        assert ledger is not None
        made.append(ledger)
        return ledger

    yield make
    for ledger in made:
        await ledger.aclose()
