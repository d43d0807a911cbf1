"""Running the command line in-process against the stand-ins, as an operator would, but fast.

``run_cli("send", "--user-id", ...)`` parses the arguments with the real parser and runs the command
on the session's event loop with one shared :class:`Bus` (opening an SDK link costs about half a
second, so links are opened once per session), printing into strings the test can read.

Test modules import the helpers below and load the fixtures with ``pytest_plugins``; the module
holds no assertions, hence PYTEST_DONT_REWRITE (pytest would warn that it was imported before it
could rewrite it).
"""

from __future__ import annotations

import io
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import pytest

from standins.servicebus_broker import ServiceBusBroker
from tests.conftest import DEADLETTER_QUEUE, UPGRADE_QUEUE, fast_credential
from upgrade_handler.__main__ import build_parser
from upgrade_handler.auth import TokenProvider
from upgrade_handler.cli import events
from upgrade_handler.cli.app import dispatch
from upgrade_handler.cli.bus import Bus
from upgrade_handler.cli.output import make_console
from upgrade_handler.delivery import Delivery
from upgrade_handler.errors import GraphFailure
from upgrade_handler.settings import Settings
from upgrade_handler.settlement import DeadLetterReason, History, dead_letter_message

__all__ = [
    "DEADLETTER_QUEUE",
    "UPGRADE_QUEUE",
    "CliResult",
    "cli_bus",
    "dead_letter",
    "queue_bodies",
    "run_cli",
]


@dataclass(frozen=True)
class CliResult:
    code: int
    out: str
    err: str

    @property
    def text(self) -> str:
        return self.out + self.err


@pytest.fixture(scope="session")
async def cli_bus(environment: dict[str, str]) -> AsyncIterator[Bus]:
    bus = Bus(Settings.from_environment().service_bus, retry_total=0)
    yield bus
    await bus.aclose()


RunCli = Callable[..., Awaitable[CliResult]]


@pytest.fixture
def run_cli(cli_bus: Bus, environment: dict[str, str], reset_stand_ins: None) -> RunCli:
    async def run(*argv: str, **seams: Any) -> CliResult:
        args = build_parser().parse_args(list(argv))
        events.install(verbose=args.verbose)
        out, err = io.StringIO(), io.StringIO()
        if args.command in ("worker", "upgrade") and "tokens" not in seams:
            # The managed identity credential without the SDK's own waits between retries.
            seams["tokens"] = TokenProvider(Settings.from_environment().graph_scope, fast_credential)
        code = await dispatch(
            args,
            make_console(out, width=220),
            errors=make_console(err, width=220),
            bus=cli_bus,
            **seams,
        )
        return CliResult(code, out.getvalue(), err.getvalue())

    return run


def queue_bodies(broker: ServiceBusBroker, queue: str = UPGRADE_QUEUE) -> list[Any]:
    return [json.loads(message.body) for message in broker.messages(queue)]


def dead_letter(
    body: dict[str, Any] | bytes,
    *,
    reason: DeadLetterReason = DeadLetterReason.GRAPH_REQUEST_REJECTED,
    message_id: str = "m-1",
    failed_at: datetime | None = None,
    properties: dict[str, Any] | None = None,
    status: int | None = 403,
    code: str = "Forbidden",
    correlation_id: str | None = None,
) -> Any:
    """A dead letter exactly as the handler builds it (``settlement.dead_letter_message``)."""
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    delivery = Delivery(
        raw,
        message_id=message_id,
        delivery_count=1,
        content_type="application/json",
        correlation_id=correlation_id,
        application_properties=properties or {},
        enqueued_time_utc=datetime(2026, 11, 29, 12, 0, tzinfo=UTC),
    )
    failure = (
        GraphFailure(
            status=status,
            code=code,
            message=f"Graph said {code}",
            request_id="req-1",
            client_request_id="client-1",
            raw_body=json.dumps({"error": {"code": code, "message": f"Graph said {code}"}}),
        )
        if reason in (DeadLetterReason.GRAPH_REQUEST_REJECTED, DeadLetterReason.RETRIES_EXHAUSTED)
        else None
    )
    return dead_letter_message(
        delivery,
        History.of(delivery),
        reason=reason,
        description=f"why: {reason}",
        attempts=1,
        failed_at=failed_at or datetime.now(UTC),
        failure=failure,
    )
