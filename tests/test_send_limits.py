"""A Service Bus send ends in bounded time, and a failed link is not reused (contract §2).

Over the wire: the real ``azure-servicebus`` client talks to the broker stand-in through a proxy
that can stop forwarding, as a link frozen by the network would. Bounds are shortened through
the constructor.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Iterator

import pytest
from azure.servicebus import ServiceBusMessage
from azure.servicebus.exceptions import OperationTimeoutError, ServiceBusError

from standins.faults import FaultProxy
from upgrade_handler.servicebus import MAX_BATCH_BYTES, ServiceBusMessageSender, _new_batch
from upgrade_handler.settings import ServiceBusConnection

QUEUE = "send-limits"
#: Longer than any test may take: reaching it means a send was not bounded.
GUARD_SECONDS = 60


@pytest.fixture
def proxy(broker) -> Iterator[FaultProxy]:
    broker.purge(QUEUE)
    with FaultProxy(broker.port) as running:
        yield running
    broker.purge(QUEUE)


@pytest.fixture
async def bus(broker, proxy: FaultProxy) -> AsyncIterator[ServiceBusMessageSender]:
    connection_string = broker.connection_string.replace(f":{broker.port};", f":{proxy.port};")
    sender = ServiceBusMessageSender(
        ServiceBusConnection(connection_string=connection_string), send_timeout=2.0, retry_total=0
    )
    yield sender
    proxy.flow()
    await sender.aclose()


def message(text: str) -> ServiceBusMessage:
    return ServiceBusMessage(text.encode(), message_id=text[:64])


def bodies(broker) -> set[bytes]:
    return {stored.body for stored in broker.messages(QUEUE)}


async def test_sends_behind_a_frozen_link_fail_within_the_bound_and_the_next_send_reconnects(
    broker, proxy: FaultProxy, bus: ServiceBusMessageSender
):
    # Given a sender whose link works
    await bus.send(QUEUE, [message("before")])
    assert b"before" in bodies(broker)
    connections = proxy.connections

    # When the link freezes (nothing goes either way) and three sends queue up on it
    proxy.freeze()
    async with asyncio.timeout(GUARD_SECONDS):
        outcomes = await asyncio.gather(
            *(bus.send(QUEUE, [message(f"frozen-{n}")]) for n in range(3)), return_exceptions=True
        )

    # Then each fails as a Service Bus error, the one behind the lock included
    assert all(isinstance(outcome, OperationTimeoutError) for outcome in outcomes), outcomes
    assert all(isinstance(outcome, ServiceBusError) for outcome in outcomes)

    # And once the network is back, the next send goes out on a new connection.
    proxy.flow()
    async with asyncio.timeout(GUARD_SECONDS):
        await bus.send(QUEUE, [message("after")])
    assert b"after" in bodies(broker)
    assert proxy.connections > connections


async def test_a_refused_send_drops_its_sender_and_the_next_send_opens_a_new_one(
    broker, proxy: FaultProxy, bus: ServiceBusMessageSender
):
    await bus.send(QUEUE, [message("first")])
    broker.fail_sends(QUEUE, count=1)
    with pytest.raises(ServiceBusError):
        await bus.send(QUEUE, [message("refused")])
    async with asyncio.timeout(GUARD_SECONDS):
        await bus.send(QUEUE, [message("second")])
    assert {b"first", b"second"} <= bodies(broker)
    assert b"refused" not in bodies(broker)


async def test_batches_stay_within_the_service_batch_limit_and_every_message_arrives(
    broker, bus: ServiceBusMessageSender
):
    # The stand-in's link allows 1 MiB messages, as a Premium large-message entity allows 100 MB:
    # a batch sized to the link would pass the 1 MB the service takes in one batch.
    sender = bus.client.get_queue_sender(QUEUE)
    try:
        batch = await _new_batch(sender)
        assert batch.max_size_in_bytes == MAX_BATCH_BYTES
        assert (await sender.create_message_batch()).max_size_in_bytes > MAX_BATCH_BYTES
    finally:
        await sender.close()

    # Three megabytes in one send: several batches, each within the limit, nothing left out.
    payloads = [f"{n:04d}-{uuid.uuid4()}".ljust(20_000, "x") for n in range(150)]
    await bus.send(QUEUE, [message(payload) for payload in payloads])
    assert bodies(broker) == {payload.encode() for payload in payloads}


def test_a_send_bound_that_is_not_positive_is_refused():
    with pytest.raises(ValueError, match="positive"):
        ServiceBusMessageSender(ServiceBusConnection(connection_string="Endpoint=sb://x/"), send_timeout=0)
