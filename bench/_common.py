"""What the benchmarks share: the stand-ins, a tenant to upgrade, an in-memory host, tables and results.

Everything talks to 127.0.0.1 only. Every loop here is bounded in count and in time.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import platform
import random
import subprocess
import sys
import time
import uuid
from collections import Counter, deque
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from azure.servicebus import ServiceBusMessage

from standins.graph_simulator import GraphSimulator
from standins.identity_endpoint import IdentityEndpoint
from upgrade_handler.delivery import Delivery
from upgrade_handler.handler import UpgradeHandler

ROOT = Path(__file__).resolve().parent.parent
RESULTS = Path(__file__).resolve().parent / "results"
UPGRADE_QUEUE = "teams-app-upgrades"
DEADLETTER_QUEUE = "teams-app-upgrades-deadletter"
MI_CLIENT_ID = "0b1c2d3e-4f50-6172-8394-a5b6c7d8e9f0"
APP = "12345678-aaaa-4bbb-8ccc-1234567890ab"
APP_EXTERNAL = "com.contoso.helpdesk"
#: The Functions host's ``maxConcurrentCalls`` in host.json.
HOST_CONCURRENCY = 16
#: Graph as the throughput and fan-out benchmarks simulate it: 30 requests per sliding
#: one-second window per tenant (throttled calls count), 150 ms +- 50 ms latency.
LIMIT = 30
WINDOW = 1.0
LATENCY, JITTER = 0.150, 0.050


def quiet_logs() -> None:
    """Log records are still made (their cost is part of the handler's), but go nowhere."""
    logger = logging.getLogger("upgrade_handler")
    logger.handlers[:] = [logging.NullHandler()]
    logger.setLevel(logging.INFO)
    logger.propagate = False
    for noisy in ("azure", "proton", "httpx", "aiohttp", "kiota_http", "msgraph"):
        logging.getLogger(noisy).setLevel(logging.ERROR)


@contextmanager
def stand_ins(*, seed: int = 0) -> Iterator[tuple[IdentityEndpoint, GraphSimulator]]:
    """The identity endpoint and the Graph simulator on loopback, with the app in the catalog.

    ``IDENTITY_ENDPOINT`` / ``IDENTITY_HEADER`` are put in this process's environment so that
    ``ManagedIdentityCredential`` (ours and msgraph-sdk's) talks to the stand-in.
    """
    with (
        IdentityEndpoint(client_id=MI_CLIENT_ID) as identity,
        GraphSimulator(token_validator=identity.is_valid, seed=seed) as graph,
    ):
        graph.tenant.add_app(APP, APP_EXTERNAL, "Contoso Helpdesk")
        os.environ.update(identity.environment())
        yield identity, graph


def add_users(graph: GraphSimulator, count: int, *, tag: str = "u") -> list[tuple[str, str]]:
    """``count`` fresh users with the app installed: (user id, installation id)."""
    made = []
    for _ in range(count):
        user_id = str(uuid.uuid4())
        graph.tenant.add_user(user_id, f"{tag}.{user_id[:8]}@contoso.com")
        made.append((user_id, graph.tenant.install("user", user_id, APP)))
    return made


def environment(identity: IdentityEndpoint, graph_url: str, **overrides: str) -> dict[str, str]:
    """The app settings of a local deployment (the Service Bus string is only validated, not used)."""
    values = {
        **identity.environment(),
        "ServiceBusConnection": "Endpoint=sb://127.0.0.1:5672;SharedAccessKeyName=local;SharedAccessKey=local;"
        "UseDevelopmentEmulator=true",
        "GRAPH_BASE_URL": graph_url,
        "AZURE_CLIENT_ID": MI_CLIENT_ID,
        "UPGRADE_QUEUE_NAME": UPGRADE_QUEUE,
        "DEADLETTER_QUEUE_NAME": DEADLETTER_QUEUE,
    }
    values.update(overrides)
    return values


def request_body(user_id: str, installation_id: str, request_id: str) -> bytes:
    return json.dumps({"userId": user_id, "appInstallationId": installation_id, "requestId": request_id}).encode()


# --- an in-memory host: deliveries, scheduled retries, abandon and redelivery --------------------


@dataclass
class _Pending:
    delivery: Delivery
    due: float


@dataclass
class HostReport:
    outcomes: Counter[str] = field(default_factory=Counter)
    raised: Counter[str] = field(default_factory=Counter)
    dead_letters: list[ServiceBusMessage] = field(default_factory=list)
    scheduled: int = 0
    invocations: int = 0
    unfinished: int = 0


class LocalHost:
    """Hands deliveries to a handler ``concurrency`` at a time, as the Functions host does.

    It is also the handler's ``sender``: a retry copy goes back on the queue for its scheduled
    time, a dead-letter copy is kept. A raise abandons the delivery, which comes back with its
    delivery count one higher. No Service Bus, so nothing but the handler and Graph is measured.
    """

    def __init__(self, upgrade_queue: str = UPGRADE_QUEUE, deadletter_queue: str = DEADLETTER_QUEUE) -> None:
        self._upgrade_queue = upgrade_queue
        self._deadletter_queue = deadletter_queue
        self._ready: deque[Delivery] = deque()
        self._later: list[_Pending] = []
        self.report = HostReport()

    def put(self, delivery: Delivery) -> None:
        self._ready.append(delivery)

    async def send(self, queue: str, messages: Sequence[ServiceBusMessage]) -> None:
        for message in messages:
            if queue == self._deadletter_queue:
                self.report.dead_letters.append(message)
                continue
            assert queue == self._upgrade_queue, queue
            when = message.scheduled_enqueue_time_utc
            due = time.monotonic() + max(0.0, (when - datetime.now(UTC)).total_seconds()) if when else 0.0
            self.report.scheduled += 1
            self._later.append(_Pending(to_delivery(message), due))

    async def run(self, handler: UpgradeHandler, *, concurrency: int, deadline: float) -> HostReport:
        """Until every delivery is settled or ``deadline`` (time.monotonic()) passes."""
        busy = 0

        async def worker() -> None:
            nonlocal busy
            while time.monotonic() < deadline:
                delivery = self._next()
                if delivery is None:
                    if busy == 0 and not self._later:
                        return
                    await asyncio.sleep(0.01)
                    continue
                busy += 1
                self.report.invocations += 1
                try:
                    outcome = await handler.handle(delivery)
                    self.report.outcomes[str(outcome)] += 1
                except Exception as error:  # the host abandons: delivered again
                    self.report.raised[type(error).__name__] += 1
                    self._ready.append(_redelivered(delivery))
                finally:
                    busy -= 1

        await asyncio.gather(*(worker() for _ in range(concurrency)))
        self.report.unfinished = len(self._ready) + len(self._later)
        return self.report

    def _next(self) -> Delivery | None:
        if self._later:
            now = time.monotonic()
            due = [p for p in self._later if p.due <= now]
            if due:
                self._later = [p for p in self._later if p.due > now]
                self._ready.extend(p.delivery for p in due)
        return self._ready.popleft() if self._ready else None


@contextmanager
def worker_processes(module: str, env: Mapping[str, str], shares: Sequence[Any]) -> Iterator[WorkerFleet]:
    """One ``python -m <module> --child`` per share, each told ``{"env", "users"}`` on its standard
    input, started together: yields once every one has imported everything and said ``ready``; kills
    any still running on the way out."""
    fleet = WorkerFleet([])
    try:
        for share in shares:
            child = subprocess.Popen(
                [sys.executable, "-m", module, "--child"],
                cwd=ROOT,
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                text=True,
                env={**os.environ, "PYTHONPATH": str(ROOT)},
            )
            assert child.stdin is not None
            child.stdin.write(json.dumps({"env": dict(env), "users": share}) + "\n")
            child.stdin.flush()
            fleet.children.append(child)
        for child in fleet.children:
            assert child.stdout is not None
            if child.stdout.readline().strip() != "ready":
                raise RuntimeError("a worker process did not start")
        yield fleet
    finally:
        for child in fleet.children:
            if child.poll() is None:
                child.kill()


@dataclass
class WorkerFleet:
    """The worker processes of :func:`worker_processes`."""

    children: list[subprocess.Popen[str]]

    def go(self) -> None:
        """Tell every worker to start, as close to the same instant as the pipes allow."""
        for child in self.children:
            assert child.stdin is not None
            child.stdin.write("go\n")
            child.stdin.flush()

    def reports(self, timeout: float) -> list[dict[str, Any]]:
        """Each worker's report: the last line it printed, as JSON."""
        return [json.loads(child.communicate(timeout=timeout)[0].strip().splitlines()[-1]) for child in self.children]


def to_delivery(message: ServiceBusMessage, delivery_count: int = 1) -> Delivery:
    body = message.body
    raw = body if isinstance(body, bytes) else b"".join(body)
    properties = {str(k): v for k, v in (message.application_properties or {}).items()}
    return Delivery(
        body=raw,
        message_id=str(message.message_id),
        delivery_count=delivery_count,
        content_type=message.content_type,
        correlation_id=message.correlation_id,
        subject=message.subject,
        enqueued_time_utc=datetime.now(UTC),
        application_properties=properties,
    )


def _redelivered(delivery: Delivery) -> Delivery:
    return Delivery(
        body=delivery.body,
        message_id=delivery.message_id,
        delivery_count=delivery.delivery_count + 1,
        content_type=delivery.content_type,
        correlation_id=delivery.correlation_id,
        subject=delivery.subject,
        enqueued_time_utc=delivery.enqueued_time_utc,
        application_properties=delivery.application_properties,
    )


def new_delivery(body: bytes, message_id: str | None = None) -> Delivery:
    return Delivery(
        body=body,
        message_id=message_id or str(uuid.uuid4()),
        delivery_count=1,
        content_type="application/json",
        enqueued_time_utc=datetime.now(UTC),
    )


# --- figures -------------------------------------------------------------------------------------


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A Markdown table, so the same text goes to the terminal and to the README."""
    cells = [[_cell(v) for v in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) if cells else len(h) for i, h in enumerate(headers)]
    lines = [
        "| " + " | ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)) + " |",
        "| " + " | ".join("-" * w for w in widths) + " |",
    ]
    lines += ["| " + " | ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) + " |" for row in cells]
    return "\n".join(lines)


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:,.3f}" if abs(value) < 10 else f"{value:,.1f}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def ratio(a: float, b: float) -> float | None:
    return round(a / b, 3) if b else None


def machine() -> dict[str, Any]:
    return {
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "when_utc": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
    }


def write_result(name: str, data: Mapping[str, Any]) -> Path:
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"{name}.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps({"benchmark": name, "machine": machine(), **data}, indent=2, default=str) + "\n")
    tmp.replace(path)
    return path


def seeded(seed: int) -> random.Random:
    return random.Random(seed)
