"""Shares and lanes of the shared Graph budget (:mod:`.budget`): pure functions of one snapshot.

Every instance computes the same :func:`allocate` from the same heartbeat rows and lays the shares
side by side on ``[0, 1)`` (:func:`lay_out`); grid slot ``k`` belongs to the lane holding
``frac(k x golden ratio)``, so no two lanes ever hold the same slot.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

#: 2**64 / golden ratio: ``frac(k * phi)`` in 64-bit fixed point, exact for any slot number.
_PHI64 = 0x9E3779B97F4A7C15
#: Lanes narrower than this (a thousandth of the rate) are no lane: slivers that intersecting moving lanes leave.
MIN_LANE = 0.001
#: The most grid slots one search for the next owned slot looks at (a lane of MIN_LANE needs ~1,000).
MAX_SEARCH = 20_000


def allocate(demands: Mapping[str, float], rate: float) -> dict[str, float]:
    """Split ``rate`` among the positive ``demands``: in proportion while they fit, max-min fair when not.

    Every instance computes this from the rows it read; an instance's share only falls when another's
    demand rises, so an instance that sees a peer's demand as higher than it is only takes less.
    """
    active = {key: value for key, value in demands.items() if value > 0}
    total = sum(active.values())
    if total <= 0:
        return {}
    if total <= rate:
        return {key: rate * value / total for key, value in active.items()}
    level, left, pending = 0.0, rate, sorted(active.items(), key=lambda item: item[1])
    while pending:  # water-filling: the smallest demands are met first, the rest share what is left
        level = left / len(pending)
        if pending[0][1] > level:
            break
        left -= pending.pop(0)[1]
    return {key: min(value, level) for key, value in active.items()}


@dataclass(frozen=True, slots=True)
class Lane:
    """A part ``[low, high)`` of ``[0, 1)``: the grid slots whose golden-ratio point falls in it."""

    low: float
    high: float

    @property
    def width(self) -> float:
        return max(0.0, self.high - self.low)

    def owns(self, slot: int) -> bool:
        point = ((slot * _PHI64) & 0xFFFFFFFFFFFFFFFF) / 2.0**64
        return self.low <= point < self.high

    def intersect(self, other: Lane | None) -> Lane | None:
        if other is None:
            return None
        low, high = max(self.low, other.low), min(self.high, other.high)
        return Lane(low, high) if high - low >= MIN_LANE else None

    def next_slot(self, slot: int) -> int:
        """The first slot from ``slot`` on in this lane (about ``1 / width`` tries, at most :data:`MAX_SEARCH`).

        When none is found within the search, the slot after it: the caller waits that long and looks
        again (a lane that narrow is a sliver left by lanes moving, and moves itself soon).
        """
        for candidate in range(slot, slot + MAX_SEARCH):
            if self.owns(candidate):
                return candidate
        return slot + MAX_SEARCH


def lay_out(shares: Mapping[str, float], rate: float) -> dict[str, Lane]:
    """The shares side by side on ``[0, 1)``, in key order, so every reader lays them out alike."""
    lanes, low = {}, 0.0
    for key in sorted(shares):
        high = min(1.0, low + shares[key] / rate)
        if high - low >= MIN_LANE:
            lanes[key] = Lane(low, high)
        low = high
    return lanes
