"""When fan-out children come due: slots on the tenant's timeline (contract §6).

A fan-out does not put its children on the queue all at once: that backlog is what makes Azure scale
the app out. It reserves one slot per Graph call its children will make, spaced ``1 / rate``
seconds apart, and sends each child scheduled for its first slot. With the shared store (§7) the
timeline is the tenant's, reserved across instances and concurrent fan-outs; without it, the
process's own.
"""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Protocol


class Timeline(Protocol):
    """Reserves slots for Graph calls at the budget's rate: the shared budget
    (:class:`~upgrade_handler.budget.SharedBudget`) or one process's
    (:class:`~upgrade_handler.budget.LocalSchedule`)."""

    rate: float
    """Slots per second."""

    async def reserve_schedule(self, calls: int) -> datetime:
        """Reserve ``calls`` consecutive slots; return when the first of them is due (UTC)."""


def due_times(start: datetime, count: int, calls_each: int, rate: float) -> list[datetime]:
    """When each of ``count`` children is due: one every ``calls_each / rate`` seconds from ``start``."""
    step = calls_each / rate
    return [start + timedelta(seconds=index * step) for index in range(count)]
