"""The app's own storage account (``AzureWebJobsStorage``): an async Table client that never holds a caller up.

What lives there (the shared Graph budget, contract §7) is advisory: when the store is slow or away
the caller goes on without it. So every call is short and bounded:

- the SDK does not retry (``retry_total=0``): the caller has its own degraded mode, and a retry
  with back-off inside the SDK would only hide the store's trouble for seconds;
- the transport's connect and read timeouts are ``timeout`` (default :data:`OPERATION_TIMEOUT`),
  and :func:`bounded` puts an ``asyncio.timeout`` of the same length around the whole operation
  (paging, DNS and the credential's token request included), raising :class:`StoreUnavailable`;
- any storage failure (timeout, refused connection, 5xx, 503 throttling, a missing table, an
  expired token) becomes :class:`StoreUnavailable` with the cause chained, so callers catch one
  thing; a missing table is ``table_missing`` so the caller can create it again.

Connections come in the forms the Functions host accepts (settings.py parses them): a connection
string (Azurite's ``UseDevelopmentStorage=true`` included), or a table endpoint reached with the
managed identity inside Azure and ``DefaultAzureCredential`` elsewhere (as :mod:`.auth` does for Graph).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from typing import Any, TypeVar

from azure.core.credentials_async import AsyncTokenCredential
from azure.core.exceptions import AzureError, ResourceExistsError, ResourceNotFoundError
from azure.data.tables.aio import TableClient

from .auth import default_credential
from .settings import StorageConnection

#: Seconds one storage operation may take, connecting included: a stalled store must never hold a Graph call.
OPERATION_TIMEOUT = 2.0

T = TypeVar("T")


class StoreUnavailable(Exception):
    """A storage operation failed or took longer than its bound; the cause is chained."""

    def __init__(self, operation: str, detail: str, *, table_missing: bool = False) -> None:
        super().__init__(f"storage {operation}: {detail}")
        self.operation = operation
        self.detail = detail
        self.table_missing = table_missing


class Table:
    """One table of the storage account: the async ``TableClient`` and the credential it owns."""

    def __init__(self, client: TableClient, credential: AsyncTokenCredential | None, timeout: float) -> None:
        self.client = client
        self.timeout = timeout
        self._credential = credential

    @property
    def name(self) -> str:
        return self.client.table_name

    async def create_if_missing(self) -> None:
        """Create the table; an existing one is fine (another instance may have won the race)."""
        try:
            await bounded(self.client.create_table(), "create table", self.timeout)
        except StoreUnavailable as error:
            if not isinstance(error.__cause__, ResourceExistsError):
                raise

    async def aclose(self) -> None:
        await self.client.close()
        if self._credential is not None:
            await self._credential.close()


def open_table(connection: StorageConnection, table: str, *, timeout: float = OPERATION_TIMEOUT) -> Table:
    """An async client for ``table`` with no SDK retries and ``timeout``-second transport timeouts.

    Opens no connection yet: the first operation does.
    """
    options: dict[str, Any] = {"retry_total": 0, "connection_timeout": timeout, "read_timeout": timeout}
    if connection.connection_string:
        client = TableClient.from_connection_string(connection.connection_string, table, **options)
        return Table(client, None, timeout)
    assert connection.table_service_uri is not None
    credential = default_credential(connection.client_id)
    client = TableClient(connection.table_service_uri, table, credential=credential, **options)
    return Table(client, credential, timeout)


async def bounded(operation: Awaitable[T], name: str, timeout: float = OPERATION_TIMEOUT) -> T:  # noqa: ASYNC109
    """Await one storage ``operation`` for at most ``timeout`` seconds; any failure is :class:`StoreUnavailable`."""
    try:
        async with asyncio.timeout(timeout):
            return await operation
    except TimeoutError as error:
        raise StoreUnavailable(name, f"no answer within {timeout:g} s") from error
    except ResourceNotFoundError as error:
        missing = "TableNotFound" in str(getattr(error, "error_code", "") or "") or "TableNotFound" in str(error)
        raise StoreUnavailable(name, _first_line(error), table_missing=missing) from error
    except AzureError as error:
        raise StoreUnavailable(name, _first_line(error)) from error


def _first_line(error: Exception) -> str:
    text = str(error).strip()
    return (text.splitlines()[0] if text else type(error).__name__)[:300]
