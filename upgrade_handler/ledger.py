"""The rollout ledger (contract §8): how each request of a rollout ended, in the app's storage account.

One table (``ROLLOUT_TABLE``, default ``rollouts``), one partition per rollout id, and in it:

- a **target row** per installation target, row key ``{scope}:{id}`` (``user:adele@contoso.com``,
  ``team:…``, ``chat:19:…@thread.v2``), with ``outcome`` (:data:`OUTCOMES`), ``attempts``,
  ``versionBefore`` / ``versionAfter`` when known, ``reason`` for a dead letter, ``at``, ``scope``,
  ``target`` (the id as the request gave it) and ``messageId``. User and team ids are case-insensitive
  in Entra, so their keys are lower-cased: one user is one row however a producer spelled the name;
- a **page row** per fan-out page, row key ``~page:{fan-out id}:{page:06d}``, with ``targets`` (the
  users that page named) and ``last`` (no page follows). ``~`` sorts after every scope, so the
  target rows come first in a partition.

Keys may not hold ``/ \\ # ?`` or control characters, and a guest's UPN holds ``#``
(``ann_fabrikam.com#EXT#@contoso.onmicrosoft.com``): those characters and ``%`` itself are written
as ``%XX`` (:func:`escape_key`), so every key reads back to the id it came from (:func:`target_of`).

Every write is one upsert that replaces the row: a redelivered child or page writes the same row
again, never a second one, and the row holds how the target's latest delivery ended.

**Writing never fails a message.** :meth:`Ledger.record` is bounded (:data:`WRITE_TIMEOUT` in all,
creating the table when it is missing, or was deleted, included) and never raises: a store that is
away, slow or refusing is logged as ``rollout.ledger_failed`` (WARNING) and the message goes on as
if there were no ledger.

**Reading** (:meth:`Ledger.status`): one partition query gives a :class:`RolloutStatus`:

- ``expected``: the targets the fan-out pages named (their sum), or the targets recorded when that
  is more (single requests beside a fan-out, or a rollout of single requests only);
- ``complete``: every fan-out of the rollout (named by its page rows, or by a child's ``fanoutId``)
  has read its last page (a ``last`` page row and all of its pages 1..n present) or was itself
  dead-lettered (a ``fanout`` target row); a rollout of single requests only is complete once
  anything is recorded;
- ``settled``: complete, and every expected target recorded as ``upgraded``, ``current``, ``skipped``
  or ``deadlettered``.

A user named by two fan-outs of one rollout (overlapping groups) is one row but counts twice in
``expected``, so such a rollout never settles: give each fan-out its own rollout id.
"""

from __future__ import annotations

import logging
import re
from collections import Counter
from collections.abc import Awaitable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from azure.data.tables import UpdateMode

from .logs import log_event, redact_user
from .settings import Settings
from .storage import StoreUnavailable, Table, bounded, open_table

#: How a request of a rollout ended (the ``outcome`` column); all but ``retrying`` are final.
OUTCOMES = ("upgraded", "current", "skipped", "retrying", "deadlettered")
FINAL_OUTCOMES = frozenset(OUTCOMES) - {"retrying"}
#: Target scopes. ``fanout``: the fan-out request itself was dead-lettered (its id is the fan-out's
#: first message id), so no further page will be read.
SCOPES = ("user", "team", "chat", "fanout")

#: Seconds one ledger write may take in all (table creation included): a message waits at most this.
WRITE_TIMEOUT = 2.0
#: Seconds a reader (the command line) gives one storage request, and one whole partition query.
READ_TIMEOUT = 10.0
READ_ALL_TIMEOUT = 120.0

PAGE_PREFIX = "~page:"
_UNSAFE = re.compile(r"[/\\#?%\x00-\x1f\x7f-\x9f]")
_ESCAPED = re.compile(r"%([0-9A-F]{2})")
_CASE_INSENSITIVE = frozenset({"user", "team"})


