"""The demo's rollout (contract §8): one group fan-out with ``version`` and ``rolloutId``, end to end.

The release pipeline sends one event: "Contoso Expenses 2.4.0 for the group Finance", rollout
``demo-2.4.0``. The catalog lists 2.4.0 as ``submitted``, not yet ``published``. The group's
members, in the order the fan-out paces them:

1. one already runs 2.4.0 (a pilot user): ``upgrade.already_current``, no upgrade call;
2. the first member behind meets the lagging catalog: no upgrade call, the attempt is deferred
   with ``CatalogNotUpdated`` and a retry copy is scheduled (backoff about 10 s);
3. the catalog then publishes 2.4.0, the other members behind are upgraded, and so is the
   deferred one when its retry copy comes due.

Two things are fast-forwarded so that this takes seconds, not minutes: the handler runs on a clock
whose monotonic seconds (what times its 60-second catalog cache) the demo moves on by a minute when
the catalog publishes, and retry copies are sent due at once instead of at their scheduled time.
Both happen between two deliveries: the worker handles one message at a time here.

At the end the rollout's status is read from the ledger with the ``rollout status`` command's own
code, when the demo has a storage account (Azurite); without one that part is skipped.

The stand-ins are not imported here (only ``demo`` may): the demo seeds the tenant and hands over
a :class:`RolloutTenant`.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from azure.servicebus import ServiceBusMessage
from rich.console import Console
from rich.table import Table

from ..catalog import CATALOG_TTL_SECONDS
from ..clock import SystemClock
from ..handler import UpgradeHandler
from ..ledger import READ_TIMEOUT, open_ledger
from ..outcome import Outcome
from ..settings import Settings
from ..storage import StoreUnavailable
from .bus import Bus
from .events import Event
from .report import OUTCOME_WORDS, summarise
from .requests import prepare
from .rollout import render
from .send import send_requests
from .worker import Processed, Worker

ROLLOUT_ID = "demo-2.4.0"
VERSION = "2.4.0"
#: The version every member behind runs, and the catalog's latest published one until 2.4.0 is.
PREVIOUS = "2.3.0"
EXPENSES = "0c5e9a5e-7d3b-4f7e-9b1a-6f2d8e4c3a10"
EXPENSES_EXTERNAL = "com.contoso.expenses"
GROUP = "7d1c2b3a-4e5f-4a6b-8c7d-9e0f1a2b3c4d"
GROUP_NAME = "Finance"
UNTIL_IDLE = 1.0
#: How far the demo moves the handler's clock when the catalog publishes: past the catalog cache.
SKIP_SECONDS = CATALOG_TTL_SECONDS + 1
_RETRY_MARK = ":retry:"


@dataclass(frozen=True, slots=True)
class Member:
    user_id: str
    upn: str
    installed: str
    """The version installed before the rollout."""


@dataclass(frozen=True, slots=True)
class RolloutTenant:
    """The simulated tenant as the rollout needs it (``demo`` seeds it)."""

    members: tuple[Member, ...]
    """The group's members, in the order the fan-out enqueues them."""
    publish: Callable[[], None]
    """Publish :data:`VERSION` in the tenant's catalog."""
    installed_now: Callable[[Member], str]
    upgrade_calls: Callable[[], int]
    """Upgrade calls Graph received for Contoso Expenses so far."""


@dataclass(frozen=True, slots=True)
class RolloutRun:
    processed: tuple[Processed, ...]
    fast_forwarded: tuple[float, ...]
    """Seconds each retry copy would have waited (sent due at once instead)."""
    upgrade_calls: int


class SkippingClock(SystemClock):
    """The real clock, whose monotonic seconds the demo can move on (``now`` stays the broker's time)."""

    def __init__(self) -> None:
        self.skipped = 0.0

    def monotonic(self) -> float:
        return time.monotonic() + self.skipped

    def skip(self, seconds: float) -> None:
        self.skipped += seconds


class RetriesDueNow:
    """The handler's sender, except that retry copies are sent due at once (fan-out children keep their
    schedule, the tenant's timeline)."""

    def __init__(self, bus: Bus) -> None:
        self._bus = bus
        self.fast_forwarded: list[float] = []

    async def send(self, queue: str, messages: Sequence[ServiceBusMessage]) -> None:
        for message in messages:
            due = message.scheduled_enqueue_time_utc
            if due is not None and _RETRY_MARK in (message.message_id or ""):
                self.fast_forwarded.append(max(0.0, (due - datetime.now(UTC)).total_seconds()))
                message.scheduled_enqueue_time_utc = None
        await self._bus.send(queue, messages)


