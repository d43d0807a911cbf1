"""The local Service Bus broker, proven with the real azure-servicebus SDK, sync and async.

Every behaviour test runs twice, through ``ServiceBusClient`` and ``azure.servicebus.aio.ServiceBusClient``
(the ``bus`` fixture). Opening an SDK link costs about half a second, so brokers, clients, senders and
receivers are opened once per module and shared; each test starts from purged queues instead.
"""

from __future__ import annotations

import asyncio
import inspect
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from typing import Any, cast

import pytest
import pytest_asyncio
from azure.servicebus import (
    ServiceBusClient,
    ServiceBusMessage,
    ServiceBusReceivedMessage,
    ServiceBusReceiveMode,
    ServiceBusSubQueue,
)
from azure.servicebus.aio import ServiceBusClient as AsyncServiceBusClient
from azure.servicebus.exceptions import MessageLockLostError, ServiceBusError

from standins.servicebus_broker import ServiceBusBroker

QUEUE = "upgrades"
RAD_QUEUE = "upgrades-receive-and-delete"  # its own queue: a peek-lock receiver with credit would take a share
DEDUP_QUEUE = "dedup"
DLQ = f"{QUEUE}/$DeadLetterQueue"
WAIT = 3.0  # upper bound on waiting for messages that are expected; empty receives are never waited for


async def call(result: Any) -> Any:
    """The result of an SDK call, awaited when the client is the async one: one test body serves both."""
    return await result if inspect.isawaitable(result) else result


class Bus:
    """One SDK client, sync or async, whose senders and receivers stay open until the module ends."""

    def __init__(self, client: Any) -> None:
        self.client = client
        self.is_async = isinstance(client, AsyncServiceBusClient)
        self._handlers: dict[tuple[Any, ...], Any] = {}

    @classmethod
    def connect(cls, flavour: str, connection_string: str, **kwargs: Any) -> Bus:
        client_class = AsyncServiceBusClient if flavour == "async" else ServiceBusClient
        return cls(client_class.from_connection_string(connection_string, **kwargs))

    def sender(self, queue: str) -> Any:
        return self._cached(("sender", queue), lambda: self.client.get_queue_sender(queue))

    def receiver(
        self,
        queue: str,
        *,
        sub_queue: ServiceBusSubQueue | None = None,
        receive_mode: ServiceBusReceiveMode = ServiceBusReceiveMode.PEEK_LOCK,
    ) -> Any:
        key = ("receiver", queue, sub_queue, receive_mode)
        return self._cached(
            key,
            lambda: self.client.get_queue_receiver(queue, sub_queue=sub_queue, receive_mode=receive_mode),
        )

    def _cached(self, key: tuple[Any, ...], factory: Callable[[], Any]) -> Any:
        if key not in self._handlers:
            self._handlers[key] = factory()
        return self._handlers[key]

    async def close(self) -> None:
        await close_all(list(self._handlers.values()))
        await call(self.client.close())


async def open_all(handlers: list[Any]) -> None:
    """Open SDK senders and receivers together (a receive with a short max_wait_time cannot wait for it)."""
    if inspect.iscoroutinefunction(handlers[0].close):
        await asyncio.gather(*(handler.__aenter__() for handler in handlers))
    else:
        with ThreadPoolExecutor(max_workers=len(handlers)) as pool:
            list(pool.map(lambda handler: handler.__enter__(), handlers))


async def close_all(handlers: list[Any]) -> None:
    """Close SDK senders and receivers together: each close waits on the SDK's own keep-alive timer."""
    if not handlers:
        return
    if inspect.iscoroutinefunction(handlers[0].close):
        await asyncio.gather(*(handler.close() for handler in handlers))
    else:
        with ThreadPoolExecutor(max_workers=len(handlers)) as pool:
            list(pool.map(lambda handler: handler.close(), handlers))


async def receive(receiver: Any, count: int, within: float = WAIT) -> list[ServiceBusReceivedMessage]:
    """Exactly ``count`` messages (fewer only if they do not arrive ``within`` seconds)."""
    received: list[ServiceBusReceivedMessage] = []
    deadline = time.monotonic() + within
    while len(received) < count and time.monotonic() < deadline:
        batch = await call(
            receiver.receive_messages(
                max_message_count=count - len(received), max_wait_time=max(0.1, deadline - time.monotonic())
            )
        )
        received.extend(batch)
    return received


