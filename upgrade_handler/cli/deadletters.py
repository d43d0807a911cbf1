"""Triage and replay of failed requests (contract §3).

Two places hold them:

- the dead-letter queue ``DEADLETTER_QUEUE_NAME``, where the function sends a copy of each failed
  request with ``DeadLetterReason``, ``GraphErrorCode`` and the other properties of contract §3;
- the upgrade queue's own ``$DeadLetterQueue``, where Service Bus itself moves a message that hit
  the queue's delivery limit (``MaxDeliveryCountExceeded``) or expired.

``list`` and ``show`` only peek: nothing is locked or changed. ``replay`` peeks to choose, then
receives each chosen dead letter in peek-lock, sends a copy to the upgrade queue and only then
completes the dead letter; if the send fails the dead letter is abandoned and stays.

The replayed copy is a plain resend: the original body, content type, correlation id and
application properties, without the failure properties and the retry bookkeeping (so it starts
with a fresh attempt budget), plus ``ReplayOf`` (the first message id) and ``ReplayCount``. Its
message id is ``{ReplayOf}:replay:{ReplayCount}``: new, because the original id may still be in the
upgrade queue's duplicate-detection window, and deterministic, so a replay that crashed between
the send and the completion and is run again is dropped by duplicate detection instead of
upgrading twice.
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from enum import Enum
from typing import Any

from azure.servicebus import ServiceBusMessage, ServiceBusReceivedMessage
from azure.servicebus.exceptions import ServiceBusError
from rich.console import Console
from rich.table import Table

from ..delivery import Delivery
from ..settings import Settings
from ..settlement import BOOKKEEPING, carry_property
from .bus import Bus
from .output import describe_request, plain, shorten

#: Set by the function (or Service Bus) when a message fails; never carried onto a replay.
FAILURE_PROPERTIES = frozenset(
    {
        "DeadLetterReason",
        "DeadLetterErrorDescription",
        "FailedAtUtc",
        "OriginalDeliveryCount",
        "DeadLetterPropertiesDropped",
    }
)
#: Added to a replayed copy: the first message id of the request, and how many replays so far.
REPLAY_OF = "ReplayOf"
REPLAY_COUNT = "ReplayCount"
_MAX_MESSAGE_ID = 128
#: Messages received per round while replaying.
REPLAY_BATCH = 50


def is_dropped_on_replay(name: str) -> bool:
    """Failure properties (``DeadLetter*``, ``FailedAtUtc``, ``Graph*``, ...) and retry bookkeeping."""
    return name in FAILURE_PROPERTIES or name in BOOKKEEPING or name.startswith("Graph")


class Source(Enum):
    """Where dead letters are read from."""

    DEADLETTER_QUEUE = "deadletter-queue"
    UPGRADE_QUEUE_DLQ = "upgrade-queue-dlq"


@dataclass(frozen=True, slots=True)
class Place:
    source: Source
    queue: str
    sub_queue: bool

    @property
    def name(self) -> str:
        return f"{self.queue}/$DeadLetterQueue" if self.sub_queue else self.queue


def places(settings: Settings, sources: Iterable[Source]) -> list[Place]:
    where = {
        Source.DEADLETTER_QUEUE: Place(Source.DEADLETTER_QUEUE, settings.deadletter_queue, False),
        Source.UPGRADE_QUEUE_DLQ: Place(Source.UPGRADE_QUEUE_DLQ, settings.upgrade_queue, True),
    }
    return [where[source] for source in sources]


@dataclass(frozen=True, slots=True)
class DeadLetter:
    """One dead-lettered request, as peeked or received."""

    place: Place
    message: ServiceBusReceivedMessage
    delivery: Delivery

    @classmethod
    def of(cls, place: Place, message: ServiceBusReceivedMessage) -> DeadLetter:
        return cls(place, message, Delivery.from_received_message(message))

    @property
    def properties(self) -> Mapping[str, Any]:
        return self.delivery.application_properties

    @property
    def message_id(self) -> str:
        return self.delivery.message_id

    @property
    def sequence_number(self) -> int:
        return int(self.message.sequence_number or 0)

    @property
    def reason(self) -> str:
        return plain(self.properties.get("DeadLetterReason") or self.message.dead_letter_reason) or "(none)"

    @property
    def description(self) -> str:
        return plain(self.properties.get("DeadLetterErrorDescription") or self.message.dead_letter_error_description)

    @property
    def graph_code(self) -> str:
        return plain(self.properties.get("GraphErrorCode"))

    @property
    def graph(self) -> str:
        """``403 Forbidden``: Graph's status and code, as far as the dead letter knows them."""
        status, code = self.properties.get("GraphStatus"), self.properties.get("GraphErrorCode")
        return " ".join(plain(part) for part in (status, code) if part is not None)

    @property
    def attempts(self) -> str:
        return plain(self.properties.get("UpgradeAttempts"))

    @property
    def failed_at(self) -> datetime | None:
        """``FailedAtUtc``, or when Service Bus enqueued the dead letter."""
        text = self.properties.get("FailedAtUtc")
        if isinstance(text, str):
            try:
                return datetime.fromisoformat(text.replace("Z", "+00:00"))
            except ValueError:
                pass
        enqueued = self.delivery.enqueued_time_utc
        return enqueued

    @property
    def request(self) -> str:
        return describe_request(self.delivery.body)


