"""The Graph simulator's fault knobs: scripted answers, seeded chaos and the tenant's rate limit.

:class:`Fault` is what a test scripts (or chaos draws) in place of Graph's normal answer;
:class:`Chaos` draws a seeded fault kind per request; :class:`RateLimit` is Graph's per-tenant
sliding window, which counts throttled requests too. The simulator holds its lock around them.
"""

from __future__ import annotations

import random
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

ROUTES = ("upgrade", "list", "installation", "catalog", "group", "*")
CHAOS_KINDS = ("429", "500", "502", "503", "504", "timeout", "reset")


@dataclass(frozen=True)
class Fault:
    """One scripted or random response that replaces (or delays) normal behaviour.

    ``body``: a dict is sent as JSON (when it holds ``error.innerError``, the missing ``date``,
    ``request-id`` and ``client-request-id`` are filled in to match the headers); a str or
    bytes is sent as is; None sends Graph's error body for ``status`` (nothing for a 2xx/3xx).
    ``headers`` are added to (and override) the standard Graph headers.
    """

    status: int = 500
    body: dict[str, Any] | str | bytes | None = None
    headers: Mapping[str, str] = field(default_factory=dict)
    delay: float = 0.0
    reset: bool = False
    passthrough: bool = False

    def __post_init__(self) -> None:
        if not 100 <= self.status <= 599:
            raise ValueError(f"not an HTTP status: {self.status}")
        if self.delay < 0:
            raise ValueError("delay must be >= 0")

    @classmethod
    def throttled(cls, retry_after: str | None = "2.128") -> Fault:
        """429 ``TooManyRequests`` with the body of Graph's throttling docs (research §2.1)."""
        return cls(429, headers={} if retry_after is None else {"Retry-After": retry_after})

    @classmethod
    def graph_error(
        cls,
        status: int,
        code: str,
        message: str,
        *,
        inner_code: str | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> Fault:
        """A Graph-shaped error; ``inner_code`` adds ``innerError.code`` and ``.message`` as Teams does."""
        inner: dict[str, Any] = {}
        if inner_code is not None:
            inner = {"code": inner_code, "message": message, "details": []}
        return cls(
            status,
            body={"error": {"code": code, "message": message, "innerError": inner}},
            headers=dict(headers or {}),
        )


@dataclass
class Chaos:
    thresholds: list[tuple[float, str]]
    rng: random.Random
    timeout_delay: float
    retry_after: str | None

    def draw(self) -> str | None:
        r = self.rng.random()
        for upper, kind in self.thresholds:
            if r < upper:
                return kind
        return None

    def fault(self, kind: str) -> Fault:
        if kind == "reset":
            return Fault(reset=True)
        if kind == "timeout":
            return Fault(504, delay=self.timeout_delay)
        status = int(kind)
        if status in (429, 503) and self.retry_after is not None:
            return Fault(status, headers={"Retry-After": self.retry_after})
        return Fault(status)


@dataclass
class RateLimit:
    limit: int
    window: float
    hits: deque[float] = field(default_factory=deque)

    def admit(self, now: float) -> float | None:
        """None when admitted, else the seconds until the window has room again."""
        cutoff = now - self.window
        while self.hits and self.hits[0] <= cutoff:
            self.hits.popleft()
        self.hits.append(now)  # a throttled request is logged against the window too
        if len(self.hits) <= self.limit:
            return None
        # Room appears once all but limit-1 of the logged hits have left the window.
        return self.hits[len(self.hits) - self.limit] + self.window - now
