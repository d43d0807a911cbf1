"""``send``: upgrade requests onto the upgrade queue, checked with the function's rules first.

One request from flags, or many from a JSON Lines, CSV or JSON file (``-`` reads standard input).
Nothing is sent unless every request is valid; the bad ones are listed with their line numbers.
Message ids come from the requests' content (:func:`~upgrade_handler.cli.requests.message_id_for`),
so sending the same file again is harmless: the queue's duplicate detection drops the copies
(within its window, one hour in the Bicep). Messages go out in batches of ``--batch-size``.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from ..settings import Settings
from .bus import Bus
from .requests import PreparedRequest, RequestError, detect_format, prepare, read_requests, request_from_flags

DEFAULT_BATCH_SIZE = 100
#: Up to this many requests are listed one by one; beyond it only counted.
LISTED = 50


def gather(args: argparse.Namespace) -> tuple[str, list[PreparedRequest]]:
    """The validated requests the arguments name, and where they came from; raises :class:`RequestError`."""
    flags = request_from_flags(vars(args))
    if args.file is not None:
        if flags:
            names = ", ".join(f"--{key}" for key in sorted(_flag_names(args)))
            raise RequestError([("flags", f"give either --file or request flags ({names}), not both")], 0)
        fmt = detect_format(args.file, args.format) if args.file != "-" else (args.format or "jsonl")
        if args.file == "-":
            return "standard input", prepare(read_requests(sys.stdin, fmt))
        path = Path(args.file)
        try:
            with path.open(encoding="utf-8", newline="") as stream:
                return str(path), prepare(read_requests(stream, fmt))
        except OSError as error:
            raise RequestError([(str(path), error.strerror or str(error))], 0) from None
    if not flags:
        raise RequestError([("flags", "name a request with flags (see --help) or give --file")], 0)
    return "flags", prepare([("flags", flags)])


def _flag_names(args: argparse.Namespace) -> list[str]:
    from .requests import FLAG_FIELDS

    names = [dest.replace("_", "-") for dest in FLAG_FIELDS if getattr(args, dest, None) is not None]
    if getattr(args, "permission", None):
        names.append("permission")
    return names


def parse_properties(pairs: Sequence[str] | None) -> dict[str, Any]:
    properties: dict[str, Any] = {}
    for pair in pairs or ():
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise RequestError([("--property", f"{pair!r} is not NAME=VALUE")], 0)
        properties[key.strip()] = value
    return properties


async def send_requests(
    bus: Bus,
    queue: str,
    requests: Sequence[PreparedRequest],
    *,
    batch_size: int = DEFAULT_BATCH_SIZE,
    correlation_id: str | None = None,
    properties: dict[str, Any] | None = None,
    progress: Progress | None = None,
) -> int:
    """Send in batches of ``batch_size``; returns how many were sent (duplicates dropped by the queue included)."""
    task = progress.add_task("sending", total=len(requests)) if progress is not None else None
    sent = 0
    for start in range(0, len(requests), batch_size):
        chunk = requests[start : start + batch_size]
        await bus.send(queue, [r.message(correlation_id=correlation_id, properties=properties) for r in chunk])
        sent += len(chunk)
        if progress is not None and task is not None:
            progress.update(task, completed=sent)
    return sent


async def run_command(args: argparse.Namespace, console: Console, settings: Settings, bus: Bus) -> int:
    source, requests = gather(args)
    properties = parse_properties(args.property)
    if args.file is not None:
        console.print(f"{len(requests)} valid request{'s' if len(requests) != 1 else ''} in {source}.")
    if len(requests) <= LISTED:
        console.print(_table(requests))
    if args.dry_run:
        console.print(f"Dry run: nothing sent to {settings.upgrade_queue}.")
        return 0
    show_progress = len(requests) > args.batch_size and not args.no_progress
    if show_progress:
        columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
        with Progress(*columns, console=console, transient=True) as progress:
            sent = await send_requests(
                bus,
                settings.upgrade_queue,
                requests,
                batch_size=args.batch_size,
                correlation_id=args.correlation_id,
                properties=properties,
                progress=progress,
            )
    else:
        sent = await send_requests(
            bus,
            settings.upgrade_queue,
            requests,
            batch_size=args.batch_size,
            correlation_id=args.correlation_id,
            properties=properties,
        )
    console.print(
        f"Sent {sent} message{'s' if sent != 1 else ''} to {settings.upgrade_queue}. "
        "Message ids come from the requests' content: a resend within the queue's "
        "duplicate-detection window is dropped."
    )
    return 0


def _table(requests: Sequence[PreparedRequest]) -> Table:
    table = Table(title_justify="left")
    table.add_column("from")
    table.add_column("message id")
    table.add_column("request", overflow="fold")
    for request in requests:
        table.add_row(request.where, request.message_id, request.summary)
    return table
