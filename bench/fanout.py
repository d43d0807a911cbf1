"""Benchmark 6: one fan-out request for a whole group, upgraded end to end through the broker.

The tenant holds a group of N users, each with the app installed. ONE request
``{"groupId": ..., "teamsAppId": ...}`` goes on the upgrade queue of the Service Bus stand-in
(duplicate detection on, on both queues, as in Azure), and the host-like peek-lock driver of
the soak (``bench.soak.HostDriver``, 16 handler calls at a time) runs until the queue is empty
and nothing is in flight. The group request reads one page of members per invocation (contract
§6) and enqueues one ``teamsAppId`` request per member plus a continuation; each member's
request is then a lookup and an upgrade. So the Graph calls are pages + N lookups + N upgrades,
all against the simulator's 30-per-second window (throttled calls count) with 150 ms ± 50 ms of
latency: the floor is those calls ÷ 30/s.

Then the reconciliation: every member has exactly one child request on the queue (by message
id and by user), exactly one 2xx upgrade in the simulator's records, and its installation at
the app's latest version; nothing is dead-lettered and nothing is left on the queue.

    python -m bench fanout [--size 20000] [--seed 1]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import random
import sys
import time
import uuid
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

from azure.identity.aio import ManagedIdentityCredential
from azure.servicebus import ServiceBusMessage, ServiceBusReceiveMode
from azure.servicebus.aio import ServiceBusClient

from bench._common import (
    APP,
    DEADLETTER_QUEUE,
    HOST_CONCURRENCY,
    JITTER,
    LATENCY,
    LIMIT,
    MI_CLIENT_ID,
    ROOT,
    UPGRADE_QUEUE,
    WINDOW,
    quiet_logs,
    stand_ins,
    table,
    write_result,
)
from bench.soak import HostDriver
from standins.graph_simulator import GraphSimulator, RecordedRequest
from standins.identity_endpoint import IdentityEndpoint
from standins.servicebus_broker import DEAD_LETTER_SUFFIX, ServiceBusBroker
from upgrade_handler.auth import TokenProvider
from upgrade_handler.fanout import PAGE_PROPERTY, PARENT_PROPERTY, child_message_id
from upgrade_handler.graph import GraphClient
from upgrade_handler.handler import UpgradeHandler
from upgrade_handler.ratelimit import AdaptiveRateLimiter
from upgrade_handler.servicebus import ServiceBusMessageSender
from upgrade_handler.settings import Settings

#: The run is bounded by this many times its floor, plus a margin.
DEADLINE_FACTOR = 1.5
DEADLINE_MARGIN = 120.0


@dataclass(frozen=True)
class FanOutConfig:
    size: int = 20_000
    seed: int = 1
    concurrency: int = HOST_CONCURRENCY
    #: The simulator's window (None: no rate limit) and latency.
    rate_limit: int | None = LIMIT
    latency: float = LATENCY
    jitter: float = JITTER
    #: ``GRAPH_MAX_REQUESTS_PER_SECOND`` of the handler.
    max_requests_per_second: float = LIMIT
    #: Members per group page (the simulator's cap; the handler asks for 999). None: leave it.
    page_size: int | None = None
    #: Seconds; None: DEADLINE_FACTOR x floor + DEADLINE_MARGIN.
    deadline_seconds: float | None = None


class CountingSender:
    """The handler's sender, which also notes every message id it sends, by kind."""

    def __init__(self, inner: ServiceBusMessageSender) -> None:
        self.inner = inner
        self.children: list[tuple[str, str]] = []  # (message id, userId)
        self.continuations: list[str] = []
        self.retries: list[str] = []
        self.other: list[str] = []
        self.children_done_at: float | None = None  # time.monotonic() of the last child send

    async def send(self, queue: str, messages: Sequence[ServiceBusMessage]) -> None:
        await self.inner.send(queue, messages)
        for message in messages:
            properties = message.application_properties or {}
            message_id = str(message.message_id)
            if PAGE_PROPERTY in properties:  # a continuation (it names the fan-out's parent too)
                (self.retries if ":retry:" in message_id else self.continuations).append(message_id)
            elif PARENT_PROPERTY in properties:
                body = message.body
                raw = body if isinstance(body, bytes) else b"".join(body)
                self.children.append((message_id, str(json.loads(raw)["userId"])))
                self.children_done_at = time.monotonic()
            elif ":retry:" in message_id:
                self.retries.append(message_id)
            else:
                self.other.append(f"{queue}: {message_id}")

    async def aclose(self) -> None:
        await self.inner.aclose()


