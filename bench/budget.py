"""Benchmark: one Graph budget shared by 1, 4, 10 and 40 processes through one Azurite (contract §7).

Every process is a worker as ``bench throughput``'s multi-process mode runs them (the function's
handler behind an in-memory host with the host's concurrency of 16), with ``AzureWebJobsStorage``
set to one Azurite, so their Graph clients wait for the shared budget first. They share the
simulated tenant (30 calls per sliding second, throttled calls counted, 150 ± 50 ms), are started
together (each imports and builds everything, says ready, and all are told "go" at once), and the
upgrades are split evenly among them. Figures: elapsed ÷ floor, share of calls throttled, and what
the budget costs: storage operations per second per instance.

Then the outage run: 4 processes, and Azurite is stopped for a while mid-run and started again
(empty, as an in-memory Azurite comes back: the table is created again). Nothing may be lost, the
pace while the store is away is each process's last known share, and every process must log
``budget.degraded`` once and ``budget.recovered`` once.

    python -m bench budget [--counts 1,4,10,40] [--sizes 1000,1000,2000,2400] [--outage 12] [--skip-outage]

``BENCH_BUDGET_HEADROOM`` (default: the limiter's 0.92) sets the budget's pace as a share of the limit,
``BENCH_LIMITER_SCALE`` multiplies the per-process limiter's ceiling: both only to measure alternatives.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import sys
import threading
import time
import uuid
from collections import Counter
from typing import Any

import httpx

from bench._common import (
    HOST_CONCURRENCY,
    JITTER,
    LATENCY,
    LIMIT,
    ROOT,
    WINDOW,
    LocalHost,
    add_users,
    environment,
    new_delivery,
    quiet_logs,
    request_body,
    stand_ins,
    table,
    worker_processes,
    write_result,
)
from standins.azurite import Azurite
from standins.graph_simulator import GraphSimulator

#: No run may take longer than this many times its floor, plus a minute.
DEADLINE_FACTOR = 3.0
#: When the outage run stops Azurite (seconds after go), and for how long by default.
OUTAGE_AFTER = 8.0

Users = list[tuple[str, str]]


# --- one worker process --------------------------------------------------------------------------


class _Events(logging.Handler):
    """Counts the budget's log events in a worker."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.counts: Counter[str] = Counter()

    def emit(self, record: logging.LogRecord) -> None:
        name = getattr(record, "event", "")
        if name.startswith("budget."):
            self.counts[name] += 1


async def drive(env: dict[str, str], users: Users, events: _Events) -> dict[str, Any]:
    from upgrade_handler.budget import shared_budget
    from upgrade_handler.graph import LIMITS, TIMEOUT, GraphClient
    from upgrade_handler.handler import UpgradeHandler
    from upgrade_handler.ratelimit import HEADROOM, AdaptiveRateLimiter
    from upgrade_handler.settings import Settings

    statuses: Counter[str] = Counter()

    async def count(response: httpx.Response) -> None:
        statuses[str(response.status_code)] += 1

    settings = Settings.from_environment(env)
    limiter_scale = float(os.environ.get("BENCH_LIMITER_SCALE", "1"))
    headroom = float(os.environ.get("BENCH_BUDGET_HEADROOM") or HEADROOM)  # to measure other paces
    budget = shared_budget(settings, headroom=headroom)
    assert budget is not None, "the benchmark sets AzureWebJobsStorage"
    http = httpx.AsyncClient(
        timeout=TIMEOUT, limits=LIMITS, follow_redirects=False, trust_env=False, event_hooks={"response": [count]}
    )
    graph = GraphClient(
        settings.graph_base_url,
        limiter=AdaptiveRateLimiter(settings.max_requests_per_second * limiter_scale),
        http=http,
        budget=budget,
        budget_wait=settings.max_budget_wait_seconds,
    )
    host = LocalHost()
    handler = UpgradeHandler(settings, graph=graph, sender=host)
    for user_id, installation_id in users:
        host.put(new_delivery(request_body(user_id, installation_id, str(uuid.uuid4()))))
    timeline: list[tuple[float, int, float, bool]] = []
    started = time.perf_counter()

    async def sample() -> None:
        while True:
            timeline.append(
                (round(time.perf_counter() - started, 2), budget.granted, round(budget.share, 2), budget.degraded)
            )
            await asyncio.sleep(1.0)

    sampler = asyncio.create_task(sample())
    deadline = time.monotonic() + len(users) * env_count(env) / LIMIT * DEADLINE_FACTOR + 60
    report = await host.run(handler, concurrency=HOST_CONCURRENCY, deadline=deadline)
    elapsed = time.perf_counter() - started
    sampler.cancel()
    operations = budget.store_operations
    beats, failed = budget.beats, budget.failed_beats
    await handler.aclose()  # the budget's too: it stops beating and gives its share back
    return {
        "elapsed_s": round(elapsed, 3),
        "outcomes": dict(report.outcomes),
        "raised": dict(report.raised),
        "retries_scheduled": report.scheduled,
        "dead_lettered": len(report.dead_letters),
        "unfinished": report.unfinished,
        "statuses": dict(statuses),
        "granted": budget.granted,
        "store_operations": operations,
        "store_ops_per_s": round(operations / elapsed, 2),
        "beats": beats,
        "failed_beats": failed,
        "events": dict(events.counts),
        "timeline": timeline,
    }


