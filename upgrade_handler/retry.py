"""When to try again: inline within the invocation, or as a scheduled retry copy (contract §2, §4).

Two budgets bound every request. Failed attempts (not counting deferrals) are held against
``UPGRADE_MAX_ATTEMPTS``; deferrals (Graph or the tenant said "not now") are bounded by time:
no retry comes due later than ``UPGRADE_MAX_RETRY_HOURS`` after the first attempt.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

from .errors import GraphConnectionError, GraphFailure, GraphTimeout, HeldBack, TransientGraphError

#: Attempts one invocation makes before handing the request to a scheduled retry.
INLINE_ATTEMPTS = 3
#: Inline backoff before the n-th repeat of a 5xx or a lost connection: 0.5 s, 1 s (± 20%).
INLINE_BACKOFF_SECONDS = 0.5
#: A Graph Retry-After is honoured plus at most this share of jitter.
RETRY_AFTER_JITTER = 0.1
#: Error codes of a "not now" that is not a 429 from Graph: the tenant's budget or the process's
#: throttle gate held the call back (``TooManyRequests`` without a response), or the catalog does
#: not publish the requested version yet (§8).
DEFERRAL_CODES = frozenset({"TooManyRequests", "CatalogNotUpdated"})


def is_deferral(failure: GraphFailure) -> bool:
    """Whether Graph or the tenant said "not now" rather than the attempt failing (§2)."""
    return failure.status == 429 or failure.code in DEFERRAL_CODES


@dataclass(frozen=True, slots=True)
class Backoff:
    """How long a scheduled retry waits when Graph gave no ``Retry-After``, in seconds.

    ``base * 2^(attempts-1)``, capped at ``cap``, stretched by up to ``jitter`` (a share) so that
    requests failing together do not come back together: 10, 20, 40, 80 s ... 15 minutes.
    """

    base: float = 10.0
    cap: float = 900.0
    jitter: float = 0.2

    def delay(self, attempts: int, rng: random.Random) -> float:
        return float(min(self.cap, self.base * 2 ** min(max(0, attempts - 1), 64)) * (1 + rng.uniform(0, self.jitter)))


@dataclass(slots=True)
class RetryPolicy:
    """The waits of contract §2: inline repeats within ``max_inline_wait`` seconds, then scheduled
    retries after ``Retry-After`` (plus up to 10% jitter) or the exponential :class:`Backoff`."""

    max_inline_wait: float
    backoff: Backoff = field(default_factory=Backoff)
    rng: random.Random = field(default_factory=random.Random)

    def inline_wait(self, error: TransientGraphError, *, inline_attempts: int, waited: float) -> float | None:
        """Seconds to wait before repeating within this invocation, or ``None`` to schedule a retry."""
        if isinstance(error, GraphTimeout | HeldBack) or inline_attempts >= INLINE_ATTEMPTS:
            return None
        failure = error.failure
        budget = self.inline_budget(waited)
        if failure.retry_after is not None:
            short = failure.retry_after <= self.max_inline_wait
            return failure.retry_after if short and failure.retry_after <= budget else None
        repeatable = isinstance(error, GraphConnectionError) or (
            failure.status is not None and (failure.status >= 500 or failure.status == 400)
        )
        if not repeatable:
            return None
        wait = INLINE_BACKOFF_SECONDS * 2 ** (inline_attempts - 1) * self.rng.uniform(0.8, 1.2)
        return wait if wait <= budget else None

    def inline_budget(self, waited: float) -> float:
        """What is left of the invocation's inline waiting."""
        return max(0.0, self.max_inline_wait - waited)

    def retry_delay(self, failure: GraphFailure, attempts: int) -> float:
        """Seconds until a scheduled retry comes due."""
        if failure.retry_after is not None:
            return failure.retry_after * (1 + self.rng.uniform(0, RETRY_AFTER_JITTER))
        return self.backoff.delay(attempts, self.rng)
