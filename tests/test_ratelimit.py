"""The process-wide Graph pacing (upgrade_handler/ratelimit.py), driven by a fake clock."""

from __future__ import annotations

import asyncio
import contextvars

import pytest

from tests.support import FakeClock
from upgrade_handler import ratelimit
from upgrade_handler.ratelimit import AdaptiveRateLimiter, GateClosed


def limiter(clock: FakeClock, max_rate: float = 10.0) -> AdaptiveRateLimiter:
    return AdaptiveRateLimiter(max_rate, clock=clock.monotonic, sleep=clock.sleep)


def unpaced_429(pacing: AdaptiveRateLimiter, retry_after: float | None = 0.0) -> None:
    """A 429 to a call this limiter did not pace (no slot known), as a caller outside it sees it."""
    contextvars.Context().run(pacing.on_throttled, retry_after)


def accept(pacing: AdaptiveRateLimiter, seconds: float) -> None:
    """``seconds`` worth of accepted calls at the limiter's own rate."""
    elapsed = 0.0
    while elapsed < seconds:
        elapsed += 1 / pacing.rate
        pacing.on_success()


def test_starts_below_its_maximum_by_the_headroom():
    clock = FakeClock()
    pacing = limiter(clock, 30)
    assert pacing.rate == pytest.approx(30 * ratelimit.HEADROOM)
    assert pacing.ceiling == 30
    assert pacing.decreases == 0


def test_a_maximum_that_is_not_positive_is_refused():
    with pytest.raises(ValueError, match="positive"):
        AdaptiveRateLimiter(0)


async def test_slots_are_spaced_one_over_the_rate_apart():
    clock = FakeClock()
    pacing = limiter(clock)
    for _ in range(5):
        await pacing.acquire()
    assert clock.sleeps == pytest.approx([1 / pacing.rate] * 4)


async def test_concurrent_callers_get_distinct_slots_without_a_burst():
    clock = FakeClock()
    pacing = limiter(clock)
    start = clock.monotonic()
    await asyncio.gather(*(pacing.acquire() for _ in range(4)))
    # The first goes at once; each other one waits for its own slot, 1 / rate after the last.
    assert clock.sleeps == pytest.approx([1 / pacing.rate] * 3)
    assert clock.monotonic() - start == pytest.approx(3 / pacing.rate)


async def test_idle_time_does_not_build_up_a_burst():
    clock = FakeClock()
    pacing = limiter(clock)
    await pacing.acquire()
    await clock.sleep(60)
    clock.sleeps.clear()
    await pacing.acquire()
    await pacing.acquire()
    assert clock.sleeps == pytest.approx([1 / pacing.rate])


async def test_a_429_shuts_the_gate_for_every_caller_until_retry_after():
    clock = FakeClock()
    pacing = limiter(clock)
    await pacing.acquire()
    throttled_at = clock.monotonic()
    pacing.on_throttled(2.5)
    assert pacing.gate_until == pytest.approx(throttled_at + 2.5)
    await pacing.acquire()
    assert clock.monotonic() == pytest.approx(throttled_at + 2.5)
    await pacing.acquire()  # the next one is paced after the gate, not let through with it
    assert clock.monotonic() == pytest.approx(throttled_at + 2.5 + 1 / pacing.rate)


def test_a_429_without_retry_after_still_shuts_the_gate():
    clock = FakeClock()
    pacing = limiter(clock)
    pacing.on_throttled(None)
    assert pacing.gate_until == pytest.approx(clock.monotonic() + ratelimit.DEFAULT_THROTTLE_SECONDS)


def test_several_429s_of_one_closing_of_the_gate_decrease_the_rate_once():
    clock = FakeClock()
    pacing = limiter(clock)
    before = pacing.rate
    unpaced_429(pacing, 1.0)
    once = pacing.rate
    assert once < before
    assert pacing.ceiling == before
    for _ in range(5):
        unpaced_429(pacing, 1.0)
    assert pacing.rate == once
    assert pacing.decreases == 1


async def test_a_429_to_a_call_sent_before_the_decrease_is_no_new_event():
    clock = FakeClock()
    pacing = limiter(clock)
    answered = asyncio.Event()

    both_sent = asyncio.Barrier(2)

    async def early_call(throttle_first: bool) -> None:
        await pacing.acquire()  # both calls take their slot before any 429 comes back
        await both_sent.wait()
        if throttle_first:
            await clock.sleep(0.05)
            pacing.on_throttled(0.1)
            answered.set()
        else:
            await answered.wait()
            await clock.sleep(5)  # long after the gate and the hold-off: only its slot is old
            pacing.on_throttled(0.1)

    await asyncio.gather(early_call(True), early_call(False))
    assert pacing.decreases == 1

    async def later_call() -> None:
        await pacing.acquire()
        pacing.on_throttled(0.1)

    await asyncio.create_task(later_call())
    assert pacing.decreases == 2


