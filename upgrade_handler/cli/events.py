"""The handler's log events, as data: how the command line learns what happened to a message.

The handler reports every happening as one log event (``upgrade.succeeded``,
``upgrade.retry_scheduled``, ``upgrade.dead_lettered``, ...) with stable keys (see
:mod:`upgrade_handler.logs`). A command that wants those details for a report runs the handler
inside :func:`collecting`; the events of that asyncio task (and only of it, thanks to a context
variable) land in the list it yields. Nothing in the handler changes for this.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any

from ..logs import logger as handler_logger


@dataclass(frozen=True, slots=True)
class Event:
    """One ``upgrade.*`` log event: its name and its fields (``message_id``, ``graph_status``, ...)."""

    name: str
    fields: Mapping[str, Any] = field(default_factory=dict)

    def get(self, key: str, default: Any = None) -> Any:
        return self.fields.get(key, default)


_sink: ContextVar[list[Event] | None] = ContextVar("upgrade_handler_cli_events", default=None)


class _Collector(logging.Handler):
    def emit(self, record: logging.LogRecord) -> None:
        sink = _sink.get()
        name = getattr(record, "event", None)
        if sink is not None and isinstance(name, str):
            sink.append(Event(name, dict(getattr(record, "fields", {}) or {})))


_collector = _Collector(logging.DEBUG)
_verbose_handler: logging.Handler | None = None


def install(*, verbose: bool = False) -> None:
    """Make the handler's events reach :func:`collecting`; with ``verbose`` also print them to stderr.

    Without ``verbose`` the events are not shown: the commands print their own summary.
    """
    global _verbose_handler
    handler_logger.setLevel(logging.INFO)
    if _collector not in handler_logger.handlers:
        handler_logger.addHandler(_collector)
    if verbose and _verbose_handler is None:
        _verbose_handler = logging.StreamHandler()
        _verbose_handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)-7s %(message)s"))
        handler_logger.addHandler(_verbose_handler)
        logging.getLogger("azure").setLevel(logging.WARNING)


@contextmanager
def collecting() -> Iterator[list[Event]]:
    """Collect the events the current task logs inside the ``with`` block."""
    events: list[Event] = []
    token = _sink.set(events)
    try:
        yield events
    finally:
        _sink.reset(token)