@dataclass(frozen=True)
class TargetRecord:
    """How one request for one target ended (or that it will be retried)."""

    rollout_id: str
    scope: str
    target_id: str
    outcome: str
    attempts: int
    at: datetime
    version_before: str | None = None
    version_after: str | None = None
    reason: str | None = None
    message_id: str | None = None
    fanout_id: str | None = None
    """For a fan-out child: the fan-out's first message id (``FanOutParentMessageId``). The rollout is
    then complete only once that fan-out's pages are read to the end, even when the child's row lands
    before its page's (or the page's write failed)."""

    def __post_init__(self) -> None:
        if self.outcome not in OUTCOMES:
            raise ValueError(f"outcome {self.outcome!r} is not one of {OUTCOMES}")
        if self.scope not in SCOPES:
            raise ValueError(f"scope {self.scope!r} is not one of {SCOPES}")


@dataclass(frozen=True)
class PageRecord:
    """One page of a fan-out: ``targets`` users enqueued; ``last``: no page follows."""

    rollout_id: str
    fanout_id: str
    page: int
    targets: int
    last: bool
    at: datetime

    def __post_init__(self) -> None:
        if self.page < 1 or self.targets < 0:
            raise ValueError(f"page {self.page} with {self.targets} targets: pages count from 1, targets from 0")


# --- keys --------------------------------------------------------------------------------------------


def escape_key(text: str) -> str:
    """``text`` with the characters a Table key may not hold (and ``%``) as ``%XX``; see :func:`unescape_key`."""
    return _UNSAFE.sub(lambda found: f"%{ord(found.group()):02X}", text)


def unescape_key(key: str) -> str:
    return _ESCAPED.sub(lambda found: chr(int(found.group(1), 16)), key)


def partition_key(rollout_id: str) -> str:
    return escape_key(rollout_id)


def target_key(scope: str, target_id: str) -> str:
    """The row key of a target: ``{scope}:{id}``, lower-cased for the case-insensitive user and team ids."""
    return f"{scope}:{escape_key(target_id.lower() if scope in _CASE_INSENSITIVE else target_id)}"


def target_of(row_key: str) -> tuple[str, str]:
    """``(scope, id)`` back from a target row key."""
    scope, _, escaped = row_key.partition(":")
    return scope, unescape_key(escaped)


def page_key(fanout_id: str, page: int) -> str:
    return f"{PAGE_PREFIX}{escape_key(fanout_id)}:{page:06d}"


def entity_of(record: TargetRecord | PageRecord) -> dict[str, Any]:
    """The table row of ``record`` (absent values are left out, so an upsert clears them)."""
    at = record.at if record.at.tzinfo is not None else record.at.replace(tzinfo=UTC)
    if isinstance(record, PageRecord):
        return {
            "PartitionKey": partition_key(record.rollout_id),
            "RowKey": page_key(record.fanout_id, record.page),
            "kind": "page",
            "fanoutId": record.fanout_id,
            "page": record.page,
            "targets": record.targets,
            "last": record.last,
            "at": at,
        }
    row = {
        "PartitionKey": partition_key(record.rollout_id),
        "RowKey": target_key(record.scope, record.target_id),
        "kind": "target",
        "scope": record.scope,
        "target": record.target_id,
        "outcome": record.outcome,
        "attempts": record.attempts,
        "at": at,
        "versionBefore": record.version_before,
        "versionAfter": record.version_after,
        "reason": record.reason,
        "messageId": record.message_id,
        "fanoutId": record.fanout_id,
    }
    return {name: value for name, value in row.items() if value is not None}


# --- reading -----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RolloutStatus:
    """A rollout as its ledger partition shows it (see the module docstring for the rules)."""

    rollout_id: str
    expected: int
    complete: bool
    counts: Mapping[str, int]
    """Targets by outcome, every outcome of :data:`OUTCOMES` present."""
    dead_letters: Mapping[str, int]
    """Dead-lettered targets by ``reason``."""
    pages: int = 0
    last_activity: datetime | None = None

    @property
    def recorded(self) -> int:
        return sum(self.counts.values())

    @property
    def finished(self) -> int:
        """Targets whose outcome is final."""
        return sum(count for outcome, count in self.counts.items() if outcome in FINAL_OUTCOMES)

    @property
    def settled(self) -> bool:
        return self.complete and self.finished >= self.expected and self.counts.get("retrying", 0) == 0

    def to_json(self) -> dict[str, Any]:
        return {
            "rolloutId": self.rollout_id,
            "expected": self.expected,
            "complete": self.complete,
            "settled": self.settled,
            "recorded": self.recorded,
            "counts": dict(self.counts),
            "deadLetters": dict(self.dead_letters),
            "pages": self.pages,
            "lastActivity": _iso(self.last_activity),
        }