def seed(graph: Any, people: Sequence[tuple[str, str]]) -> RolloutTenant:
    """Contoso Expenses for the group Finance in the Graph simulator ``graph``: ``people`` (object id,
    UPN) in the order the fan-out paces them; the first already runs :data:`VERSION` (a pilot user),
    the others :data:`PREVIOUS`. The catalog has :data:`VERSION` only ``submitted``."""
    tenant = graph.tenant
    tenant.add_app(EXPENSES, EXPENSES_EXTERNAL, "Contoso Expenses", versions=(PREVIOUS,))
    tenant.publish(EXPENSES, VERSION, state="submitted")
    members: list[Member] = []
    installations: dict[str, str] = {}
    for number, (user_id, upn) in enumerate(people):
        version = VERSION if number == 0 else PREVIOUS
        installations[user_id] = tenant.install("user", user_id, EXPENSES, version=version)
        members.append(Member(user_id, upn, version))
    tenant.add_group(GROUP, [member.user_id for member in members])
    return RolloutTenant(
        members=tuple(members),
        publish=lambda: tenant.publish(EXPENSES, VERSION),
        installed_now=lambda member: str(tenant.installation_version(installations[member.user_id])),
        upgrade_calls=lambda: sum(1 for call in graph.upgraded if call.teams_app_id == EXPENSES),
    )


def request_document() -> dict[str, str]:
    """The release pipeline's one event for the whole group."""
    return {
        "groupId": GROUP,
        "teamsAppId": EXPENSES,
        "version": VERSION,
        "rolloutId": ROLLOUT_ID,
        "requestId": f"release-{VERSION}",
    }


def catalog_deferral(item: Processed) -> bool:
    return any(
        event.name == "upgrade.retry_scheduled" and event.get("graph_error_code") == "CatalogNotUpdated"
        for event in item.events
    )


async def run(console: Console, settings: Settings, tenant: RolloutTenant) -> RolloutRun:
    """Send the group fan-out, run a worker until the queue is idle; publish when the catalog defers."""
    current = sum(1 for member in tenant.members if member.installed == VERSION)
    console.print(
        f"\nA rollout (contract §8): the release pipeline sends one event for the group {GROUP_NAME} "
        f"({len(tenant.members)} members), Contoso Expenses by teamsAppId, version {VERSION}, rolloutId "
        f"{ROLLOUT_ID}. {current} member already runs {VERSION}, the others {PREVIOUS}. The catalog lists "
        f"{VERSION} as submitted, not yet published (a new version can take hours to reach a tenant's catalog).",
        markup=False,
    )
    bus = Bus(settings.service_bus)
    clock = SkippingClock()
    sender = RetriesDueNow(bus)
    handler = UpgradeHandler(settings, sender=sender, clock=clock)
    processed: list[Processed] = []
    published = False

    def on_processed(item: Processed) -> None:
        nonlocal published
        processed.append(item)
        if not catalog_deferral(item):
            return
        # Every deferral moves the clock past the catalog cache, so a retry copy (due at once) can
        # never meet the same cached answer again.
        clock.skip(SKIP_SECONDS)
        if not published:
            published = True
            tenant.publish()
            ahead = f" (scheduled {sender.fast_forwarded[-1]:.1f} s ahead)" if sender.fast_forwarded else ""
            console.print(
                f"  {_whom(tenant, item)} was deferred (CatalogNotUpdated: the catalog publishes {PREVIOUS}, not yet "
                f"{VERSION}). Then the catalog publishes {VERSION}: the demo moves the handler's clock on by "
                f"{SKIP_SECONDS:g} s, past the {CATALOG_TTL_SECONDS:g} s it keeps a catalog answer, and lets the "
                f"retry copy{ahead} come due at once.",
                markup=False,
            )

    try:
        [request] = prepare([("rollout", request_document())])
        await send_requests(bus, settings.upgrade_queue, [request], properties={"Source": "release-pipeline"})
        worker = Worker(
            handler.handle, bus, settings.upgrade_queue, concurrency=1, until_idle=UNTIL_IDLE, on_processed=on_processed
        )
        started = time.monotonic()
        stats = await worker.run()
        console.print(
            f"  Worker (1 at a time) ran until the queue was idle for {UNTIL_IDLE:g} s: {stats.received} deliveries, "
            f"{stats.completed} completed, {stats.abandoned} abandoned, {time.monotonic() - started:.1f} s.\n",
            markup=False,
        )
    finally:
        await handler.aclose()
        await bus.aclose()
    return RolloutRun(tuple(processed), tuple(sender.fast_forwarded), tenant.upgrade_calls())


def _whom(tenant: RolloutTenant, item: Processed) -> str:
    try:
        user = str(json.loads(item.delivery.body).get("userId", "")).lower()
    except (ValueError, AttributeError):
        user = ""
    upn = next((member.upn for member in tenant.members if member.user_id.lower() == user), None)
    return f"The request for {upn}" if upn else "A member's request"


# --- printing -------------------------------------------------------------------------------------


def word(outcome: Outcome | None) -> str:
    if outcome is None:
        return "abandoned"
    return OUTCOME_WORDS[outcome]


def steps(item: Processed) -> list[str]:
    """What one delivery did, in words (the rollout's own events told here, the others as ``report`` does)."""
    told: list[str] = []
    for event in item.events:
        attempt = event.get("attempt", event.get("attempts"))
        if event.name == "upgrade.retry_scheduled" and event.get("graph_error_code") == "CatalogNotUpdated":
            when = str(event.get("retry_at", "")).rpartition("T")[2]
            told.append(
                f"attempt {attempt}: the catalog publishes {PREVIOUS}, not yet {VERSION}: no upgrade call, "
                f"deferred (CatalogNotUpdated), retry copy scheduled for {when}"
            )
        else:
            told.extend(_told_by_report(event))
    if item.error is not None:
        told.append(f"handler raised {type(item.error).__name__}: {item.error}")
    return told


