"""The shared Graph budget (contract §7) against a real Table service: Azurite, over a real socket.

Several budgets in one process (and two in processes of their own) share one table. Beats are run
faster than in production (0.1 s instead of 0.5 s) to keep the tests short; what is asserted is
counted (slots granted, lanes held, log records), never timed.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import sys
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import replace
from subprocess import PIPE
from typing import Any

import pytest
from azure.data.tables.aio import TableClient

from standins.azurite import Azurite
from standins.graph_simulator import GraphSimulator
from standins.storage_proxy import StorageProxy
from tests.support import USER, FakeClock
from upgrade_handler.budget import (
    BLIND_SHARE,
    BudgetWaitExceeded,
    LocalSchedule,
    SharedBudget,
    shared_budget,
)
from upgrade_handler.budget_lanes import MAX_SEARCH, MIN_LANE, Lane, allocate, lay_out
from upgrade_handler.budget_store import TableBudgetStore, budget_key
from upgrade_handler.errors import TransientGraphError
from upgrade_handler.graph import GraphClient
from upgrade_handler.messages import Scope, Target
from upgrade_handler.ratelimit import HEADROOM, AdaptiveRateLimiter
from upgrade_handler.settings import Settings, StorageConnection
from upgrade_handler.storage import open_table

LIMIT = 30.0
RATE = LIMIT * HEADROOM
#: Production beats every 0.5 s; the tests beat five times as often, with the other intervals to match.
FAST = {"heartbeat": 0.1, "settle": 0.25, "stale_after": 1.0, "idle_after": 0.3}
KEY = budget_key("https://graph.microsoft.com", None)
ROOT = __import__("pathlib").Path(__file__).resolve().parent.parent


def new_table() -> str:
    return "budget" + uuid.uuid4().hex[:12]


def budget(connection_string: str, table: str, *, key: str = KEY, timeout: float = 0.5, **tuning: Any) -> SharedBudget:
    store = TableBudgetStore(
        open_table(StorageConnection(connection_string=connection_string), table, timeout=timeout), key
    )
    return SharedBudget(store, RATE, **{**FAST, **tuning})


class Load:
    """``workers`` tasks that each take a slot after another from ``budget`` until stopped."""

    def __init__(self, of: SharedBudget, workers: int = 8) -> None:
        self.budget = of
        self.granted = 0
        self.exceeded = 0
        self._tasks = [asyncio.create_task(self._work()) for _ in range(workers)]

    async def _work(self) -> None:
        while True:
            try:
                await self.budget.acquire(60.0)
                self.granted += 1
            except BudgetWaitExceeded:
                self.exceeded += 1
                await asyncio.sleep(0.05)

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)


async def until(condition: Callable[[], bool], *, within: float = 15.0, what: str = "") -> None:
    """Poll ``condition`` (a bound on a wait, not an assertion about time)."""
    deadline = time.monotonic() + within
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"never came true: {what}")
        await asyncio.sleep(0.02)


def busiest_grid_second(slot_lists: list[list[int]], rate: float = RATE) -> int:
    """The most slots granted in any window of one second on the grid (slot ``k`` starts at ``k / rate``)."""
    slots = sorted(s for slots in slot_lists for s in slots)
    span, most, low = rate, 0, 0
    for high, slot in enumerate(slots):
        while slot - slots[low] >= span:
            low += 1
        most = max(most, high - low + 1)
    return most


def lanes_overlap(budgets: list[SharedBudget]) -> bool:
    held = [b._lane for b in budgets if b._lane is not None]
    return any(a.intersect(b) is not None for i, a in enumerate(held) for b in held[i + 1 :])


@pytest.fixture
async def fleet(azurite: Azurite) -> AsyncIterator[Callable[..., SharedBudget]]:
    """Builds budgets on one fresh table of the session's Azurite; closes them after."""
    made: list[SharedBudget] = []
    table = new_table()

    def build(connection_string: str | None = None, **kwargs: Any) -> SharedBudget:
        made.append(budget(connection_string or azurite.connection_string, kwargs.pop("table", table), **kwargs))
        return made[-1]

    yield build
    for each in made:
        await each.aclose()


