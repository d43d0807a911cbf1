"""Service Bus for a command: one client, its receivers opened once, sends through the function's sender.

Opening a link costs a round of AMQP frames (about half a second against the local broker), so a
command keeps every receiver it opened until :meth:`Bus.aclose`, which closes them together.
Sends go through :class:`~upgrade_handler.servicebus.ServiceBusMessageSender`, the very sender
the handler uses, so batching and error behaviour are the function's.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence
from typing import Any

from azure.servicebus import ServiceBusMessage, ServiceBusReceivedMessage, ServiceBusReceiveMode, ServiceBusSubQueue
from azure.servicebus.aio import ServiceBusClient, ServiceBusReceiver

from ..servicebus import ServiceBusMessageSender
from ..settings import ServiceBusConnection

#: How many messages one peek asks for.
PEEK_PAGE = 250


class Bus:
    """One command's connection to the namespace; also a :class:`~upgrade_handler.servicebus.MessageSender`."""

    def __init__(self, connection: ServiceBusConnection, **client_options: Any) -> None:
        self.sender = ServiceBusMessageSender(connection, **client_options)
        self._receivers: dict[tuple[str, bool], ServiceBusReceiver] = {}

    @property
    def client(self) -> ServiceBusClient:
        return self.sender.client

    async def receiver(self, queue: str, *, dead_letter_sub_queue: bool = False) -> ServiceBusReceiver:
        """A peek-lock receiver on ``queue`` (or on its ``$DeadLetterQueue``), opened once per command.

        It is open when returned: a receive with a short ``max_wait_time`` would otherwise spend
        its whole wait opening the link, and fail.
        """
        key = (queue, dead_letter_sub_queue)
        receiver = self._receivers.get(key)
        if receiver is None:
            receiver = self.client.get_queue_receiver(
                queue,
                sub_queue=ServiceBusSubQueue.DEAD_LETTER if dead_letter_sub_queue else None,
                receive_mode=ServiceBusReceiveMode.PEEK_LOCK,
                prefetch_count=0,
            )
            await receiver.__aenter__()
            self._receivers[key] = receiver
        return receiver

    async def send(self, queue: str, messages: Sequence[ServiceBusMessage]) -> None:
        await self.sender.send(queue, messages)

    async def peek_all(
        self, queue: str, *, dead_letter_sub_queue: bool = False, limit: int | None = None
    ) -> AsyncIterator[ServiceBusReceivedMessage]:
        """Every message of the queue in sequence-number order, without locking any (at most ``limit``)."""
        receiver = await self.receiver(queue, dead_letter_sub_queue=dead_letter_sub_queue)
        next_sequence_number, seen = 1, 0
        while limit is None or seen < limit:
            page = await receiver.peek_messages(
                max_message_count=PEEK_PAGE if limit is None else min(PEEK_PAGE, limit - seen),
                sequence_number=next_sequence_number,
            )
            if not page:
                return
            for message in page:
                seen += 1
                yield message
            next_sequence_number = max(m.sequence_number or 0 for m in page) + 1

    async def aclose(self) -> None:
        receivers, self._receivers = list(self._receivers.values()), {}
        # Each close waits for the SDK's own detach timer: close them together.
        await asyncio.gather(*(receiver.close() for receiver in receivers), return_exceptions=True)
        await self.sender.aclose()
