"""The broker's queues, with no knowledge of links.

Arrivals (with duplicate detection by message id and scheduled enqueue times), peek-locks and their
expiry, settlement, MaxDeliveryCount dead-lettering, the snapshots tests read, and each message as it
goes out on the wire. Every method expects the caller to hold the broker's lock.
"""

from __future__ import annotations

import heapq
import random
import time
import uuid
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from proton import symbol, timestamp, uint

from .amqp_codec import (
    APPLICATION_PROPERTIES,
    CONTENT_TYPE,
    CORRELATION_ID,
    DELIVERY_ANNOTATIONS,
    HEADER,
    MESSAGE_ANNOTATIONS,
    MESSAGE_ID,
    PROPERTIES,
    SUBJECT,
    Section,
    as_str,
    body_bytes,
    encode_section,
    plain,
    replace_section,
    section_value,
    to_ms,
    utc,
)

DEAD_LETTER_SUFFIX = "/$DeadLetterQueue"

_SEQUENCE_NUMBER = symbol("x-opt-sequence-number")
_ENQUEUED_TIME = symbol("x-opt-enqueued-time")
_LOCKED_UNTIL = symbol("x-opt-locked-until")
_SCHEDULED_TIME = symbol("x-opt-scheduled-enqueue-time")
_DEAD_LETTER_SOURCE = symbol("x-opt-deadletter-source")
_MESSAGE_STATE = symbol("x-opt-message-state")  # 0 active, 1 deferred, 2 scheduled, as Service Bus sends it

DEAD_LETTER_REASON = "DeadLetterReason"
DEAD_LETTER_DESCRIPTION = "DeadLetterErrorDescription"


@dataclass(frozen=True)
class StoredMessage:
    """A read-only snapshot of one message held by the broker (see :meth:`ServiceBusBroker.messages`)."""

    body: bytes
    message_id: str | None
    correlation_id: str | None
    content_type: str | None
    subject: str | None
    application_properties: dict[str, object]
    scheduled_enqueue_time_utc: datetime | None
    enqueued_time_utc: datetime
    sequence_number: int
    delivery_count: int  # deliveries so far, as Service Bus Explorer and .NET show DeliveryCount
    state: str  # "available", "locked", "scheduled" or "deferred"
    dead_letter_reason: str | None
    dead_letter_error_description: str | None


@dataclass(eq=False)
class Entry:
    sections: list[Section]
    sequence_number: int
    enqueued_at: float
    state: str = "available"
    delivery_count: int = 0  # deliveries so far, the one in progress included
    deferred: bool = False  # a deferred message goes back to "deferred", not "available", when unlocked
    lock_token: uuid.UUID | None = None
    locked_until: float = 0.0


@dataclass(eq=False)
class Queue:
    name: str
    entries: dict[int, Entry] = field(default_factory=dict)  # by sequence number, in order
    available: list[int] = field(default_factory=list)  # heap of sequence numbers; stale ones are skipped
    last_sequence_number: int = 0
    accepted_total: int = 0
    seen_message_ids: set[str] | None = None  # set only when duplicate detection is on
    consumers: list[Any] = field(default_factory=list)  # proton Sender links (the SDK's receivers)

    @property
    def is_dead_letter_queue(self) -> bool:
        return self.name.endswith(DEAD_LETTER_SUFFIX)

    def make_available(self, entry: Entry) -> None:
        entry.state = "deferred" if entry.deferred else "available"
        entry.lock_token = None
        if not entry.deferred:
            heapq.heappush(self.available, entry.sequence_number)

    def pop_available(self) -> Entry | None:
        while self.available:
            entry = self.entries.get(heapq.heappop(self.available))
            if entry is not None and entry.state == "available":
                return entry
        return None

    def has_available(self) -> bool:
        while self.available:
            entry = self.entries.get(self.available[0])
            if entry is not None and entry.state == "available":
                return True
            heapq.heappop(self.available)
        return False


@dataclass
class SendFault:
    remaining: int | None
    rate: float
    rng: random.Random
    condition: str

    def strikes(self) -> bool:
        if self.remaining is not None:
            self.remaining -= 1
        return self.rng.random() < self.rate

    @property
    def exhausted(self) -> bool:
        return self.remaining is not None and self.remaining <= 0


class LockLost(Exception):
    pass