def events(caplog: pytest.LogCaptureFixture, name: str) -> int:
    return sum(1 for r in caplog.records if getattr(r, "event", None) == name)


# --- shares and lanes, without a store ----------------------------------------------------------------


def test_shares_follow_demand_while_it_fits_and_are_max_min_fair_when_it_does_not() -> None:
    assert allocate({"a": 5, "b": 15}, 30) == {"a": 7.5, "b": 22.5}
    assert allocate({"a": 5, "b": 30, "c": 30}, 30) == {"a": 5, "b": 12.5, "c": 12.5}
    assert allocate({"a": 0, "b": 0}, 30) == {}
    forty = allocate({str(i): 30.0 for i in range(40)}, 27.6)
    assert sum(forty.values()) == pytest.approx(27.6)
    assert list(forty.values()) == [pytest.approx(27.6 / 40)] * 40


def test_a_peer_asking_for_more_never_gives_another_more() -> None:
    before = allocate({"a": 10, "b": 10, "c": 3}, 20)
    after = allocate({"a": 10, "b": 25, "c": 3}, 20)
    assert after["a"] <= before["a"]
    assert after["c"] <= before["c"]


def test_lanes_are_laid_side_by_side_in_key_order_and_own_disjoint_slots() -> None:
    lanes = lay_out({"b": 10, "a": 5, "c": 15}, 30)
    assert lanes["a"].low == 0.0
    assert lanes["a"].high == pytest.approx(1 / 6)
    assert lanes["c"].high == pytest.approx(1.0)
    owners = [sum(lane.owns(k) for lane in lanes.values()) for k in range(10_000)]
    assert set(owners) == {1}, "every slot has exactly one owner"
    share_of_b = sum(lanes["b"].owns(k) for k in range(30_000)) / 30_000
    assert share_of_b == pytest.approx(1 / 3, abs=0.002)


def test_a_lane_spreads_its_slots_instead_of_bunching_them() -> None:
    lane = Lane(0.5, 0.5 + 1 / 40)
    slots = [k for k in range(20_000) if lane.owns(k)]
    gaps = {b - a for a, b in itertools.pairwise(slots)}
    assert max(gaps) <= 3 * 40, gaps  # the three-gap theorem: a few gap lengths around 1 / width


def test_a_sliver_left_by_moving_lanes_is_no_lane_and_no_search_runs_away() -> None:
    old, new = Lane(0.3, 0.325), Lane(0.325 - 1e-12, 0.35)
    assert old.intersect(new) is None
    assert lay_out({"a": 1e-9, "b": 30}, 30).keys() == {"b"}
    narrow = Lane(0.5, 0.5 + MIN_LANE / 2)  # not made by the budget, but searched in bounded steps
    assert narrow.next_slot(0) <= MAX_SEARCH


async def test_the_local_schedule_spaces_reservations_at_the_rate() -> None:
    clock = FakeClock()
    schedule = LocalSchedule(10.0, now=clock.now)
    first = await schedule.reserve_schedule(20)
    second = await schedule.reserve_schedule(5)
    assert first == clock.now()
    assert (second - first).total_seconds() == pytest.approx(2.0)


def test_no_storage_account_means_no_shared_budget() -> None:
    settings = Settings.from_environment(
        {"ServiceBusConnection": "Endpoint=sb://x.servicebus.windows.net/;SharedAccessKeyName=a;SharedAccessKey=b"}
    )
    assert shared_budget(settings) is None
    assert budget_key("https://graph.microsoft.us", "0B1C2D3E-4F50-6172-8394-A5B6C7D8E9F0") == (
        "graph.microsoft.us|0b1c2d3e-4f50-6172-8394-a5b6c7d8e9f0"
    )


# --- the fleet, against Azurite -------------------------------------------------------------------------


async def test_a_lone_instance_takes_the_whole_budget(fleet: Callable[..., SharedBudget]) -> None:
    alone = fleet()
    load = Load(alone)
    await until(lambda: load.granted >= 40, what="40 slots granted")
    await load.stop()
    assert alone.share == pytest.approx(RATE)
    assert len(set(alone.slots)) == len(alone.slots)
    assert busiest_grid_second([list(alone.slots)]) <= LIMIT