@dataclass(frozen=True, slots=True)
class Filters:
    """Which dead letters a command acts on; empty fields match everything."""

    reasons: tuple[str, ...] = ()
    graph_codes: tuple[str, ...] = ()
    message_ids: tuple[str, ...] = ()
    older_than: timedelta | None = None
    newer_than: timedelta | None = None
    limit: int | None = None
    now: datetime = field(default_factory=lambda: datetime.now(UTC))

    @property
    def narrows(self) -> bool:
        """Whether anything beyond ``limit`` was asked for."""
        return bool(self.reasons or self.graph_codes or self.message_ids or self.older_than or self.newer_than)

    def matches(self, letter: DeadLetter) -> bool:
        if self.reasons and letter.reason.lower() not in {r.lower() for r in self.reasons}:
            return False
        if self.graph_codes and letter.graph_code.lower() not in {c.lower() for c in self.graph_codes}:
            return False
        if self.message_ids and not {letter.message_id, plain(letter.properties.get("OriginalMessageId"))} & set(
            self.message_ids
        ):
            return False
        if self.older_than is not None or self.newer_than is not None:
            failed = letter.failed_at
            if failed is None:
                return False
            age = self.now - failed
            if self.older_than is not None and age < self.older_than:
                return False
            if self.newer_than is not None and age > self.newer_than:
                return False
        return True


async def collect(bus: Bus, where: Sequence[Place], filters: Filters) -> list[DeadLetter]:
    """The matching dead letters of every place, peeked (nothing is locked), at most ``filters.limit``."""
    found: list[DeadLetter] = []
    for place in where:
        async for message in bus.peek_all(place.queue, dead_letter_sub_queue=place.sub_queue):
            letter = DeadLetter.of(place, message)
            if filters.matches(letter):
                found.append(letter)
                if filters.limit is not None and len(found) >= filters.limit:
                    return found
    return found


# --- replay ------------------------------------------------------------------------------------


def replay_message_id(letter: DeadLetter) -> str:
    first = replay_of(letter)
    suffix = f":replay:{replay_count(letter) + 1}"
    if len(first) + len(suffix) <= _MAX_MESSAGE_ID:
        return first + suffix
    digest = hashlib.sha256(first.encode()).hexdigest()[:12]
    return f"{first[: _MAX_MESSAGE_ID - len(suffix) - len(digest) - 1]}~{digest}{suffix}"


def replay_of(letter: DeadLetter) -> str:
    """The message id the request first had: carried by earlier replays and retry copies."""
    for key in (REPLAY_OF, "OriginalMessageId"):
        value = letter.properties.get(key)
        if isinstance(value, str) and value:
            return value
    return letter.message_id