class Store:
    def __init__(self, *, max_delivery_count: int, lock_duration: float, duplicate_detection: Iterable[str]):
        self.max_delivery_count = max_delivery_count
        self.lock_duration = lock_duration
        self.duplicate_detection = set(duplicate_detection)
        self.queues: dict[str, Queue] = {}
        self.locks: dict[uuid.UUID, tuple[Queue, Entry]] = {}
        self.schedule: list[tuple[float, int, str]] = []  # heap of (due, sequence number, queue)
        self.faults: dict[str, SendFault] = {}

    def queue(self, name: str) -> Queue:
        queue = self.queues.get(name)
        if queue is None:
            queue = self.queues[name] = Queue(name)
            if name in self.duplicate_detection:
                queue.seen_message_ids = set()
        return queue

    # -- arrivals ---------------------------------------------------------------------------------

    def refuse_send(self, name: str) -> str | None:
        """The error condition to refuse this send with, if a fault is armed for the queue."""
        fault = self.faults.get(name)
        if fault is None:
            return None
        strikes = fault.strikes()
        if fault.exhausted:
            del self.faults[name]
        return fault.condition if strikes else None

    def enqueue(self, queue: Queue, sections: list[Section], now: float) -> Entry | None:
        """Store a message; None when duplicate detection drops it (silently, as Service Bus does)."""
        if queue.seen_message_ids is not None:
            message_id = as_str((section_value(sections, PROPERTIES) or [None])[MESSAGE_ID])
            if message_id is not None:
                if message_id in queue.seen_message_ids:
                    return None
                queue.seen_message_ids.add(message_id)
        queue.last_sequence_number += 1
        queue.accepted_total += 1
        entry = Entry(sections, queue.last_sequence_number, now)
        queue.entries[entry.sequence_number] = entry
        scheduled = (section_value(sections, MESSAGE_ANNOTATIONS) or {}).get(_SCHEDULED_TIME)
        due = int(scheduled) / 1000 if scheduled is not None else now
        if due > now:
            entry.state = "scheduled"
            heapq.heappush(self.schedule, (due, entry.sequence_number, queue.name))
        else:
            queue.make_available(entry)
        return entry

    def activate_due(self, now: float) -> set[str]:
        """Make scheduled messages whose time has come available; returns the queues that changed."""
        changed: set[str] = set()
        while self.schedule and self.schedule[0][0] <= now:
            _, sequence_number, name = heapq.heappop(self.schedule)
            queue = self.queue(name)
            entry = queue.entries.get(sequence_number)
            if entry is not None and entry.state == "scheduled":
                entry.enqueued_at = now
                queue.make_available(entry)
                changed.add(name)
        return changed

    def cancel_scheduled(self, queue: Queue, sequence_numbers: Iterable[int]) -> None:
        for sequence_number in sequence_numbers:
            entry = queue.entries.get(sequence_number)
            if entry is not None and entry.state == "scheduled":
                del queue.entries[sequence_number]

    # -- locks and settlement -------------------------------------------------------------------------

    def lock(self, queue: Queue, entry: Entry, now: float) -> uuid.UUID:
        token = uuid.uuid4()
        entry.state, entry.lock_token, entry.locked_until = "locked", token, now + self.lock_duration
        self.locks[token] = (queue, entry)
        return token

    def locked(self, token: uuid.UUID) -> tuple[Queue, Entry]:
        held = self.locks.get(token)
        # Checked against the clock too, so a lock is lost the moment it expires, not at the next tick.
        if held is None or held[1].locked_until <= time.time():
            raise LockLost(f"The lock {token} has expired or the message was already settled.")
        return held

    def complete(self, token: uuid.UUID) -> None:
        queue, entry = self.locked(token)
        del self.locks[token]
        queue.entries.pop(entry.sequence_number, None)

    def abandon(self, token: uuid.UUID, now: float) -> None:
        queue, entry = self.locked(token)
        del self.locks[token]
        self._unlock(queue, entry, now)

    def release(self, token: uuid.UUID) -> None:
        """The client gave back a message it never handed to the application: not a delivery attempt."""
        queue, entry = self.locked(token)
        del self.locks[token]
        entry.delivery_count = max(0, entry.delivery_count - 1)
        queue.make_available(entry)

    def defer(self, token: uuid.UUID) -> None:
        queue, entry = self.locked(token)
        del self.locks[token]
        entry.deferred = True
        queue.make_available(entry)

    def dead_letter(self, token: uuid.UUID, reason: str | None, description: str | None, now: float) -> None:
        queue, entry = self.locked(token)
        del self.locks[token]
        self._move_to_dead_letter_queue(queue, entry, reason, description, now)

    def renew(self, token: uuid.UUID, now: float) -> float:
        _, entry = self.locked(token)
        entry.locked_until = now + self.lock_duration
        return entry.locked_until

    def expire_locks(self, now: float) -> set[str]:
        expired = [token for token, (_, entry) in self.locks.items() if entry.locked_until <= now]
        changed: set[str] = set()
        for token in expired:
            queue, entry = self.locks.pop(token)
            self._unlock(queue, entry, now)
            changed.add(queue.name)
        return changed

    def _unlock(self, queue: Queue, entry: Entry, now: float) -> None:
        """An attempt failed (abandon or lock expiry): redeliver, or dead-letter once attempts run out."""
        if not queue.is_dead_letter_queue and entry.delivery_count >= self.max_delivery_count:
            description = f"Message could not be consumed after {entry.delivery_count} delivery attempts."
            self._move_to_dead_letter_queue(queue, entry, "MaxDeliveryCountExceeded", description, now)
        else:
            queue.make_available(entry)

    def _move_to_dead_letter_queue(
        self, queue: Queue, entry: Entry, reason: str | None, description: str | None, now: float
    ) -> None:
        queue.entries.pop(entry.sequence_number, None)
        properties = dict(section_value(entry.sections, APPLICATION_PROPERTIES) or {})
        if reason is not None:
            properties[DEAD_LETTER_REASON] = reason
        if description is not None:
            properties[DEAD_LETTER_DESCRIPTION] = description
        annotations = dict(section_value(entry.sections, MESSAGE_ANNOTATIONS) or {})
        annotations[_DEAD_LETTER_SOURCE] = queue.name
        sections = replace_section(entry.sections, APPLICATION_PROPERTIES, properties)
        sections = replace_section(sections, MESSAGE_ANNOTATIONS, annotations)
        dead_letter_queue = self.queue(queue.name + DEAD_LETTER_SUFFIX)
        copy = self.enqueue(dead_letter_queue, sections, now)
        if copy is not None:
            # Service Bus keeps the count, so a DLQ copy shows how many attempts were made.
            copy.delivery_count = entry.delivery_count

    # -- snapshots --------------------------------------------------------------------------------

    def purge(self, name: str | None) -> None:
        names = list(self.queues) if name is None else [name, name + DEAD_LETTER_SUFFIX]
        for queue_name in names:
            queue = self.queues.get(queue_name)
            if queue is not None:
                queue.entries.clear()
                queue.available.clear()
                if queue.seen_message_ids is not None:
                    queue.seen_message_ids.clear()
        self.locks = {t: (q, e) for t, (q, e) in self.locks.items() if q.name not in names}

    def snapshot(self, name: str) -> list[StoredMessage]:
        queue = self.queues.get(name)
        return [] if queue is None else [snapshot(entry) for entry in queue.entries.values()]