def bodies(messages: list[ServiceBusReceivedMessage]) -> list[str]:
    return [str(message) for message in messages]


# --------------------------------------------------------------------------------------------------
# Fixtures
# --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def broker() -> Iterator[ServiceBusBroker]:
    with ServiceBusBroker(duplicate_detection={DEDUP_QUEUE}) as started:
        yield started


@pytest.fixture(scope="module")
def short_lock_broker() -> Iterator[ServiceBusBroker]:
    with ServiceBusBroker(lock_duration=0.5) as started:
        yield started


@pytest.fixture(autouse=True)
def _empty_queues(request: pytest.FixtureRequest) -> None:
    for name in ("broker", "short_lock_broker"):
        if name in request.fixturenames:
            request.getfixturevalue(name).purge()


@pytest_asyncio.fixture(scope="module", params=["sync", "async"])
async def bus(request: pytest.FixtureRequest, broker: ServiceBusBroker) -> AsyncIterator[Bus]:
    connected = Bus.connect(request.param, broker.connection_string)
    yield connected
    await connected.close()


@pytest_asyncio.fixture(scope="module", params=["sync", "async"])
async def no_retry_bus(request: pytest.FixtureRequest, broker: ServiceBusBroker) -> AsyncIterator[Bus]:
    connected = Bus.connect(request.param, broker.connection_string, retry_total=0)
    yield connected
    await connected.close()


@pytest_asyncio.fixture(scope="module", params=["sync", "async"])
async def short_lock_bus(request: pytest.FixtureRequest, short_lock_broker: ServiceBusBroker) -> AsyncIterator[Bus]:
    connected = Bus.connect(request.param, short_lock_broker.connection_string)
    yield connected
    await connected.close()


# --------------------------------------------------------------------------------------------------
# Sending and receiving
# --------------------------------------------------------------------------------------------------


async def test_single_list_and_batch_sends_arrive_in_order_with_service_bus_annotations(bus, broker):
    sender, receiver = bus.sender(QUEUE), bus.receiver(QUEUE)
    before = broker.sent_count(QUEUE)
    batch = await call(sender.create_message_batch())
    batch.add_message(ServiceBusMessage("batch-1"))
    batch.add_message(ServiceBusMessage("batch-2"))

    await call(sender.send_messages(ServiceBusMessage("single")))
    await call(sender.send_messages([ServiceBusMessage("list-1"), ServiceBusMessage("list-2")]))
    await call(sender.send_messages(batch))
    received = await receive(receiver, 5)

    assert bodies(received) == ["single", "list-1", "list-2", "batch-1", "batch-2"]
    sequence_numbers = [m.sequence_number or 0 for m in received]
    assert sequence_numbers == sorted(set(sequence_numbers))
    assert len({m.lock_token for m in received}) == 5  # read before settling: the SDK clears it then
    for message in received:
        assert message.enqueued_time_utc is not None
        assert message.locked_until_utc is not None
        assert message.locked_until_utc - message.enqueued_time_utc >= timedelta(seconds=59)
        await call(receiver.complete_message(message))
    assert broker.messages(QUEUE) == []
    assert broker.sent_count(QUEUE) - before == 5


async def test_message_properties_survive_the_round_trip(bus, broker):
    sender, receiver = bus.sender(QUEUE), bus.receiver(QUEUE)
    sent = ServiceBusMessage(
        b'{"app": "x"}',
        message_id="upgrade-1",
        correlation_id="run-7",
        content_type="application/json",
        subject="upgrade",
    )

    await call(sender.send_messages(sent))
    stored = broker.messages(QUEUE)
    [received] = await receive(receiver, 1)
    await call(receiver.complete_message(received))

    assert (received.message_id, received.correlation_id) == ("upgrade-1", "run-7")
    assert (received.content_type, received.subject) == ("application/json", "upgrade")
    assert b"".join(received.body) == b'{"app": "x"}'
    [snapshot] = stored
    assert (snapshot.body, snapshot.message_id, snapshot.correlation_id) == (b'{"app": "x"}', "upgrade-1", "run-7")
    assert (snapshot.content_type, snapshot.subject, snapshot.state) == ("application/json", "upgrade", "available")