def replay_count(letter: DeadLetter) -> int:
    value = letter.properties.get(REPLAY_COUNT)
    if isinstance(value, str) and value.isdigit():
        return int(value)
    return value if isinstance(value, int) and value >= 0 else 0


def replay_message(letter: DeadLetter) -> ServiceBusMessage:
    """The original request again: body, content type, correlation id, subject and properties."""
    delivery = letter.delivery
    properties = {
        key: carry_property(value) for key, value in letter.properties.items() if not is_dropped_on_replay(key)
    }
    properties[REPLAY_OF] = replay_of(letter)
    properties[REPLAY_COUNT] = replay_count(letter) + 1
    # The function's dead letter has the reason as its subject; a Service Bus dead letter keeps the original's.
    subject = delivery.subject if delivery.subject and delivery.subject != letter.reason else None
    return ServiceBusMessage(
        delivery.body,
        message_id=replay_message_id(letter),
        content_type=delivery.content_type,
        correlation_id=delivery.correlation_id,
        subject=subject,
        application_properties={k: v for k, v in properties.items() if v is not None},
    )


@dataclass(slots=True)
class ReplayResult:
    selected: list[DeadLetter] = field(default_factory=list)
    replayed: list[tuple[DeadLetter, str]] = field(default_factory=list)
    failed: list[tuple[DeadLetter, str]] = field(default_factory=list)
    skipped_on_the_way: int = 0
    """Non-matching dead letters received (and abandoned at once) on the way to the chosen ones."""


async def replay(
    bus: Bus,
    settings: Settings,
    where: Sequence[Place],
    filters: Filters,
    *,
    dry_run: bool = False,
    on_replayed: Callable[[DeadLetter, str], None] | None = None,
) -> ReplayResult:
    """Resend the matching dead letters to the upgrade queue, removing each only after its copy was sent."""
    result = ReplayResult(selected=await collect(bus, where, filters))
    if dry_run or not result.selected:
        return result
    for place in where:
        chosen = {letter.sequence_number for letter in result.selected if letter.place == place}
        if chosen:
            await _replay_from(bus, settings, place, chosen, result, on_replayed)
    return result


async def _replay_from(
    bus: Bus,
    settings: Settings,
    place: Place,
    chosen: set[int],
    result: ReplayResult,
    on_replayed: Callable[[DeadLetter, str], None] | None,
) -> None:
    receiver = await bus.receiver(place.queue, dead_letter_sub_queue=place.sub_queue)
    remaining, last = set(chosen), max(chosen)
    while remaining:
        messages = await receiver.receive_messages(max_message_count=min(REPLAY_BATCH, len(remaining)), max_wait_time=2)
        if not messages:
            break  # the rest is gone, or locked by someone else
        letters = [DeadLetter.of(place, message) for message in messages]
        wanted = [letter for letter in letters if letter.sequence_number in remaining]
        for letter in letters:
            if letter.sequence_number not in remaining:
                result.skipped_on_the_way += 1
                await receiver.abandon_message(letter.message)
        if not wanted:
            if all(letter.sequence_number > last for letter in letters):
                break
            continue
        copies = [replay_message(letter) for letter in wanted]
        try:
            await bus.send(settings.upgrade_queue, copies)
        except ServiceBusError as error:
            for letter in wanted:
                result.failed.append((letter, f"send failed: {error}"))
                await receiver.abandon_message(letter.message)
            return
        for letter, copy in zip(wanted, copies, strict=True):
            remaining.discard(letter.sequence_number)
            try:
                await receiver.complete_message(letter.message)
            except ServiceBusError as error:
                # The copy is on the upgrade queue; the dead letter comes back and a rerun's copy
                # (same id) is dropped by duplicate detection.
                result.failed.append((letter, f"sent as {copy.message_id}, but not removed: {error}"))
                continue
            result.replayed.append((letter, str(copy.message_id)))
            if on_replayed is not None:
                on_replayed(letter, str(copy.message_id))


