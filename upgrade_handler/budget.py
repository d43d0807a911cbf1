"""One Graph budget for every instance of the app (contract §7), kept in the app's own storage account.

Graph's limit belongs to the app in the tenant; Azure runs as many instances as the queue asks for.
So the instances share one pace, ``GRAPH_MAX_REQUESTS_PER_SECOND`` x :data:`HEADROOM` calls per
second (``rate``), as a *grid* of slots ``1 / rate`` seconds apart on a timeline every instance
agrees on, and each instance owns a part of the grid:

- **Heartbeat.** While it has work, every instance upserts its row in one partition every
  :data:`HEARTBEAT_SECONDS` (±10%) with its demand (calls per second it could use: arrivals plus
  waiters over the last beat, capped at ``rate``; 0 once it has had nothing to do for
  :data:`IDLE_SECONDS`) and reads the partition back: 2 storage operations per beat. Rows whose
  server ``Timestamp`` is :data:`STALE_SECONDS` older than the reader's own are ignored (a crashed
  instance's share returns within that plus a beat); a closing instance deletes its row (its share
  returns within a beat); an idle instance writes 0 once and stops beating: it holds nothing and
  costs nothing.
- **Shares.** Every instance computes the same :func:`allocate` from the same rows: each gets its
  demand while the demands fit the rate, a max-min fair share (water-filling) when they do not,
  and the whole rate is handed out either way. The shares are laid side by side on ``[0, 1)`` in
  row-key order (:func:`lay_out`): an instance's *lane*.
- **The grid.** Slot ``k`` starts at ``k / rate`` seconds on the store's clock (learned from the
  ``Timestamp`` the store puts on each upsert, the round trip with the shortest time of the last
  16 counting, as NTP does) and belongs to whoever's lane holds ``frac(k x golden ratio)``. The
  golden-ratio sequence fills any lane as evenly as a sequence can, so an instance's slots are
  spread over time, and no two lanes hold the same slot: the fleet together starts at most one
  call per slot, whatever the number of instances, with no phase luck (40 instances that each
  paced themselves to ``rate / 40`` would bunch calls into some seconds at random and be throttled).
- **Joining without overshoot.** A lane is used only where the instance has held it in every
  snapshot of the last :data:`SETTLE_SECONDS` (longer than a beat): by then every other instance has
  seen the change and let go of that part. A newcomer therefore waits for about two beats before
  its first call, and a shrinking lane shrinks at once.

Waiting is local: :meth:`SharedBudget.acquire` queues the caller, and a dispatcher grants the
instance's next slot to the oldest waiter. No storage call is ever on a Graph call's path.

**When the store fails** (no answer within 2 s, refused connection, 5xx or 503 throttling, a
deleted table, which the failed beat creates again for the next one): the instance keeps granting on its
*last known lane* (its last known share, so if the whole fleet lost the store together the lanes
still do not overlap); an instance that had no lane yet takes a *blind lane* of
``1 / (active instances last seen + 1)`` of the rate, or :data:`BLIND_SHARE` of it when it never
reached the store, never more than the whole rate and never nothing (no livelock). It logs
``budget.degraded`` (WARNING) once per episode and ``budget.recovered`` when a beat succeeds again;
the lane it then takes is the intersection of the old and the new, so recovering never overshoots.
A clock that jumps: the grid follows the store's clock (a jump in the offset of more than
:data:`CLOCK_JUMP_SECONDS` restarts the estimate), staleness is judged on the store's timestamps
only, and no slot is ever sought more than two seconds past "now", so neither direction stalls.
An instance cut off alone while the others still reach the store overlaps them once its row goes
stale (it keeps its lane, they take it back): the per-process gate and adaptive rate
(:mod:`.ratelimit`) are the last line there.

Fan-outs reserve their children's due times on the tenant's *schedule* (:meth:`reserve_schedule`):
one row holding the next free time, advanced with ETag optimistic concurrency (fan-outs are rare,
so contention is not a concern). :class:`LocalSchedule` is the per-process timeline without a store.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import math
import random
import time
import uuid
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from .budget_lanes import Lane, allocate, lay_out
from .budget_store import BudgetStore, Snapshot, TableBudgetStore, budget_key
from .logs import log_event
from .ratelimit import HEADROOM
from .settings import Settings
from .storage import OPERATION_TIMEOUT, StoreUnavailable, open_table

#: Seconds between two heartbeats of a busy instance (each: one upsert, one partition query).
HEARTBEAT_SECONDS = 0.5
#: A row whose store timestamp is this much older than the reader's own is a departed instance's.
STALE_SECONDS = 5.0
#: A lane is used where the instance has held it for this long (one beat and a margin).
SETTLE_SECONDS = 0.75
#: No call and no waiter for this long: the instance is idle, writes demand 0 and stops beating.
IDLE_SECONDS = 1.0
#: The share of the rate an instance takes when the store fails before it ever answered.
BLIND_SHARE = 0.25
#: The store's clock moving against ours by more than this is a jump, not drift: estimate it afresh.
CLOCK_JUMP_SECONDS = 1.0


class BudgetWaitExceeded(Exception):
    """This instance's next slot is ``expected_wait`` seconds away, further than the caller may wait."""

    def __init__(self, expected_wait: float) -> None:
        super().__init__(f"the shared Graph budget has no slot for this call within {expected_wait:.1f} s")
        self.expected_wait = expected_wait


