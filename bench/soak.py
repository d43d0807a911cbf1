"""Benchmark 4: a seeded chaos soak, then a reconciliation of every request.

Requests go through the Service Bus stand-in and are received as the Functions host does:
``azure.servicebus.aio`` in peek-lock, N handler calls at a time, complete on return, abandon on
raise (the broker redelivers and counts). Meanwhile:

- the Graph simulator fails 20% of calls (429, 500, 502, 503, 504, timeouts, resets, evenly);
- the identity endpoint fails 5% of token requests (tokens live one second, so they are
  fetched again and again: with Azure's hour-long tokens a failing endpoint would hardly show);
- the broker refuses 2% of the handler's sends (retry copies and dead letters), so the handler
  raises and the message is abandoned and delivered again;
- faults on the wire, in turn (``standins.faults.FaultProxy`` in front of each stand-in): the
  identity endpoint hangs (accepts and never answers), the handler's Service Bus link freezes,
  Graph trickles its answers a byte at a time; each ends as a network ends a dead link, with the
  connections reset. Only the time limits (shortened here) get the handler through these.

Then every request must have ended exactly once: upgraded (at least one 2xx upgrade in the
simulator's records) or on the dead-letter queue with a reason. The mix of requests includes
ones that must be dead-lettered (invalid bodies, unknown installations, lookups that find
nothing), each with its expected reason.

Short waits, so it finishes in minutes: the inline wait budget is a settings override; the
scheduled-retry backoff (10 s x 2^(n-1) in ``upgrade_handler.handler``) is a module constant
with no other seam, so it is patched for the run and restored after.

    python -m bench soak [--size 5000] [--seed 1]
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import sys
import time
import uuid
from collections import Counter
from dataclasses import dataclass, replace
from typing import Any
from urllib.parse import urlsplit

import httpx
from azure.identity.aio import ManagedIdentityCredential
from azure.servicebus import ServiceBusMessage, ServiceBusReceiveMode
from azure.servicebus.aio import ServiceBusClient, ServiceBusReceiver
from azure.servicebus.exceptions import ServiceBusError

from bench._common import APP, HOST_CONCURRENCY, MI_CLIENT_ID, ROOT, quiet_logs, stand_ins, table, write_result
from standins.faults import FaultProxy
from standins.graph_simulator import CHAOS_KINDS, GraphSimulator
from standins.identity_endpoint import IdentityEndpoint
from standins.servicebus_broker import DEAD_LETTER_SUFFIX, ServiceBusBroker
from upgrade_handler.auth import TokenProvider
from upgrade_handler.delivery import Delivery
from upgrade_handler.graph import GraphClient
from upgrade_handler.handler import Backoff, UpgradeHandler
from upgrade_handler.ratelimit import AdaptiveRateLimiter
from upgrade_handler.settings import Settings

#: What the requests are, and how each kind must end.
MIX = (
    ("installation", 0.88, "upgraded"),
    ("lookup", 0.04, "upgraded"),
    ("upn", 0.02, "upgraded"),
    ("invalid", 0.02, "InvalidMessage"),
    ("unknown_installation", 0.02, "GraphRequestRejected"),
    ("not_installed", 0.02, "InstallationNotFound"),
)
#: The soak starts with this many requests of every kind, then draws from MIX.
EVERY_KIND_AT_LEAST = 3
_INVALID_BODIES = (
    b"{not json",
    b'{"appInstallationId": "aWQ="}',
    b'{"userId": "not-a-guid-or-upn", "appInstallationId": "aWQ="}',
    b'{"userId": "7f3c2d1e-0a4b-4c5d-9e8f-112233445566", "appInstallationId": "a/../b"}',
    b"[1, 2, 3]",
    b"",
)


@dataclass(frozen=True)
class SoakConfig:
    size: int = 5000
    seed: int = 1
    concurrency: int = HOST_CONCURRENCY
    graph_failure_rate: float = 0.20
    identity_failure_rate: float = 0.05
    send_failure_rate: float = 0.02
    #: Seconds. Azure's tokens live for hours and the handler renews them five minutes early, so a
    #: failing identity endpoint would hardly be called; one-second tokens make it fetch about once
    #: a second. The price: a token can expire on its way to Graph (a 401, retried with a new one),
    #: and rarely twice in a row (dead-lettered as GraphRequestRejected: tolerated, reported).
    token_lifetime: float = 1.0
    #: The client gives up on a Graph call after this long; chaos "timeouts" hold it longer.
    graph_timeout: float = 0.5
    timeout_delay: float = 1.0
    chaos_retry_after: str = "0.2"
    max_inline_wait: float = 1.0
    backoff_base: float = 0.25
    backoff_cap: float = 2.0
    max_requests_per_second: float = 1000.0
    deadline_seconds: float = 900.0
    #: Wire faults, one at a time in turn (see WIRE_FAULTS): each lasts this long, with a gap
    #: before it. The run goes on until every kind has happened at least once.
    wire_fault_seconds: float = 1.0
    wire_fault_gap: float = 0.3
    trickle_interval: float = 0.05
    #: The time limits of contract §2 (token 10 s, send 30 s), shortened to fit the faults; the
    #: Graph request's whole-request limit is ``graph_timeout``. A send must have time to open a
    #: new connection and link (about 0.5 s each on a busy machine), so its limit is longer, and
    #: a frozen link lasts longer still, so that sends do run into the limit.
    token_timeout: float = 0.5
    send_timeout: float = 2.0
    servicebus_freeze_seconds: float = 2.5


#: What goes wrong on the wire, in this order, again and again.
WIRE_FAULTS = ("graph_trickle", "identity_hang", "servicebus_freeze")
#: A fault window that has held nothing yet stays open up to this many tenths of a second longer.
WINDOW_EXTENSION_STEPS = 50


class WireFaults:
    """Runs the wire faults in turn on proxies in front of the identity endpoint, the broker (the
    handler's sends only) and Graph; counts what each one held up."""

    def __init__(self, config: SoakConfig, identity: FaultProxy, bus: FaultProxy, graph: FaultProxy) -> None:
        self.config = config
        self.proxies = {"graph_trickle": graph, "identity_hang": identity, "servicebus_freeze": bus}
        self.windows: Counter[str] = Counter()
        self.rounds = 0

    async def run(self) -> None:
        try:
            while True:
                for kind in WIRE_FAULTS:
                    await asyncio.sleep(self.config.wire_fault_gap)
                    proxy = self.proxies[kind]
                    if kind == "graph_trickle":
                        proxy.trickle(self.config.trickle_interval)
                    else:
                        proxy.freeze()
                    self.windows[kind] += 1
                    before = self._caught(kind)
                    try:
                        if kind == "servicebus_freeze":
                            await asyncio.sleep(self.config.servicebus_freeze_seconds)
                        else:
                            await asyncio.sleep(self.config.wire_fault_seconds)
                        # A window that caught nothing yet (the handler was between calls) stays
                        # open a little longer, so every fault really meets the handler's traffic.
                        for _ in range(WINDOW_EXTENSION_STEPS):
                            if self._caught(kind) > before:
                                break
                            await asyncio.sleep(0.1)
                    finally:
                        proxy.sever()
                        proxy.flow()
                self.rounds += 1
        except asyncio.CancelledError:
            return

    def _caught(self, kind: str) -> int:
        proxy = self.proxies[kind]
        return proxy.trickled if kind == "graph_trickle" else proxy.held

    def figures(self) -> dict[str, Any]:
        graph, identity, bus = (self.proxies[kind] for kind in WIRE_FAULTS)
        return {
            "windows": dict(self.windows),
            "identity_requests_held": identity.held,
            "servicebus_frames_held": bus.held,
            "graph_bytes_trickled": graph.trickled,
        }


@dataclass(frozen=True)
class Request:
    number: int
    kind: str
    expected: str
    message_id: str
    request_id: str
    installation_id: str | None
    body: bytes


def make_requests(graph: GraphSimulator, config: SoakConfig, run: str) -> list[Request]:
    """``config.size`` requests, each for its own user, with a traceable id; seeded."""
    import random

    rng = random.Random(config.seed)
    kinds = [kind for kind, _, _ in MIX]
    weights = [weight for _, weight, _ in MIX]
    expected = {kind: end for kind, _, end in MIX}
    requests = []
    for number in range(config.size):
        # Every kind a few times first: under this much chaos a lone request of a rare kind may
        # legitimately end RetriesExhausted, and the soak must still see each kind's own end.
        seeded_first = number < len(kinds) * EVERY_KIND_AT_LEAST
        kind = kinds[number % len(kinds)] if seeded_first else rng.choices(kinds, weights)[0]
        user_id = str(uuid.UUID(int=rng.getrandbits(128), version=4))
        upn = f"soak.{user_id[:8]}@contoso.com"
        request_id = f"{run}-{number}"
        installation_id: str | None = None
        body: dict[str, Any] = {"requestId": request_id}
        raw: bytes | None = None
        if kind == "invalid":
            raw = rng.choice(_INVALID_BODIES)
        elif kind == "not_installed":
            graph.tenant.add_user(user_id, upn)
            body.update(userId=user_id, teamsAppId=APP)
        elif kind == "unknown_installation":
            graph.tenant.add_user(user_id, upn)
            body.update(userId=user_id, appInstallationId=base64.b64encode(f"gone-{request_id}".encode()).decode())
        else:
            graph.tenant.add_user(user_id, upn)
            installation_id = graph.tenant.install("user", user_id, APP)
            if kind == "installation":
                body.update(userId=user_id, appInstallationId=installation_id)
            elif kind == "upn":
                body.update(userId=upn, appInstallationId=installation_id)
            else:
                body.update(userId=user_id, teamsAppId=APP)
        payload = raw if raw is not None else json.dumps(body).encode()
        requests.append(Request(number, kind, expected[kind], request_id, request_id, installation_id, payload))
    return requests


class HostDriver:
    """Receives in peek-lock and runs up to ``concurrency`` handler calls, as the host does."""

    def __init__(self, handler: UpgradeHandler, receiver: ServiceBusReceiver, concurrency: int) -> None:
        self.handler = handler
        self.receiver = receiver
        self.concurrency = concurrency
        self.outcomes: Counter[str] = Counter()
        self.raised: Counter[str] = Counter()
        self.unhandled: list[str] = []
        self.settle_errors: Counter[str] = Counter()
        self.invocations = 0
        self._in_flight: set[asyncio.Task[None]] = set()
        self._link = asyncio.Lock()

    @property
    def busy(self) -> int:
        return len(self._in_flight)

    async def pump(self) -> None:
        """Receive what there is room for, start it, and return (bounded by the receive wait)."""
        free = self.concurrency - len(self._in_flight)
        if free <= 0:
            await asyncio.wait(self._in_flight, timeout=0.5, return_when=asyncio.FIRST_COMPLETED)
            return
        async with self._link:
            messages = await self.receiver.receive_messages(max_message_count=free, max_wait_time=0.1)
        for message in messages:
            task = asyncio.create_task(self._invoke(message))
            self._in_flight.add(task)
            task.add_done_callback(self._in_flight.discard)
        if not messages:
            await asyncio.sleep(0.05)

    async def drain(self) -> None:
        if self._in_flight:
            await asyncio.wait(self._in_flight, timeout=60)

    async def _invoke(self, message: Any) -> None:
        self.invocations += 1
        try:
            outcome = await self.handler.handle(Delivery.from_received_message(message))
        except ServiceBusError as error:  # the deliberate raise-to-retry: a send failed
            self.raised[type(error).__name__] += 1
            await self._settle(self.receiver.abandon_message, message)
            return
        except Exception as error:
            self.unhandled.append(f"{type(error).__name__}: {error}")
            await self._settle(self.receiver.abandon_message, message)
            return
        self.outcomes[str(outcome)] += 1
        await self._settle(self.receiver.complete_message, message)

    async def _settle(self, settle: Any, message: Any) -> None:
        try:
            async with self._link:
                await settle(message)
        except Exception as error:  # lock lost and the like: the broker delivers it again
            self.settle_errors[type(error).__name__] += 1


async def soak(
    identity: IdentityEndpoint, graph: GraphSimulator, broker: ServiceBusBroker, config: SoakConfig
) -> dict[str, Any]:
    """Run one soak against running stand-ins; returns the reconciliation and the figures."""
    identity_port, graph_port = urlsplit(identity.url).port, urlsplit(graph.url).port
    assert identity_port is not None
    assert graph_port is not None
    with (
        FaultProxy(identity_port) as identity_proxy,
        FaultProxy(broker.port) as bus_proxy,
        FaultProxy(graph_port) as graph_proxy,
    ):
        faults = WireFaults(config, identity_proxy, bus_proxy, graph_proxy)
        return await _soak(identity, graph, broker, config, faults)


async def _soak(
    identity: IdentityEndpoint, graph: GraphSimulator, broker: ServiceBusBroker, config: SoakConfig, faults: WireFaults
) -> dict[str, Any]:
    run = f"soak{config.seed}-{uuid.uuid4().hex[:6]}"
    queue, deadletter_queue = f"{run}-upgrades", f"{run}-deadletter"
    graph_proxy, identity_proxy, bus_proxy = (faults.proxies[kind] for kind in WIRE_FAULTS)
    proxied_identity = identity.url.replace(f":{urlsplit(identity.url).port}", f":{identity_proxy.port}", 1)
    env = {
        **identity.environment(),
        # The handler's own traffic goes through the proxies; the host's receiver does not.
        "ServiceBusConnection": broker.connection_string.replace(f":{broker.port};", f":{bus_proxy.port};"),
        "GRAPH_BASE_URL": graph_proxy.url,
        "AZURE_CLIENT_ID": MI_CLIENT_ID,
        "UPGRADE_QUEUE_NAME": queue,
        "DEADLETTER_QUEUE_NAME": deadletter_queue,
        "GRAPH_MAX_REQUESTS_PER_SECOND": str(config.max_requests_per_second),
    }
    settings = replace(Settings.from_environment(env), max_inline_wait_seconds=config.max_inline_wait)
    requests = make_requests(graph, config, run)
    by_request_id = {r.request_id: r for r in requests}
    upgrades_before = len(graph.upgraded)
    identity_before = len(identity.requests)
    stats_before = graph.stats()

    from upgrade_handler.servicebus import ServiceBusMessageSender

    # retry_total=0: a refused send reaches the handler instead of being retried by the SDK.
    sender = ServiceBusMessageSender(settings.service_bus, send_timeout=config.send_timeout, retry_total=0)

    def credential() -> ManagedIdentityCredential:
        # azure-identity reads the endpoint from the environment when the credential is built.
        saved = os.environ.get("IDENTITY_ENDPOINT")
        os.environ["IDENTITY_ENDPOINT"] = proxied_identity
        try:
            return ManagedIdentityCredential(client_id=MI_CLIENT_ID)
        finally:
            if saved is None:
                del os.environ["IDENTITY_ENDPOINT"]
            else:
                os.environ["IDENTITY_ENDPOINT"] = saved

    tokens = TokenProvider(settings.graph_scope, credential, timeout=config.token_timeout)
    client = GraphClient(
        settings.graph_base_url,
        limiter=AdaptiveRateLimiter(settings.max_requests_per_second),
        timeout=httpx.Timeout(config.graph_timeout, connect=config.graph_timeout),
        request_timeout=config.graph_timeout,
    )
    handler = UpgradeHandler(
        settings,
        graph=client,
        tokens=tokens,
        sender=sender,
        backoff=Backoff(base=config.backoff_base, cap=config.backoff_cap),
    )
    started = time.monotonic()
    deadline = started + config.deadline_seconds
    async with ServiceBusClient.from_connection_string(broker.connection_string) as bus:
        async with bus.get_queue_sender(queue) as producer:
            for start in range(0, len(requests), 200):
                batch = [
                    ServiceBusMessage(r.body, message_id=r.message_id, content_type="application/json")
                    for r in requests[start : start + 200]
                ]
                await producer.send_messages(batch)
        # Trouble starts once the requests are queued.
        rates = {kind: config.graph_failure_rate / len(CHAOS_KINDS) for kind in CHAOS_KINDS}
        graph.set_chaos(
            rates, seed=config.seed, timeout_delay=config.timeout_delay, retry_after=config.chaos_retry_after
        )
        identity.set_token_lifetime(config.token_lifetime)
        identity.set_failure_rate(config.identity_failure_rate, seed=config.seed)
        broker.fail_sends(queue, rate=config.send_failure_rate, seed=config.seed)
        broker.fail_sends(deadletter_queue, rate=config.send_failure_rate, seed=config.seed + 1)
        wire = asyncio.create_task(faults.run())
        try:
            receiver = bus.get_queue_receiver(queue, receive_mode=ServiceBusReceiveMode.PEEK_LOCK, prefetch_count=0)
            async with receiver:
                driver = HostDriver(handler, receiver, config.concurrency)
                next_check = 0.0
                while time.monotonic() < deadline:
                    await driver.pump()
                    if time.monotonic() >= next_check:
                        next_check = time.monotonic() + 0.5
                        if driver.busy == 0 and not broker.messages(queue) and faults.rounds >= 1:
                            break
                await driver.drain()
        finally:
            wire.cancel()
            await wire
            graph.set_chaos({})
            identity.set_failure_rate(0)
            identity.set_token_lifetime(86400.0)
            broker.fail_sends(queue, count=0)
            broker.fail_sends(deadletter_queue, count=0)
            await handler.aclose()
            await sender.aclose()  # the handler closes only what it opened
    elapsed = time.monotonic() - started
    left = broker.messages(queue)
    return reconcile(
        requests,
        by_request_id,
        upgrades=graph.upgraded[upgrades_before:],
        dead_letters=broker.messages(deadletter_queue),
        broker_dead_letters=broker.messages(queue + DEAD_LETTER_SUFFIX),
        left_on_queue=len(left),
        driver=driver,
        figures={
            "elapsed_s": round(elapsed, 1),
            "graph": {k: v - stats_before.get(k, 0) for k, v in graph.stats().items()},
            "identity_requests": len(identity.requests) - identity_before,
            "identity_failures": sum(1 for r in identity.requests[identity_before:] if r.status != 200),
            "retry_copies_sent": broker.sent_count(queue) - len(requests),
            "wire_faults": faults.figures(),
        },
    )


def reconcile(
    requests: list[Request],
    by_request_id: dict[str, Request],
    *,
    upgrades: list[Any],
    dead_letters: list[Any],
    broker_dead_letters: list[Any],
    left_on_queue: int,
    driver: HostDriver,
    figures: dict[str, Any],
) -> dict[str, Any]:
    by_installation = {r.installation_id: r for r in requests if r.installation_id}
    upgraded: Counter[str] = Counter()
    for record in upgrades:
        request = by_installation.get(record.installation_id)
        if request is not None:
            upgraded[request.request_id] += 1
    by_message_id = {r.message_id: r for r in requests}
    lettered: dict[str, list[str]] = {}
    statuses: dict[str, str] = {}
    guarded: set[str] = set()  # dead-lettered by the poison guard, before the body was even read
    for letter in [*dead_letters, *broker_dead_letters]:
        properties = letter.application_properties
        original = properties.get("OriginalMessageId") or letter.message_id
        request = by_message_id.get(str(original))
        if request is None:
            continue
        reason = properties.get("DeadLetterReason")
        lettered.setdefault(request.request_id, []).append(str(reason) if reason else "")
        statuses[request.request_id] = f"{properties.get('GraphStatus')} {properties.get('GraphErrorCode')}"
        if "UPGRADE_MAX_DELIVERY_COUNT" in str(properties.get("DeadLetterErrorDescription", "")):
            guarded.add(request.request_id)
    ends: Counter[str] = Counter()
    lost, both, no_reason, unexpected, tolerated = [], [], [], [], []
    for request in requests:
        up = upgraded.get(request.request_id, 0)
        reasons = lettered.get(request.request_id, [])
        if up and reasons:
            both.append(request.request_id)
        elif not up and not reasons:
            lost.append(request.request_id)
        if reasons and not all(reasons):
            no_reason.append(request.request_id)
        end = "upgraded" if up else (reasons[0] if reasons else "lost")
        ends[end] += 1
        if end == request.expected:
            continue
        detail = f"{request.request_id} ({request.kind}): {end}, last Graph answer {statuses.get(request.request_id)}"
        if (
            (request.expected != "InvalidMessage" and end == "RetriesExhausted")
            or (end == "RetriesExhausted" and request.request_id in guarded)
            or (request.expected == "upgraded" and statuses.get(request.request_id, "")[:3] == "401")
        ):
            # A request that calls Graph may run out of attempts under this much chaos (Graph
            # failing, trickling, or no token); any request, an invalid one too, may reach the
            # poison guard when a frozen link fails the sends that would settle it, delivery after
            # delivery; and with one-second tokens (see SoakConfig.token_lifetime) one may be
            # refused twice for an expired token.
            tolerated.append(detail)
        else:
            unexpected.append(detail)
    duplicates = {rid: n for rid, n in upgraded.items() if n > 1}
    duplicate_letters = {rid: len(r) for rid, r in lettered.items() if len(r) > 1}
    return {
        "requests": len(requests),
        "kinds": dict(Counter(r.kind for r in requests)),
        "ends": dict(ends),
        "lost": len(lost),
        "lost_ids": lost[:20],
        "upgraded_and_dead_lettered": len(both),
        "dead_lettered_without_reason": len(no_reason),
        "unexpected_ends": unexpected[:20],
        "unexpected_end_count": len(unexpected),
        "tolerated_ends": tolerated[:20],
        "tolerated_end_count": len(tolerated),
        "duplicated_upgrades": sum(n - 1 for n in duplicates.values()),
        "requests_upgraded_more_than_once": len(duplicates),
        "duplicated_dead_letters": sum(n - 1 for n in duplicate_letters.values()),
        "dead_lettered_by_service_bus": len(broker_dead_letters),
        "unhandled_errors": len(driver.unhandled),
        "unhandled": driver.unhandled[:20],
        "raised_to_retry": dict(driver.raised),
        "settle_errors": dict(driver.settle_errors),
        "outcomes": dict(driver.outcomes),
        "invocations": driver.invocations,
        "left_on_queue": left_on_queue,
        **figures,
    }


def print_report(report: dict[str, Any]) -> None:
    print(
        table(
            (
                "requests",
                "upgraded",
                "dead-lettered",
                "lost",
                "upgraded and dead-lettered",
                "duplicated upgrades",
                "unhandled errors",
                "left on queue",
                "elapsed s",
            ),
            [
                [
                    report["requests"],
                    report["ends"].get("upgraded", 0),
                    report["requests"] - report["ends"].get("upgraded", 0) - report["lost"],
                    report["lost"],
                    report["upgraded_and_dead_lettered"],
                    report["duplicated_upgrades"],
                    report["unhandled_errors"],
                    report["left_on_queue"],
                    report["elapsed_s"],
                ]
            ],
        )
    )
    print()
    print(table(("end", "requests"), sorted(report["ends"].items())))
    print()
    graph = report["graph"]
    faults = {k: v for k, v in graph.items() if k.startswith("status_") or k in ("resets", "faults", "requests")}
    print(
        table(
            ("what happened on the way", "count"),
            [
                ["handler invocations", report["invocations"]],
                ["retry copies scheduled", report["retry_copies_sent"]],
                ["raised to retry (send refused)", sum(report["raised_to_retry"].values())],
                ["settlement errors", sum(report["settle_errors"].values())],
                ["identity requests / failed", f"{report['identity_requests']} / {report['identity_failures']}"],
                *[[f"Graph {k}", v] for k, v in sorted(faults.items())],
                ["valid requests dead-lettered (tolerated, see README)", report["tolerated_end_count"]],
                ["unexpected ends", report["unexpected_end_count"]],
            ],
        )
    )


def run(size: int = 5000, seed: int = 1) -> dict[str, Any]:
    quiet_logs()
    config = SoakConfig(size=size, seed=seed)
    with stand_ins(seed=seed) as (identity, graph), ServiceBusBroker() as broker:
        report = asyncio.run(soak(identity, graph, broker, config))
    print_report(report)
    path = write_result("soak", {"config": config.__dict__, **report})
    print(f"\nwritten to {path.relative_to(ROOT)}")
    return report


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench soak")
    parser.add_argument("--size", type=int, default=5000)
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args(argv)
    report = run(args.size, args.seed)
    if report["lost"] or report["unhandled_errors"]:
        sys.exit(1)


if __name__ == "__main__":
    main()