# --- what the commands print -------------------------------------------------------------------


def _when(moment: datetime | None) -> str:
    return moment.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%SZ") if moment else ""


def summary_table(letters: Sequence[DeadLetter], where: Sequence[Place]) -> Table:
    """Counts per queue, ``DeadLetterReason`` and Graph error, with the oldest and newest failure."""
    table = Table(title="Dead letters by reason and Graph error", title_justify="left")
    for column in ("queue", "DeadLetterReason", "Graph error", "count", "oldest failure", "newest failure"):
        table.add_column(column, justify="right" if column == "count" else "left")
    groups: dict[tuple[str, str, str], list[DeadLetter]] = {}
    for letter in letters:
        groups.setdefault((letter.place.name, letter.reason, letter.graph), []).append(letter)
    counts = Counter(letter.place.name for letter in letters)
    for place in where:
        if not counts[place.name]:
            table.add_row(place.name, "(empty)", "", "0", "", "")
    for (queue, reason, graph), members in sorted(groups.items(), key=lambda item: (item[0][0], -len(item[1]))):
        times = [m.failed_at for m in members if m.failed_at is not None]
        table.add_row(
            queue,
            reason,
            graph or "-",
            str(len(members)),
            _when(min(times)) if times else "",
            _when(max(times)) if times else "",
        )
    return table


def message_table(letters: Sequence[DeadLetter], *, title: str = "Dead letters") -> Table:
    table = Table(title=title, title_justify="left")
    for column in ("message id", "queue", "reason", "Graph", "attempts", "failed at", "request"):
        table.add_column(column, overflow="fold")
    for letter in letters:
        table.add_row(
            letter.message_id,
            "$DeadLetterQueue" if letter.place.sub_queue else "dead-letter queue",
            letter.reason,
            letter.graph or "-",
            letter.attempts or "-",
            _when(letter.failed_at),
            shorten(letter.request, 60),
        )
    return table


def print_letter(console: Console, letter: DeadLetter) -> None:
    """Everything about one dead letter: why, Graph's answer, what a replay would send, the body."""
    delivery = letter.delivery
    console.print(f"Dead letter {letter.message_id} in {letter.place.name} (sequence number {letter.sequence_number})")
    facts = Table.grid(padding=(0, 2))
    facts.add_column(style="bold")
    facts.add_column(overflow="fold")
    rows = [
        ("reason", letter.reason),
        ("description", letter.description),
        ("failed at", _when(letter.failed_at)),
        ("attempts", letter.attempts),
        ("Graph", letter.graph),
        ("Graph message", plain(letter.properties.get("GraphErrorMessage"))),
        ("Graph inner code", plain(letter.properties.get("GraphInnerErrorCode"))),
        ("Graph request-id", plain(letter.properties.get("GraphRequestId"))),
        ("client-request-id", plain(letter.properties.get("GraphClientRequestId"))),
        ("Graph date", plain(letter.properties.get("GraphDate"))),
        ("request", letter.request),
        ("content type", plain(delivery.content_type)),
        ("correlation id", plain(delivery.correlation_id)),
        ("subject", plain(delivery.subject)),
        ("delivery count", plain(letter.message.delivery_count)),
    ]
    for name, value in rows:
        if value:
            facts.add_row(name, value)
    console.print(facts)
    properties = Table(title="Application properties", title_justify="left")
    properties.add_column("name")
    properties.add_column("value", overflow="fold")
    properties.add_column("on replay")
    for name, value in sorted(letter.properties.items()):
        if name == "GraphError":
            continue
        kept = "dropped" if is_dropped_on_replay(name) else "kept"
        properties.add_row(name, shorten(plain(value), 200), kept)
    console.print(properties)
    console.print("Body:")
    console.print(_pretty(delivery.body), markup=False)
    raw_error = letter.properties.get("GraphError")
    if raw_error:
        console.print("Graph error (GraphError):")
        console.print(_pretty(plain(raw_error).encode()), markup=False)
    console.print(
        f"Replay it with: python -m upgrade_handler deadletters replay --id {letter.message_id}", markup=False
    )