def expected_calls(size: int, page_size: int) -> int:
    """Group pages + one lookup and one upgrade per member."""
    return max(1, math.ceil(size / page_size)) + 2 * size


def seed_group(graph: GraphSimulator, size: int, seed: int) -> tuple[str, dict[str, str]]:
    """A group of ``size`` fresh users, each with the app installed: (group id, user id -> installation id)."""
    rng = random.Random(seed)
    tenant = graph.tenant

    def fresh_id() -> str:
        for _ in range(1000):
            candidate = str(uuid.UUID(int=rng.getrandbits(128), version=4))
            if tenant.resolve("user", candidate) is None:
                return candidate
        raise RuntimeError("could not draw a fresh user id")

    group_id = str(uuid.UUID(int=rng.getrandbits(128), version=4))
    members: dict[str, str] = {}
    for _ in range(size):
        user_id = fresh_id()
        tenant.add_user(user_id, f"fan.{user_id[:8]}@contoso.com")
        members[user_id] = tenant.install("user", user_id, APP)
    tenant.add_group(group_id, list(members))
    return group_id, members


def classify(record: RecordedRequest) -> str:
    if "transitiveMembers" in record.segments:
        return "group_pages"
    if record.method == "POST" and record.segments[-1:] == ("upgrade",):
        return "upgrades"
    if record.method == "GET" and record.segments[-1:] == ("installedApps",):
        return "lookups"
    return "other"


async def sample_limiter(limiter: AdaptiveRateLimiter, trace: list[tuple[float, float]], started: float) -> None:
    for _ in range(100_000):  # bounded; cancelled when the run ends
        trace.append((round(time.monotonic() - started, 1), round(limiter.rate, 2)))
        await asyncio.sleep(1.0)


async def sample_queue(broker: ServiceBusBroker, trace: list[tuple[float, int, int]], started: float) -> None:
    """Every second: the upgrade queue's active messages (due: available or locked, what scaling
    reads) and those scheduled for later (a paced fan-out's children waiting for their slot)."""
    for _ in range(100_000):  # bounded; cancelled when the run ends
        counts = broker.state_counts(UPGRADE_QUEUE)
        active = counts.get("available", 0) + counts.get("locked", 0)
        trace.append((round(time.monotonic() - started, 1), active, counts.get("scheduled", 0)))
        await asyncio.sleep(1.0)