async def test_application_properties_of_every_type_come_back_unchanged(bus, broker):
    sender, receiver = bus.sender(QUEUE), bus.receiver(QUEUE)
    when = datetime(2024, 5, 1, 12, 30, tzinfo=UTC)
    # The SDK encodes every Python int as a 32-bit AMQP int and refuses bigger ones before sending;
    # a 64-bit value only reaches the wire typed as an AMQP long, through the SDK's own helper.
    from azure.servicebus._pyamqp.utils import amqp_long_value

    properties = {
        "text": "ValueError",
        "small": 7,
        "big": amqp_long_value(2**40),
        "flag": True,
        "ratio": 0.25,
        "nothing": None,
        "when": when,
    }

    await call(sender.send_messages(ServiceBusMessage("typed", application_properties=cast(Any, properties))))
    [stored] = broker.messages(QUEUE)
    [received] = await receive(receiver, 1)
    await call(receiver.complete_message(received))

    assert received.application_properties == {
        b"text": b"ValueError",
        b"small": 7,
        b"big": 2**40,
        b"flag": True,
        b"ratio": 0.25,
        b"nothing": None,
        b"when": int(when.timestamp() * 1000),  # the SDK hands timestamps back as epoch milliseconds
    }
    assert stored.application_properties == {
        "text": "ValueError",
        "small": 7,
        "big": 2**40,
        "flag": True,
        "ratio": 0.25,
        "nothing": None,
        "when": when,
    }


async def test_receive_and_delete_removes_messages_as_they_are_delivered(bus, broker):
    sender = bus.sender(RAD_QUEUE)
    receiver = bus.receiver(RAD_QUEUE, receive_mode=ServiceBusReceiveMode.RECEIVE_AND_DELETE)

    await call(sender.send_messages([ServiceBusMessage("a"), ServiceBusMessage("b")]))
    received = await receive(receiver, 2)

    assert bodies(received) == ["a", "b"]
    assert [m.delivery_count for m in received] == [0, 0]  # zero-based, as Service Bus sends it
    assert broker.messages(RAD_QUEUE) == []


async def test_duplicate_message_ids_are_dropped_on_a_queue_with_duplicate_detection(bus, broker):
    sender, receiver = bus.sender(DEDUP_QUEUE), bus.receiver(DEDUP_QUEUE)
    before = broker.sent_count(DEDUP_QUEUE)

    await call(sender.send_messages(ServiceBusMessage("first", message_id="dead-letter-copy-1")))
    await call(sender.send_messages(ServiceBusMessage("again", message_id="dead-letter-copy-1")))
    await call(sender.send_messages(ServiceBusMessage("other", message_id="dead-letter-copy-2")))
    received = await receive(receiver, 2)
    for message in received:
        await call(receiver.complete_message(message))

    assert bodies(received) == ["first", "other"]
    assert broker.sent_count(DEDUP_QUEUE) - before == 2


async def test_many_senders_and_receivers_share_queues_concurrently(bus, broker):
    # Every SDK sender and receiver is an AMQP connection of its own (7.15 shares none), each carrying
    # its CBS, entity and $management links: this is several connections and many links at once.
    queue, senders_count, per_sender = "fan-out", 3, 20
    before = broker.sent_count(queue)
    senders = [bus.client.get_queue_sender(queue) for _ in range(senders_count)]
    receivers = [bus.client.get_queue_receiver(queue) for _ in range(3)]
    expected = {f"{s}-{i}" for s in range(senders_count) for i in range(per_sender)}
    got: list[str] = []

    async def send_all(index: int, sender: Any) -> None:
        for i in range(per_sender):
            await call(sender.send_messages(ServiceBusMessage(f"{index}-{i}")))

    async def drain(receiver: Any) -> None:
        deadline = time.monotonic() + 10
        while len(got) < len(expected) and time.monotonic() < deadline:
            for message in await call(receiver.receive_messages(max_message_count=10, max_wait_time=0.3)):
                got.append(str(message))
                await call(receiver.complete_message(message))

    await open_all([*senders, *receivers])
    jobs = [send_all(i, s) for i, s in enumerate(senders)] + [drain(r) for r in receivers]
    try:
        if bus.is_async:
            await asyncio.gather(*jobs)
        else:  # the sync client's calls block, so each sender and receiver gets a thread
            threads = [threading.Thread(target=asyncio.run, args=(job,)) for job in jobs]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
    finally:
        await close_all([*senders, *receivers])

    assert sorted(got) == sorted(expected)
    assert broker.messages(queue) == []
    assert broker.sent_count(queue) - before == len(expected)


# --------------------------------------------------------------------------------------------------
# Settlement
# --------------------------------------------------------------------------------------------------