def _told_by_report(event: Event) -> tuple[str, ...]:
    return summarise(None, (event,)).steps


def print_run(console: Console, tenant: RolloutTenant, run: RolloutRun) -> None:
    """The rollout member by member, then one line of figures from the deliveries themselves."""
    by_request: dict[str, list[Processed]] = {}
    for item in run.processed:
        by_request.setdefault(item.original_message_id, []).append(item)
    upns = {member.user_id.lower(): member for member in tenant.members}
    table = Table(title=f"Rollout {ROLLOUT_ID}, request by request", title_justify="left", show_lines=True)
    table.add_column("request", overflow="fold", max_width=34)
    table.add_column("version", overflow="fold")
    table.add_column("outcome", overflow="fold", max_width=26)
    table.add_column("what happened", overflow="fold")
    outcomes: dict[str, int] = {}
    deferred_then_upgraded = 0
    for deliveries in by_request.values():
        body = json.loads(deliveries[0].delivery.body)
        told = [step for item in deliveries for step in steps(item)]
        journey = " → ".join(word(item.outcome) for item in deliveries)
        member = upns.get(str(body.get("userId", "")).lower())
        if member is None:
            table.add_row(f"release-pipeline: group {GROUP_NAME}, version {VERSION}", "-", journey, "\n".join(told))
            continue
        final = word(deliveries[-1].outcome)
        outcomes[final] = outcomes.get(final, 0) + 1
        if final == "upgraded" and any(catalog_deferral(item) for item in deliveries):
            deferred_then_upgraded += 1
        now = tenant.installed_now(member)
        table.add_row(
            f"↳ fan-out child: user {member.upn}",
            f"{member.installed} → {now}" if now != member.installed else f"{now} (no change)",
            journey,
            "\n".join(told),
        )
    console.print(table)
    figures = ", ".join(f"{name} {count}" for name, count in sorted(outcomes.items()))
    after = f" ({deferred_then_upgraded} after a CatalogNotUpdated deferral)" if deferred_then_upgraded else ""
    console.print(
        f"Rollout {ROLLOUT_ID} by its deliveries: {len(tenant.members)} members: {figures}{after}; "
        f"{run.upgrade_calls} upgrade calls to Graph, none for a member already on {VERSION}.",
        markup=False,
    )


async def print_status(console: Console, settings: Settings) -> None:
    """The rollout as ``rollout status ROLLOUT_ID`` prints it, from the ledger; one line without storage."""
    ledger = open_ledger(settings, timeout=READ_TIMEOUT)
    if ledger is None:
        console.print(
            "Rollout status: skipped, the rollout ledger needs a storage account (AzureWebJobsStorage); "
            "`make setup` installs Azurite, with which the demo shows it.",
            markup=False,
        )
        return
    try:
        status = await ledger.status(ROLLOUT_ID)
    except StoreUnavailable as error:
        console.print(f"Rollout status: the ledger could not be read: {error}", markup=False)
        return
    finally:
        await ledger.aclose()
    console.print(
        f"\nThe ledger, as `python -m upgrade_handler rollout status {ROLLOUT_ID}` prints it "
        f"(table {settings.rollout_table} in Azurite):",
        markup=False,
    )
    console.print(render(status))
    if not status.settled:
        verdict = "would go on waiting: not settled"
    elif status.counts.get("deadlettered", 0):
        verdict = "exits 1: settled, with dead letters"
    else:
        verdict = "exits 0: settled, nothing dead-lettered"
    console.print(f"With --json, as a pipeline reads it (--wait {verdict}):", markup=False)
    console.print(json.dumps(status.to_json()), markup=False, highlight=False, soft_wrap=True)


def print_budget(console: Console, settings: Settings, processed: Sequence[Processed]) -> None:
    waits = [
        wait
        for item in processed
        for event in item.events
        if event.name == "upgrade.succeeded" and isinstance(wait := event.get("budget_wait_ms"), int)
    ]
    if waits:
        console.print(
            f"Shared Graph budget (table {settings.budget_table}): each of the {len(waits)} upgrade calls waited for "
            f"its turn first, at most {max(waits)} ms (budget_wait_ms in upgrade.succeeded).",
            markup=False,
        )


def storage_line(settings: Settings, storage: str | None) -> str:
    if storage is None:
        return (
            "Storage: none (Azurite is not installed; `make setup` installs it): the process paces its Graph calls "
            "alone, and no rollout ledger is written."
        )
    return (
        f"Storage: Azurite's Table service on 127.0.0.1 as AzureWebJobsStorage: the Graph budget is shared through "
        f"table {settings.budget_table} and every request's outcome is recorded in table {settings.rollout_table}, "
        "as in Azure."
    )
