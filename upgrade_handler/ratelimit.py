"""Pacing of Graph calls across one process: a rate that adapts, and a gate shut by 429s.

Graph allows about 30 installedApps requests per second per app per tenant, counts throttled
calls against that budget, and keeps throttling a client that keeps calling. So every call
waits for a slot first:

- slots are spaced ``1 / rate`` seconds apart (no bursts); the rate starts a little below the
  configured maximum (``HEADROOM``);
- a 429 shuts the gate for every caller in the process until its ``Retry-After`` has passed
  (at most ``MAX_GATE_SECONDS``), including callers already waiting for their slot;
- a 429 is a *congestion event* only when its call was sent long enough after the last decrease
  for Graph's window to have slid past the calls sent at the old rate: calls already in flight,
  and the rest of one closing of the gate, are not news. Each event multiplies the rate by
  ``1 - share of 429s / 2`` (multiplicative decrease): a lone 429 costs about 2%, a storm of
  them halves the rate;
- each accepted call raises the rate a little (additive increase), in proportion to the rate of
  the last 429 (so N instances together probe the limit as fast as one alone), faster the
  longer Graph has accepted everything, up to the configured maximum.

Several instances that each do this converge on a share of the tenant's limit without talking
to each other, as TCP flows share a link. The figures behind the constants are in
bench/README.md (benchmark 1).
"""

from __future__ import annotations

import asyncio
import contextvars
import math
import time
from collections.abc import Awaitable, Callable

#: The rate never falls below this, so a long outage is probed at least once a second.
MIN_RATE = 1.0
#: Without a Retry-After a 429 still shuts the gate this long.
DEFAULT_THROTTLE_SECONDS = 1.0
#: One answer shuts the gate for at most this long (contract §2: the longest scheduled backoff),
#: however far in the future its Retry-After lies: a request that must wait longer is the
#: handler's to schedule or end, not a reason to stop every other call in the process.
MAX_GATE_SECONDS = 900.0
#: The limiter starts at this share of its maximum: latency jitter at Graph bunches calls sent
#: at an even 30/s into 31 within some one-second windows; at 92% of the limit hardly any are.
HEADROOM = 0.92
#: A congestion event multiplies the rate by ``1 - share / 2``, within these bounds, where
#: ``share`` is the share of 429s among the answers since the last decrease or among about the
#: last second of answers, whichever is larger: a lone 429 among accepted calls takes about half
#: a request per second off (2% at 28/s), a storm of them (every call throttled) halves the rate.
GENTLEST_DECREASE = 0.98
DEEPEST_DECREASE = 0.5
#: A decrease shows only once Graph's window (one second for the Teams limits) has slid past the
#: calls sent before it: a 429 is news only for a call sent at least this long after the last
#: decrease (or, for a call this limiter did not pace, arriving this long after it).
HOLDOFF_SECONDS = 1.0
#: After a deep decrease (a storm: other instances were over the limit too, and decrease at their
#: own moments) the window takes longer to show the decrease.
STORM_HOLDOFF_SECONDS = 2.5
#: Accepted calls raise the rate by ``INCREASE`` x the ceiling (the rate of the last 429, or the
#: maximum) per second: an instance sharing the tenant with others grows as much slower as its
#: share is smaller, so N instances together probe the limit as fast as one alone. The longer
#: Graph has accepted everything, the faster it grows: x (1 + (seconds since the 429 / ACCELERATE)^2),
#: so an instance left alone after others stop reaches the maximum in a minute or two.
#: (Seconds of accepted calls, not of wall time: an idle process learns nothing.)
INCREASE = 0.003
ACCELERATE_SECONDS = 15.0