def env_count(env: dict[str, str]) -> int:
    return int(env.get("BENCH_PROCESSES", "1"))


def child_main() -> None:
    quiet_logs()
    events = _Events()
    logging.getLogger("upgrade_handler").addHandler(events)
    plan = json.loads(sys.stdin.readline())
    users = [tuple(pair) for pair in plan["users"]]
    print("ready", flush=True)
    if sys.stdin.readline().strip() != "go":
        return
    report = asyncio.run(drive(plan["env"], users, events))
    print(json.dumps(report), flush=True)


# --- the runs ------------------------------------------------------------------------------------


def run_fleet(
    graph: GraphSimulator, env: dict[str, str], users: Users, processes: int, *, during: Any = None
) -> dict[str, Any]:
    """``processes`` workers sharing the tenant and the store; ``during(go_time)`` runs in a thread meanwhile."""
    env = {**env, "BENCH_PROCESSES": str(processes), "GRAPH_BUDGET_TABLE": "budget" + uuid.uuid4().hex[:12]}
    shares = [users[i::processes] for i in range(processes)]
    with worker_processes("bench.budget", env, shares) as fleet:
        before = graph.stats()
        upgraded_before = len(graph.upgraded)
        started = time.perf_counter()
        fleet.go()
        side = threading.Thread(target=during, args=(started,), daemon=True) if during else None
        if side:
            side.start()
        reports = fleet.reports(timeout=len(users) / LIMIT * DEADLINE_FACTOR + 180)
        elapsed = time.perf_counter() - started
        if side:
            side.join(120)
    after = graph.stats()
    calls = after["requests"] - before["requests"]
    throttled = after["throttled"] - before["throttled"]
    wanted = {iid for _, iid in users}
    done = {r.installation_id for r in graph.upgraded[upgraded_before:]} & wanted
    floor = len(users) / LIMIT
    ops = [r["store_ops_per_s"] for r in reports]
    return {
        "processes": processes,
        "requests": len(users),
        "upgraded": len(done),
        "elapsed_s": round(elapsed, 3),
        "floor_s": round(floor, 3),
        "elapsed_over_floor": round(elapsed / floor, 3),
        "graph_calls": calls,
        "throttled_429": throttled,
        "throttled_share": round(throttled / calls, 4) if calls else 0.0,
        "dead_lettered": sum(r["dead_lettered"] for r in reports),
        "unfinished": sum(r["unfinished"] for r in reports),
        "retries_scheduled": sum(r["retries_scheduled"] for r in reports),
        "store_ops_per_s_per_instance_mean": round(sum(ops) / len(ops), 2),
        "store_ops_per_s_per_instance_max": max(ops),
        "per_process": reports,
    }


def fresh_limit(graph: GraphSimulator) -> None:
    time.sleep(1.5)
    graph.set_rate_limit(LIMIT, window=WINDOW)
    graph.set_latency(LATENCY, JITTER)