async def fanout(
    identity: IdentityEndpoint, graph: GraphSimulator, broker: ServiceBusBroker, config: FanOutConfig
) -> dict[str, Any]:
    """Run one group fan-out against running stand-ins; returns the figures and the reconciliation.

    ``broker`` must detect duplicates on ``UPGRADE_QUEUE`` and ``DEADLETTER_QUEUE``.
    """
    page_size = config.page_size or graph.tenant.group_page_size
    floor_calls = expected_calls(config.size, min(page_size, 999))
    floor_s = floor_calls / LIMIT
    deadline_s = config.deadline_seconds or DEADLINE_FACTOR * floor_s + DEADLINE_MARGIN
    group_id, members = seed_group(graph, config.size, config.seed)
    installation_of = {iid: user for user, iid in members.items()}
    env = {
        **identity.environment(),
        "ServiceBusConnection": broker.connection_string,
        "GRAPH_BASE_URL": graph.url,
        "AZURE_CLIENT_ID": MI_CLIENT_ID,
        "UPGRADE_QUEUE_NAME": UPGRADE_QUEUE,
        "DEADLETTER_QUEUE_NAME": DEADLETTER_QUEUE,
        "GRAPH_MAX_REQUESTS_PER_SECOND": str(config.max_requests_per_second),
    }
    settings = Settings.from_environment(env)
    sender = CountingSender(ServiceBusMessageSender(settings.service_bus))
    tokens = TokenProvider(settings.graph_scope, lambda: ManagedIdentityCredential(client_id=MI_CLIENT_ID))
    limiter = AdaptiveRateLimiter(settings.max_requests_per_second)
    handler = UpgradeHandler(
        settings, graph=GraphClient(settings.graph_base_url, limiter=limiter), tokens=tokens, sender=sender
    )
    request_id = f"fanout{config.seed}-{uuid.uuid4().hex[:6]}"
    request = {"groupId": group_id, "teamsAppId": APP, "requestId": request_id}
    sent_before = broker.sent_count(UPGRADE_QUEUE)
    dead_before = len(broker.messages(DEADLETTER_QUEUE))
    old_page_size = graph.tenant.__dict__.get("group_page_size")
    if config.page_size is not None:
        graph.tenant.group_page_size = config.page_size
    if config.rate_limit:
        await asyncio.sleep(1.5)  # let any earlier window drain
    graph.set_rate_limit(config.rate_limit, window=WINDOW)
    graph.set_latency(config.latency, config.jitter)
    requests_before = len(graph.requests)
    upgrades_before = len(graph.upgraded)
    trace: list[tuple[float, float]] = []
    timed_out = False
    started = time.monotonic()
    deadline = started + deadline_s
    sampler = asyncio.create_task(sample_limiter(limiter, trace, started))
    queue_trace: list[tuple[float, int, int]] = []
    queue_sampler = asyncio.create_task(sample_queue(broker, queue_trace, started))
    try:
        async with ServiceBusClient.from_connection_string(broker.connection_string) as bus:
            async with bus.get_queue_sender(UPGRADE_QUEUE) as producer:
                await producer.send_messages(
                    ServiceBusMessage(
                        json.dumps(request).encode(), message_id=request_id, content_type="application/json"
                    )
                )
            receiver = bus.get_queue_receiver(
                UPGRADE_QUEUE, receive_mode=ServiceBusReceiveMode.PEEK_LOCK, prefetch_count=0
            )
            async with receiver:
                driver = HostDriver(handler, receiver, config.concurrency)
                next_check = 0.0
                while True:
                    if time.monotonic() >= deadline:
                        timed_out = True
                        break
                    await driver.pump()
                    if time.monotonic() >= next_check:
                        next_check = time.monotonic() + 0.5
                        if driver.busy == 0 and not broker.messages(UPGRADE_QUEUE):
                            break
                await driver.drain()
    finally:
        elapsed = time.monotonic() - started
        sampler.cancel()
        queue_sampler.cancel()
        graph.set_rate_limit(None)
        graph.set_latency(0.0)
        if config.page_size is not None:
            if old_page_size is None:
                del graph.tenant.group_page_size
            else:
                graph.tenant.group_page_size = old_page_size
        await handler.aclose()
        await sender.aclose()

    records = graph.requests[requests_before:]
    calls: Counter[str] = Counter(classify(r) for r in records)
    statuses: Counter[str] = Counter(str(r.status) for r in records)
    throttled = statuses.get("429", 0)
    total_calls = len(records)
    upgrades = graph.upgraded[upgrades_before:]
    upgraded_per_member: Counter[str] = Counter()
    for record in upgrades:
        user = installation_of.get(record.installation_id)
        if user is not None:
            upgraded_per_member[user] += 1
    latest = {graph.tenant.installation_version(iid) for iid in members.values()}
    at_latest = sum(1 for iid in members.values() if graph.tenant.installation_version(iid) == "1.1.0")
    children_by_user: Counter[str] = Counter(user for _, user in set(sender.children))
    expected_child_ids = {child_message_id(request_id, user) for user in members}
    child_ids = {message_id for message_id, _ in sender.children}
    retries = len(set(sender.retries))
    continuations = len(set(sender.continuations))
    accepted = broker.sent_count(UPGRADE_QUEUE) - sent_before
    dead_letters = broker.messages(DEADLETTER_QUEUE)[dead_before:]
    lost = [user for user in members if upgraded_per_member.get(user, 0) == 0]
    upgrade_times = sorted(r.time for r in upgrades)
    page_times = sorted(r.received_at for r in records if classify(r) == "group_pages")
    return {
        "members": config.size,
        "group_page_size": page_size,
        "graph_calls": total_calls,
        "graph_calls_by_kind": dict(calls),
        "floor_calls": floor_calls,
        "floor_s": round(total_calls / LIMIT, 1),
        "elapsed_s": round(elapsed, 1),
        "over_floor": round(elapsed / (total_calls / LIMIT) - 1, 4) if total_calls else None,
        "calls_per_second": round(total_calls / elapsed, 2) if elapsed else None,
        "members_per_second": round(len(upgrade_times) / elapsed, 2) if elapsed else None,
        "throttled_429": throttled,
        "throttled_share": round(throttled / total_calls, 4) if total_calls else 0.0,
        "statuses": dict(statuses),
        "children_sent": len(sender.children),
        "children_distinct": len(child_ids),
        "children_match_members": child_ids == expected_child_ids,
        "members_with_one_child": sum(1 for user in members if children_by_user.get(user) == 1),
        "continuations": continuations,
        "retry_copies": retries,
        "other_sends": sender.other[:20],
        "accepted_by_broker": accepted,
        "children_accepted_by_broker": accepted - 1 - continuations - retries,
        "upgraded_members": len(upgraded_per_member),
        "upgrades_2xx": len(upgrades),
        "upgraded_more_than_once": sum(1 for n in upgraded_per_member.values() if n > 1),
        "installations_at_latest": at_latest,
        "installation_versions": sorted(latest),
        "dead_letters": len(dead_letters),
        "dead_letter_reasons": dict(
            Counter(str(m.application_properties.get("DeadLetterReason")) for m in dead_letters)
        ),
        "dead_lettered_by_service_bus": len(broker.messages(UPGRADE_QUEUE + DEAD_LETTER_SUFFIX)),
        "lost": len(lost),
        "lost_ids": lost[:20],
        "left_on_queue": len(broker.messages(UPGRADE_QUEUE)),
        "timed_out": timed_out,
        "deadline_s": round(deadline_s, 1),
        "outcomes": dict(driver.outcomes),
        "invocations": driver.invocations,
        "raised": dict(driver.raised),
        "unhandled": driver.unhandled[:20],
        "unhandled_errors": len(driver.unhandled),
        "settle_errors": dict(driver.settle_errors),
        "pages_read_by_s": round(page_times[-1] - started, 2) if page_times else None,
        "children_enqueued_by_s": round(sender.children_done_at - started, 2) if sender.children_done_at else None,
        "first_upgrade_at_s": round(upgrade_times[0] - started, 2) if upgrade_times else None,
        "last_upgrade_at_s": round(upgrade_times[-1] - started, 2) if upgrade_times else None,
        "limiter_decreases": limiter.decreases,
        "limiter_rate_final": round(limiter.rate, 2),
        "limiter_rate_mean": round(sum(r for _, r in trace) / len(trace), 2) if trace else None,
        "limiter_trace": trace[:: max(1, len(trace) // 40)],
        "queue_active_max": max((active for _, active, _ in queue_trace), default=0),
        "queue_active_mean": round(sum(a for _, a, _ in queue_trace) / len(queue_trace), 1) if queue_trace else None,
        "queue_scheduled_max": max((scheduled for _, _, scheduled in queue_trace), default=0),
        "queue_trace": queue_trace[:: max(1, len(queue_trace) // 40)],
    }


COLUMNS = (
    "members",
    "Graph calls (pages + lookups + upgrades)",
    "floor s",
    "elapsed s",
    "over floor",
    "429 share",
    "children enqueued / members",
    "upgraded / members",
    "dead letters",
    "lost",
)


def row(r: dict[str, Any]) -> list[Any]:
    kinds = r["graph_calls_by_kind"]
    breakdown = f"{kinds.get('group_pages', 0):,} + {kinds.get('lookups', 0):,} + {kinds.get('upgrades', 0):,}"
    over = f"{r['over_floor']:+.1%}" if r["over_floor"] is not None else "-"
    return [
        r["members"],
        f"{r['graph_calls']:,} ({breakdown})",
        r["floor_s"],
        r["elapsed_s"],
        over,
        f"{r['throttled_share']:.2%} ({r['throttled_429']:,})",
        f"{r['children_distinct']:,} / {r['members']:,} (sent {r['children_sent']:,})",
        f"{r['upgraded_members']:,} / {r['members']:,}"
        f" (2xx {r['upgrades_2xx']:,}, at latest {r['installations_at_latest']:,})",
        r["dead_letters"],
        r["lost"],
    ]


def print_report(r: dict[str, Any]) -> None:
    print(table(COLUMNS, [row(r)]))
    print()
    print(
        table(
            ("on the way", "value"),
            [
                ["handler invocations", r["invocations"]],
                ["outcomes", ", ".join(f"{k} {v:,}" for k, v in sorted(r["outcomes"].items()))],
                ["continuations / retry copies", f"{r['continuations']} / {r['retry_copies']}"],
                ["accepted by the broker (request + children + continuations + retries)", r["accepted_by_broker"]],
                ["all pages read by s", r["pages_read_by_s"]],
                ["all children enqueued by s", r["children_enqueued_by_s"]],
                ["first / last upgrade at s", f"{r['first_upgrade_at_s']} / {r['last_upgrade_at_s']}"],
                ["Graph calls per s / members per s", f"{r['calls_per_second']} / {r['members_per_second']}"],
                [
                    "limiter: mean / final rate, decreases",
                    f"{r['limiter_rate_mean']} / {r['limiter_rate_final']}, {r['limiter_decreases']}",
                ],
                ["unhandled errors / settle errors", f"{r['unhandled_errors']} / {sum(r['settle_errors'].values())}"],
                [
                    "upgrade queue: active (due) messages max / mean, scheduled max",
                    f"{r['queue_active_max']:,} / {r['queue_active_mean']}, {r['queue_scheduled_max']:,}",
                ],
                ["left on queue / timed out", f"{r['left_on_queue']} / {r['timed_out']}"],
            ],
        )
    )


def run(size: int = 20_000, seed: int = 1) -> dict[str, Any]:
    quiet_logs()
    config = FanOutConfig(size=size, seed=seed)
    with (
        stand_ins(seed=seed) as (identity, graph),
        ServiceBusBroker(duplicate_detection=[UPGRADE_QUEUE, DEADLETTER_QUEUE]) as broker,
    ):
        report = asyncio.run(fanout(identity, graph, broker, config))
    print_report(report)
    path = write_result("fanout", {"config": asdict(config), "limit_per_second": LIMIT, **report})
    print(f"\nwritten to {path.relative_to(ROOT)}")
    return report


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench fanout")
    parser.add_argument("--size", type=int, default=20_000, help="members of the group")
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args(argv)
    report = run(args.size, args.seed)
    if report["lost"] or report["unhandled_errors"] or report["upgraded_more_than_once"]:
        sys.exit(1)


if __name__ == "__main__":
    main()
