"""Every failure the handler knows, and whether it is worth retrying.

The class decides what happens to the message; nothing retries on a bare ``Exception``::

    UpgradeError
    ├── InvalidMessageError            the body breaks contract §1        → dead-letter InvalidMessage
    ├── InstallationNotFoundError      the lookup found no installation   → dead-letter or skip
    └── GraphError                     a Graph attempt failed; carries status, codes, request ids
        ├── PermanentGraphError        4xx that retrying cannot fix       → dead-letter GraphRequestRejected
        │   └── AuthenticationRejected 401: retried once with a new token, then permanent
        └── TransientGraphError        429, 408, 423, 5xx, backend-flake 400 → retry, then RetriesExhausted
            ├── GraphTimeout           no answer in time (never repeated inline)
            ├── GraphConnectionError   the connection failed or was reset
            ├── TokenUnavailable       the identity endpoint gave no token
            └── HeldBack               the tenant's shared budget had no turn in time (never repeated inline)

A message that cannot be settled (the dead-letter or retry send failed) is not an
``UpgradeError``: the Service Bus exception propagates so the host abandons the message.
"""

from __future__ import annotations

import json
import math
import re
import time
from collections.abc import Mapping
from dataclasses import dataclass
from email.utils import parsedate_to_datetime
from http import HTTPStatus
from typing import Any

#: A 400 whose message reports a failed call from Graph to a Teams backend; these succeed on
#: retry (research/graph.md §2.4).
_BACKEND_FLAKE = re.compile(r"failed to execute [a-z ]*request", re.IGNORECASE)
_TRANSIENT_STATUSES = frozenset({408, 423, 429})
#: ``Retry-After`` as delta-seconds: digits, with a decimal part as Graph sometimes sends.
_SECONDS = re.compile(r"[0-9]+(?:\.[0-9]*)?|\.[0-9]+", re.ASCII)
#: The longest wait a ``Retry-After`` is read as: far past any retry horizon (24 h by default),
#: so a longer one still ends the request, while every date and clock can hold it.
MAX_RETRY_AFTER_SECONDS = 10 * 24 * 3600.0


class UpgradeError(Exception):
    """Base of every failure the handler settles a message for."""


class InvalidMessageError(UpgradeError):
    """The message body does not follow contract §1; ``reason`` says which rule it breaks."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class InstallationNotFoundError(UpgradeError):
    """A lookup by ``teamsAppId`` or ``externalId`` returned no installation."""


@dataclass(frozen=True, slots=True)
class GraphFailure:
    """What is known about one failed Graph attempt, for logs and the dead-letter message."""

    status: int | None
    code: str
    message: str
    inner_code: str | None = None
    request_id: str | None = None
    client_request_id: str | None = None
    date: str | None = None
    raw_body: str | None = None
    retry_after: float | None = None


class GraphError(UpgradeError):
    """A failed Graph attempt. ``failure`` holds the status, codes and request ids."""

    def __init__(self, failure: GraphFailure) -> None:
        status = failure.status if failure.status is not None else "no response"
        super().__init__(f"Graph {status} {failure.code}: {failure.message}")
        self.failure = failure


class PermanentGraphError(GraphError):
    """Graph rejected the request; the same request will be rejected again."""


class AuthenticationRejected(PermanentGraphError):
    """401: the token was refused. Worth one retry with a newly acquired token."""


class TransientGraphError(GraphError):
    """A failure that may pass: throttling, a server error, a timeout, a lost connection."""


class GraphTimeout(TransientGraphError):
    """Graph did not answer within the request timeout."""


class GraphConnectionError(TransientGraphError):
    """The connection to Graph could not be made or was lost."""


class TokenUnavailable(TransientGraphError):
    """The managed identity endpoint did not issue a token."""


class HeldBack(TransientGraphError):
    """The call was not sent: the tenant's shared budget (§7) had no turn for it within what is left of
    the invocation's ``UPGRADE_MAX_BUDGET_WAIT_SECONDS``; ``retry_after`` is the expected wait. A
    deferral, scheduled as a retry at once (the invocation has waited all it may)."""


def classify_response(status: int, headers: Mapping[str, str], body: bytes) -> GraphError:
    """Turn a non-2xx Graph response into the error that decides its fate (research/graph.md §9.1)."""
    error = _error_object(body)
    inner = error.get("innerError") or error.get("innererror") or {}
    if not isinstance(inner, dict):
        inner = {}
    code = _text(error.get("code")) or f"Http{status}"
    message = _text(error.get("message"))
    nested = _nested_error(message)
    if nested is not None:
        # Some Teams errors wrap a whole Graph error as a JSON string inside `message`.
        code = _text(nested.get("code")) or code
        message = _text(nested.get("message")) or message
        nested_inner = nested.get("innerError") or nested.get("innererror")
        if isinstance(nested_inner, dict) and not inner.get("code"):
            inner = {**inner, "code": nested_inner.get("code")}
    failure = GraphFailure(
        status=status,
        code=code,
        message=message or _reason_phrase(status),
        inner_code=_text(inner.get("code")) or None,
        request_id=headers.get("request-id") or _text(inner.get("request-id")) or None,
        client_request_id=headers.get("client-request-id") or _text(inner.get("client-request-id")) or None,
        date=headers.get("date") or _text(inner.get("date")) or None,
        raw_body=body.decode("utf-8", errors="replace") if body else None,
        retry_after=parse_retry_after(headers.get("retry-after")),
    )
    if status == 401:
        return AuthenticationRejected(failure)
    if status in _TRANSIENT_STATUSES or status >= 500:
        return TransientGraphError(failure)
    if status == 400 and _BACKEND_FLAKE.search(message):
        return TransientGraphError(failure)
    return PermanentGraphError(failure)


def parse_retry_after(value: str | None, *, now: float | None = None) -> float | None:
    """Seconds to wait from a ``Retry-After`` header, or ``None`` when absent or unreadable.

    Accepts an integer (``10``), a decimal (``2.128``), a list (``30,120``: the largest counts)
    and an HTTP date (seconds from ``now``, epoch seconds, never negative). Never raises: any
    other value (negative, ``nan``, garbage) is unreadable, and a wait longer than
    ``MAX_RETRY_AFTER_SECONDS`` (``1e400``, ``Fri, 31 Dec 9999 …``) is that long, so the result
    is always a finite number that a clock or a ``timedelta`` can take.
    """
    if value is None or not value.strip():
        return None
    numbers = [part.strip() for part in value.split(",")]
    if all(_SECONDS.fullmatch(number) for number in numbers):
        # A long run of digits is infinite as a float, and still only "later than the horizon".
        return min(max(float(number) for number in numbers), MAX_RETRY_AFTER_SECONDS)
    try:
        when = parsedate_to_datetime(value.strip())
        if when.tzinfo is None:
            return None
        seconds = when.timestamp() - (time.time() if now is None else now)
    except (TypeError, ValueError, IndexError, OverflowError, OSError):
        return None
    if not math.isfinite(seconds):
        return None
    return min(max(0.0, seconds), MAX_RETRY_AFTER_SECONDS)


def _error_object(body: bytes) -> dict[str, Any]:
    try:
        document = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        return {}
    if isinstance(document, dict) and isinstance(document.get("error"), dict):
        return dict(document["error"])
    return {}


def _nested_error(message: str) -> dict[str, Any] | None:
    if not message.startswith("{"):
        return None
    inner = _error_object(message.encode())
    return inner or None


def _text(value: object) -> str:
    return value if isinstance(value, str) else ""


def _reason_phrase(status: int) -> str:
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return f"HTTP {status}"