def _pretty(raw: bytes) -> str:
    try:
        return json.dumps(json.loads(raw.decode("utf-8-sig")), indent=2, ensure_ascii=False)
    except (UnicodeDecodeError, ValueError):
        return raw.decode("utf-8", errors="replace")


# --- the commands ------------------------------------------------------------------------------


def sources_of(args: Any) -> list[Source]:
    choice = getattr(args, "source", "both")
    if choice == "both":
        return [Source.DEADLETTER_QUEUE, Source.UPGRADE_QUEUE_DLQ]
    return [Source(choice)]


def filters_of(args: Any) -> Filters:
    return Filters(
        reasons=tuple(getattr(args, "reason", None) or ()),
        graph_codes=tuple(getattr(args, "graph_code", None) or ()),
        message_ids=tuple(getattr(args, "id", None) or ()),
        older_than=getattr(args, "older_than", None),
        newer_than=getattr(args, "newer_than", None),
        limit=getattr(args, "limit", None),
    )


async def run_list(args: Any, console: Console, settings: Settings, bus: Bus) -> int:
    where = places(settings, sources_of(args))
    filters = filters_of(args)
    letters = await collect(bus, where, Filters(**{**_fields(filters), "limit": None}))
    console.print(summary_table(letters, where))
    shown = letters[: filters.limit] if filters.limit is not None else letters
    if shown:
        console.print(message_table(shown))
        if len(shown) < len(letters):
            console.print(f"... {len(letters) - len(shown)} more (raise --limit to see them).")
        console.print(
            "Details of one: deadletters show MESSAGE_ID. Send them again: deadletters replay --reason ... "
            "(try --dry-run first).",
            markup=False,
        )
    return 0


def _fields(filters: Filters) -> dict[str, Any]:
    return {name: getattr(filters, name) for name in Filters.__dataclass_fields__}


async def run_show(args: Any, console: Console, settings: Settings, bus: Bus) -> int:
    where = places(settings, sources_of(args))
    letters = await collect(bus, where, Filters(message_ids=(args.message_id,)))
    if not letters:
        names = " or ".join(place.name for place in where)
        console.print(f"No dead letter with message id {args.message_id} in {names}.", markup=False)
        return 1
    for letter in letters:
        print_letter(console, letter)
    return 0


async def run_replay(args: Any, console: Console, settings: Settings, bus: Bus) -> int:
    filters = filters_of(args)
    if not filters.narrows and not args.all:
        console.print(
            "Name what to replay (--reason, --graph-code, --id, --older-than, --newer-than), "
            "or pass --all to replay every dead letter.",
            markup=False,
        )
        return 2
    where = places(settings, sources_of(args))
    result = await replay(bus, settings, where, filters, dry_run=args.dry_run)
    if not result.selected:
        console.print("No dead letter matches; nothing replayed.")
        return 0
    if args.dry_run:
        console.print(message_table(result.selected, title="Would replay (dry run: nothing sent, nothing removed)"))
        return 0
    table = Table(title=f"Replayed to {settings.upgrade_queue}", title_justify="left")
    for column in ("dead letter", "reason", "new message id", "request"):
        table.add_column(column, overflow="fold")
    for letter, new_id in result.replayed:
        table.add_row(letter.message_id, letter.reason, new_id, shorten(letter.request, 60))
    console.print(table)
    for letter, why in result.failed:
        console.print(f"Not replayed: {letter.message_id}: {why}", markup=False)
    missing = len(result.selected) - len(result.replayed) - len(result.failed)
    console.print(
        f"Replayed {len(result.replayed)} of {len(result.selected)} selected; each dead letter was removed "
        "after its copy was sent."
        + (f" {missing} were gone or locked by someone else." if missing else "")
        + (
            f" {result.skipped_on_the_way} other dead letters were received on the way and put back."
            if result.skipped_on_the_way
            else ""
        ),
        markup=False,
    )
    return 1 if result.failed else 0