#: The slot the current task was last given: tells a 429 to a call sent before the last
#: decrease (already accounted for) from one sent after it (a new congestion event).
_SENT_AT: contextvars.ContextVar[float] = contextvars.ContextVar("graph_request_slot")


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
        #: The rate Graph is believed to allow: the maximum, until a 429 says otherwise.
        self.ceiling = max_rate
        self.rate = max_rate * HEADROOM
        #: Congestion events so far (each one decreased the rate once).
        self.decreases = 0
        #: Answers, and 429s among them, since the last decrease; and the share of 429s among
        #: about the last second of answers (a moving average with weight ``1 / rate``).
        self.answers = 0
        self.throttled = 0
        self.recent_share = 0.0
        self._clock = clock
        self._sleep = sleep
        self._next_slot = 0.0
        self._gate_until = 0.0
        self._decreased_at = float("-inf")
        self._holdoff = HOLDOFF_SECONDS
        self._calm = 0.0

    @property
    def gate_until(self) -> float:
        return self._gate_until

    async def acquire(self, max_gate_wait: float = float("inf")) -> None:
        """Wait until this caller may send one request.

        Raises :class:`GateClosed` instead of waiting when the throttle gate stays shut longer
        than ``max_gate_wait`` seconds, less what this call has already waited: such a wait
        belongs to a scheduled retry, not to this call. A 429 that shuts the gate while the call
        waits for its slot sends it to the back of the gate, as if it had just arrived.
        """
        arrived = self._clock()
        now = arrived
        while True:
            left = max_gate_wait - (now - arrived)
            if self._gate_until - now > left:
                raise GateClosed(self._gate_until - now)
            slot = max(now, self._next_slot, self._gate_until)
            self._next_slot = slot + 1.0 / self.rate
            _SENT_AT.set(slot)
            if slot <= now:
                return
            await self._sleep(slot - now)
            if self._gate_until <= slot:
                return
            now = self._clock()  # the gate was shut meanwhile: this slot is inside it

    def on_success(self) -> None:
        self._observe(throttled=False)
        # Seconds' worth of accepted calls since the last decrease (not wall time: idle is no news).
        self._calm += 1.0 / self.rate
        step = INCREASE * self.ceiling * (1.0 + min(self._calm / ACCELERATE_SECONDS, 10.0) ** 2)
        self.rate = min(self.max_rate, self.rate + step / self.rate)

    def on_throttled(self, retry_after: float | None) -> None:
        self._observe(throttled=True)
        now = self._clock()
        if retry_after is None or not math.isfinite(retry_after):
            wait = DEFAULT_THROTTLE_SECONDS
        else:
            wait = min(max(0.0, retry_after), MAX_GATE_SECONDS)
        sent_at = _SENT_AT.get(None)
        if sent_at is None:  # not paced by this limiter: tell events apart by the gate and the time
            news = now >= self._gate_until and now - self._decreased_at >= self._holdoff
        else:  # sent once Graph's window had slid past the calls sent at the old rate
            news = sent_at - self._decreased_at >= self._holdoff
        if news:
            share = max(self.throttled / self.answers, self.recent_share)
            factor = min(GENTLEST_DECREASE, max(DEEPEST_DECREASE, 1.0 - share / 2))
            self.ceiling = self.rate
            self.rate = max(MIN_RATE, self.rate * factor)
            self._decreased_at = now
            self._holdoff = HOLDOFF_SECONDS if factor >= GENTLEST_DECREASE - 0.05 else STORM_HOLDOFF_SECONDS
            self._calm = 0.0
            self.answers = self.throttled = 0  # the next event is judged by the answers at the new rate
            self.decreases += 1
        # Exactly Retry-After: the handler waits that long inline and then asks for a slot with
        # what is left of its inline budget (nothing, when Retry-After took all of it).
        self._gate_until = max(self._gate_until, now + wait)
        self._next_slot = max(self._next_slot, self._gate_until)

    def _observe(self, *, throttled: bool) -> None:
        self.answers += 1
        self.throttled += throttled
        self.recent_share += ((1.0 if throttled else 0.0) - self.recent_share) / max(self.rate, 1.0)