def summarise(rollout_id: str, rows: Iterable[Mapping[str, Any]]) -> RolloutStatus:
    """The :class:`RolloutStatus` of one partition's rows."""
    counts: Counter[str] = Counter({outcome: 0 for outcome in OUTCOMES})
    dead_letters: Counter[str] = Counter()
    pages: dict[str, dict[int, tuple[int, bool]]] = {}
    failed_fanouts: set[str] = set()
    fanouts: set[str] = set()
    """Every fan-out a row names (escaped as in the page keys)."""
    last_activity: datetime | None = None
    for row in rows:
        at = row.get("at")
        if isinstance(at, datetime) and (last_activity is None or at > last_activity):
            last_activity = at
        key = str(row.get("RowKey", ""))
        if key.startswith(PAGE_PREFIX):
            fanout, _, number = key[len(PAGE_PREFIX) :].rpartition(":")
            if number.isdigit():
                pages.setdefault(fanout, {})[int(number)] = (int(row.get("targets") or 0), bool(row.get("last")))
            continue
        outcome = str(row.get("outcome", ""))
        if outcome not in OUTCOMES:
            continue  # a row this version does not know: neither a target nor a page
        counts[outcome] += 1
        parent = row.get("fanoutId")
        if isinstance(parent, str) and parent:
            fanouts.add(escape_key(parent))
        if outcome == "deadlettered":
            dead_letters[str(row.get("reason") or "(none)")] += 1
            scope, target = target_of(key)
            if scope == "fanout":
                failed_fanouts.add(escape_key(target))
    recorded = sum(counts.values())
    paged = sum(targets for fanout in pages.values() for targets, _ in fanout.values())
    fanouts |= pages.keys()
    complete = (recorded > 0 or bool(pages)) and all(
        fanout in failed_fanouts or _read_to_the_end(pages.get(fanout, {})) for fanout in fanouts
    )
    return RolloutStatus(
        rollout_id=rollout_id,
        expected=max(paged + len(failed_fanouts), recorded),
        complete=complete,
        counts=dict(counts),
        dead_letters=dict(sorted(dead_letters.items())),
        pages=sum(len(p) for p in pages.values()),
        last_activity=last_activity,
    )


def _read_to_the_end(pages: Mapping[int, tuple[int, bool]]) -> bool:
    """A ``last`` page is there and so is every page before it."""
    lasts = [number for number, (_, last) in pages.items() if last]
    return bool(lasts) and all(number in pages for number in range(1, min(lasts) + 1))


@dataclass(frozen=True)
class RolloutSeen:
    """A rollout with ledger rows written since some time (``rollout list``)."""

    rollout_id: str
    last_activity: datetime
    status: RolloutStatus = field(compare=False)


# --- the ledger --------------------------------------------------------------------------------------