async def test_four_instances_together_never_start_more_than_the_budget_in_any_second(
    fleet: Callable[..., SharedBudget],
) -> None:
    four = [fleet() for _ in range(4)]
    loads = [Load(b) for b in four]
    overlaps = 0

    def enough() -> bool:
        nonlocal overlaps
        overlaps += lanes_overlap(four)
        return sum(load.granted for load in loads) >= 120 and all(load.granted >= 10 for load in loads)

    await until(enough, within=30, what="120 slots over four instances, at least 10 each")
    for load in loads:
        await load.stop()
    slots = [list(b.slots) for b in four]
    everything = [s for each in slots for s in each]
    assert len(set(everything)) == len(everything), "no slot is granted twice across the fleet"
    assert busiest_grid_second(slots) <= LIMIT
    assert overlaps == 0
    assert sum(b.share for b in four) <= RATE + 1e-9


async def test_a_newcomer_gets_a_share_and_a_leaver_gives_it_back(fleet: Callable[..., SharedBudget]) -> None:
    first, second = fleet(), fleet()
    first_load = Load(first)
    await until(lambda: first.share == pytest.approx(RATE), what="the first alone holds everything")
    second_load = Load(second)
    overlaps = 0

    def shared() -> bool:
        nonlocal overlaps
        overlaps += lanes_overlap([first, second])
        return second.share > 0 and first.share + second.share == pytest.approx(RATE)

    await until(shared, what="the newcomer holds a share")
    assert second.share == pytest.approx(RATE / 2)
    assert overlaps == 0
    await second_load.stop()
    await second.aclose()  # leaves: deletes its row
    await until(lambda: first.share == pytest.approx(RATE), what="the leaver's share comes back")
    await first_load.stop()


async def test_a_crashed_instance_share_returns_once_its_row_is_stale(fleet: Callable[..., SharedBudget]) -> None:
    survivor, crashed = fleet(), fleet()
    loads = [Load(survivor), Load(crashed)]
    await until(lambda: survivor.share == pytest.approx(RATE / 2), what="two halves")
    await loads[1].stop()
    for task in crashed._tasks:  # dies without a word: no demand 0, no deleted row
        task.cancel()
    await until(lambda: survivor.share == pytest.approx(RATE), what="the stale row is ignored")
    await loads[0].stop()


async def test_an_idle_instance_holds_nothing_and_stops_beating(fleet: Callable[..., SharedBudget]) -> None:
    busy, idle = fleet(), fleet()
    busy_load = Load(busy)
    for _ in range(3):
        await idle.acquire(10.0)
    await until(lambda: idle.share == 0 and busy.share == pytest.approx(RATE), what="the idle one lets go")
    beats = idle.beats
    await until(lambda: busy.beats >= 10 + beats, what="ten more beats of the busy one")
    assert idle.beats <= beats + 1, "an idle instance does not keep beating"
    await idle.acquire(10.0)  # and comes back when called
    assert idle.granted == 4
    await busy_load.stop()


async def test_two_apps_sharing_a_storage_account_do_not_share_a_budget(fleet: Callable[..., SharedBudget]) -> None:
    one = fleet(key=budget_key("https://graph.microsoft.com", "0b1c2d3e-4f50-6172-8394-a5b6c7d8e9f0"))
    other = fleet(key=budget_key("https://graph.microsoft.com", "11111111-4f50-6172-8394-a5b6c7d8e9f0"))
    loads = [Load(one), Load(other)]
    await until(lambda: one.share == pytest.approx(RATE) and other.share == pytest.approx(RATE), what="both whole")
    for load in loads:
        await load.stop()


async def test_a_wait_longer_than_allowed_is_refused_with_the_expected_wait(
    fleet: Callable[..., SharedBudget],
) -> None:
    newcomer = fleet()
    with pytest.raises(BudgetWaitExceeded) as joining:
        await newcomer.acquire(0.0)  # it has no share until it has been seen
    assert joining.value.expected_wait > 0
    await newcomer.acquire(10.0)
    results = await asyncio.gather(*(newcomer.acquire(0.3) for _ in range(20)), return_exceptions=True)
    refused = [r for r in results if isinstance(r, BudgetWaitExceeded)]
    assert refused, "20 slots at 27.6/s cannot all come within 0.3 s"
    assert all(r.expected_wait > 0.3 for r in refused)
    assert all(isinstance(r, float) and r <= 0.3 + 0.1 for r in results if not isinstance(r, BaseException))


