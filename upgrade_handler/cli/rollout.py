"""``rollout status | list``: read the rollout ledger (contract §8), and wait on a rollout from a pipeline.

``status`` prints one rollout's counts by outcome, its dead letters by reason and a progress bar
(finished targets of those expected); ``--json`` prints the same as one JSON object
(:meth:`RolloutStatus.to_json`). ``--wait`` reads the ledger every :data:`POLL_SECONDS` until the
rollout is settled, showing a live progress bar on a terminal, one line per change in a log, and
nothing but the final object with ``--json``. Exit statuses:

- ``0``: printed; with ``--wait``, settled with nothing dead-lettered;
- ``1``: settled with dead letters (``--wait``), or the ledger could not be read (``status`` without
  ``--wait``, ``list``);
- ``2``: ``--timeout`` passed before the rollout settled (the last status read is printed);
- ``3``: there is no ledger to read: ``AzureWebJobsStorage`` is not set.

A rollout with nothing recorded yet is not settled: a pipeline may start waiting before the function
has read the event. A ledger that does not answer while waiting is reported once on standard error
and read again at the next poll.
"""

from __future__ import annotations

import argparse
import asyncio
import json
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime

from rich.console import Console, Group
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.progress_bar import ProgressBar
from rich.table import Table
from rich.text import Text

from ..ledger import OUTCOMES, READ_TIMEOUT, Ledger, RolloutStatus, open_ledger, summarise
from ..settings import Settings
from ..storage import StoreUnavailable

EXIT_SETTLED = 0
EXIT_DEAD_LETTERS = 1
EXIT_FAILED = 1
EXIT_TIMEOUT = 2
EXIT_NO_LEDGER = 3
#: Seconds between two reads of the ledger while waiting (one partition query each).
POLL_SECONDS = 5.0

Sleep = Callable[[float], Awaitable[None]]


async def run_command(
    args: argparse.Namespace,
    console: Console,
    errors: Console,
    settings: Settings,
    *,
    poll_interval: float = POLL_SECONDS,
    sleep: Sleep = asyncio.sleep,
) -> int:
    ledger = open_ledger(settings, timeout=READ_TIMEOUT)
    if ledger is None:
        errors.print(
            "error: no rollout ledger to read: AzureWebJobsStorage (or AzureWebJobsStorage__accountName) is not set; "
            "the function records rollouts only in its storage account.",
            markup=False,
        )
        return EXIT_NO_LEDGER
    try:
        if args.action == "list":
            return await _list(args, console, errors, ledger)
        if args.wait:
            return await _wait(args, console, errors, ledger, poll_interval, sleep)
        try:
            status = await ledger.status(args.rollout_id)
        except StoreUnavailable as error:
            errors.print(f"error: the rollout ledger ({ledger.table.name}) could not be read: {error}", markup=False)
            return EXIT_FAILED
        _show(console, status, as_json=args.json)
        return 0
    finally:
        await ledger.aclose()


async def _wait(
    args: argparse.Namespace,
    console: Console,
    errors: Console,
    ledger: Ledger,
    poll_interval: float,
    sleep: Sleep,
) -> int:
    loop = asyncio.get_running_loop()
    deadline = None if args.timeout is None else loop.time() + args.timeout
    status = summarise(args.rollout_id, [])
    live = console.is_terminal and not args.json
    progress = Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[counts]}"),
        TimeElapsedColumn(),
        console=console,
        transient=True,
        disable=not live,
    )
    task = progress.add_task(args.rollout_id, total=None, counts="waiting for the first record")
    printed: str | None = None
    unreadable = False
    with progress:
        while True:
            try:
                status = await ledger.status(args.rollout_id)
            except StoreUnavailable as error:
                if not unreadable:
                    errors.print(f"warning: the rollout ledger does not answer: {error}; reading again", markup=False)
                unreadable = True
            else:
                if unreadable:
                    errors.print("the rollout ledger answers again", markup=False)
                unreadable = False
                progress.update(task, total=status.expected or None, completed=status.finished, counts=_brief(status))
                line = _line(status)
                if not live and not args.json and line != printed:
                    console.print(line, markup=False)
                    printed = line
            if status.settled:
                break
            if deadline is not None and loop.time() >= deadline:
                _show(console, status, as_json=args.json)
                errors.print(
                    f"timed out after {args.timeout:g} s: rollout {args.rollout_id} is not settled", markup=False
                )
                return EXIT_TIMEOUT
            pause = poll_interval if deadline is None else min(poll_interval, max(0.0, deadline - loop.time()))
            await sleep(pause)
    _show(console, status, as_json=args.json)
    return EXIT_DEAD_LETTERS if status.counts.get("deadlettered", 0) else EXIT_SETTLED


