"""App settings for the command line: the function's own settings (contract §5), flags on top.

Every command reads the same environment variables as the function (``ServiceBusConnection``,
``UPGRADE_QUEUE_NAME``, ``GRAPH_BASE_URL``, ...). A flag given on the command line replaces the
variable of the same meaning, and the result goes through :meth:`Settings.from_environment`,
so a bad value is refused with the same error, naming the setting, as the function gives.
"""

from __future__ import annotations

import argparse
import os
import re
from collections.abc import Mapping
from datetime import timedelta

from ..settings import Settings

#: Command-line flag (its ``dest``) -> the app setting it stands for.
FLAG_SETTINGS = {
    "connection_string": "ServiceBusConnection",
    "namespace": "ServiceBusConnection__fullyQualifiedNamespace",
    "queue": "UPGRADE_QUEUE_NAME",
    "deadletter_queue": "DEADLETTER_QUEUE_NAME",
    "graph_base_url": "GRAPH_BASE_URL",
    "client_id": "AZURE_CLIENT_ID",
}

#: Stands in for a Service Bus connection in commands that never touch a queue (``upgrade``).
NO_SERVICE_BUS = "Endpoint=sb://no-service-bus.invalid/;SharedAccessKeyName=unused;SharedAccessKey=unused"


def add_service_bus_flags(parser: argparse.ArgumentParser, *, deadletter_queue: bool = True) -> None:
    group = parser.add_argument_group(
        "Service Bus (default: the function's app settings from the environment)",
    )
    group.add_argument(
        "--connection-string",
        metavar="TEXT",
        help="a Service Bus connection string [ServiceBusConnection]; prefer the environment variable, "
        "a flag is visible in the process list",
    )
    group.add_argument(
        "--namespace",
        metavar="HOST",
        help="<name>.servicebus.windows.net, reached with your Azure sign-in or a managed identity "
        "[ServiceBusConnection__fullyQualifiedNamespace]",
    )
    group.add_argument("--queue", metavar="NAME", help="the upgrade queue [UPGRADE_QUEUE_NAME, teams-app-upgrades]")
    if deadletter_queue:
        group.add_argument(
            "--deadletter-queue",
            metavar="NAME",
            help="the dead-letter queue [DEADLETTER_QUEUE_NAME, teams-app-upgrades-deadletter]",
        )


def add_graph_flags(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("Microsoft Graph (default: the function's app settings from the environment)")
    group.add_argument(
        "--graph-base-url",
        metavar="URL",
        help="a Graph cloud root, or http://127.0.0.1:<port> for a local simulator "
        "[GRAPH_BASE_URL, https://graph.microsoft.com]",
    )
    group.add_argument(
        "--client-id",
        metavar="GUID",
        help="client id of a user-assigned managed identity [AZURE_CLIENT_ID]",
    )


def settings_from(
    args: argparse.Namespace, environ: Mapping[str, str] | None = None, *, needs_service_bus: bool = True
) -> Settings:
    """The app settings from ``environ`` (default ``os.environ``) with the flags in ``args`` on top."""
    values = dict(os.environ if environ is None else environ)
    for flag, setting in FLAG_SETTINGS.items():
        value = getattr(args, flag, None)
        if value:
            values[setting] = value
    if getattr(args, "connection_string", None):
        values.pop("ServiceBusConnection__fullyQualifiedNamespace", None)
    elif getattr(args, "namespace", None):
        values.pop("ServiceBusConnection", None)
    if not needs_service_bus:
        values["ServiceBusConnection"] = NO_SERVICE_BUS
    return Settings.from_environment(values)


_DURATION = re.compile(r"(?P<number>\d+(?:\.\d+)?)\s*(?P<unit>s|m|h|d)?")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def duration(text: str) -> timedelta:
    """``90``, ``90s``, ``15m``, ``2h``, ``7d`` as a ``timedelta`` (an argparse ``type``)."""
    match = _DURATION.fullmatch(text.strip())
    if match is None:
        raise argparse.ArgumentTypeError(f"{text!r} is not a duration such as 90s, 15m, 2h or 7d")
    return timedelta(seconds=float(match["number"]) * _UNITS[match["unit"] or "s"])


def seconds(text: str) -> float:
    """A non-negative number of seconds (an argparse ``type``)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not value >= 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"{text!r} must be a finite number of seconds >= 0")
    return value


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} must be 1 or more")
    return value
