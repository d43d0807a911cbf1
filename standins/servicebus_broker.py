"""A small in-process AMQP 1.0 broker that the real ``azure-servicebus`` SDK accepts as Azure Service Bus.

There is no Service Bus emulator on the machines this project is tested on (the official one needs
Docker), and no ready-made broker answers the Service Bus specific parts of the protocol. This module
is one, written on ``python-qpid-proton``. Point the SDK at it with :attr:`ServiceBusBroker.connection_string`
(``UseDevelopmentEmulator=true`` makes the SDK speak plain AMQP to the custom port on 127.0.0.1).

What it emulates, as the SDK (7.15, sync and async) sees it:

* SASL ANONYMOUS and the CBS ``put-token`` exchange (any token is accepted);
* queues, created on first use, each with a ``<queue>/$DeadLetterQueue`` sub-queue;
* sends of single messages, lists and batches (the 0x80013700 batch format is unpacked);
* receive in peek-lock (lock token = 16-byte delivery tag) and in receive-and-delete;
* complete, abandon, defer and dead-letter, on the receive link and over ``$management``
  (``update-disposition``), with the outcome echoed back as Service Bus does;
* lock expiry and MaxDeliveryCount dead-lettering (``MaxDeliveryCountExceeded``);
* ``$management``: peek, schedule, cancel-scheduled, renew-lock, receive-by-sequence-number
  (deferred messages), update-disposition; and scheduled messages sent with
  ``x-opt-scheduled-enqueue-time``;
* optional duplicate detection by message id, per queue;
* fault injection for tests: :meth:`ServiceBusBroker.fail_sends`.

What it does not emulate: TLS and real authentication (any token passes), topics, subscriptions and
rules, sessions, transactions, message TTL and expiry, size quotas, the duplicate-detection time window
(ids are remembered until :meth:`ServiceBusBroker.purge`), the HTTP administration API and missing-entity
errors (every address is a queue), partitioning, and Service Bus's sequence-number layout (numbers here
count up per queue, the dead-letter queue having its own). Locks are not tied to links: a lock outlives
the link or connection that took it and ends only by settlement or expiry.

Two deliberate differences on the wire: the header's delivery-count is the number of deliveries
including the current one (Service Bus sends one less and lets .NET and Java add one; the Python SDK
shows the raw value, so this makes it show 1 on a first receive), and a batch is recognised by its shape
(see :func:`_unpack_batch`), so a single message whose body is itself an encoded AMQP message would be
taken for a batch.
"""

from __future__ import annotations

import functools
import heapq
import logging
import os
import random
import threading
import time
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Self, cast
from urllib.parse import urlsplit

from proton import (
    UNDESCRIBED,
    Array,
    Condition,
    Data,
    Delivery,
    Described,
    Endpoint,
    Handler,
    Link,
    Message,
    symbol,
    timestamp,
    uint,
    ulong,
)
from proton.reactor import ApplicationEvent, Container, EventInjector

__all__ = ["ServiceBusBroker", "StoredMessage"]

log = logging.getLogger(__name__)

DEAD_LETTER_SUFFIX = "/$DeadLetterQueue"
_MANAGEMENT_SUFFIX = "/$management"
_CBS_NODE = "$cbs"

# AMQP 1.0 message section descriptors.
_HEADER = 0x70
_DELIVERY_ANNOTATIONS = 0x71
_MESSAGE_ANNOTATIONS = 0x72
_PROPERTIES = 0x73
_APPLICATION_PROPERTIES = 0x74
_DATA = 0x75
_AMQP_SEQUENCE = 0x76
_AMQP_VALUE = 0x77
_FOOTER = 0x78
_BODY_SECTIONS = (_DATA, _AMQP_SEQUENCE, _AMQP_VALUE)

# Properties section field positions.
_MESSAGE_ID, _SUBJECT, _CORRELATION_ID, _CONTENT_TYPE = 0, 3, 5, 6

_SEQUENCE_NUMBER = symbol("x-opt-sequence-number")
_ENQUEUED_TIME = symbol("x-opt-enqueued-time")
_LOCKED_UNTIL = symbol("x-opt-locked-until")
_SCHEDULED_TIME = symbol("x-opt-scheduled-enqueue-time")
_DEAD_LETTER_SOURCE = symbol("x-opt-deadletter-source")
_MESSAGE_STATE = symbol("x-opt-message-state")  # 0 active, 1 deferred, 2 scheduled, as Service Bus sends it

DEAD_LETTER_REASON = "DeadLetterReason"
DEAD_LETTER_DESCRIPTION = "DeadLetterErrorDescription"
_LOCK_LOST = "com.microsoft:message-lock-lost"
_MESSAGE_NOT_FOUND = "com.microsoft:message-not-found"

_TICK_SECONDS = 0.05  # granularity of lock expiry and scheduled delivery
_RECEIVE_CREDIT = 500  # credit granted to each sending client; topped up as transfers arrive

Section = tuple[int, bytes]  # (descriptor, encoded section)


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
    delivery_count: int
    state: str  # "available", "locked", "scheduled" or "deferred"
    dead_letter_reason: str | None
    dead_letter_error_description: str | None