async def test_fan_outs_reserve_consecutive_stretches_of_one_schedule(fleet: Callable[..., SharedBudget]) -> None:
    one, other = fleet(), fleet()
    starts = await asyncio.gather(*(b.reserve_schedule(27) for b in (one, other, one, other)))
    ordered = sorted(starts)
    gaps = [(b - a).total_seconds() for a, b in itertools.pairwise(ordered)]
    assert gaps == [pytest.approx(27 / RATE, abs=1e-3)] * 3, "each reservation starts where the last ended"


async def test_two_processes_never_start_more_than_the_budget_in_any_second(azurite: Azurite) -> None:
    table = new_table()
    command = [sys.executable, "-m", "tests.test_budget", azurite.connection_string, table, "60"]
    children = [await asyncio.create_subprocess_exec(*command, cwd=ROOT, stdout=PIPE) for _ in range(2)]
    outputs = [await asyncio.wait_for(child.communicate(), 60) for child in children]
    reports = [json.loads(out.decode().strip().splitlines()[-1]) for out, _ in outputs]
    assert all(r["granted"] >= 60 for r in reports)
    slots = [r["slots"] for r in reports]
    everything = [s for each in slots for s in each]
    assert len(set(everything)) == len(everything), "no slot is granted twice across the processes"
    assert busiest_grid_second(slots) <= LIMIT
    first, second = (r["store_minus_wall"] for r in reports)
    assert abs(first - second) < 0.02, "both processes keep the grid on the store's clock"


# --- the store misbehaves: the budget goes on, and says so once ------------------------------------------

FAULTS: dict[str, Callable[[StorageProxy], None]] = {
    "stalls": lambda proxy: proxy.stall(),
    "throttles (503)": lambda proxy: proxy.answer(503),
    "fails (500)": lambda proxy: proxy.answer(500),
    "refuses connections": lambda proxy: proxy.refuse(),
}


@pytest.mark.parametrize("fault", FAULTS)
async def test_a_store_that_fails_never_stops_the_budget(
    fault: str, fleet: Callable[..., SharedBudget], storage_proxy: StorageProxy, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="upgrade_handler")
    proxied = fleet(storage_proxy.connection_string, timeout=0.3)
    other = fleet()  # reaches the store directly
    loads = [Load(proxied), Load(other)]
    await until(lambda: proxied.share == pytest.approx(RATE / 2), what="two halves")
    lane = proxied._lane
    FAULTS[fault](storage_proxy)
    await until(lambda: proxied.failed_beats >= 3, what="three failed beats")
    granted = loads[0].granted
    await until(lambda: loads[0].granted >= granted + 10, what="ten more slots while the store fails")
    assert proxied.degraded
    assert proxied._lane == lane, "the cautious pace is the last known share"
    assert events(caplog, "budget.degraded") == 1, "once per episode"
    storage_proxy.forward()
    await until(lambda: not proxied.degraded, what="rejoins")
    assert events(caplog, "budget.recovered") == 1
    assert events(caplog, "budget.degraded") == 1
    assert loads[0].exceeded == 0
    for load in loads:
        await load.stop()


async def test_a_deleted_table_is_created_again(
    azurite: Azurite, fleet: Callable[..., SharedBudget], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="upgrade_handler")
    table = new_table()
    one = fleet(table=table)
    load = Load(one)
    await until(lambda: one.share == pytest.approx(RATE), what="a share")
    async with TableClient.from_connection_string(azurite.connection_string, table) as client:
        await client.delete_table()
    granted = load.granted
    await until(lambda: events(caplog, "budget.recovered") == 1, what="the table is back and the beat with it")
    await until(lambda: load.granted >= granted + 20, what="twenty more slots")
    assert events(caplog, "budget.degraded") == 1
    assert load.exceeded == 0
    await load.stop()


