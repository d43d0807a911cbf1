"""The fuzz of bench/fuzz.py at CI size: message bodies and ids from hypothesis, through the handler.

Valid requests are never dead-lettered as InvalidMessage; requests with one rule of contract §1
broken always are, without a Graph call; arbitrary bodies never crash the handler; only a
refused send is raised (so the host retries); every Graph request stays in its path segments.
"""

from __future__ import annotations

from bench.fuzz import Tally, run_properties


def test_fuzzed_bodies_and_ids_are_settled_and_confined() -> None:
    tally = Tally()
    run_properties(150, tally, derandomize=True)
    assert tally.inputs == {"valid": 150, "invalid": 150, "arbitrary": 150}
    assert tally.outcomes["upgraded"] > 0 and tally.outcomes["dead_lettered"] > 0
    assert tally.raised_to_retry > 0
