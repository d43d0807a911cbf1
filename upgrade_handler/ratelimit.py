"""Pacing of Graph calls across one process: a rate that adapts, and a gate shut by 429s.

Graph allows about 30 installedApps requests per second per app per tenant, counts throttled
calls against that budget, and keeps throttling a client that keeps calling. So every call
waits for a slot first:

- slots are spaced ``1 / rate`` seconds apart (no bursts);
- a 429 shuts the gate for every caller in the process until its ``Retry-After`` has passed,
  and halves the rate (multiplicative decrease);
- each accepted call raises the rate by ``1 / rate``, i.e. about one request per second more
  for every second of accepted calls (additive increase), up to the configured maximum.

Several instances that each do this converge on a fair share of the tenant's limit without
talking to each other, as TCP flows share a link.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable

#: The rate never falls below this, so a long outage is probed at least once a second.
MIN_RATE = 1.0
#: Without a Retry-After a 429 still shuts the gate this long.
DEFAULT_THROTTLE_SECONDS = 1.0


class GateClosed(Exception):
    """The throttle gate stays shut for ``remaining`` more seconds."""

    def __init__(self, remaining: float) -> None:
        super().__init__(f"Graph throttled this process; the gate opens in {remaining:.3f} s")
        self.remaining = remaining


class AdaptiveRateLimiter:
    """AIMD pacing with a shared throttle gate. All times are in seconds.

    ``clock`` and ``sleep`` are seams for tests (defaults: ``time.monotonic``, ``asyncio.sleep``).
    """

    def __init__(
        self,
        max_rate: float,
        *,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        if max_rate <= 0:
            raise ValueError("max_rate must be positive")
        self.max_rate = max_rate
        self.rate = max_rate
        self._clock = clock
        self._sleep = sleep
        self._next_slot = 0.0
        self._gate_until = 0.0

    @property
    def gate_until(self) -> float:
        return self._gate_until

    async def acquire(self, max_gate_wait: float = float("inf")) -> None:
        """Wait until this caller may send one request.

        Raises :class:`GateClosed` instead of waiting when the throttle gate stays shut longer
        than ``max_gate_wait``: such a wait belongs to a scheduled retry, not to this call.
        """
        now = self._clock()
        if self._gate_until - now > max_gate_wait:
            raise GateClosed(self._gate_until - now)
        slot = max(now, self._next_slot, self._gate_until)
        self._next_slot = slot + 1.0 / self.rate
        if slot > now:
            await self._sleep(slot - now)

    def on_success(self) -> None:
        self.rate = min(self.max_rate, self.rate + 1.0 / self.rate)

    def on_throttled(self, retry_after: float | None) -> None:
        now = self._clock()
        wait = DEFAULT_THROTTLE_SECONDS if retry_after is None else retry_after
        if now >= self._gate_until:
            # Calls sent together are often throttled together: halve once per closing of the gate.
            self.rate = max(MIN_RATE, self.rate / 2)
        self._gate_until = max(self._gate_until, now + wait)
        self._next_slot = max(self._next_slot, self._gate_until)