# --- the budget ------------------------------------------------------------------------------------


@dataclass(slots=True)
class _Waiter:
    future: asyncio.Future[None]
    deadline: float


class SharedBudget:
    """This instance's part of the fleet's Graph budget. Times in seconds.

    ``rate`` is the fleet's pace (calls per second, already below the configured maximum by
    :data:`HEADROOM`). ``clock`` (monotonic seconds) and ``sleep`` are seams for tests; the
    intervals are parameters so that tests can run beats faster than production does.
    """

    def __init__(
        self,
        store: BudgetStore,
        rate: float,
        *,
        instance_id: str | None = None,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        wall_clock: Callable[[], datetime] = lambda: datetime.now(UTC),
        heartbeat: float = HEARTBEAT_SECONDS,
        stale_after: float = STALE_SECONDS,
        settle: float = SETTLE_SECONDS,
        idle_after: float = IDLE_SECONDS,
    ) -> None:
        if rate <= 0:
            raise ValueError("rate must be positive")
        self.store = store
        self.rate = rate
        self.instance_id = instance_id or uuid.uuid4().hex
        self._clock, self._sleep, self._wall_clock = clock, sleep, wall_clock
        self._heartbeat, self._stale_after, self._settle, self._idle_after = heartbeat, stale_after, settle, idle_after
        self._queue: deque[_Waiter] = deque()
        self._arrivals = 0
        self._last_call = float("-inf")
        self._measured_at: float | None = None
        self._demand_peak = 0.0
        self._history: list[tuple[float, Lane | None]] = []
        self._lane: Lane | None = None
        self._known_lane: Lane | None = None
        self._last_slot: int | None = None
        self._offset: float | None = None
        self._offsets: deque[tuple[float, float]] = deque(maxlen=16)
        self._ever_answered = False
        self._peers = 0
        self._degraded_since: float | None = None
        self._idle_written = False
        self._changed: asyncio.Event | None = None
        self._wake: asyncio.Event | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._local = LocalSchedule(rate, now=wall_clock)
        self._closed = False
        #: Slots granted, and beats that reached the store / failed: for tests, benchmarks and logs.
        self.granted = 0
        #: The grid slots granted last (slot ``k`` starts at ``k / rate`` s on the store's clock).
        self.slots: deque[int] = deque(maxlen=100_000)
        self.beats = 0
        self.failed_beats = 0
        self.degraded_episodes = 0

    # --- what callers use -------------------------------------------------------------------------

    @property
    def share(self) -> float:
        """Calls per second this instance may start now (0 while it joins or is idle)."""
        return self._lane.width * self.rate if self._lane is not None else 0.0

    @property
    def degraded(self) -> bool:
        return self._degraded_since is not None

    @property
    def store_operations(self) -> int:
        return self.store.operations

    async def acquire(self, max_wait: float) -> float:
        """Wait for this instance's next slot; returns the seconds waited.

        Raises :class:`BudgetWaitExceeded` (with the expected wait) instead of waiting when the slot
        is, or turns out to be, further away than ``max_wait``. Never raises for a store problem.
        """
        self._start()
        assert self._changed is not None
        assert self._wake is not None
        started = self._clock()
        self._arrivals += 1
        self._last_call = started
        expected = self._expected_wait(len(self._queue) + 1)
        if expected > max_wait:
            raise BudgetWaitExceeded(expected)
        waiter = _Waiter(asyncio.get_running_loop().create_future(), started + max_wait)
        self._queue.append(waiter)
        self._changed.set()
        self._wake.set()
        try:
            await waiter.future
        finally:
            if not waiter.future.done():
                waiter.future.cancel()
        return max(0.0, self._clock() - started)

    async def reserve_schedule(self, calls: int) -> datetime:
        """Reserve ``calls`` slots on the tenant's schedule; returns when the first is due (UTC).

        The schedule advances by ``calls / rate`` seconds. A store that fails falls back to this
        process's own timeline (and counts towards the degraded episode); it never raises for that.
        """
        if calls <= 0:
            raise ValueError("calls must be positive")
        now = self._wall_clock().timestamp()
        try:
            start = await self.store.reserve(calls, self.rate, now)
        except StoreUnavailable as error:
            self._store_failed(error)
            return await self._local.reserve_schedule(calls)
        self._store_answered()
        # Keep the local timeline at least as late, for the moments the store is away.
        self._local.advance_to(start + calls / self.rate)
        return datetime.fromtimestamp(start, UTC)

    async def aclose(self) -> None:
        """Stop beating and give the share back at once (the row is deleted; a failure only delays that)."""
        if self._closed:
            return
        self._closed = True
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        for waiter in self._queue:
            waiter.future.cancel()
        if self.beats:
            with contextlib.suppress(StoreUnavailable):
                await self.store.leave(self.instance_id)
        await self.store.aclose()

    # --- waiting: the dispatcher grants this instance's slots on the grid ---------------------------

    def _start(self) -> None:
        if self._closed:
            raise RuntimeError("the budget is closed")
        if not self._tasks:
            self._changed, self._wake = asyncio.Event(), asyncio.Event()
            self._tasks = [
                asyncio.create_task(self._beat_loop(), name="budget-heartbeat"),
                asyncio.create_task(self._dispatch_loop(), name="budget-dispatch"),
            ]

    def _grid_now(self) -> float:
        return self._clock() + (self._offset or 0.0)

    def _next_slot(self, lane: Lane) -> int:
        now_slot = math.floor(self._grid_now() * self.rate)
        start = now_slot
        # Never a slot already given; but a clock that went back must not push "next" far ahead.
        if self._last_slot is not None and now_slot <= self._last_slot < now_slot + 2 * self.rate:
            start = self._last_slot + 1
        return lane.next_slot(start)

    def _expected_wait(self, position: int) -> float:
        if self._lane is not None:
            return position / self.share
        # Joining: a beat or two until the lane settles, then the queue at an even share of the peers.
        return self._settle + 2 * self._heartbeat + position * (self._peers + 1) / self.rate

    async def _dispatch_loop(self) -> None:
        assert self._changed is not None
        while True:
            self._queue_drop_done()
            if not self._queue:
                self._changed.clear()
                await self._changed.wait()
                continue
            lane = self._lane
            if lane is None:  # joining or idle-to-busy: the heartbeat sets a lane within ~2 beats
                self._fail_late_waiters(self._settle + self._heartbeat)
                await self._sleep(self._heartbeat / 2)
                continue
            slot = self._next_slot(lane)
            delay = slot / self.rate - self._grid_now()
            self._fail_late_waiters(max(0.0, delay))
            if not self._queue:
                continue
            if delay > 0:
                self._changed.clear()
                await self._sleep(min(delay, self._heartbeat / 2))  # then look again: the lane may have moved
                continue
            self._last_slot = slot
            self.slots.append(slot)
            waiter = self._queue.popleft()
            waiter.future.set_result(None)
            self.granted += 1

    def _queue_drop_done(self) -> None:
        while self._queue and self._queue[0].future.done():
            self._queue.popleft()
        if any(w.future.done() for w in self._queue):
            self._queue = deque(w for w in self._queue if not w.future.done())

    def _fail_late_waiters(self, head_delay: float) -> None:
        """Waiters whose slot (the head's, then one per ``1 / share``) lies past their deadline give up now."""
        now = self._clock()
        spacing = 1.0 / self.share if self.share > 0 else (self._peers + 1) / self.rate
        kept: deque[_Waiter] = deque()
        for waiter in self._queue:
            due = now + head_delay + len(kept) * spacing
            if due > waiter.deadline:
                if not waiter.future.done():
                    waiter.future.set_exception(BudgetWaitExceeded(due - now))
            else:
                kept.append(waiter)
        self._queue = kept

    # --- beating: demand out, the partition in ------------------------------------------------------

    def _measure_demand(self) -> float:
        now = self._clock()
        elapsed = self._heartbeat if self._measured_at is None else max(now - self._measured_at, 1e-3)
        raw = (self._arrivals + len(self._queue)) / elapsed
        self._arrivals, self._measured_at = 0, now
        self._demand_peak = max(raw, self._demand_peak * 0.5 ** (elapsed / self._idle_after))
        if not self._queue and now - self._last_call >= self._idle_after:
            self._demand_peak = 0.0
        return float(min(self.rate, math.ceil(self._demand_peak))) if self._demand_peak > 0 else 0.0

    async def _beat_loop(self) -> None:
        assert self._wake is not None
        jitter = random.Random(self.instance_id)
        while True:
            demand = self._measure_demand()
            if demand == 0 and self._idle_written and not self._queue:
                self._wake.clear()
                await self._wake.wait()
                continue
            began = self._clock()
            try:
                snapshot = await self.store.heartbeat(self.instance_id, demand, self._clock)
            except Exception as error:  # whatever the SDK raised, the store failed this beat
                failure = error if isinstance(error, StoreUnavailable) else StoreUnavailable("heartbeat", repr(error))
                self.failed_beats += 1
                self._store_failed(failure)
                self._idle_written = False
            else:
                self.beats += 1
                self._store_answered()
                self._take(snapshot)
                self._idle_written = demand == 0
            spent = self._clock() - began
            # Joining (callers wait, no lane yet): beat thrice per settle so the lane is usable on time.
            interval = self._settle / 3 if self._lane is None and self._queue else self._heartbeat
            await self._sleep(max(0.0, min(self._heartbeat, interval) * jitter.uniform(0.9, 1.1) - spent))

    def _take(self, snapshot: Snapshot) -> None:
        self._learn_offset(snapshot)
        fresh = {
            instance: demand
            for instance, (demand, at) in snapshot.rows.items()
            if snapshot.stamped - at <= self._stale_after and demand > 0
        }
        self._peers = len(fresh) - (self.instance_id in fresh)
        lane = lay_out(allocate(fresh, self.rate), self.rate).get(self.instance_id)
        self._settle_lane(lane)

    def _settle_lane(self, lane: Lane | None) -> None:
        """Record ``lane`` as held now; use what was held throughout the last ``settle`` seconds."""
        now = self._clock()
        if self._history and self._history[-1][0] > now:  # the clock went back: old entries mean nothing
            self._history.clear()
        self._history.append((now, lane))
        horizon = now - self._settle
        # Keep the newest entry at or before the horizon (it covers the window's start) and the later ones.
        while len(self._history) > 1 and self._history[1][0] <= horizon:
            self._history.pop(0)
        effective: Lane | None = None
        if self._history[0][0] <= horizon:
            effective = self._history[0][1]
            for _, held in self._history[1:]:
                effective = effective.intersect(held) if effective is not None else None
        self._set_lane(effective)
        if effective is not None:
            self._known_lane = effective

    def _set_lane(self, lane: Lane | None) -> None:
        if lane != self._lane:
            self._lane = lane
            if self._changed is not None:
                self._changed.set()

    def _learn_offset(self, snapshot: Snapshot) -> None:
        """Align the grid with the store's clock: the offset of the fastest of the last 16 round trips."""
        round_trip = snapshot.answered - snapshot.sent
        offset = snapshot.stamped - (snapshot.sent + snapshot.answered) / 2
        if self._offset is not None and abs(offset - self._offset) > CLOCK_JUMP_SECONDS + round_trip:
            self._offsets.clear()  # a jump (ours or the store's), not drift
            self._last_slot = None
        self._offsets.append((round_trip, offset))
        self._offset = min(self._offsets)[1]

    # --- the store's health ---------------------------------------------------------------------------

    def _store_failed(self, error: StoreUnavailable) -> None:
        now = self._clock()
        if self._degraded_since is None:
            self._degraded_since = now
            self.degraded_episodes += 1
            lane = self._known_lane or self._blind_lane()
            log_event(
                "budget.degraded",
                logging.WARNING,
                reason=str(error),
                pace_per_second=round(lane.width * self.rate, 2),
                peers_last_seen=self._peers,
                instance=self.instance_id,
            )
        # Go on at the cautious pace, recorded as held so that recovering intersects with it.
        lane = self._lane or self._known_lane or self._blind_lane()
        self._history.append((now, lane))
        self._set_lane(lane)
        self._known_lane = lane

    def _store_answered(self) -> None:
        self._ever_answered = True
        if self._degraded_since is not None:
            log_event(
                "budget.recovered",
                logging.INFO,
                degraded_seconds=round(self._clock() - self._degraded_since, 3),
                instance=self.instance_id,
            )
            self._degraded_since = None

    def _blind_lane(self) -> Lane:
        width = 1.0 / (self._peers + 1) if self._ever_answered else BLIND_SHARE
        place = int(hashlib.sha256(self.instance_id.encode()).hexdigest()[:8], 16) / 2.0**32
        low = place * (1.0 - width)
        return Lane(low, low + width)