def snapshot(entry: Entry) -> StoredMessage:
    properties = section_value(entry.sections, PROPERTIES) or []
    properties = [*properties, *[None] * (13 - len(properties))]
    application_properties = plain(section_value(entry.sections, APPLICATION_PROPERTIES) or {})
    scheduled = (section_value(entry.sections, MESSAGE_ANNOTATIONS) or {}).get(_SCHEDULED_TIME)
    return StoredMessage(
        body=body_bytes(entry.sections),
        message_id=as_str(properties[MESSAGE_ID]),
        correlation_id=as_str(properties[CORRELATION_ID]),
        content_type=as_str(properties[CONTENT_TYPE]),
        subject=as_str(properties[SUBJECT]),
        application_properties=application_properties,
        scheduled_enqueue_time_utc=plain(timestamp(scheduled)) if scheduled is not None else None,
        enqueued_time_utc=utc(entry.enqueued_at),
        sequence_number=entry.sequence_number,
        delivery_count=entry.delivery_count,
        state=entry.state,
        dead_letter_reason=as_str(application_properties.get(DEAD_LETTER_REASON)),
        dead_letter_error_description=as_str(application_properties.get(DEAD_LETTER_DESCRIPTION)),
    )


def wire_message(entry: Entry, *, received: bool, locked_until: float | None = None) -> bytes:
    """The entry as sent to a client: a fresh header and the broker's annotations on the stored bare message.

    ``received``: sent as a delivery (a receive, or a deferred message received by sequence number),
    counted in ``entry.delivery_count`` already; otherwise a peek.
    """
    header = list(section_value(entry.sections, HEADER) or [])
    header += [None] * (5 - len(header))
    # As Service Bus sends it: a delivery carries the deliveries before this one (AMQP's count of
    # failed delivery attempts), 0 on a first delivery; a peek carries the deliveries so far. The .NET
    # SDK, and so the Functions host, adds 1 to a received message's count and nothing to a peeked
    # one's (Azure.Messaging.ServiceBus AmqpMessageConverter); the Python SDK shows the header as is.
    header[4] = uint(max(0, entry.delivery_count - 1) if received else entry.delivery_count)
    annotations = dict(section_value(entry.sections, MESSAGE_ANNOTATIONS) or {})
    annotations[_SEQUENCE_NUMBER] = entry.sequence_number
    annotations[_ENQUEUED_TIME] = to_ms(entry.enqueued_at)
    if locked_until is not None:
        annotations[_LOCKED_UNTIL] = to_ms(locked_until)
    if entry.state in ("deferred", "scheduled"):
        annotations[_MESSAGE_STATE] = 1 if entry.state == "deferred" else 2
    bare = [(k, raw) for k, raw in entry.sections if k not in (HEADER, DELIVERY_ANNOTATIONS, MESSAGE_ANNOTATIONS)]
    return b"".join(
        [encode_section(HEADER, header), encode_section(MESSAGE_ANNOTATIONS, annotations)] + [raw for _, raw in bare]
    )