async def test_first_delivery_counts_zero_and_an_abandoned_message_comes_back_counting_one(bus, broker):
    """Service Bus sends the deliveries before this one; only the .NET SDK (the Functions host) adds 1."""
    sender, receiver = bus.sender(QUEUE), bus.receiver(QUEUE)
    await call(sender.send_messages(ServiceBusMessage("retry me")))

    [first] = await receive(receiver, 1)
    first_lock = first.lock_token
    await call(receiver.abandon_message(first))
    [second] = await receive(receiver, 1)
    second_lock = second.lock_token
    await call(receiver.complete_message(second))

    assert (first.delivery_count, second.delivery_count) == (0, 1)
    assert second.sequence_number == first.sequence_number
    assert second_lock != first_lock
    assert broker.messages(QUEUE) == []


async def test_dead_lettered_message_lands_in_the_dead_letter_queue_with_reason_and_properties(bus, broker):
    sender, receiver = bus.sender(QUEUE), bus.receiver(QUEUE)
    dead_letters = bus.receiver(QUEUE, sub_queue=ServiceBusSubQueue.DEAD_LETTER)
    await call(sender.send_messages(ServiceBusMessage("poison", application_properties={"attempt": 3})))

    [received] = await receive(receiver, 1)
    await call(receiver.dead_letter_message(received, reason="ValueError", error_description="bad payload: x=1"))
    [stored] = broker.messages(DLQ)
    [dead] = await receive(dead_letters, 1)
    await call(dead_letters.complete_message(dead))

    assert str(dead) == "poison"
    assert (dead.dead_letter_reason, dead.dead_letter_error_description) == ("ValueError", "bad payload: x=1")
    assert dead.dead_letter_source == QUEUE
    assert (dead.application_properties or {}).get(b"attempt") == 3
    assert (stored.dead_letter_reason, stored.dead_letter_error_description) == ("ValueError", "bad payload: x=1")
    assert stored.application_properties["attempt"] == 3
    assert broker.messages(QUEUE) == []
    assert broker.messages(DLQ) == []


async def test_message_is_dead_lettered_once_it_reaches_max_delivery_count(bus, broker):
    sender, receiver = bus.sender(QUEUE), bus.receiver(QUEUE)
    dead_letters = bus.receiver(QUEUE, sub_queue=ServiceBusSubQueue.DEAD_LETTER)
    broker.set_max_delivery_count(2)
    try:
        await call(sender.send_messages(ServiceBusMessage("never works")))
        for _ in range(2):
            [attempt] = await receive(receiver, 1)
            await call(receiver.abandon_message(attempt))
    finally:
        broker.set_max_delivery_count(10)
    [dead] = await receive(dead_letters, 1)
    await call(dead_letters.complete_message(dead))

    assert attempt.delivery_count == 1  # the second and last delivery
    assert str(dead) == "never works"
    assert dead.dead_letter_reason == "MaxDeliveryCountExceeded"
    assert dead.dead_letter_error_description == "Message could not be consumed after 2 delivery attempts."
    assert broker.messages(QUEUE) == []


async def test_deferred_message_is_only_received_by_sequence_number(bus, broker):
    sender, receiver = bus.sender(QUEUE), bus.receiver(QUEUE)
    await call(sender.send_messages(ServiceBusMessage("later")))

    [received] = await receive(receiver, 1)
    await call(receiver.defer_message(received))
    [stored] = broker.messages(QUEUE)
    [deferred] = await call(receiver.receive_deferred_messages([received.sequence_number]))
    await call(receiver.complete_message(deferred))

    assert stored.state == "deferred"
    assert str(deferred) == "later"
    assert (received.delivery_count, deferred.delivery_count) == (0, 1)
    assert deferred.sequence_number == received.sequence_number
    assert broker.messages(QUEUE) == []


async def test_renew_message_lock_extends_the_lock(bus, broker):
    sender, receiver = bus.sender(QUEUE), bus.receiver(QUEUE)
    await call(sender.send_messages(ServiceBusMessage("slow work")))
    [received] = await receive(receiver, 1)
    locked_until = received.locked_until_utc
    assert locked_until is not None

    await asyncio.sleep(0.05)
    renewed = await call(receiver.renew_message_lock(received))
    seen_by_message = received.locked_until_utc
    await call(receiver.complete_message(received))

    assert renewed >= locked_until + timedelta(seconds=0.05)
    assert seen_by_message == renewed


