"""``upgrade``: one upgrade from the terminal, with your own Azure sign-in, no queue.

The request runs through the function's own :class:`UpgradeHandler` (validation, lookup, token,
upgrade call, inline retries, error classification); only its sender is swapped for one that
keeps what the function would have put on a queue, so the command can print it instead:
Graph's answer on success, the Graph error a dead letter would carry on failure, or the wait Graph
asked for when the function would have scheduled a retry.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from typing import Any

from azure.servicebus import ServiceBusMessage
from rich.console import Console
from rich.table import Table

from ..delivery import Delivery
from ..handler import UpgradeHandler
from ..outcome import Outcome
from ..settings import Settings
from .events import Event, collecting
from .output import plain
from .requests import CONTENT_TYPE, RequestError, prepare, request_from_flags

#: Exit status when Graph asked to try again later (the function would have scheduled a retry).
EXIT_TRY_LATER = 3


class KeepingSender:
    """A :class:`~upgrade_handler.servicebus.MessageSender` that keeps messages instead of sending them."""

    def __init__(self) -> None:
        self.kept: list[tuple[str, ServiceBusMessage]] = []

    async def send(self, queue: str, messages: Sequence[ServiceBusMessage]) -> None:
        self.kept.extend((queue, message) for message in messages)


async def run_command(args: argparse.Namespace, console: Console, settings: Settings, **seams: Any) -> int:
    document = request_from_flags(vars(args))
    if not document:
        raise RequestError([("flags", "name the target and the app (see --help)")], 0)
    [request] = prepare([("flags", document)])
    kept = KeepingSender()
    handler = UpgradeHandler(settings, sender=kept, **seams)
    delivery = Delivery(request.body, message_id=request.message_id, delivery_count=1, content_type=CONTENT_TYPE)
    console.print(f"Upgrading {request.summary} through {settings.graph_base_url} ...")
    try:
        with collecting() as events:
            outcome = await handler.handle(delivery)
    finally:
        await handler.aclose()
    return _report(console, outcome, events, kept)


def _report(console: Console, outcome: Outcome, events: Sequence[Event], kept: KeepingSender) -> int:
    succeeded = next((e for e in events if e.name == "upgrade.succeeded"), None)
    for event in events:
        if event.name == "upgrade.attempt_failed":
            console.print(
                f"  attempt {event.get('attempt')}: Graph answered {event.get('graph_status') or '-'} "
                f"{event.get('graph_error_code') or ''}; {event.get('next')}"
            )
    if outcome is Outcome.UPGRADED and succeeded is not None:
        console.print(
            f"Upgraded: Graph answered {succeeded.get('graph_status')} "
            f"in {succeeded.get('duration_ms')} ms on attempt {succeeded.get('attempt')}."
        )
        _facts(
            console,
            [
                ("request-id", succeeded.get("graph_request_id")),
                ("client-request-id", succeeded.get("client_request_id")),
            ],
        )
        return 0
    if outcome is Outcome.SKIPPED:
        console.print("Skipped: the app is not installed there.")
        return 0
    if outcome is Outcome.RETRY_SCHEDULED and kept.kept:
        _, retry = kept.kept[-1]
        props = retry.application_properties or {}
        console.print(
            f"Not upgraded yet: Graph answered {plain(props.get('LastErrorStatus')) or '-'} "
            f"{plain(props.get('LastErrorCode'))} and asked to wait longer than UPGRADE_MAX_INLINE_WAIT_SECONDS. "
            f"The function would try again at {retry.scheduled_enqueue_time_utc:%Y-%m-%d %H:%M:%SZ}; "
            "run this command again then."
        )
        return EXIT_TRY_LATER
    if outcome is Outcome.DEAD_LETTERED and kept.kept:
        _, letter = kept.kept[-1]
        props = {str(k): v for k, v in (letter.application_properties or {}).items()}
        console.print(
            f"Failed: {plain(props.get('DeadLetterReason'))}. {plain(props.get('DeadLetterErrorDescription'))}"
        )
        _facts(
            console,
            [
                ("Graph status", props.get("GraphStatus")),
                ("Graph error code", props.get("GraphErrorCode")),
                ("inner error code", props.get("GraphInnerErrorCode")),
                ("Graph message", props.get("GraphErrorMessage")),
                ("request-id", props.get("GraphRequestId")),
                ("client-request-id", props.get("GraphClientRequestId")),
                ("date", props.get("GraphDate")),
                ("attempts", props.get("UpgradeAttempts")),
            ],
        )
        raw = props.get("GraphError")
        if raw:
            console.print("Graph's answer:")
            try:
                console.print(json.dumps(json.loads(plain(raw)), indent=2, ensure_ascii=False), markup=False)
            except ValueError:
                console.print(plain(raw), markup=False)
        return 1
    console.print(f"Outcome: {outcome.value}")
    return 1


def _facts(console: Console, rows: Sequence[tuple[str, Any]]) -> None:
    grid = Table.grid(padding=(0, 2))
    grid.add_column(style="bold")
    grid.add_column(overflow="fold")
    for name, value in rows:
        if value not in (None, ""):
            grid.add_row(f"  {name}", plain(value))
    console.print(grid)
