"""No ``Retry-After`` value, however large or malformed, raises or stops the process (contract §2).

The header is read into a finite number of seconds (or ``None``) that every later step can use:
the throttle gate (shut for at most 15 minutes), a clock, a ``timedelta`` for a scheduled retry.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import httpx
import pytest
from hypothesis import given
from hypothesis import strategies as st

from tests.support import FakeClock
from upgrade_handler import ratelimit
from upgrade_handler.errors import MAX_RETRY_AFTER_SECONDS, TransientGraphError, classify_response, parse_retry_after
from upgrade_handler.ratelimit import AdaptiveRateLimiter

NOW = datetime(2026, 11, 29, 12, 0, tzinfo=UTC).timestamp()
HORIZON = 24 * 3600.0

#: Values seen in the wild or built to break a parser.
HOSTILE = [
    "Fri, 31 Dec 9999 23:59:59 GMT",
    "Sat, 01 Jan 0001 00:00:00 GMT",
    "Fri, 31 Dec 99999 23:59:59 GMT",
    "Mon, 01 Jan 2024 00:00:00 +9999",
    "9" * 400,
    "9" * 5000 + ".5",
    "1e400",
    "1e308",
    "NaN",
    "-inf",
    "infinity",
    "-1",
    "1_000",
    "0x10",
    "١٢٣",  # Arabic-Indic digits: float() reads them, HTTP does not
    "30,",
    ",",
    "\x00",
    "Fri, 31 Dec 9999 23:59:59",
    "31 Dec 9999 23:59:59 GMT, 5",
]


def check(seconds: float | None) -> None:
    if seconds is not None:
        assert isinstance(seconds, float)
        assert 0.0 <= seconds <= MAX_RETRY_AFTER_SECONDS
        timedelta(seconds=seconds)  # a scheduled retry can be computed from it
        datetime.now(UTC) + timedelta(seconds=seconds)


@pytest.mark.parametrize("value", HOSTILE)
def test_a_hostile_retry_after_is_read_without_raising(value: str):
    check(parse_retry_after(value, now=NOW))


@given(st.text())
def test_any_text_is_read_without_raising(value: str):
    check(parse_retry_after(value, now=NOW))


@given(st.text(alphabet=st.sampled_from("0123456789.,- :GMTFriDecJan+")))
def test_any_number_like_text_is_read_without_raising(value: str):
    check(parse_retry_after(value, now=NOW))


@given(st.integers(min_value=0, max_value=10**400))
def test_any_whole_number_of_seconds_is_that_many_up_to_the_ceiling(seconds: int):
    parsed = parse_retry_after(str(seconds), now=NOW)
    assert parsed == (float(seconds) if seconds <= MAX_RETRY_AFTER_SECONDS else MAX_RETRY_AFTER_SECONDS)


@pytest.mark.parametrize("value", ["Fri, 31 Dec 9999 23:59:59 GMT", "9" * 400, "9" * 20, "99999999999999999999.5"])
def test_a_wait_far_past_the_retry_horizon_still_reads_as_past_it(value: str):
    parsed = parse_retry_after(value, now=NOW)
    assert parsed is not None
    assert parsed > HORIZON


@pytest.mark.parametrize("value", ["NaN", "inf", "-1", "1_000", "0x10", "١٢٣", "30,", "Fri, 31 Dec 9999 23:59:59"])
def test_what_is_not_a_retry_after_is_no_retry_after(value: str):
    assert parse_retry_after(value, now=NOW) is None


@given(st.text(alphabet=st.characters(min_codepoint=0x20, max_codepoint=0xFF)))
def test_a_429_with_any_retry_after_is_classified_and_shuts_the_gate_for_at_most_fifteen_minutes(value: str):
    # Any of these bytes can arrive from the wire; httpx decodes them as it would a real answer.
    headers = httpx.Headers({b"Retry-After": value.encode("latin-1")})
    error = classify_response(429, headers, b'{"error": {"code": "TooManyRequests", "message": "slow down"}}')
    assert isinstance(error, TransientGraphError)
    check(error.failure.retry_after)

    clock = FakeClock()
    pacing = AdaptiveRateLimiter(30, clock=clock.monotonic, sleep=clock.sleep)
    pacing.on_throttled(error.failure.retry_after)
    assert clock.monotonic() <= pacing.gate_until <= clock.monotonic() + ratelimit.MAX_GATE_SECONDS


def test_the_year_9999_answer_shuts_the_gate_for_fifteen_minutes_not_for_ever():
    headers = httpx.Headers({"Retry-After": "Fri, 31 Dec 9999 23:59:59 GMT"})
    error = classify_response(429, headers, b"")
    clock = FakeClock()
    pacing = AdaptiveRateLimiter(30, clock=clock.monotonic, sleep=clock.sleep)
    pacing.on_throttled(error.failure.retry_after)
    assert pacing.gate_until == pytest.approx(clock.monotonic() + ratelimit.MAX_GATE_SECONDS)
