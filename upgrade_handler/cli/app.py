"""Running a parsed command: settings, Service Bus, errors as exit statuses, ``asyncio.run`` at the edge.

Exit statuses: 0 done; 1 the operation failed (Service Bus refused, a replay or an upgrade
failed); 2 a usage, setting or request error, before anything was sent; 3 ``upgrade`` only: Graph
asked to try again later. ``rollout status --wait`` has its own (:mod:`.rollout`).
"""

from __future__ import annotations

import argparse
import asyncio
from typing import Any

from azure.core.exceptions import AzureError
from rich.console import Console

from ..settings import ConfigurationError
from . import events
from .bus import Bus
from .options import settings_from
from .output import make_console
from .requests import RequestError

EXIT_FAILED = 1
EXIT_USAGE = 2


def run(args: argparse.Namespace, console: Console | None = None) -> int:
    """The command line's edge: one event loop per command."""
    events.install(verbose=getattr(args, "verbose", False))
    console = console or make_console()
    try:
        return asyncio.run(dispatch(args, console))
    except KeyboardInterrupt:
        return 130


async def dispatch(
    args: argparse.Namespace,
    console: Console,
    *,
    errors: Console | None = None,
    bus: Bus | None = None,
    **seams: Any,
) -> int:
    """Run ``args.command``, printing to ``console`` and errors to ``errors`` (default: standard error).

    ``bus`` and ``seams`` are for tests: a given bus is used and left open, else one is opened and
    closed here; ``seams`` go to the handler (``upgrade``, ``worker``).
    """
    errors = errors or make_console(stderr=True)
    try:
        if args.command == "rollout":  # reads the storage account only: no Service Bus, no Graph
            from .rollout import run_command as run_rollout

            return await run_rollout(args, console, errors, settings_from(args, needs_service_bus=False), **seams)
        return await _dispatch(args, console, bus, seams)
    except ConfigurationError as error:
        errors.print(f"error: {error}", markup=False)
        return EXIT_USAGE
    except RequestError as error:
        errors.print(f"error: nothing was sent: {error}:" if error.total else "error:", markup=False)
        for line in error.lines():
            errors.print(f"  {line}", markup=False)
        return EXIT_USAGE
    except AzureError as error:
        errors.print(f"error: {type(error).__name__}: {_first_line(str(error))}", markup=False)
        return EXIT_FAILED


async def _dispatch(args: argparse.Namespace, console: Console, bus: Bus | None, seams: dict[str, Any]) -> int:
    command = args.command
    if command == "demo":
        from .demo import run_command as run_demo

        return await run_demo(args, console)
    if command == "upgrade":
        from .direct import run_command as run_upgrade

        return await run_upgrade(args, console, settings_from(args, needs_service_bus=False), **seams)
    settings = settings_from(args)
    own_bus = bus is None
    bus = bus or Bus(settings.service_bus)
    try:
        if command == "worker":
            from .worker import run_command as run_worker

            return await run_worker(args, console, settings, bus, **seams)
        if command == "send":
            from .send import run_command as run_send

            return await run_send(args, console, settings, bus)
        if command == "deadletters":
            from . import deadletters

            action = {"list": deadletters.run_list, "show": deadletters.run_show, "replay": deadletters.run_replay}
            return await action[args.action](args, console, settings, bus)
        raise ValueError(f"unknown command {command!r}")
    finally:
        if own_bus:
            await bus.aclose()


def _first_line(text: str) -> str:
    lines = text.strip().splitlines()
    return lines[0][:500] if lines else "(no details)"
