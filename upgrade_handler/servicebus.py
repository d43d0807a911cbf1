"""Sending to Service Bus: one async client per process, one open sender per queue.

The connection comes from the same app settings as the trigger (``ServiceBusConnection`` or
``ServiceBusConnection__fullyQualifiedNamespace`` with a managed identity). A failed send
raises the SDK's ``ServiceBusError`` to the caller: the handler lets it propagate so the host
abandons the message and Service Bus delivers it again.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any, Protocol

from azure.servicebus import ServiceBusMessage
from azure.servicebus.aio import ServiceBusClient, ServiceBusSender

from .auth import default_credential
from .settings import ServiceBusConnection


class MessageSender(Protocol):
    """The seam the handler sends through."""

    async def send(self, queue: str, messages: Sequence[ServiceBusMessage]) -> None: ...


class ServiceBusMessageSender:
    """Sends through one ``ServiceBusClient``, keeping a sender open per queue.

    ``client_options`` go to the client (tests pass ``retry_total=0`` to fail fast).
    """

    def __init__(self, connection: ServiceBusConnection, **client_options: Any) -> None:
        self._connection = connection
        self._options = client_options
        self._client: ServiceBusClient | None = None
        self._credential: Any = None
        self._senders: dict[str, ServiceBusSender] = {}
        self._locks: dict[str, asyncio.Lock] = {}

    @property
    def client(self) -> ServiceBusClient:
        """The process's one ``ServiceBusClient``, created on first use (tools open receivers on it)."""
        if self._client is None:
            if self._connection.connection_string:
                self._client = ServiceBusClient.from_connection_string(
                    self._connection.connection_string, **self._options
                )
            else:
                assert self._connection.fully_qualified_namespace
                self._credential = default_credential(self._connection.client_id)
                self._client = ServiceBusClient(
                    self._connection.fully_qualified_namespace, self._credential, **self._options
                )
        return self._client

    async def send(self, queue: str, messages: Sequence[ServiceBusMessage]) -> None:
        """Send ``messages`` to ``queue`` in as few batches as Service Bus allows."""
        if not messages:
            return
        lock = self._locks.setdefault(queue, asyncio.Lock())
        # One send at a time per link: the SDK does not guard a link opened by concurrent callers.
        async with lock:
            sender = self._senders.get(queue)
            if sender is None:
                sender = self.client.get_queue_sender(queue)
                self._senders[queue] = sender
            if len(messages) == 1:
                await sender.send_messages(messages[0])
                return
            batch = await sender.create_message_batch()
            for message in messages:
                try:
                    batch.add_message(message)
                except ValueError:  # MessageSizeExceededError: this batch is full
                    await sender.send_messages(batch)
                    batch = await sender.create_message_batch()
                    batch.add_message(message)
            await sender.send_messages(batch)

    async def aclose(self) -> None:
        senders, self._senders = list(self._senders.values()), {}
        for sender in senders:
            await sender.close()
        if self._client is not None:
            await self._client.close()
            self._client = None
        if self._credential is not None:
            await self._credential.close()
            self._credential = None
