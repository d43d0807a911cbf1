"""What became of a delivery."""

from enum import StrEnum


class Outcome(StrEnum):
    UPGRADED = "upgraded"
    """Graph answered 2xx; the message completes."""
    CURRENT = "current"
    """Already at or past the requested version: no upgrade call; the message completes."""
    SKIPPED = "skipped"
    """Not installed and the request said ``ifNotInstalled: skip``; the message completes."""
    RETRY_SCHEDULED = "retry_scheduled"
    """A copy waits on the upgrade queue for its time; the message completes."""
    DEAD_LETTERED = "dead_lettered"
    """A copy with the reason is on the dead-letter queue; the message completes."""
    FANNED_OUT = "fanned_out"
    """One request per user is on the upgrade queue (and a continuation for the next page)."""
