"""When fan-out children come due: slots on the tenant's timeline (contract §6).

A fan-out does not put its children on the queue all at once: that backlog is what makes Azure scale
the app out. It reserves one slot per Graph call its children will make, spaced ``1 / rate``
seconds apart, and sends each child scheduled for its first slot. With the shared store (§7) the
timeline is the tenant's, reserved across instances and concurrent fan-outs; without it, the
process's own (:class:`LocalTimeline`).
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime, timedelta
from typing import Protocol


class Timeline(Protocol):
    """Reserves slots for Graph calls at the budget's rate."""

    @property
    def rate(self) -> float:
        """Slots per second."""

    async def reserve(self, calls: int) -> datetime:
        """Reserve ``calls`` consecutive slots; return when the first of them is due (UTC)."""


class LocalTimeline:
    """One process's timeline: the next free slot, advanced by every reservation."""

    def __init__(self, rate: float, now: Callable[[], datetime]) -> None:
        if rate <= 0:
            raise ValueError("rate must be positive")
        self._rate = rate
        self._now = now
        self._next: datetime | None = None

    @property
    def rate(self) -> float:
        return self._rate

    async def reserve(self, calls: int) -> datetime:
        now = self._now()
        start = now if self._next is None or self._next < now else self._next
        self._next = start + timedelta(seconds=max(0, calls) / self._rate)
        return start


def due_times(start: datetime, count: int, calls_each: int, rate: float) -> list[datetime]:
    """When each of ``count`` children is due: one every ``calls_each / rate`` seconds from ``start``."""
    step = calls_each / rate
    return [start + timedelta(seconds=index * step) for index in range(count)]