async def test_settling_a_message_the_broker_no_longer_holds_raises_lock_lost(bus, broker):
    sender, receiver = bus.sender(QUEUE), bus.receiver(QUEUE)
    await call(sender.send_messages(ServiceBusMessage("purged while locked")))
    [received] = await receive(receiver, 1)

    broker.purge(QUEUE)

    with pytest.raises(MessageLockLostError):
        await call(receiver.complete_message(received))


async def test_an_expired_lock_is_lost_and_the_message_is_redelivered(short_lock_bus, short_lock_broker):
    sender, receiver = short_lock_bus.sender(QUEUE), short_lock_bus.receiver(QUEUE)
    await call(sender.send_messages(ServiceBusMessage("too slow")))
    [first] = await receive(receiver, 1)
    assert first.locked_until_utc is not None

    await asyncio.sleep(max(0.0, (first.locked_until_utc - datetime.now(UTC)).total_seconds()) + 0.1)

    with pytest.raises(MessageLockLostError):  # the broker's answer to renew-lock
        await call(receiver.renew_message_lock(first))
    with pytest.raises(MessageLockLostError):  # the SDK's own check against locked_until_utc
        await call(receiver.complete_message(first))
    [second] = await receive(receiver, 1)
    await call(receiver.complete_message(second))

    assert (first.delivery_count, second.delivery_count) == (0, 1)
    assert str(second) == "too slow"
    assert short_lock_broker.messages(QUEUE) == []


# --------------------------------------------------------------------------------------------------
# $management: peek and scheduling
# --------------------------------------------------------------------------------------------------


async def test_peek_reads_without_locking_and_continues_where_it_left_off(bus, broker):
    sender, receiver = bus.sender(QUEUE), bus.receiver(QUEUE)
    await call(sender.send_messages([ServiceBusMessage(f"peek-{i}") for i in range(5)]))

    first_page = await call(receiver.peek_messages(max_message_count=3))
    second_page = await call(receiver.peek_messages(max_message_count=3))
    third_page = await call(receiver.peek_messages(max_message_count=3))
    from_start = await call(receiver.peek_messages(max_message_count=1, sequence_number=first_page[0].sequence_number))
    received = await receive(receiver, 5)
    for message in received:
        await call(receiver.complete_message(message))

    assert bodies(first_page) == ["peek-0", "peek-1", "peek-2"]
    assert bodies(second_page) == ["peek-3", "peek-4"]
    assert third_page == []
    assert bodies(from_start) == ["peek-0"]
    assert {m.delivery_count for m in first_page} == {0}
    assert bodies(received) == [f"peek-{i}" for i in range(5)]


async def test_a_peek_counts_the_deliveries_so_far_and_a_delivery_those_before_it(bus, broker):
    """As Service Bus sends them: the .NET SDK adds 1 to a received message's count, not to a peeked one's."""
    # given a message delivered once and abandoned
    sender, receiver = bus.sender(QUEUE), bus.receiver(QUEUE)
    await call(sender.send_messages(ServiceBusMessage("twice")))
    [first] = await receive(receiver, 1)
    await call(receiver.abandon_message(first))

    # when it is peeked, then delivered again
    [peeked] = await call(receiver.peek_messages(max_message_count=1, sequence_number=first.sequence_number))
    [second] = await receive(receiver, 1)
    [held] = broker.messages(QUEUE)
    await call(receiver.complete_message(second))

    # then the peek and the second delivery both show 1, and the broker counts 2 deliveries
    assert (first.delivery_count, peeked.delivery_count, second.delivery_count) == (0, 1, 1)
    assert held.delivery_count == 2


async def test_scheduled_message_arrives_at_its_time_and_a_cancelled_one_never_does(bus, broker):
    sender, receiver = bus.sender(QUEUE), bus.receiver(QUEUE)
    due = datetime.now(UTC) + timedelta(seconds=1)

    kept, cancelled = await call(
        sender.schedule_messages([ServiceBusMessage("kept"), ServiceBusMessage("cancelled")], due)
    )
    await call(sender.cancel_scheduled_messages(cancelled))
    [held] = broker.messages(QUEUE)
    [received] = await receive(receiver, 1)
    arrived = datetime.now(UTC)
    await call(receiver.complete_message(received))

    assert kept != cancelled
    assert (held.state, held.sequence_number, held.body) == ("scheduled", kept, b"kept")
    assert held.scheduled_enqueue_time_utc is not None
    assert abs(held.scheduled_enqueue_time_utc - due) < timedelta(milliseconds=2)
    assert str(received) == "kept"
    assert received.sequence_number == kept
    assert arrived >= due - timedelta(milliseconds=2)
    assert broker.messages(QUEUE) == []


