"""The function outside Azure Functions: receive from the upgrade queue, handle, settle as the host does.

    receive (peek-lock) → renew the lock while it runs → UpgradeHandler.handle → complete on return,
                                                                                 abandon on raise

Each message goes through exactly the handler the Azure Function calls
(:meth:`UpgradeHandler.handle`); the worker only does what the Functions host does around it:

- at most ``concurrency`` handler calls at once (``maxConcurrentCalls`` in ``host.json``);
- the lock is renewed by an ``AutoLockRenewer`` for up to ``max_lock_renewal`` seconds
  (``maxAutoLockRenewalDuration``);
- a return completes the message, an exception abandons it, so Service Bus delivers it again
  with a higher delivery count (``autoCompleteMessages``);
- a stop request (SIGINT / SIGTERM) stops receiving and lets the calls in flight finish; a second
  one cancels them, and their messages are abandoned;
- with ``until_idle`` it stops by itself once nothing was received or in flight for that many
  seconds and the queue holds no scheduled message (a retry copy waiting for its time) either.

Every settled delivery is reported to ``on_processed`` as a :class:`Processed`, with the
handler's :class:`Outcome` and its log events, which is how ``demo`` tells its story.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from azure.servicebus import ServiceBusMessageState, ServiceBusReceivedMessage
from azure.servicebus.aio import AutoLockRenewer, ServiceBusReceiver
from azure.servicebus.exceptions import ServiceBusError

from ..delivery import Delivery
from ..outcome import Outcome
from ..settlement import History
from .bus import PEEK_PAGE, Bus
from .events import Event, collecting
from .report import Summary, summarise

log = logging.getLogger("upgrade_handler.cli.worker")

#: The Functions host's defaults in ``host.json``.
DEFAULT_CONCURRENCY = 16
DEFAULT_MAX_LOCK_RENEWAL = 300.0
#: Longest single wait for messages; also how soon a stop request is noticed.
DEFAULT_POLL_SECONDS = 1.0
#: Peek pages read when looking for scheduled messages (the queue is near empty then).
_SCHEDULE_PAGES = 4

Handle = Callable[[Delivery], Awaitable[Outcome]]


@dataclass(frozen=True, slots=True)
class Processed:
    """One delivery, handled and settled."""

    delivery: Delivery
    outcome: Outcome | None
    """What the handler returned; ``None`` when it raised."""
    error: BaseException | None
    settlement: str
    """``completed``, ``abandoned``, or ``not settled: <why>`` (the lock was lost, say)."""
    events: tuple[Event, ...]
    seconds: float

    @property
    def original_message_id(self) -> str:
        """The producer's message id, also for a scheduled retry copy."""
        return History.of(self.delivery).original_message_id

    @property
    def summary(self) -> Summary:
        return summarise(self.outcome, self.events, self.error)


@dataclass(slots=True)
class WorkerStats:
    received: int = 0
    completed: int = 0
    abandoned: int = 0
    unsettled: int = 0
    outcomes: Counter[str] = field(default_factory=Counter)