def test_a_429_not_paced_here_is_news_only_after_the_hold_off():
    clock = FakeClock()
    pacing = limiter(clock)
    accept(pacing, 10)
    unpaced_429(pacing)
    clock._elapsed += ratelimit.HOLDOFF_SECONDS / 2
    unpaced_429(pacing)
    assert pacing.decreases == 1
    clock._elapsed += ratelimit.HOLDOFF_SECONDS
    unpaced_429(pacing)
    assert pacing.decreases == 2


async def test_after_a_lone_429_a_call_must_be_sent_a_hold_off_later_to_be_news():
    clock = FakeClock()
    pacing = limiter(clock)
    accept(pacing, 10)
    await pacing.acquire()
    pacing.on_throttled(0.0)  # a lone 429 among accepted calls: a gentle decrease
    assert pacing.decreases == 1

    async def call_after(seconds: float) -> None:
        await clock.sleep(seconds)
        await pacing.acquire()
        pacing.on_throttled(0.0)

    await asyncio.create_task(call_after(ratelimit.HOLDOFF_SECONDS / 2))
    assert pacing.decreases == 1
    await asyncio.create_task(call_after(ratelimit.HOLDOFF_SECONDS))
    assert pacing.decreases == 2


def test_after_a_storm_the_hold_off_is_longer():
    clock = FakeClock()
    pacing = limiter(clock)
    for _ in range(20):  # nothing but 429s: a storm
        unpaced_429(pacing)
    assert pacing.decreases == 1
    clock._elapsed += ratelimit.HOLDOFF_SECONDS
    for _ in range(20):
        unpaced_429(pacing)
    assert pacing.decreases == 1
    clock._elapsed += ratelimit.STORM_HOLDOFF_SECONDS
    unpaced_429(pacing)
    assert pacing.decreases == 2


def test_a_lone_429_costs_a_little_and_a_storm_of_them_halves_the_rate():
    clock = FakeClock()
    calm = limiter(clock, 30)
    accept(calm, 10)
    before = calm.rate
    unpaced_429(calm)
    assert calm.rate == pytest.approx(before * ratelimit.GENTLEST_DECREASE)
    assert calm.ceiling == before

    stormy = limiter(clock, 30)
    for _ in range(30):
        stormy.on_success()
    clock._elapsed += 1
    unpaced_429(stormy)  # the first of a storm: still gentle
    first = stormy.rate
    for _ in range(50):  # then every answer a 429
        unpaced_429(stormy)
    clock._elapsed += ratelimit.HOLDOFF_SECONDS
    unpaced_429(stormy)
    assert stormy.rate == pytest.approx(first * ratelimit.DEEPEST_DECREASE)


def test_the_rate_never_falls_below_the_minimum():
    clock = FakeClock()
    pacing = limiter(clock, 2.0)
    for _ in range(50):
        clock._elapsed += ratelimit.STORM_HOLDOFF_SECONDS
        unpaced_429(pacing)
    assert pacing.rate == ratelimit.MIN_RATE


def test_accepted_calls_raise_the_rate_additively_up_to_the_maximum():
    clock = FakeClock()
    pacing = limiter(clock, 10.0)
    start = pacing.rate
    accept(pacing, 1.0)  # one second of accepted calls adds INCREASE x the ceiling (the maximum)
    assert pacing.rate - start == pytest.approx(ratelimit.INCREASE * 10.0, rel=0.15)
    accept(pacing, 3600)
    assert pacing.rate == 10.0


def test_an_instance_sharing_the_tenant_grows_in_proportion_to_its_share():
    clock = FakeClock()
    alone, shared = limiter(clock, 30.0), limiter(clock, 30.0)
    alone.rate, alone.ceiling = 20.0, 30.0
    shared.rate, shared.ceiling = 20.0, 7.5  # Graph throttled it at 7.5/s: three others are calling
    accept(alone, 1.0)
    accept(shared, 1.0)
    assert (shared.rate - 20.0) == pytest.approx((alone.rate - 20.0) / 4, rel=0.15)


def test_the_longer_graph_accepts_everything_the_faster_the_rate_grows():
    clock = FakeClock()
    pacing = limiter(clock, 1000.0)
    pacing.rate = 10.0
    before = pacing.rate
    accept(pacing, 1.0)
    early = pacing.rate - before
    accept(pacing, ratelimit.ACCELERATE_SECONDS - 2.0)
    before = pacing.rate
    accept(pacing, 1.0)
    later = pacing.rate - before
    assert later == pytest.approx(2 * early, rel=0.2)  # x (1 + (t / ACCELERATE)^2) at t = ACCELERATE
    unpaced_429(pacing)  # a decrease starts the count again
    before = pacing.rate
    accept(pacing, 1.0)
    assert pacing.rate - before < later