async def test_message_sent_with_a_scheduled_enqueue_time_is_held_until_then(bus, broker):
    sender, receiver = bus.sender(QUEUE), bus.receiver(QUEUE)
    due = datetime.now(UTC) + timedelta(seconds=1)

    await call(sender.send_messages(ServiceBusMessage("retry at", scheduled_enqueue_time_utc=due)))
    [held] = broker.messages(QUEUE)
    [received] = await receive(receiver, 1)
    arrived = datetime.now(UTC)
    await call(receiver.complete_message(received))

    assert held.state == "scheduled"
    assert arrived >= due - timedelta(milliseconds=2)
    assert received.scheduled_enqueue_time_utc is not None
    assert abs(received.scheduled_enqueue_time_utc - due) < timedelta(milliseconds=2)


# --------------------------------------------------------------------------------------------------
# Fault injection
# --------------------------------------------------------------------------------------------------


async def test_refused_sends_raise_a_service_bus_error_until_cleared(no_retry_bus, broker):
    sender = no_retry_bus.sender(QUEUE)
    broker.fail_sends(QUEUE)

    with pytest.raises(ServiceBusError):
        await call(sender.send_messages(ServiceBusMessage("refused")))
    with pytest.raises(ServiceBusError):
        await call(sender.schedule_messages(ServiceBusMessage("refused"), datetime.now(UTC)))
    broker.fail_sends(QUEUE, count=0)
    await call(sender.send_messages(ServiceBusMessage("accepted")))

    assert [m.body for m in broker.messages(QUEUE)] == [b"accepted"]


async def test_one_refused_send_is_retried_by_the_sdk_and_succeeds(bus, broker):
    sender = bus.sender(QUEUE)
    await call(sender.send_messages(ServiceBusMessage("warm-up")))  # open the link before arming the fault
    broker.purge(QUEUE)
    before = broker.sent_count(QUEUE)
    broker.fail_sends(QUEUE, count=1)

    await call(sender.send_messages(ServiceBusMessage("second try")))

    assert [m.body for m in broker.messages(QUEUE)] == [b"second try"]
    assert broker.sent_count(QUEUE) - before == 1


async def test_a_seeded_share_of_sends_is_refused(no_retry_bus, broker):
    sender = no_retry_bus.sender(QUEUE)
    broker.fail_sends(QUEUE, rate=0.5, seed=42, condition="com.microsoft:server-busy")
    outcomes = []
    for i in range(20):
        try:
            await call(sender.send_messages(ServiceBusMessage(f"m{i}")))
            outcomes.append(True)
        except ServiceBusError:
            outcomes.append(False)
    broker.fail_sends(QUEUE, count=0)

    assert 0 < outcomes.count(False) < 20
    assert len(broker.messages(QUEUE)) == outcomes.count(True)


# --------------------------------------------------------------------------------------------------
# The broker itself
# --------------------------------------------------------------------------------------------------


async def test_purge_empties_a_queue_and_its_dead_letter_queue_only(bus, broker):
    sender, receiver = bus.sender(QUEUE), bus.receiver(QUEUE)
    await call(sender.send_messages([ServiceBusMessage("to dead-letter"), ServiceBusMessage("waiting")]))
    [received] = await receive(receiver, 1)
    await call(receiver.dead_letter_message(received, reason="test"))
    await call(bus.sender(RAD_QUEUE).send_messages(ServiceBusMessage("elsewhere")))

    broker.purge(QUEUE)

    assert broker.messages(QUEUE) == []
    assert broker.messages(DLQ) == []
    assert [m.body for m in broker.messages(RAD_QUEUE)] == [b"elsewhere"]


def test_broker_listens_on_loopback_and_stops_cleanly():
    broker = ServiceBusBroker()

    with broker:
        port = broker.port
        connection_string = broker.connection_string
    broker.stop()  # a second stop is harmless

    assert port > 0
    assert connection_string == (
        f"Endpoint=sb://127.0.0.1:{port};SharedAccessKeyName=local;SharedAccessKey=local;UseDevelopmentEmulator=true"
    )
    assert not any(t.name == f"servicebus-broker:{port}" for t in threading.enumerate())