async def test_a_store_that_never_answered_gives_a_blind_share(
    fleet: Callable[..., SharedBudget], storage_proxy: StorageProxy, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="upgrade_handler")
    storage_proxy.refuse()
    blind = fleet(storage_proxy.connection_string)
    waited = await blind.acquire(10.0)
    assert waited >= 0
    assert blind.share == pytest.approx(RATE * BLIND_SHARE)
    assert events(caplog, "budget.degraded") == 1
    storage_proxy.forward()
    load = Load(blind)
    await until(lambda: blind.share == pytest.approx(RATE), what="alone once the store answers")
    await load.stop()
    assert events(caplog, "budget.recovered") == 1


@pytest.mark.parametrize("jump", [3600.0, -3600.0])
async def test_a_clock_that_jumps_neither_stalls_nor_bursts(jump: float, fleet: Callable[..., SharedBudget]) -> None:
    shift = [0.0]
    jumpy = fleet(clock=lambda: time.monotonic() + shift[0])
    steady = fleet()
    loads = [Load(jumpy), Load(steady)]
    await until(lambda: jumpy.share == pytest.approx(RATE / 2), what="two halves")
    before = len(jumpy.slots)
    shift[0] = jump
    await until(lambda: len(jumpy.slots) >= before + 20, what="twenty more slots after the jump")
    for load in loads:
        await load.stop()
    assert jumpy._offset is not None
    assert abs(jumpy._offset + jump - (steady._offset or 0.0)) < 0.05, "the grid follows the store's clock again"


async def test_settings_build_a_budget_that_reaches_azurite(azurite: Azurite) -> None:
    settings = Settings.from_environment(
        {
            "ServiceBusConnection": "Endpoint=sb://x.servicebus.windows.net/;SharedAccessKeyName=a;SharedAccessKey=b",
            "AzureWebJobsStorage": azurite.connection_string,
            "GRAPH_BUDGET_TABLE": new_table(),
        }
    )
    made = shared_budget(replace(settings, max_requests_per_second=LIMIT))
    assert made is not None
    assert made.rate == pytest.approx(RATE)
    try:
        assert await made.acquire(10.0) >= 0
        assert made.share == pytest.approx(RATE)
    finally:
        await made.aclose()


# --- a budget in a process of its own (the two-process test runs this) -----------------------------------


async def _child(connection_string: str, table: str, count: int) -> dict[str, Any]:
    one = budget(connection_string, table)
    offsets: list[float] = []

    async def work() -> None:
        while one.granted < count:
            await one.acquire(60.0)
            if one._offset is not None:  # the store's clock against this machine's wall clock
                offsets.append(one._offset - (time.time() - time.monotonic()))

    await asyncio.gather(*(work() for _ in range(8)))
    slots = list(one.slots)
    await one.aclose()
    offsets.sort()
    return {"granted": len(slots), "slots": slots, "store_minus_wall": offsets[len(offsets) // 2]}


def _run_child(argv: list[str]) -> None:
    print(json.dumps(asyncio.run(_child(argv[0], argv[1], int(argv[2])))), flush=True)


if __name__ == "__main__":
    _run_child(sys.argv[1:])


# --- the Graph client waits for the budget first, and turns "too far" into a deferral -----------------------


async def test_a_graph_call_held_back_by_the_budget_is_a_transient_too_many_requests(
    fleet: Callable[..., SharedBudget], graph: GraphSimulator
) -> None:
    newcomer = fleet()  # no share until it has been seen, so no slot within 0 s
    client = GraphClient(graph.url, limiter=AdaptiveRateLimiter(LIMIT), budget=newcomer, budget_wait=0.0)
    requests = graph.stats()["requests"]
    try:
        with pytest.raises(TransientGraphError) as held:
            await client.upgrade(Target(Scope.USER, USER), "aW5zdGFsbGF0aW9u", None, "token")
    finally:
        await client.aclose()
    failure = held.value.failure
    assert (failure.status, failure.code) == (None, "TooManyRequests")
    assert failure.message.startswith("held back: ")
    assert failure.retry_after is not None
    assert failure.retry_after > 0
    assert failure.client_request_id
    assert graph.stats()["requests"] == requests, "nothing was sent"