async def _list(args: argparse.Namespace, console: Console, errors: Console, ledger: Ledger) -> int:
    since = datetime.now(UTC) - args.since
    try:
        seen = await ledger.rollouts(since)
    except StoreUnavailable as error:
        errors.print(f"error: the rollout ledger ({ledger.table.name}) could not be read: {error}", markup=False)
        return EXIT_FAILED
    if args.json:
        document = {"since": _iso(since), "rollouts": [item.status.to_json() for item in seen]}
        console.print(json.dumps(document), markup=False, highlight=False, soft_wrap=True)
        return 0
    if not seen:
        console.print(f"No rollout recorded since {_iso(since)}.", markup=False)
        return 0
    table = Table(title=f"Rollouts recorded since {_iso(since)}", title_justify="left")
    for column in ("rollout", "last activity", "state", "finished", *OUTCOMES):
        table.add_column(column, justify="right" if column in ("finished", *OUTCOMES) else "left")
    for item in seen:
        status = item.status
        table.add_row(
            Text(status.rollout_id),
            _iso(item.last_activity) or "",
            _state(status),
            f"{status.finished}/{status.expected}",
            *(str(status.counts.get(outcome, 0)) for outcome in OUTCOMES),
        )
    console.print(table)
    console.print("Details of one: rollout status ROLLOUT_ID (--wait to wait until it is settled).", markup=False)
    return 0


# --- printing ----------------------------------------------------------------------------------------


def _show(console: Console, status: RolloutStatus, *, as_json: bool) -> None:
    if as_json:
        # soft_wrap: one line however wide, or a long rollout id would be broken inside a string.
        console.print(json.dumps(status.to_json()), markup=False, highlight=False, soft_wrap=True)
        return
    console.print(render(status))


def render(status: RolloutStatus) -> Group:
    """The rollout for people: state, a progress bar, counts by outcome, dead letters by reason."""
    head = Text(f"Rollout {status.rollout_id}: {_state(status)}")
    if status.last_activity is not None:
        head.append(f" (last record {_iso(status.last_activity)})")
    bar = Table.grid(padding=(0, 1))
    bar.add_row(
        ProgressBar(total=max(status.expected, 1), completed=status.finished if status.expected else 0, width=40),
        Text(f"{status.finished}/{status.expected} finished" + (f" ({_percent(status)})" if status.expected else "")),
    )
    counts = Table(box=None, show_header=True, pad_edge=False)
    counts.add_column("outcome")
    counts.add_column("targets", justify="right")
    for outcome in OUTCOMES:
        counts.add_row(outcome, str(status.counts.get(outcome, 0)))
    parts: list[Table | Text] = [head, bar, counts]
    if status.dead_letters:
        reasons = Table(box=None, show_header=True, pad_edge=False)
        reasons.add_column("dead-letter reason")
        reasons.add_column("targets", justify="right")
        for reason, count in status.dead_letters.items():
            reasons.add_row(Text(reason), str(count))
        parts += [reasons, Text("Why and how to send them again: python -m upgrade_handler deadletters list")]
    return Group(*parts)


def _state(status: RolloutStatus) -> str:
    if status.recorded == 0 and status.pages == 0:
        return "nothing recorded yet"
    if status.settled:
        return "settled"
    if not status.complete:
        return f"reading the fan-out ({status.pages} page{'s' if status.pages != 1 else ''} so far)"
    return "in progress"


def _line(status: RolloutStatus) -> str:
    return f"{status.rollout_id}: {_state(status)}, {status.finished}/{status.expected} finished; {_brief(status)}"


def _brief(status: RolloutStatus) -> str:
    return ", ".join(f"{outcome} {status.counts.get(outcome, 0)}" for outcome in OUTCOMES)


def _percent(status: RolloutStatus) -> str:
    return f"{100 * status.finished // status.expected}%"


def _iso(moment: datetime | None) -> str | None:
    if moment is None:
        return None
    return moment.astimezone(UTC).isoformat(timespec="seconds").replace("+00:00", "Z")