# --------------------------------------------------------------------------------------------------
# Encoding helpers. Messages are kept as their encoded sections, so whatever the SDK encoded (int32 vs
# int64, timestamps, symbols) goes back out byte for byte; only header and annotations are rewritten.
# --------------------------------------------------------------------------------------------------


def _own(value: Any) -> Any:
    """Deep-copy proton's memoryviews, which point into buffers proton reuses for the next frame."""
    if isinstance(value, memoryview | bytearray):
        return bytes(value)
    if isinstance(value, Described):
        return Described(value.descriptor, _own(value.value))
    if isinstance(value, dict):
        return {_own(k): _own(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_own(v) for v in value]
    if isinstance(value, Array):
        return Array(value.descriptor, value.type, *(_own(v) for v in value.elements))
    return value


def _decode_one(raw: bytes) -> tuple[Any, int]:
    """The first AMQP value encoded in ``raw`` and how many bytes it took."""
    data = Data()
    consumed = data.decode(raw)
    data.rewind()
    data.next()
    # Copied while ``data`` is alive: its binaries are memoryviews into memory freed along with it.
    return _own(data.get_object()), consumed


def _split_sections(raw: bytes) -> list[Section]:
    """Split an encoded message into its sections; raises if ``raw`` is not a sequence of sections."""
    sections: list[Section] = []
    offset = 0
    while offset < len(raw):
        described, consumed = _decode_one(raw[offset:])
        if not isinstance(described, Described):
            raise ValueError("not a message section")
        descriptor = int(cast(int, described.descriptor))
        if not _HEADER <= descriptor <= _FOOTER:
            raise ValueError(f"unknown section descriptor {descriptor:#x}")
        sections.append((descriptor, raw[offset : offset + consumed]))
        offset += consumed
    return sections


def _section_value(sections: list[Section], descriptor: int) -> Any:
    for kind, raw in sections:
        if kind == descriptor:
            return _decode_one(raw)[0].value
    return None


def _encode_section(descriptor: int, value: Any) -> bytes:
    data = Data()
    data.put_object(Described(ulong(descriptor), value))
    return bytes(data.encode())


def _replace_section(sections: list[Section], descriptor: int, value: Any) -> list[Section]:
    """Return ``sections`` with the ``descriptor`` section set to ``value``, keeping AMQP section order."""
    kept = [s for s in sections if s[0] != descriptor]
    new = (descriptor, _encode_section(descriptor, value))
    position = next((i for i, (kind, _) in enumerate(kept) if kind > descriptor), len(kept))
    return [*kept[:position], new, *kept[position:]]


def _unpack_batch(sections: list[Section]) -> list[list[Section]] | None:
    """The messages inside a batch transfer, or None if ``sections`` is an ordinary message.

    proton does not expose the transfer's message-format (0x80013700 for batches), so a batch is
    recognised by its shape: a body of data sections that each decode as a whole message.
    """
    bodies = [raw for kind, raw in sections if kind in _BODY_SECTIONS]
    if not bodies or any(kind in (_AMQP_VALUE, _AMQP_SEQUENCE) for kind, _ in sections):
        return None
    messages: list[list[Section]] = []
    for raw in bodies:
        payload = _section_value([(_DATA, raw)], _DATA)
        if not isinstance(payload, bytes) or not payload.startswith(b"\x00S"):
            return None
        try:
            inner = _split_sections(payload)
        except Exception:
            return None
        if not any(kind in _BODY_SECTIONS for kind, _ in inner):
            return None
        messages.append(inner)
    return messages


def _plain(value: Any) -> Any:
    """proton's typed values as plain Python values, for snapshots."""
    if isinstance(value, timestamp):
        return datetime.fromtimestamp(int(value) / 1000, UTC)
    if isinstance(value, bool | None):
        return value
    if isinstance(value, str):
        return str(value)
    if isinstance(value, int):
        return int(value)
    if isinstance(value, float):
        return float(value)
    if isinstance(value, dict):
        return {_plain(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    return value


def _body_bytes(sections: list[Section]) -> bytes:
    parts: list[bytes] = []
    for kind, raw in sections:
        if kind not in _BODY_SECTIONS:
            continue
        value = _section_value([(kind, raw)], kind)
        if isinstance(value, bytes):
            parts.append(value)
        elif isinstance(value, str):
            parts.append(value.encode())
        else:
            parts.append(repr(_plain(value)).encode())
    return b"".join(parts)


def _as_str(value: Any) -> str | None:
    if value is None:
        return None
    if isinstance(value, bytes):
        return value.decode(errors="replace")
    return str(value)


def _to_ms(seconds: float) -> timestamp:
    return timestamp(round(seconds * 1000))


def _utc(seconds: float) -> datetime:
    return datetime.fromtimestamp(seconds, UTC)


def _entity_of(address: str | None) -> str:
    """``amqps://host:port/q/$DeadLetterQueue`` -> ``q/$DeadLetterQueue``; plain names pass through."""
    address = address or ""
    if "://" in address:
        address = urlsplit(address).path
    return address.strip("/")


# --------------------------------------------------------------------------------------------------
# The store: queues, locks and schedules, with no knowledge of links. Callers hold the broker's lock.
# --------------------------------------------------------------------------------------------------


@dataclass(eq=False)
class _Entry:
    sections: list[Section]
    sequence_number: int
    enqueued_at: float
    state: str = "available"
    delivery_count: int = 0
    deferred: bool = False  # a deferred message goes back to "deferred", not "available", when unlocked
    lock_token: uuid.UUID | None = None
    locked_until: float = 0.0


@dataclass(eq=False)
class _Queue:
    name: str
    entries: dict[int, _Entry] = field(default_factory=dict)  # by sequence number, in order
    available: list[int] = field(default_factory=list)  # heap of sequence numbers; stale ones are skipped
    last_sequence_number: int = 0
    accepted_total: int = 0
    seen_message_ids: set[str] | None = None  # set only when duplicate detection is on
    consumers: list[Any] = field(default_factory=list)  # proton Sender links (the SDK's receivers)

    @property
    def is_dead_letter_queue(self) -> bool:
        return self.name.endswith(DEAD_LETTER_SUFFIX)

    def make_available(self, entry: _Entry) -> None:
        entry.state = "deferred" if entry.deferred else "available"
        entry.lock_token = None
        if not entry.deferred:
            heapq.heappush(self.available, entry.sequence_number)

    def pop_available(self) -> _Entry | None:
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
class _SendFault:
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


class _LockLost(Exception):
    pass


class _MgmtError(Exception):
    def __init__(self, status: int, condition: str, description: str) -> None:
        super().__init__(description)
        self.status, self.condition, self.description = status, condition, description


class _Store:
    def __init__(self, *, max_delivery_count: int, lock_duration: float, duplicate_detection: Iterable[str]):
        self.max_delivery_count = max_delivery_count
        self.lock_duration = lock_duration
        self.duplicate_detection = set(duplicate_detection)
        self.queues: dict[str, _Queue] = {}
        self.locks: dict[uuid.UUID, tuple[_Queue, _Entry]] = {}
        self.schedule: list[tuple[float, int, str]] = []  # heap of (due, sequence number, queue)
        self.faults: dict[str, _SendFault] = {}

    def queue(self, name: str) -> _Queue:
        queue = self.queues.get(name)
        if queue is None:
            queue = self.queues[name] = _Queue(name)
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

    def enqueue(self, queue: _Queue, sections: list[Section], now: float) -> _Entry | None:
        """Store a message; None when duplicate detection drops it (silently, as Service Bus does)."""
        if queue.seen_message_ids is not None:
            message_id = _as_str((_section_value(sections, _PROPERTIES) or [None])[_MESSAGE_ID])
            if message_id is not None:
                if message_id in queue.seen_message_ids:
                    return None
                queue.seen_message_ids.add(message_id)
        queue.last_sequence_number += 1
        queue.accepted_total += 1
        entry = _Entry(sections, queue.last_sequence_number, now)
        queue.entries[entry.sequence_number] = entry
        scheduled = (_section_value(sections, _MESSAGE_ANNOTATIONS) or {}).get(_SCHEDULED_TIME)
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

    def cancel_scheduled(self, queue: _Queue, sequence_numbers: Iterable[int]) -> None:
        for sequence_number in sequence_numbers:
            entry = queue.entries.get(sequence_number)
            if entry is not None and entry.state == "scheduled":
                del queue.entries[sequence_number]

    # -- locks and settlement -------------------------------------------------------------------------

    def lock(self, queue: _Queue, entry: _Entry, now: float) -> uuid.UUID:
        token = uuid.uuid4()
        entry.state, entry.lock_token, entry.locked_until = "locked", token, now + self.lock_duration
        self.locks[token] = (queue, entry)
        return token

    def locked(self, token: uuid.UUID) -> tuple[_Queue, _Entry]:
        held = self.locks.get(token)
        # Checked against the clock too, so a lock is lost the moment it expires, not at the next tick.
        if held is None or held[1].locked_until <= time.time():
            raise _LockLost(f"The lock {token} has expired or the message was already settled.")
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

    def _unlock(self, queue: _Queue, entry: _Entry, now: float) -> None:
        """An attempt failed (abandon or lock expiry): redeliver, or dead-letter once attempts run out."""
        if not queue.is_dead_letter_queue and entry.delivery_count >= self.max_delivery_count:
            description = f"Message could not be consumed after {entry.delivery_count} delivery attempts."
            self._move_to_dead_letter_queue(queue, entry, "MaxDeliveryCountExceeded", description, now)
        else:
            queue.make_available(entry)

    def _move_to_dead_letter_queue(
        self, queue: _Queue, entry: _Entry, reason: str | None, description: str | None, now: float
    ) -> None:
        queue.entries.pop(entry.sequence_number, None)
        properties = dict(_section_value(entry.sections, _APPLICATION_PROPERTIES) or {})
        if reason is not None:
            properties[DEAD_LETTER_REASON] = reason
        if description is not None:
            properties[DEAD_LETTER_DESCRIPTION] = description
        annotations = dict(_section_value(entry.sections, _MESSAGE_ANNOTATIONS) or {})
        annotations[_DEAD_LETTER_SOURCE] = queue.name
        sections = _replace_section(entry.sections, _APPLICATION_PROPERTIES, properties)
        sections = _replace_section(sections, _MESSAGE_ANNOTATIONS, annotations)
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
        return [] if queue is None else [_snapshot(entry) for entry in queue.entries.values()]


def _snapshot(entry: _Entry) -> StoredMessage:
    properties = _section_value(entry.sections, _PROPERTIES) or []
    properties = [*properties, *[None] * (13 - len(properties))]
    application_properties = _plain(_section_value(entry.sections, _APPLICATION_PROPERTIES) or {})
    scheduled = (_section_value(entry.sections, _MESSAGE_ANNOTATIONS) or {}).get(_SCHEDULED_TIME)
    return StoredMessage(
        body=_body_bytes(entry.sections),
        message_id=_as_str(properties[_MESSAGE_ID]),
        correlation_id=_as_str(properties[_CORRELATION_ID]),
        content_type=_as_str(properties[_CONTENT_TYPE]),
        subject=_as_str(properties[_SUBJECT]),
        application_properties=application_properties,
        scheduled_enqueue_time_utc=_plain(timestamp(scheduled)) if scheduled is not None else None,
        enqueued_time_utc=_utc(entry.enqueued_at),
        sequence_number=entry.sequence_number,
        delivery_count=entry.delivery_count,
        state=entry.state,
        dead_letter_reason=_as_str(application_properties.get(DEAD_LETTER_REASON)),
        dead_letter_error_description=_as_str(application_properties.get(DEAD_LETTER_DESCRIPTION)),
    )


def _wire_message(entry: _Entry, *, locked_until: float | None = None) -> bytes:
    """The entry as sent to a client: a fresh header and the broker's annotations on the stored bare message."""
    header = list(_section_value(entry.sections, _HEADER) or [])
    header += [None] * (5 - len(header))
    # The header carries the attempts including this one, so the Python SDK (which shows the header as
    # is) reports 1 on the first receive and 2 after one abandon, like DeliveryCount in .NET and Java.
    # Service Bus itself sends attempts - 1 here and lets .NET and Java add the 1.
    header[4] = uint(entry.delivery_count)
    annotations = dict(_section_value(entry.sections, _MESSAGE_ANNOTATIONS) or {})
    annotations[_SEQUENCE_NUMBER] = entry.sequence_number
    annotations[_ENQUEUED_TIME] = _to_ms(entry.enqueued_at)
    if locked_until is not None:
        annotations[_LOCKED_UNTIL] = _to_ms(locked_until)
    if entry.state in ("deferred", "scheduled"):
        annotations[_MESSAGE_STATE] = 1 if entry.state == "deferred" else 2
    bare = [(k, raw) for k, raw in entry.sections if k not in (_HEADER, _DELIVERY_ANNOTATIONS, _MESSAGE_ANNOTATIONS)]
    return b"".join(
        [_encode_section(_HEADER, header), _encode_section(_MESSAGE_ANNOTATIONS, annotations)]
        + [raw for _, raw in bare]
    )


# --------------------------------------------------------------------------------------------------
# The AMQP side: proton events in, store operations and transfers out. Runs on the reactor thread.
# --------------------------------------------------------------------------------------------------


class _HangUpFilter(logging.Filter):
    """Drops proton's ERROR records for peers that hung up: the SDK closes its socket without waiting
    for the broker's closing frames, so every client close would otherwise log a BrokenPipeError."""

    _HANG_UPS = ("BrokenPipeError", "ConnectionResetError")

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not (
            message.startswith(("Couldn't send", "Couldn't recv")) and any(h in message for h in self._HANG_UPS)
        )


def _quiet_proton_hang_ups() -> None:
    proton_log = logging.getLogger("proton")
    if not any(isinstance(f, _HangUpFilter) for f in proton_log.filters):
        proton_log.addFilter(_HangUpFilter())


def _guarded(method: Callable[..., None]) -> Callable[..., None]:
    """Hold the broker's lock for an event, and log instead of raising: an exception would stop the reactor."""

    @functools.wraps(method)
    def wrapper(self: _AmqpHandler, event: Any) -> None:
        try:
            with self.mutex:
                method(self, event)
        except Exception:
            log.exception("servicebus broker: error while handling %s", method.__name__)

    return wrapper


class _AmqpHandler(Handler):
    def __init__(self, store: _Store, mutex: threading.Lock) -> None:
        super().__init__()
        self.store = store
        self.mutex = mutex
        self.reply_links: dict[tuple[Any, str], Any] = {}  # (session, node) -> Sender for responses
        self.transports: set[Any] = set()  # open client transports, whose sockets stop() must close
        self.container: Any = None

    # -- lifecycle --------------------------------------------------------------------------------

    @_guarded
    def on_reactor_init(self, event: Any) -> None:
        self.container = event.container
        self.container.schedule(_TICK_SECONDS, self)

    @_guarded
    def on_timer_task(self, event: Any) -> None:
        event.container.schedule(_TICK_SECONDS, self)  # first, so a failing tick cannot stop the clock
        now = time.time()
        for name in self.store.expire_locks(now) | self.store.activate_due(now):
            self._pump(self.store.queue(name))

    @_guarded
    def on_stop_broker(self, event: Any) -> None:
        self.container.stop()

    @_guarded
    def on_connection_bound(self, event: Any) -> None:
        # The SDK insists on a SASL exchange and offers ANONYMOUS when the emulator flag is set.
        event.transport.sasl().allowed_mechs("ANONYMOUS")
        self.transports.add(event.transport)

    @_guarded
    def on_connection_remote_open(self, event: Any) -> None:
        if event.connection.state & Endpoint.LOCAL_UNINIT:
            event.connection.open()

    @_guarded
    def on_session_remote_open(self, event: Any) -> None:
        if event.session.state & Endpoint.LOCAL_UNINIT:
            event.session.open()

    @_guarded
    def on_link_remote_open(self, event: Any) -> None:
        link = event.link
        if not link.state & Endpoint.LOCAL_UNINIT:
            return
        link.source.copy(link.remote_source)
        link.target.copy(link.remote_target)
        # The SDK's peek-lock receiver asks for rcv-settle-mode "second" and then waits for our outcome.
        link.snd_settle_mode = link.remote_snd_settle_mode
        link.rcv_settle_mode = link.remote_rcv_settle_mode
        address = _entity_of(link.remote_source.address if link.is_sender else link.remote_target.address)
        link.sb_address = address
        link.open()
        if link.is_receiver:
            link.flow(_RECEIVE_CREDIT)
        elif _is_node(address):
            self.reply_links[(link.session, address)] = link
        else:
            queue = self.store.queue(address)
            queue.consumers.append(link)
            self._pump(queue)

    @_guarded
    def on_link_remote_close(self, event: Any) -> None:
        self._forget_link(event.link)
        if not event.link.state & Endpoint.LOCAL_CLOSED:
            event.link.close()

    @_guarded
    def on_session_remote_close(self, event: Any) -> None:
        if not event.session.state & Endpoint.LOCAL_CLOSED:
            event.session.close()

    @_guarded
    def on_connection_remote_close(self, event: Any) -> None:
        self._forget_connection(event.connection)
        if not event.connection.state & Endpoint.LOCAL_CLOSED:
            event.connection.close()

    @_guarded
    def on_transport_closed(self, event: Any) -> None:
        self.transports.discard(event.transport)
        if event.connection is not None:
            self._forget_connection(event.connection)

    def _forget_connection(self, connection: Any) -> None:
        link = connection.link_head(0)
        while link is not None:
            self._forget_link(link)
            link = link.next(0)

    def _forget_link(self, link: Any) -> None:
        address = getattr(link, "sb_address", None)
        if address is None or not link.is_sender:
            return
        if _is_node(address):
            self.reply_links.pop((link.session, address), None)
        elif address in self.store.queues:
            queue = self.store.queues[address]
            queue.consumers = [c for c in queue.consumers if c != link]

    # -- flow and deliveries ----------------------------------------------------------------------

    @_guarded
    def on_link_flow(self, event: Any) -> None:
        link = event.link
        address = getattr(link, "sb_address", None)
        if link.is_sender and address is not None and not _is_node(address):
            self._pump(self.store.queue(address))

    @_guarded
    def on_delivery(self, event: Any) -> None:
        delivery = event.delivery
        link = delivery.link
        if link.is_receiver:
            self._on_transfer(link, delivery)
        elif hasattr(delivery, "sb_lock_token"):
            self._on_settlement(delivery)
        elif delivery.remote_state or delivery.settled:
            delivery.settle()  # a client acknowledging a CBS or $management response

    def _on_transfer(self, link: Any, delivery: Any) -> None:
        if delivery.aborted:
            delivery.settle()
            return
        if not delivery.readable or delivery.partial:
            return
        raw = bytes(link.recv(delivery.pending) or b"")
        link.advance()
        if link.credit < _RECEIVE_CREDIT // 2:
            # Topping up in bulk, not per transfer: the SDK reads one frame per poll while it connects.
            link.flow(_RECEIVE_CREDIT - link.credit)
        address = link.sb_address
        if address == _CBS_NODE:
            self._respond(link, address, raw, self._cbs)
        elif address.endswith(_MANAGEMENT_SUFFIX):
            self._respond(link, address, raw, self._management)
        else:
            self._receive_send(delivery, address, raw)
            return
        delivery.update(Delivery.ACCEPTED)
        delivery.settle()

    def _receive_send(self, delivery: Any, address: str, raw: bytes) -> None:
        condition = self.store.refuse_send(address)
        if condition is not None:
            delivery.local.condition = _error(condition, "Send refused by fail_sends() on the test broker.")
            delivery.update(Delivery.REJECTED)
            delivery.settle()
            return
        try:
            sections = _split_sections(raw)
        except Exception as error:
            delivery.local.condition = _error("amqp:decode-error", f"Not an AMQP message: {error}")
            delivery.update(Delivery.REJECTED)
            delivery.settle()
            return
        queue = self.store.queue(address)
        now = time.time()
        for message in _unpack_batch(sections) or [sections]:
            self.store.enqueue(queue, message, now)
        delivery.update(Delivery.ACCEPTED)
        delivery.settle()
        self._pump(queue)

    def _pump(self, queue: _Queue) -> None:
        """Hand available messages to consumers with credit, round robin, then honour drain requests."""
        queue.consumers = [link for link in queue.consumers if _is_usable(link)]
        while queue.has_available():
            ready = [link for link in queue.consumers if link.credit > 0]
            if not ready:
                break
            for link in ready:
                entry = queue.pop_available()
                if entry is None:
                    break
                self._deliver(queue, link, entry)
            queue.consumers.append(queue.consumers.pop(0))
        for link in queue.consumers:
            if link.drain_mode and link.credit > 0:
                link.drained()

    def _deliver(self, queue: _Queue, link: Any, entry: _Entry) -> None:
        now = time.time()
        entry.delivery_count += 1
        receive_and_delete = link.snd_settle_mode == Link.SND_SETTLED
        if receive_and_delete:
            token, locked_until = uuid.uuid4(), None
            queue.entries.pop(entry.sequence_number, None)
        else:
            token = self.store.lock(queue, entry, now)
            locked_until = entry.locked_until
        # The SDK computes lock_token as UUID(bytes_le=delivery_tag), so the tag must be those 16 bytes.
        delivery = link.delivery(token.bytes_le)
        # proton's Delivery.tag utf-8-decodes the tag (and fails on a UUID), so keep the token ourselves.
        delivery.sb_lock_token = token
        link.send(_wire_message(entry, locked_until=locked_until))
        link.advance()
        if receive_and_delete:
            delivery.settle()

    def _on_settlement(self, delivery: Any) -> None:
        state = delivery.remote_state
        if state not in (Delivery.ACCEPTED, Delivery.RELEASED, Delivery.MODIFIED, Delivery.REJECTED):
            return  # no outcome yet (a bare "received" state, or an update without one)
        token: uuid.UUID = delivery.sb_lock_token
        now = time.time()
        try:
            if state == Delivery.ACCEPTED:
                self.store.complete(token)
            elif state == Delivery.RELEASED:
                self.store.release(token)
            elif state == Delivery.MODIFIED and delivery.remote.undeliverable:
                self.store.defer(token)
            elif state == Delivery.MODIFIED:
                self.store.abandon(token, now)
            elif state == Delivery.REJECTED:
                reason, description = _dead_letter_details(delivery.remote.condition)
                self.store.dead_letter(token, reason, description, now)
        except _LockLost as lost:
            delivery.local.condition = _error(_LOCK_LOST, str(lost))
            state = Delivery.REJECTED
        if not delivery.settled:
            # SDK 7.15 sends the disposition unsettled and waits for this echo of the outcome.
            delivery.update(state)
        delivery.settle()
        queue_name = delivery.link.sb_address
        self._pump(self.store.queue(queue_name))

    # -- request/response nodes ------------------------------------------------------------------------

    def _respond(self, link: Any, address: str, raw: bytes, handler: Callable[[Any, str], Message]) -> None:
        request = Message()
        request.decode(raw)
        response = handler(request, address)
        response.correlation_id = request.id
        reply_link = self.reply_links.get((link.session, address))
        if reply_link is None:
            log.warning("servicebus broker: no reply link for %s", address)
            return
        reply_link.send(response)

    def _cbs(self, request: Any, address: str) -> Message:
        return Message(properties={"status-code": 202, "status-description": "Accepted"})

    def _management(self, request: Any, address: str) -> Message:
        operation = str((request.properties or {}).get("operation", ""))
        body = _own(request.body) if isinstance(request.body, dict) else {}
        queue = self.store.queue(address[: -len(_MANAGEMENT_SUFFIX)])
        operations: dict[str, Callable[[_Queue, dict[str, Any]], dict[str, Any] | None]] = {
            "com.microsoft:peek-message": self._peek,
            "com.microsoft:schedule-message": self._schedule,
            "com.microsoft:cancel-scheduled-message": self._cancel_scheduled,
            "com.microsoft:renew-lock": self._renew_lock,
            "com.microsoft:update-disposition": self._update_disposition,
            "com.microsoft:receive-by-sequence-number": self._receive_by_sequence_number,
        }
        try:
            handler = operations.get(operation)
            if handler is None:
                raise _MgmtError(501, "amqp:not-implemented", f"{operation} is not emulated")
            result = handler(queue, body)
        except _LockLost as lost:
            return _status(410, str(lost), condition=_LOCK_LOST)
        except _MgmtError as error:
            return _status(error.status, error.description, condition=error.condition)
        except Exception as error:  # answer anyway: an unanswered request leaves the SDK waiting
            log.exception("servicebus broker: %s failed", operation)
            return _status(500, str(error), condition="amqp:internal-error")
        if result is None:
            return _status(204, "No Content")
        self._pump(queue)
        return _status(200, "OK", body=result)

    def _peek(self, queue: _Queue, body: dict[str, Any]) -> dict[str, Any] | None:
        start = int(body.get("from-sequence-number", 0))
        count = int(body.get("message-count", 1))
        entries = [e for seq, e in queue.entries.items() if seq >= start][:count]
        if not entries:
            return None
        return {"messages": [{"message": _wire_message(e)} for e in entries]}

    def _schedule(self, queue: _Queue, body: dict[str, Any]) -> dict[str, Any]:
        condition = self.store.refuse_send(queue.name)
        if condition is not None:
            raise _MgmtError(500, condition, "Schedule refused by fail_sends() on the test broker.")
        now = time.time()
        numbers = []
        for item in body.get("messages", []):
            entry = self.store.enqueue(queue, _split_sections(item["message"]), now)
            numbers.append(entry.sequence_number if entry is not None else 0)
        return {"sequence-numbers": _array(Data.LONG, numbers)}

    def _cancel_scheduled(self, queue: _Queue, body: dict[str, Any]) -> dict[str, Any]:
        self.store.cancel_scheduled(queue, [int(n) for n in _elements(body.get("sequence-numbers"))])
        return {}

    def _renew_lock(self, queue: _Queue, body: dict[str, Any]) -> dict[str, Any]:
        now = time.time()
        expirations = [_to_ms(self.store.renew(token, now)) for token in _elements(body.get("lock-tokens"))]
        return {"expirations": _array(Data.TIMESTAMP, expirations)}

    def _update_disposition(self, queue: _Queue, body: dict[str, Any]) -> dict[str, Any]:
        status = str(body.get("disposition-status", ""))
        now = time.time()
        for token in _elements(body.get("lock-tokens")):
            if status == "completed":
                self.store.complete(token)
            elif status == "abandoned":
                self.store.abandon(token, now)
            elif status == "defered":  # sic: the SDK's spelling
                self.store.defer(token)
            elif status == "suspended":
                reason = _as_str(body.get("deadletter-reason"))
                description = _as_str(body.get("deadletter-description"))
                self.store.dead_letter(token, reason, description, now)
            else:
                raise _MgmtError(400, "com.microsoft:argument-error", f"unknown disposition {status!r}")
        return {}

    def _receive_by_sequence_number(self, queue: _Queue, body: dict[str, Any]) -> dict[str, Any]:
        now = time.time()
        receive_and_delete = int(body.get("receiver-settle-mode", 1)) == 0
        messages: list[dict[str, Any]] = []
        for sequence_number in _elements(body.get("sequence-numbers")):
            entry = queue.entries.get(int(sequence_number))
            if entry is None or entry.state != "deferred":
                raise _MgmtError(404, _MESSAGE_NOT_FOUND, f"No deferred message {sequence_number}")
            entry.delivery_count += 1
            if receive_and_delete:
                del queue.entries[entry.sequence_number]
                messages.append({"message": _wire_message(entry)})
                continue
            token = self.store.lock(queue, entry, now)
            messages.append({"lock-token": token, "message": _wire_message(entry, locked_until=entry.locked_until)})
        return {"messages": messages}


def _is_node(address: str) -> bool:
    return address == _CBS_NODE or address.endswith(_MANAGEMENT_SUFFIX)


def _is_usable(link: Any) -> bool:
    return not link.state & (Endpoint.LOCAL_CLOSED | Endpoint.REMOTE_CLOSED)


def _array(element_type: int, elements: list[Any]) -> Array:
    return Array(cast(Any, UNDESCRIBED), element_type, *elements)


def _elements(value: Any) -> list[Any]:
    if isinstance(value, Array):
        return list(value.elements)
    return list(value or [])


def _dead_letter_details(condition: Any) -> tuple[str | None, str | None]:
    """Reason and description of a dead-letter disposition; the SDK puts both in the error's info map."""
    if condition is None:
        return None, None
    info = {str(k): v for k, v in (condition.info or {}).items()}
    reason = _as_str(info.get(DEAD_LETTER_REASON))
    description = _as_str(info.get(DEAD_LETTER_DESCRIPTION, condition.description))
    return reason, description


def _error(condition: str, description: str) -> Condition:
    # The info map is not optional in practice: the SDK's sender indexes error[2] and, without it,
    # swallows the IndexError and waits for the send outcome forever.
    return Condition(condition, description, {symbol("com.microsoft:tracking-id"): str(uuid.uuid4())})


def _status(code: int, description: str, *, condition: str | None = None, body: Any = None) -> Message:
    properties: dict[str, Any] = {"statusCode": code, "statusDescription": description}
    if condition is not None:
        properties["errorCondition"] = symbol(condition)
    return Message(properties=properties, body=body)


# --------------------------------------------------------------------------------------------------
# The public face.
# --------------------------------------------------------------------------------------------------


class ServiceBusBroker:
    """An in-memory Service Bus stand-in on 127.0.0.1, served by a proton reactor on a daemon thread.

    Use as a context manager, or call :meth:`start` and :meth:`stop` (once each: a stopped broker stays
    stopped). Every method is thread-safe.

    :param max_delivery_count: deliveries after which an abandoned or expired message is dead-lettered.
    :param lock_duration: seconds a peek-lock lasts before the message is redelivered.
    :param port: the port to listen on; 0 picks a free one (read it back from :attr:`port`).
    :param duplicate_detection: queues on which a second message with an already seen message id is
        accepted and silently dropped.
    """

    def __init__(
        self,
        *,
        max_delivery_count: int = 10,
        lock_duration: float = 60.0,
        port: int = 0,
        duplicate_detection: Iterable[str] = (),
    ) -> None:
        self._requested_port = port
        self._mutex = threading.Lock()
        self._store = _Store(
            max_delivery_count=max_delivery_count,
            lock_duration=lock_duration,
            duplicate_detection=duplicate_detection,
        )
        self._injector = EventInjector()
        self._handler = _AmqpHandler(self._store, self._mutex)
        self._container: Any = None
        self._acceptor: Any = None
        self._thread: threading.Thread | None = None
        self.port = 0

    @property
    def connection_string(self) -> str:
        return (
            f"Endpoint=sb://127.0.0.1:{self.port};SharedAccessKeyName=local;"
            "SharedAccessKey=local;UseDevelopmentEmulator=true"
        )

    def start(self) -> Self:
        if self._thread is not None:
            return self
        _quiet_proton_hang_ups()
        self._container = Container(self._handler)
        self._container.selectable(self._injector)
        self._acceptor = self._container.listen(f"127.0.0.1:{self._requested_port}")
        # proton has no public way to learn the port it bound to; the acceptor's socket knows.
        self.port = self._acceptor._selectable.getsockname()[1]
        self._thread = threading.Thread(target=self._run, daemon=True, name=f"servicebus-broker:{self.port}")
        self._thread.start()
        return self

    def _run(self) -> None:
        try:
            self._container.run()
        except Exception:
            log.exception("servicebus broker: the reactor stopped with an error")

    def stop(self) -> None:
        """Stop the reactor from any thread (proton's Container.stop is not thread-safe, so inject it)."""
        if self._thread is None or not self._thread.is_alive():
            return
        self._injector.trigger(ApplicationEvent("stop_broker"))
        self._thread.join(10)
        if self._thread.is_alive():
            log.warning("servicebus broker: the reactor thread did not stop within 10 s")
            return
        self._close_sockets()

    def _close_sockets(self) -> None:
        """Container.stop() only leaves the event loop: the listening socket, the clients' sockets and
        the injector's pipe stay open unless closed here, once the reactor thread is gone."""
        self._acceptor._selectable.close()
        for transport in self._handler.transports:
            selectable = getattr(transport, "_selectable", None)
            if selectable is not None:
                selectable.close()
        self._handler.transports.clear()
        for fd in self._injector.pipe:
            os.close(fd)

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def messages(self, queue: str) -> list[StoredMessage]:
        """The messages held for ``queue`` (or ``"q/$DeadLetterQueue"``), in sequence-number order.

        Includes locked, scheduled (``scheduled_enqueue_time_utc`` set) and deferred messages, each with
        its ``state``; completed, cancelled and received-and-deleted ones are gone.
        """
        with self._mutex:
            return self._store.snapshot(queue)

    def purge(self, queue: str | None = None) -> None:
        """Drop every message of ``queue`` and its dead-letter queue, or of all queues.

        Duplicate-detection history goes too, so a purged queue accepts the same message ids again.
        Sequence numbers and :meth:`sent_count` carry on.
        """
        with self._mutex:
            self._store.purge(queue)

    def fail_sends(
        self,
        queue: str,
        *,
        count: int | None = None,
        rate: float = 1.0,
        seed: int = 0,
        condition: str = "amqp:internal-error",
    ) -> None:
        """Refuse sends (and schedule requests) to ``queue`` with ``condition``.

        Applies to the next ``count`` sends (every send when None), of which a seeded share ``rate``
        is refused. A list or batch is one send. ``count=0`` disarms it. The SDK sees a rejected
        transfer carrying ``condition`` (or, for scheduling, an error status with that condition).
        """
        with self._mutex:
            if count is not None and count <= 0:
                self._store.faults.pop(queue, None)
            else:
                self._store.faults[queue] = _SendFault(count, rate, random.Random(seed), condition)

    def set_max_delivery_count(self, n: int) -> None:
        with self._mutex:
            self._store.max_delivery_count = n

    def sent_count(self, queue: str) -> int:
        """How many messages ever entered ``queue`` (sends, schedules and dead-lettered arrivals)."""
        with self._mutex:
            found = self._store.queues.get(queue)
            return 0 if found is None else found.accepted_total