async def test_a_gate_longer_than_the_caller_may_wait_raises_gate_closed():
    clock = FakeClock()
    pacing = limiter(clock)
    pacing.on_throttled(30.0)
    with pytest.raises(GateClosed) as closed:
        await pacing.acquire(max_gate_wait=10.0)
    assert closed.value.remaining == pytest.approx(30.0)
    assert "30.000 s" in str(closed.value)
    assert clock.sleeps == []
    await pacing.acquire(max_gate_wait=30.0)  # exactly as long is short enough: it waits
    assert clock.sleeps == pytest.approx([30.0])


class SteppedClock:
    """A clock for concurrent sleepers: time moves only through :meth:`run_until`, which wakes
    the sleepers in the order of their wake times (a FakeClock moves on each sleep in turn)."""

    def __init__(self) -> None:
        self.now = 1_000.0
        self._sleepers: list[tuple[float, asyncio.Future[None]]] = []

    def monotonic(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        woken: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._sleepers.append((self.now + seconds, woken))
        await woken

    @property
    def wake_times(self) -> list[float]:
        return sorted(wake for wake, _ in self._sleepers)

    async def run_until(self, moment: float) -> None:
        while due := sorted((s for s in self._sleepers if s[0] <= moment), key=lambda s: s[0]):
            self._sleepers.remove(due[0])
            self.now = due[0][0]
            due[0][1].set_result(None)
            for _ in range(5):  # let the woken call finish its step (send, or sleep again)
                await asyncio.sleep(0)
        self.now = moment


async def calls_waiting_for_their_slots(count: int, max_gate_wait: float = float("inf")):
    """``count`` calls asleep until their slots, 0.5 s apart, after one that went at once."""
    clock = SteppedClock()
    pacing = AdaptiveRateLimiter(2.0 / ratelimit.HEADROOM, clock=clock.monotonic, sleep=clock.sleep)
    await pacing.acquire()
    sends: list[float] = []

    async def call() -> None:
        await pacing.acquire(max_gate_wait)
        sends.append(clock.monotonic())

    waiting = [asyncio.ensure_future(call()) for _ in range(count)]
    for _ in range(count + 1):
        await asyncio.sleep(0)
    return clock, pacing, waiting, sends


async def test_a_429_while_calls_wait_for_their_slots_holds_them_until_the_gate_opens():
    # Given four calls waiting for their slots, 0.5, 1.0, 1.5 and 2.0 s from now
    clock, pacing, waiting, sends = await calls_waiting_for_their_slots(4)
    assert clock.wake_times == pytest.approx([1_000.5, 1_001.0, 1_001.5, 1_002.0])

    # When a 429 shuts the gate for 5 s at 0.2 s
    await clock.run_until(1_000.2)
    pacing.on_throttled(5.0)
    await clock.run_until(1_100.0)
    await asyncio.gather(*waiting)

    # Then none of them is sent into the shut gate; each goes after it, in a slot of its own.
    assert len(sends) == 4
    assert min(sends) >= 1_005.2
    assert len(set(sends)) == 4


async def test_a_call_that_the_gate_would_hold_past_its_wait_budget_is_told_so():
    clock, pacing, waiting, sends = await calls_waiting_for_their_slots(1, max_gate_wait=3.0)
    await clock.run_until(1_000.2)
    pacing.on_throttled(5.0)
    await clock.run_until(1_100.0)
    with pytest.raises(GateClosed) as closed:
        await waiting[0]
    # Told at its slot (0.5 s), when the gate had 4.7 s to go.
    assert closed.value.remaining == pytest.approx(4.7)
    assert sends == []


async def test_a_call_that_waited_for_its_slot_has_that_much_less_budget_for_the_gate():
    # Given a call with 5 s of budget, asleep until its slot 0.5 s from now
    clock, pacing, waiting, sends = await calls_waiting_for_their_slots(1, max_gate_wait=5.0)
    # When a 429 at its slot shuts the gate for 4.8 s (less than 5, more than the 4.5 left)
    await clock.run_until(1_000.5 - 1e-9)
    pacing.on_throttled(4.8)
    await clock.run_until(1_100.0)
    # Then it does not wait: its waits together would pass its budget.
    with pytest.raises(GateClosed):
        await waiting[0]
    assert sends == []


@pytest.mark.parametrize("retry_after", [3600.0, 86400.0 * 10, 1e300, float("inf")])
def test_one_429_shuts_the_gate_for_at_most_fifteen_minutes(retry_after: float):
    clock = FakeClock()
    pacing = limiter(clock)
    pacing.on_throttled(retry_after)
    assert clock.monotonic() < pacing.gate_until <= clock.monotonic() + ratelimit.MAX_GATE_SECONDS


@pytest.mark.parametrize("retry_after", [float("nan"), -5.0])
def test_a_retry_after_that_is_no_duration_shuts_the_gate_for_the_default(retry_after: float):
    clock = FakeClock()
    pacing = limiter(clock)
    pacing.on_throttled(retry_after)
    assert pacing.gate_until <= clock.monotonic() + ratelimit.DEFAULT_THROTTLE_SECONDS
    assert pacing.gate_until == pacing.gate_until  # a number, not NaN