class Ledger:
    """The rollout table: :meth:`record` for the function (never raises), :meth:`status` and
    :meth:`rollouts` for readers (raise :class:`StoreUnavailable`)."""

    def __init__(self, table: Table, *, timeout: float = WRITE_TIMEOUT) -> None:
        self.table = table
        self.timeout = timeout
        self.writes = 0
        """Upserts attempted (what the ledger costs the storage account)."""

    async def record(self, record: TargetRecord | PageRecord) -> None:
        """Upsert ``record``'s row, creating the table when it is missing; never raises.

        The whole write takes at most ``timeout`` seconds. A failure is logged as
        ``rollout.ledger_failed`` and otherwise ignored: the ledger reports on messages, it never
        decides their fate.
        """
        try:
            entity = entity_of(record)
            await bounded(self._upsert(entity), "ledger write", self.timeout)
        except StoreUnavailable as error:
            self._failed(record, error.operation, error.detail)
        except Exception as error:  # nothing about an advisory write may fail a message
            self._failed(record, "ledger write", f"{type(error).__name__}: {error}")

    async def _upsert(self, entity: dict[str, Any]) -> None:
        self.writes += 1
        try:
            await bounded(self.table.client.upsert_entity(entity, mode=UpdateMode.REPLACE), "upsert", self.timeout)
        except StoreUnavailable as error:
            if not error.table_missing:
                raise
            await self.table.create_if_missing()  # first write, or the table was deleted under us
            self.writes += 1
            await bounded(self.table.client.upsert_entity(entity, mode=UpdateMode.REPLACE), "upsert", self.timeout)

    def _failed(self, record: TargetRecord | PageRecord, operation: str, detail: str) -> None:
        # The row key spells the target; a storage error may quote the request URL that holds it.
        row = page_key(record.fanout_id, record.page) if isinstance(record, PageRecord) else None
        if isinstance(record, TargetRecord):
            row = target_key(record.scope, record.target_id)
        detail = detail.replace(row, "<row>") if row else detail
        target = record if isinstance(record, TargetRecord) else None
        page = record if isinstance(record, PageRecord) else None
        log_event(
            "rollout.ledger_failed",
            logging.WARNING,
            rollout_id=record.rollout_id,
            scope=target.scope if target else "page",
            target=redact_user(target.target_id) if target else None,
            outcome=target.outcome if target else None,
            fanout_id=page.fanout_id if page else None,
            page=page.page if page else None,
            operation=operation,
            error=detail,
        )

    async def status(self, rollout_id: str) -> RolloutStatus:
        """The rollout's status from one partition query; an unknown rollout (or no table yet) has no rows."""
        query = "PartitionKey eq @rollout"
        columns = ["RowKey", "outcome", "reason", "targets", "last", "at", "fanoutId"]

        async def read() -> list[Any]:
            parameters = {"rollout": partition_key(rollout_id)}
            return [row async for row in self.table.client.query_entities(query, parameters=parameters, select=columns)]

        return summarise(rollout_id, await self._read(read(), "read rollout"))

    async def rollouts(self, since: datetime) -> list[RolloutSeen]:
        """Rollouts with rows written at or after ``since``, most recent first, each with its status."""

        async def read() -> list[Any]:
            return [
                row
                async for row in self.table.client.query_entities(
                    "at ge @since", parameters={"since": since}, select=["PartitionKey", "at"]
                )
            ]

        latest: dict[str, datetime] = {}
        for row in await self._read(read(), "list rollouts"):
            rollout, at = unescape_key(str(row["PartitionKey"])), row.get("at")
            if isinstance(at, datetime) and (rollout not in latest or at > latest[rollout]):
                latest[rollout] = at
        seen = [RolloutSeen(rollout, at, await self.status(rollout)) for rollout, at in latest.items()]
        return sorted(seen, key=lambda item: item.last_activity, reverse=True)

    async def _read(self, operation: Awaitable[list[Any]], name: str) -> list[Any]:
        """A whole query, all of its pages, bounded by :data:`READ_ALL_TIMEOUT`."""
        try:
            rows = await bounded(operation, name, READ_ALL_TIMEOUT)
        except StoreUnavailable as error:
            if error.table_missing:
                return []  # nothing was ever recorded
            raise
        return rows

    async def aclose(self) -> None:
        await self.table.aclose()


def open_ledger(settings: Settings, *, timeout: float = WRITE_TIMEOUT) -> Ledger | None:
    """The ledger of ``settings`` (``None`` without a storage account). Opens no connection yet.

    ``timeout`` bounds each write in all and each storage request; a reader passes :data:`READ_TIMEOUT`.
    """
    if settings.storage is None:
        return None
    return Ledger(open_table(settings.storage, settings.rollout_table, timeout=timeout), timeout=timeout)


def _iso(moment: datetime | None) -> str | None:
    if moment is None:
        return None
    return moment.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


__all__ = [
    "OUTCOMES",
    "SCOPES",
    "Ledger",
    "PageRecord",
    "RolloutSeen",
    "RolloutStatus",
    "TargetRecord",
    "escape_key",
    "open_ledger",
    "summarise",
    "target_key",
    "target_of",
    "unescape_key",
]
