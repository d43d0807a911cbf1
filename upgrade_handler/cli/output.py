"""What the commands print: one console, and short human descriptions of requests and failures."""

from __future__ import annotations

import json
import os
from typing import IO, Any

from rich.console import Console

from ..errors import InvalidMessageError
from ..messages import AppKind, FanOutRequest, Scope, parse_request

#: Width used when the output is not a terminal (a pipe, a CI log, a test): wide enough for the tables.
PIPE_WIDTH = 140


def make_console(file: IO[str] | None = None, *, stderr: bool = False, width: int | None = None) -> Console:
    """A console that prints plain text (no colour, no wrapping surprises) when not on a terminal."""
    console = Console(file=file, stderr=stderr, highlight=False, soft_wrap=False, width=width)
    if width is None and not console.is_terminal and "COLUMNS" not in os.environ:
        console.width = PIPE_WIDTH
    return console


_APP_WORDS = {
    AppKind.INSTALLATION: "installation",
    AppKind.TEAMS_APP_ID: "teamsAppId",
    AppKind.EXTERNAL_ID: "externalId",
}


def envelope_of(body: bytes) -> str | None:
    """``"Event Grid"`` or ``"CloudEvents"`` when the body is such an event (contract §1), else ``None``."""
    try:
        document = json.loads(body.decode("utf-8-sig"))
    except (UnicodeDecodeError, ValueError):
        return None
    if isinstance(document, dict):
        if "specversion" in document:
            return "CloudEvents"
        if "eventType" in document and "data" in document:
            return "Event Grid"
    return None


def describe_request(body: bytes) -> str:
    """One short line about what a message body asks for, or why it is invalid."""
    try:
        request = parse_request(body)
    except InvalidMessageError as error:
        return f"invalid: {error.reason}"
    app = f"{_APP_WORDS[request.app.kind]} {shorten(request.app.value)}"
    if isinstance(request, FanOutRequest):
        if request.group_id is not None:
            whom = f"members of group {shorten(request.group_id)}"
        else:
            count = len(request.user_ids)
            whom = f"{count} user{'s' if count != 1 else ''}"
    else:
        target = request.target
        word = {Scope.USER: "user", Scope.TEAM: "team", Scope.CHAT: "chat"}[target.scope]
        whom = f"{word} {shorten(target.id)}"
    return f"{whom}, {app}"


def shorten(value: str, keep: int = 40) -> str:
    """``value`` cut to ``keep`` characters with an ellipsis (ids stay recognisable in a table)."""
    return value if len(value) <= keep else value[: keep - 1] + "…"


def plain(value: Any) -> str:
    """A property value as text for a table cell (``bytes`` decoded, ``None`` as empty)."""
    if value is None:
        return ""
    if isinstance(value, bytes):
        return value.decode("utf-8", errors="replace")
    return str(value)
