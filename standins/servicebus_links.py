"""The broker's AMQP side: proton events in, store operations and transfers out, on the reactor thread.

A link to a queue's address is one of its consumers (the SDK's receivers) or a producer; links to
``$cbs`` and ``<queue>/$management`` are request/response nodes answered here.
"""

from __future__ import annotations

import functools
import logging
import threading
import time
import uuid
from collections.abc import Callable
from typing import Any, cast
from urllib.parse import urlsplit

from proton import UNDESCRIBED, Array, Condition, Data, Delivery, Endpoint, Handler, Link, Message, symbol

from .amqp_codec import as_str, own, split_sections, to_ms, unpack_batch
from .servicebus_store import (
    DEAD_LETTER_DESCRIPTION,
    DEAD_LETTER_REASON,
    Entry,
    LockLost,
    Queue,
    Store,
    wire_message,
)

log = logging.getLogger(__name__)

_MANAGEMENT_SUFFIX = "/$management"
_CBS_NODE = "$cbs"
_LOCK_LOST = "com.microsoft:message-lock-lost"
_MESSAGE_NOT_FOUND = "com.microsoft:message-not-found"

_TICK_SECONDS = 0.05  # granularity of lock expiry and scheduled delivery
_RECEIVE_CREDIT = 500  # credit granted to each sending client; topped up as transfers arrive


def _entity_of(address: str | None) -> str:
    """``amqps://host:port/q/$DeadLetterQueue`` -> ``q/$DeadLetterQueue``; plain names pass through."""
    address = address or ""
    if "://" in address:
        address = urlsplit(address).path
    return address.strip("/")


class _MgmtError(Exception):
    def __init__(self, status: int, condition: str, description: str) -> None:
        super().__init__(description)
        self.status, self.condition, self.description = status, condition, description


class _HangUpFilter(logging.Filter):
    """Drops proton's ERROR records for peers that hung up: the SDK closes its socket without waiting
    for the broker's closing frames, so every client close would otherwise log a BrokenPipeError."""

    _HANG_UPS = ("BrokenPipeError", "ConnectionResetError")

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not (
            message.startswith(("Couldn't send", "Couldn't recv")) and any(h in message for h in self._HANG_UPS)
        )


def quiet_proton_hang_ups() -> None:
    proton_log = logging.getLogger("proton")
    if not any(isinstance(f, _HangUpFilter) for f in proton_log.filters):
        proton_log.addFilter(_HangUpFilter())


def _guarded(method: Callable[..., None]) -> Callable[..., None]:
    """Hold the broker's lock for an event, and log instead of raising: an exception would stop the reactor."""

    @functools.wraps(method)
    def wrapper(self: AmqpHandler, event: Any) -> None:
        try:
            with self.mutex:
                method(self, event)
        except Exception:
            log.exception("servicebus broker: error while handling %s", method.__name__)

    return wrapper


class AmqpHandler(Handler):
    def __init__(self, store: Store, mutex: threading.Lock) -> None:
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
            sections = split_sections(raw)
        except Exception as error:
            delivery.local.condition = _error("amqp:decode-error", f"Not an AMQP message: {error}")
            delivery.update(Delivery.REJECTED)
            delivery.settle()
            return
        queue = self.store.queue(address)
        now = time.time()
        for message in unpack_batch(sections) or [sections]:
            self.store.enqueue(queue, message, now)
        delivery.update(Delivery.ACCEPTED)
        delivery.settle()
        self._pump(queue)

    def _pump(self, queue: Queue) -> None:
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

    def _deliver(self, queue: Queue, link: Any, entry: Entry) -> None:
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
        link.send(wire_message(entry, received=True, locked_until=locked_until))
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
        except LockLost as lost:
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
        body = own(request.body) if isinstance(request.body, dict) else {}
        queue = self.store.queue(address[: -len(_MANAGEMENT_SUFFIX)])
        operations: dict[str, Callable[[Queue, dict[str, Any]], dict[str, Any] | None]] = {
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
        except LockLost as lost:
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

    def _peek(self, queue: Queue, body: dict[str, Any]) -> dict[str, Any] | None:
        start = int(body.get("from-sequence-number", 0))
        count = int(body.get("message-count", 1))
        entries = [e for seq, e in queue.entries.items() if seq >= start][:count]
        if not entries:
            return None
        return {"messages": [{"message": wire_message(e, received=False)} for e in entries]}

    def _schedule(self, queue: Queue, body: dict[str, Any]) -> dict[str, Any]:
        condition = self.store.refuse_send(queue.name)
        if condition is not None:
            raise _MgmtError(500, condition, "Schedule refused by fail_sends() on the test broker.")
        now = time.time()
        numbers = []
        for item in body.get("messages", []):
            entry = self.store.enqueue(queue, split_sections(item["message"]), now)
            numbers.append(entry.sequence_number if entry is not None else 0)
        return {"sequence-numbers": _array(Data.LONG, numbers)}

    def _cancel_scheduled(self, queue: Queue, body: dict[str, Any]) -> dict[str, Any]:
        self.store.cancel_scheduled(queue, [int(n) for n in _elements(body.get("sequence-numbers"))])
        return {}

    def _renew_lock(self, queue: Queue, body: dict[str, Any]) -> dict[str, Any]:
        now = time.time()
        expirations = [to_ms(self.store.renew(token, now)) for token in _elements(body.get("lock-tokens"))]
        return {"expirations": _array(Data.TIMESTAMP, expirations)}

    def _update_disposition(self, queue: Queue, body: dict[str, Any]) -> dict[str, Any]:
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
                reason = as_str(body.get("deadletter-reason"))
                description = as_str(body.get("deadletter-description"))
                self.store.dead_letter(token, reason, description, now)
            else:
                raise _MgmtError(400, "com.microsoft:argument-error", f"unknown disposition {status!r}")
        return {}

    def _receive_by_sequence_number(self, queue: Queue, body: dict[str, Any]) -> dict[str, Any]:
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
                messages.append({"message": wire_message(entry, received=True)})
                continue
            token = self.store.lock(queue, entry, now)
            wired = wire_message(entry, received=True, locked_until=entry.locked_until)
            messages.append({"lock-token": token, "message": wired})
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
    reason = as_str(info.get(DEAD_LETTER_REASON))
    description = as_str(info.get(DEAD_LETTER_DESCRIPTION, condition.description))
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
