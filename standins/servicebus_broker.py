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

The header's delivery-count is Service Bus's: the deliveries before this one, so 0 on a first
delivery and 1 after one abandon (the Python SDK's ``delivery_count`` shows it as is; the .NET SDK and
the Functions host add 1), and on a peek the deliveries so far. One deliberate difference on the wire:
a batch is recognised by its shape (see :func:`.amqp_codec.unpack_batch`), so a single message whose
body is itself an encoded AMQP message would be taken for a batch.

This module is the public face; the AMQP link handling is in :mod:`.servicebus_links`, the queues,
locks, schedules and duplicate detection in :mod:`.servicebus_store`, message sections in
:mod:`.amqp_codec`.
"""

from __future__ import annotations

import logging
import os
import random
import threading
from collections import Counter
from collections.abc import Iterable
from typing import Any, Self

from proton.reactor import ApplicationEvent, Container, EventInjector

from .servicebus_links import AmqpHandler, quiet_proton_hang_ups
from .servicebus_store import DEAD_LETTER_SUFFIX, SendFault, Store, StoredMessage

__all__ = ["DEAD_LETTER_SUFFIX", "ServiceBusBroker", "StoredMessage"]

log = logging.getLogger(__name__)


class ServiceBusBroker:
    """An in-memory Service Bus stand-in on 127.0.0.1, served by a proton reactor on a daemon thread.

    Use as a context manager, or call :meth:`start` and :meth:`stop` (once each: a stopped broker stays
    stopped). Every method is thread-safe.

    :param max_delivery_count: deliveries after which an abandoned or expired message is dead-lettered
        (``MaxDeliveryCountExceeded``), as the queue property of that name.
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
        self._store = Store(
            max_delivery_count=max_delivery_count,
            lock_duration=lock_duration,
            duplicate_detection=duplicate_detection,
        )
        self._injector = EventInjector()
        self._handler = AmqpHandler(self._store, self._mutex)
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
        quiet_proton_hang_ups()
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

    def state_counts(self, queue: str) -> dict[str, int]:
        """How many messages of ``queue`` are in each state (``available``, ``locked``, ``scheduled``,
        ``deferred``), without copying them: Service Bus's active count is available plus locked."""
        with self._mutex:
            found = self._store.queues.get(queue)
            return dict(Counter(entry.state for entry in found.entries.values())) if found is not None else {}

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
                self._store.faults[queue] = SendFault(count, rate, random.Random(seed), condition)

    def set_max_delivery_count(self, n: int) -> None:
        with self._mutex:
            self._store.max_delivery_count = n

    def sent_count(self, queue: str) -> int:
        """How many messages ever entered ``queue`` (sends, schedules and dead-lettered arrivals)."""
        with self._mutex:
            found = self._store.queues.get(queue)
            return 0 if found is None else found.accepted_total