class LocalSchedule:
    """The fan-out timeline of one process, for when there is no store: the same method as :class:`SharedBudget`."""

    def __init__(self, rate: float, *, now: Callable[[], datetime] = lambda: datetime.now(UTC)) -> None:
        if rate <= 0:
            raise ValueError("rate must be positive")
        self.rate = rate
        self._now = now
        self._next_free = 0.0

    async def reserve_schedule(self, calls: int) -> datetime:
        if calls <= 0:
            raise ValueError("calls must be positive")
        start = max(self._now().timestamp(), self._next_free)
        self._next_free = start + calls / self.rate
        return datetime.fromtimestamp(start, UTC)

    def advance_to(self, moment: float) -> None:
        self._next_free = max(self._next_free, moment)


def shared_budget(
    settings: Settings,
    *,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    timeout: float = OPERATION_TIMEOUT,
    headroom: float = HEADROOM,
    **tuning: Any,
) -> SharedBudget | None:
    """The budget of ``settings`` (``None`` without a storage account: each process paces alone).

    Opens no connection: the first :meth:`SharedBudget.acquire` starts beating (and creates the table
    when it is missing).
    """
    if settings.storage is None:
        return None
    table = open_table(settings.storage, settings.budget_table, timeout=timeout)
    store = TableBudgetStore(table, budget_key(settings.graph_base_url, settings.managed_identity_client_id))
    return SharedBudget(store, settings.max_requests_per_second * headroom, clock=clock, sleep=sleep, **tuning)
