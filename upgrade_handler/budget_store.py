"""Where the shared Graph budget (:mod:`.budget`) lives: one partition of the app's storage account.

A row per instance (its demand, stamped by the store's clock) and one schedule row (the next free
time of the fan-out timeline, advanced with ETag optimistic concurrency). Every method raises only
:class:`~upgrade_handler.storage.StoreUnavailable`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Protocol
from urllib.parse import urlsplit

from azure.core import MatchConditions
from azure.core.exceptions import ResourceExistsError, ResourceModifiedError, ResourceNotFoundError
from azure.data.tables import UpdateMode

from .storage import StoreUnavailable, Table, bounded

#: Rows of instances gone for this long are deleted by whoever sees them (one per beat).
FORGET_SECONDS = 600.0
#: A fan-out's reservation gives up on a contended schedule row after this many tries.
SCHEDULE_TRIES = 8
_ROW = "instance-"
_SCHEDULE_ROW = "schedule"


@dataclass(frozen=True, slots=True)
class Snapshot:
    """One heartbeat: the partition's rows as read right after this instance's upsert.

    ``sent`` and ``answered`` are the caller's clock around the upsert; ``stamped`` is the store's
    time of it (epoch seconds); ``rows`` maps instance ids to (demand, store time of the row).
    """

    sent: float
    answered: float
    stamped: float
    rows: dict[str, tuple[float, float]]


class BudgetStore(Protocol):
    """Where the heartbeats and the schedule live. Every method raises only :class:`StoreUnavailable`."""

    operations: int

    async def heartbeat(self, instance: str, demand: float, clock: Callable[[], float]) -> Snapshot: ...

    async def leave(self, instance: str) -> None: ...

    async def reserve(self, calls: int, rate: float, now: float) -> float: ...

    async def aclose(self) -> None: ...


class TableBudgetStore:
    """The budget in Azure Table storage: one partition per budget key, a row per instance, a schedule row.

    ``operations`` counts storage requests made (what the budget costs the storage account).
    """

    def __init__(self, table: Table, key: str) -> None:
        self.table = table
        self.key = key
        self.operations = 0
        self._table_made = False

    async def heartbeat(self, instance: str, demand: float, clock: Callable[[], float]) -> Snapshot:
        entity = {"PartitionKey": self.key, "RowKey": _ROW + instance, "demand": float(demand)}
        if not self._table_made:  # once per process: the first instance of the app creates the table
            await self._op(self.table.create_if_missing())
            self._table_made = True
        sent = clock()
        try:
            await self._upsert(entity)
        except StoreUnavailable as error:
            if error.table_missing:  # deleted under us, every row with it: create it for the next beat
                await self._op(self.table.create_if_missing())
            raise
        answered = clock()
        query = "PartitionKey eq @key and RowKey ge @low and RowKey lt @high"
        parameters = {"key": self.key, "low": _ROW, "high": _ROW[:-1] + chr(ord(_ROW[-1]) + 1)}

        async def read() -> list[Any]:
            return [e async for e in self.table.client.query_entities(query, parameters=parameters)]

        entities = await self._op(read(), "query")
        rows = {
            str(e["RowKey"])[len(_ROW) :]: (float(e.get("demand", 0.0)), e.metadata["timestamp"].timestamp())
            for e in entities
        }
        if instance not in rows:  # deleted between the two calls: the store's time is unknown this beat
            raise StoreUnavailable("query", "this instance's row was not there")
        stamped = rows[instance][1]
        forgotten = [other for other, (_, at) in rows.items() if stamped - at > FORGET_SECONDS]
        if forgotten:  # a crashed instance's row: one per beat, failures do not matter
            with contextlib.suppress(StoreUnavailable):
                await self._op(self.table.client.delete_entity(self.key, _ROW + forgotten[0]), "delete")
        return Snapshot(sent, answered, stamped, rows)

    async def leave(self, instance: str) -> None:
        await self._op(self.table.client.delete_entity(self.key, _ROW + instance), "delete")

    async def reserve(self, calls: int, rate: float, now: float) -> float:
        """Advance the schedule row's next free time by ``calls / rate``; returns where the reservation starts."""
        for _ in range(SCHEDULE_TRIES):
            try:
                current = await self._op(self.table.client.get_entity(self.key, _SCHEDULE_ROW), "read schedule")
            except StoreUnavailable as error:
                if error.table_missing:
                    await self._op(self.table.create_if_missing())
                    continue
                if not isinstance(error.__cause__, ResourceNotFoundError):
                    raise
                current = None
            start = max(now, float(current["nextFree"]) if current is not None else now)
            entity = {"PartitionKey": self.key, "RowKey": _SCHEDULE_ROW, "nextFree": start + calls / rate}
            try:
                if current is None:
                    await self._op(self.table.client.create_entity(entity), "create schedule")
                else:
                    await self._op(
                        self.table.client.update_entity(
                            entity,
                            mode=UpdateMode.REPLACE,
                            etag=current.metadata["etag"],
                            match_condition=MatchConditions.IfNotModified,
                        ),
                        "advance schedule",
                    )
            except StoreUnavailable as error:
                if isinstance(error.__cause__, ResourceExistsError | ResourceModifiedError):
                    continue  # another fan-out moved it first: read it again
                raise
            return start
        raise StoreUnavailable("reserve", f"the schedule row was contended {SCHEDULE_TRIES} times")

    async def aclose(self) -> None:
        await self.table.aclose()

    async def _upsert(self, entity: dict[str, Any]) -> None:
        await self._op(self.table.client.upsert_entity(entity, mode=UpdateMode.REPLACE), "upsert")

    async def _op(self, operation: Awaitable[Any], name: str = "create table") -> Any:
        self.operations += 1
        return await bounded(operation, name, self.table.timeout)


def budget_key(graph_base_url: str, client_id: str | None) -> str:
    """The partition of one budget: the Graph cloud and the app identity (its tenant goes with it)."""
    host = urlsplit(graph_base_url).netloc.lower()
    return f"{host}|{(client_id or 'default').lower()}"