def outage_summary(result: dict[str, Any], down_at: float, up_at: float) -> dict[str, Any]:
    """Slots granted per second by the whole fleet before, during and after the outage."""

    def pace(low: float, high: float) -> float:
        total = 0.0
        for report in result["per_process"]:  # each process's slots per second between its samples nearest
            points = [(t, g) for t, g, _, _ in report["timeline"] if low <= t <= high]
            if len(points) >= 2 and points[-1][0] > points[0][0]:
                total += (points[-1][1] - points[0][1]) / (points[-1][0] - points[0][0])
        return round(total, 2)

    events: Counter[str] = Counter()
    for report in result["per_process"]:
        events.update(report["events"])
    return {
        "store_down_s": [round(down_at, 1), round(up_at, 1)],
        "pace_before": pace(2.0, down_at),
        "pace_during": pace(down_at + 1.0, up_at),
        "pace_after": pace(up_at + 3.0, up_at + 13.0),
        "budget_events": dict(events),
        "processes_degraded_once": sum(1 for r in result["per_process"] if r["events"].get("budget.degraded") == 1),
        "processes_recovered_once": sum(1 for r in result["per_process"] if r["events"].get("budget.recovered") == 1),
    }


COLUMNS = (
    "processes",
    "upgrades",
    "upgraded",
    "elapsed s",
    "floor s",
    "elapsed ÷ floor",
    "Graph calls",
    "429s",
    "429 share",
    "dead letters",
    "storage ops/s per instance",
)


def row(r: dict[str, Any]) -> list[Any]:
    return [
        r["processes"],
        r["requests"],
        r["upgraded"],
        r["elapsed_s"],
        r["floor_s"],
        r["elapsed_over_floor"],
        r["graph_calls"],
        r["throttled_429"],
        f"{r['throttled_share']:.2%}",
        r["dead_lettered"],
        r["store_ops_per_s_per_instance_mean"],
    ]


def run(counts: list[int], sizes: list[int], outage: float, skip_outage: bool, output: str) -> dict[str, Any]:
    quiet_logs()
    results: dict[str, Any] = {"limit_per_second": LIMIT, "latency": [LATENCY, JITTER], "runs": []}
    with stand_ins() as (identity, graph), Azurite() as azurite:
        env = environment(
            identity,
            graph.url,
            GRAPH_MAX_REQUESTS_PER_SECOND=str(LIMIT),
            AzureWebJobsStorage=azurite.connection_string,
        )
        for processes, size in zip(counts, sizes, strict=True):
            users = add_users(graph, size)
            fresh_limit(graph)
            result = run_fleet(graph, env, users, processes)
            results["runs"].append(result)
            print(f"  {processes} processes: {result['elapsed_s']} s", file=sys.stderr, flush=True)
        if not skip_outage:
            users = add_users(graph, 1000)
            fresh_limit(graph)
            window: dict[str, float] = {}

            def take_the_store_away(go: float) -> None:
                time.sleep(OUTAGE_AFTER)
                window["down"] = time.perf_counter() - go
                azurite.stop()
                time.sleep(outage)
                window["up"] = time.perf_counter() - go
                azurite.start()

            result = run_fleet(graph, env, users, 4, during=take_the_store_away)
            result["outage"] = outage_summary(result, window["down"], window["up"])
            results["outage_run"] = result
    print(table(COLUMNS, [row(r) for r in results["runs"]]))
    if "outage_run" in results:
        o = results["outage_run"]
        print()
        print(table(COLUMNS, [row(o)]))
        print(json.dumps(o["outage"]))
    path = write_result(output, results)
    print(f"\nwritten to {path.relative_to(ROOT)}")
    return results


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench budget")
    parser.add_argument("--counts", default="1,4,10,40")
    parser.add_argument("--sizes", default="1000,1000,2000,2400")
    parser.add_argument("--outage", type=float, default=12.0, help="seconds Azurite is stopped in the outage run")
    parser.add_argument("--skip-outage", action="store_true")
    parser.add_argument("--output", default="budget")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        child_main()
        return
    counts = [int(c) for c in args.counts.split(",")]
    sizes = [int(s) for s in args.sizes.split(",")]
    run(counts, sizes, args.outage, args.skip_outage, args.output)


if __name__ == "__main__":
    main()
