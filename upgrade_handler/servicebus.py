"""Sending to Service Bus: one async client per process, one open sender per queue.

The connection comes from the same app settings as the trigger (``ServiceBusConnection`` or
``ServiceBusConnection__fullyQualifiedNamespace`` with a managed identity). A failed send
raises the SDK's ``ServiceBusError`` to the caller: the handler lets it propagate so the host
abandons the message and Service Bus delivers it again.

A send is bounded (contract §2): it ends within ``SEND_TIMEOUT_SECONDS``, its wait for the
queue's previous send included, or raises ``OperationTimeoutError`` (a ``ServiceBusError``, so
callers see one kind of failure). A sender that failed in any way is closed and not reused, and
when the connection may be the problem (a timeout, a lost connection) the client goes too: the
next send opens new ones instead of queueing behind a frozen link.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from azure.servicebus import ServiceBusMessage, ServiceBusMessageBatch
from azure.servicebus.aio import ServiceBusClient, ServiceBusSender
from azure.servicebus.exceptions import OperationTimeoutError, ServiceBusConnectionError

from .auth import default_credential
from .settings import ServiceBusConnection

#: The longest one ``send`` may take, waiting for the queue's previous send included.
SEND_TIMEOUT_SECONDS = 30.0
#: A batch never holds more than this: Service Bus refuses batches over 1 MB even where a
#: Premium entity's link allows messages of up to 100 MB (azure-sdk-for-python issue 38260), and
#: the SDK's own reckoning of a batch's size is an estimate, hence the margin below 1 MiB.
MAX_BATCH_BYTES = 1_000_000
#: Closing a sender or client whose connection is stuck must not hold anyone up.
_CLOSE_TIMEOUT_SECONDS = 10.0


class MessageSender(Protocol):
    """The seam the handler sends through."""

    async def send(self, queue: str, messages: Sequence[ServiceBusMessage]) -> None: ...


@dataclass(eq=False)
class _Connection:
    """One ``ServiceBusClient`` (one AMQP connection) and the senders open on it.

    ``busy`` counts sends in progress on it: a retired connection is closed when the last of them
    ends, never under a send that another queue's caller still has in flight.
    """

    client: ServiceBusClient
    senders: dict[str, ServiceBusSender] = field(default_factory=dict)
    busy: int = 0
    retired: bool = False


class ServiceBusMessageSender:
    """Sends through one ``ServiceBusClient``, keeping a sender open per queue.

    ``client_options`` go to the client (tests pass ``retry_total=0`` to fail fast);
    ``send_timeout`` bounds each :meth:`send`, in seconds.
    """

    def __init__(
        self, connection: ServiceBusConnection, *, send_timeout: float = SEND_TIMEOUT_SECONDS, **client_options: Any
    ) -> None:
        if not send_timeout > 0:
            raise ValueError("send_timeout must be positive")
        self._connection = connection
        self._send_timeout = send_timeout
        self._options = client_options
        self._current: _Connection | None = None
        self._credential: Any = None
        self._locks: dict[str, asyncio.Lock] = {}
        self._closing: set[asyncio.Task[None]] = set()

    @property
    def client(self) -> ServiceBusClient:
        """The process's one ``ServiceBusClient``, created on first use (tools open receivers on it)."""
        return self._open().client

    def _open(self) -> _Connection:
        if self._current is None:
            if self._connection.connection_string:
                client = ServiceBusClient.from_connection_string(self._connection.connection_string, **self._options)
            else:
                assert self._connection.fully_qualified_namespace
                if self._credential is None:
                    self._credential = default_credential(self._connection.client_id)
                client = ServiceBusClient(self._connection.fully_qualified_namespace, self._credential, **self._options)
            self._current = _Connection(client)
        return self._current

    async def send(self, queue: str, messages: Sequence[ServiceBusMessage]) -> None:
        """Send ``messages`` to ``queue`` in as few batches as Service Bus allows.

        Raises ``ServiceBusError`` (``OperationTimeoutError`` after ``send_timeout`` seconds).
        """
        if not messages:
            return
        try:
            async with asyncio.timeout(self._send_timeout):
                await self._send(queue, messages)
        except TimeoutError:
            raise OperationTimeoutError(
                message=f"sending to {queue} did not finish within {self._send_timeout:g} s"
            ) from None

    async def _send(self, queue: str, messages: Sequence[ServiceBusMessage]) -> None:
        lock = self._locks.setdefault(queue, asyncio.Lock())
        # One send at a time per link: the SDK does not guard a link opened by concurrent callers.
        async with lock:
            connection = self._open()
            sender = connection.senders.get(queue)
            if sender is None:
                sender = connection.client.get_queue_sender(queue)
                connection.senders[queue] = sender
            connection.busy += 1
            doomed: list[Any] = []
            try:
                await _send_all(sender, messages)
            except BaseException as error:
                # A sender that failed is never reused; when the connection itself may be stuck or
                # gone, the next send opens a new one.
                if connection.senders.get(queue) is sender:
                    del connection.senders[queue]
                doomed.append(sender)
                if isinstance(error, asyncio.CancelledError | ServiceBusConnectionError | OperationTimeoutError):
                    connection.retired = True
                    if self._current is connection:
                        self._current = None
                raise
            finally:
                connection.busy -= 1
                if connection.retired and connection.busy == 0:
                    doomed.extend(connection.senders.values())
                    connection.senders = {}
                    doomed.append(connection.client)
                if doomed:
                    closing = asyncio.ensure_future(_close_all(doomed))
                    self._closing.add(closing)
                    closing.add_done_callback(self._closing.discard)

    async def aclose(self) -> None:
        if self._closing:
            await asyncio.gather(*self._closing, return_exceptions=True)
        connection, self._current = self._current, None
        if connection is not None:
            for sender in connection.senders.values():
                await sender.close()
            await connection.client.close()
        if self._credential is not None:
            await self._credential.close()
            self._credential = None


async def _send_all(sender: ServiceBusSender, messages: Sequence[ServiceBusMessage]) -> None:
    if len(messages) == 1:
        await sender.send_messages(messages[0])
        return
    batch = await _new_batch(sender)
    for message in messages:
        try:
            batch.add_message(message)
        except ValueError:  # MessageSizeExceededError: this batch is full
            await sender.send_messages(batch)
            batch = await _new_batch(sender)
            batch.add_message(message)
    await sender.send_messages(batch)


async def _new_batch(sender: ServiceBusSender) -> ServiceBusMessageBatch:
    """An empty batch of at most ``MAX_BATCH_BYTES``, or the link's maximum when that is smaller."""
    batch = await sender.create_message_batch()  # sized to what the link advertises
    if batch.max_size_in_bytes > MAX_BATCH_BYTES:
        batch = await sender.create_message_batch(max_size_in_bytes=MAX_BATCH_BYTES)
    return batch


async def _close_all(handlers: Sequence[Any]) -> None:
    for handler in handlers:
        with contextlib.suppress(Exception, TimeoutError):
            async with asyncio.timeout(_CLOSE_TIMEOUT_SECONDS):
                await handler.close()