class Worker:
    """Receives from ``queue`` through ``bus`` and hands each message to ``handle``.

    ``handle`` is :meth:`UpgradeHandler.handle` of a handler built from the app settings.
    """

    def __init__(
        self,
        handle: Handle,
        bus: Bus,
        queue: str,
        *,
        concurrency: int = DEFAULT_CONCURRENCY,
        max_lock_renewal: float = DEFAULT_MAX_LOCK_RENEWAL,
        until_idle: float | None = None,
        poll: float = DEFAULT_POLL_SECONDS,
        on_processed: Callable[[Processed], None] | None = None,
    ) -> None:
        if concurrency < 1:
            raise ValueError("concurrency must be 1 or more")
        self._handle = handle
        self._bus = bus
        self._queue = queue
        self._concurrency = concurrency
        self._max_lock_renewal = max_lock_renewal
        self._until_idle = until_idle
        self._poll = min(poll, until_idle) if until_idle else poll
        self._on_processed = on_processed
        self._stopping = asyncio.Event()
        self._tasks: set[asyncio.Task[None]] = set()
        self._last_activity = time.monotonic()
        self.stats = WorkerStats()

    def stop(self) -> None:
        """Stop receiving and finish the calls in flight; called again, cancel them."""
        if self._stopping.is_set():
            for task in self._tasks:
                task.cancel()
        self._stopping.set()

    @property
    def stopping(self) -> bool:
        return self._stopping.is_set()

    async def run(self) -> WorkerStats:
        receiver = await self._bus.receiver(self._queue)
        renewer = AutoLockRenewer(max_lock_renewal_duration=self._max_lock_renewal)
        slots = asyncio.Semaphore(self._concurrency)
        self._last_activity = time.monotonic()
        try:
            while not self._stopping.is_set():
                taken = await self._take_slots(slots)
                if taken == 0:
                    break
                messages = await receiver.receive_messages(max_message_count=taken, max_wait_time=self._poll)
                for _ in range(taken - len(messages)):
                    slots.release()
                if messages:
                    self._last_activity = time.monotonic()
                for message in messages:
                    self.stats.received += 1
                    renewer.register(
                        receiver,
                        message,
                        max_lock_renewal_duration=self._max_lock_renewal,
                        on_lock_renew_failure=_lock_renew_failed,
                    )
                    task = asyncio.create_task(self._process(receiver, message, slots))
                    self._tasks.add(task)
                    task.add_done_callback(self._tasks.discard)
                if not messages and await self._idle_long_enough(receiver):
                    break
            if self._tasks:
                await asyncio.gather(*self._tasks, return_exceptions=True)
        finally:
            for task in self._tasks:
                task.cancel()
            if self._tasks:
                await asyncio.gather(*self._tasks, return_exceptions=True)
            await renewer.close()
        return self.stats

    async def _take_slots(self, slots: asyncio.Semaphore) -> int:
        """Wait for one free slot (or a stop request), then take every other free one too."""
        acquire = asyncio.ensure_future(slots.acquire())
        stop = asyncio.ensure_future(self._stopping.wait())
        try:
            await asyncio.wait({acquire, stop}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            stop.cancel()
        if not acquire.done():
            acquire.cancel()
            return 0
        taken = 1
        if self._stopping.is_set():
            slots.release()
            return 0
        while taken < self._concurrency and not slots.locked():
            await slots.acquire()
            taken += 1
        return taken

    async def _idle_long_enough(self, receiver: ServiceBusReceiver) -> bool:
        if self._until_idle is None or self._tasks:
            return False
        if time.monotonic() - self._last_activity < self._until_idle:
            return False
        if await self._scheduled_pending(receiver):
            # A retry copy waits for its time: the queue is not empty, only quiet.
            self._last_activity = time.monotonic()
            return False
        return True

    async def _scheduled_pending(self, receiver: ServiceBusReceiver) -> bool:
        """Whether the queue holds a scheduled message (a retry copy) that is not yet due."""
        next_sequence_number = 1
        for _ in range(_SCHEDULE_PAGES):
            page = await receiver.peek_messages(max_message_count=PEEK_PAGE, sequence_number=next_sequence_number)
            if not page:
                return False
            if any(message.state == ServiceBusMessageState.SCHEDULED for message in page):
                return True
            next_sequence_number = max(m.sequence_number or 0 for m in page) + 1
        return False

    async def _process(
        self, receiver: ServiceBusReceiver, message: ServiceBusReceivedMessage, slots: asyncio.Semaphore
    ) -> None:
        started = time.monotonic()
        delivery = Delivery.from_received_message(message)
        outcome: Outcome | None = None
        error: BaseException | None = None
        try:
            with collecting() as events:
                try:
                    outcome = await self._handle(delivery)
                except asyncio.CancelledError as cancelled:
                    error = cancelled
                except Exception as raised:
                    error = raised
                    log.warning(
                        "worker: the handler raised %s for message %s; abandoning it",
                        type(raised).__name__,
                        delivery.message_id,
                    )
            settlement = await self._settle(receiver, message, complete=error is None)
            if outcome is not None:
                self.stats.outcomes[outcome.value] += 1
            processed = Processed(
                delivery, outcome, error, settlement, tuple(events), round(time.monotonic() - started, 3)
            )
            if self._on_processed is not None:
                self._on_processed(processed)
        finally:
            self._last_activity = time.monotonic()
            slots.release()
        if isinstance(error, asyncio.CancelledError):
            raise error

    async def _settle(self, receiver: ServiceBusReceiver, message: ServiceBusReceivedMessage, *, complete: bool) -> str:
        try:
            if complete:
                await receiver.complete_message(message)
                self.stats.completed += 1
                return "completed"
            await receiver.abandon_message(message)
            self.stats.abandoned += 1
            return "abandoned"
        except ServiceBusError as error:
            # The lock was lost (it expired, or the connection dropped): Service Bus delivers the
            # message again, and the handler's duplicate-safe ids keep that harmless.
            self.stats.unsettled += 1
            log.warning("worker: could not settle message %s: %s", message.message_id, error)
            return f"not settled: {type(error).__name__}"


async def _lock_renew_failed(renewable: Any, error: Exception | None) -> None:
    log.warning("worker: lock renewal failed for message %s: %s", getattr(renewable, "message_id", "?"), error)


# --- the command -------------------------------------------------------------------------------


def _line(processed: Processed) -> str:
    """One line per settled delivery, for a container's log."""
    summary = processed.summary
    parts = [
        f"{summary.outcome:<15}",
        processed.delivery.message_id,
        f"delivery {processed.delivery.delivery_count}",
    ]
    if summary.attempts is not None:
        parts.append(f"attempt {summary.attempts}")
    if summary.graph:
        parts.append(f"Graph {summary.graph}")
    if summary.reason:
        parts.append(summary.reason)
    if processed.error is not None:
        parts.append(f"{type(processed.error).__name__}: {processed.error}")
    if processed.settlement not in ("completed", "abandoned"):
        parts.append(processed.settlement)
    return "  ".join(parts)


async def run_command(args: Any, console: Any, settings: Any, bus: Bus, **seams: Any) -> int:
    """``worker``: run until stopped (SIGINT / SIGTERM) or, with ``--until-idle``, until idle."""
    import signal

    from ..handler import UpgradeHandler

    handler = UpgradeHandler(settings, sender=bus, **seams)
    worker = Worker(
        handler.handle,
        bus,
        settings.upgrade_queue,
        concurrency=args.concurrency,
        max_lock_renewal=args.max_lock_renewal,
        until_idle=args.until_idle,
        on_processed=lambda processed: console.print(_line(processed), markup=False),
    )
    loop = asyncio.get_running_loop()
    installed = []
    for signum in (signal.SIGINT, signal.SIGTERM):
        try:
            loop.add_signal_handler(signum, worker.stop)
            installed.append(signum)
        except (NotImplementedError, RuntimeError, ValueError):  # not the main thread, or Windows
            pass
    idle = f", stopping after {args.until_idle:g} s idle" if args.until_idle is not None else ""
    console.print(
        f"Worker on {settings.upgrade_queue}: {args.concurrency} at a time, locks renewed for up to "
        f"{args.max_lock_renewal:g} s{idle}. Ctrl+C (SIGINT) or SIGTERM stops it.",
        markup=False,
    )
    try:
        stats = await worker.run()
    finally:
        for signum in installed:
            loop.remove_signal_handler(signum)
        await handler.aclose()
    outcomes = ", ".join(f"{count} {name}" for name, count in sorted(stats.outcomes.items())) or "nothing handled"
    console.print(
        f"Worker stopped: {stats.received} received, {stats.completed} completed, {stats.abandoned} abandoned"
        f"{f', {stats.unsettled} not settled' if stats.unsettled else ''} ({outcomes}).",
        markup=False,
    )
    return 0
