"""The messages that settle a failed delivery: the dead-letter copy (§3) and the scheduled retry (§4).

Both carry the delivery's body, content type and correlation id byte for byte, so a replay is a
plain resend. Pure functions: building a message never sends it.
"""

from __future__ import annotations

import hashlib
import json
import math
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any

from azure.servicebus import ServiceBusMessage

from .delivery import Delivery
from .errors import GraphFailure

#: Properties the retry copies carry between deliveries; never copied onto a dead letter.
BOOKKEEPING = (
    "UpgradeAttempts",
    "DeferredAttempts",
    "OriginalMessageId",
    "OriginalEnqueuedTimeUtc",
    "FirstAttemptUtc",
    "LastErrorStatus",
    "LastErrorCode",
)
_MAX_MESSAGE_ID = 128
_MAX_TEXT = 1024
_MAX_GRAPH_ERROR = 8 * 1024
#: Service Bus refuses a message whose properties pass 64 KiB; keep a margin for the encoding.
_PROPERTIES_BUDGET = 64 * 1024 - 2 * 1024
#: A Standard namespace refuses a message over 256 KB, body and properties together: a dead letter
#: of a large body (an invalid message of up to 256 KB) keeps its body whole and fits its properties
#: into what the body leaves, keeping at least this much for the reason and the Graph error.
_MESSAGE_BUDGET = 256 * 1024 - 4 * 1024
_LEAST_PROPERTIES = 8 * 1024
_INT32 = range(-(2**31), 2**31)


#: What a dead letter adds to the carried properties (contract §3).
_DEAD_LETTER_KEYS = frozenset(
    {
        "DeadLetterReason",
        "DeadLetterErrorDescription",
        "UpgradeAttempts",
        "DeferredAttempts",
        "FailedAtUtc",
        "OriginalMessageId",
        "OriginalEnqueuedTimeUtc",
        "OriginalDeliveryCount",
        "GraphStatus",
        "GraphErrorCode",
        "GraphErrorMessage",
        "GraphInnerErrorCode",
        "GraphRequestId",
        "GraphClientRequestId",
        "GraphDate",
        "GraphError",
    }
)


class DeadLetterReason(StrEnum):
    INVALID_MESSAGE = "InvalidMessage"
    INSTALLATION_NOT_FOUND = "InstallationNotFound"
    GRAPH_REQUEST_REJECTED = "GraphRequestRejected"
    RETRIES_EXHAUSTED = "RetriesExhausted"


@dataclass(frozen=True, slots=True)
class History:
    """What a delivery says about the request's earlier attempts (from a retry copy's properties)."""

    attempts: int
    original_message_id: str
    original_enqueued_time_utc: str | None
    first_attempt_utc: str | None
    deferred_attempts: int = 0
    """Those of ``attempts`` that Graph or the tenant deferred (§2); never more than ``attempts``."""
    last_error_status: int | None = None

    @classmethod
    def of(cls, delivery: Delivery) -> History:
        properties = delivery.application_properties
        attempts = count_property(properties.get("UpgradeAttempts"))
        original_id = properties.get("OriginalMessageId")
        enqueued = properties.get("OriginalEnqueuedTimeUtc")
        first = properties.get("FirstAttemptUtc")
        status = properties.get("LastErrorStatus")
        return cls(
            attempts=attempts,
            original_message_id=original_id if isinstance(original_id, str) and original_id else _message_id(delivery),
            original_enqueued_time_utc=enqueued if isinstance(enqueued, str) else _iso(delivery.enqueued_time_utc),
            first_attempt_utc=first if isinstance(first, str) else None,
            deferred_attempts=min(attempts, count_property(properties.get("DeferredAttempts"))),
            last_error_status=status if isinstance(status, int) and not isinstance(status, bool) else None,
        )


def count_property(value: Any) -> int:
    """A non-negative count from a property (it may come back as text); anything else is 0."""
    if isinstance(value, str) and value.isdigit():
        value = int(value)
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else 0


def iso_utc(moment: datetime) -> str:
    """``2026-11-29T15:04:05.123Z``."""
    moment = moment.astimezone(UTC)
    return moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{moment.microsecond // 1000:03d}Z"


def dead_letter_message(
    delivery: Delivery,
    history: History,
    *,
    reason: DeadLetterReason,
    description: str,
    attempts: int,
    failed_at: datetime,
    failure: GraphFailure | None = None,
    deferred_attempts: int = 0,
) -> ServiceBusMessage:
    properties = {
        key: carry_property(value) for key, value in delivery.application_properties.items() if key not in BOOKKEEPING
    }
    properties.update(
        {
            "DeadLetterReason": str(reason),
            "DeadLetterErrorDescription": _one_line(description),
            "UpgradeAttempts": attempts,
            "DeferredAttempts": deferred_attempts,
            "FailedAtUtc": iso_utc(failed_at),
            "OriginalMessageId": history.original_message_id,
            "OriginalEnqueuedTimeUtc": history.original_enqueued_time_utc,
            "OriginalDeliveryCount": delivery.delivery_count,
        }
    )
    if failure is not None:
        properties.update(_graph_properties(failure, with_status=reason is not DeadLetterReason.INSTALLATION_NOT_FOUND))
    carried = set(properties) - _DEAD_LETTER_KEYS
    properties = {key: value for key, value in properties.items() if value is not None}
    _fit_properties(properties, carried, len(delivery.body))
    return ServiceBusMessage(
        delivery.body,
        message_id=history.original_message_id,
        content_type=delivery.content_type,
        correlation_id=delivery.correlation_id,
        subject=str(reason),
        application_properties=properties,  # type: ignore[arg-type]  # values are made carriable above
    )


def retry_message(
    delivery: Delivery,
    history: History,
    *,
    attempts: int,
    first_attempt_utc: str,
    failure: GraphFailure,
    not_before: datetime,
    deferred_attempts: int = 0,
) -> ServiceBusMessage:
    properties = {key: carry_property(value) for key, value in delivery.application_properties.items()}
    for key in ("LastErrorStatus", "LastErrorCode"):
        properties.pop(key, None)
    properties.update(
        {
            "UpgradeAttempts": attempts,
            "OriginalMessageId": history.original_message_id,
            "OriginalEnqueuedTimeUtc": history.original_enqueued_time_utc,
            "FirstAttemptUtc": first_attempt_utc,
            "LastErrorStatus": failure.status,
            "LastErrorCode": failure.code,
            "DeferredAttempts": deferred_attempts,
        }
    )
    carried = set(properties) - set(BOOKKEEPING)
    properties = {key: value for key, value in properties.items() if value is not None}
    _fit_properties(properties, carried, len(delivery.body))
    return ServiceBusMessage(
        delivery.body,
        message_id=retry_message_id(history.original_message_id, attempts),
        content_type=delivery.content_type,
        correlation_id=delivery.correlation_id,
        subject=delivery.subject,
        scheduled_enqueue_time_utc=not_before,
        application_properties=properties,  # type: ignore[arg-type]  # values are made carriable above
    )


def retry_message_id(original_message_id: str, attempts: int) -> str:
    """``{OriginalMessageId}:retry:{attempts}``, shortened stably if it would pass 128 characters."""
    suffix = f":retry:{attempts}"
    if len(original_message_id) + len(suffix) <= _MAX_MESSAGE_ID:
        return original_message_id + suffix
    digest = hashlib.sha256(original_message_id.encode()).hexdigest()[:12]
    keep = _MAX_MESSAGE_ID - len(suffix) - len(digest) - 1
    return f"{original_message_id[:keep]}~{digest}{suffix}"


def describe(failure: GraphFailure) -> str:
    """One line for a human about a failed Graph attempt."""
    status = f"Graph answered {failure.status}" if failure.status is not None else "Graph call failed"
    inner = f"/{failure.inner_code}" if failure.inner_code and failure.inner_code != failure.code else ""
    return f"{status} {failure.code}{inner}: {failure.message}"


def _graph_properties(failure: GraphFailure, *, with_status: bool) -> dict[str, Any]:
    return {
        "GraphStatus": failure.status if with_status else None,
        "GraphErrorCode": failure.code,
        "GraphErrorMessage": _one_line(failure.message) if failure.message else None,
        "GraphInnerErrorCode": failure.inner_code,
        "GraphRequestId": failure.request_id,
        "GraphClientRequestId": failure.client_request_id,
        "GraphDate": failure.date,
        "GraphError": _utf8_prefix(failure.raw_body, _MAX_GRAPH_ERROR) if failure.raw_body else None,
    }


def _fit_properties(properties: dict[str, Any], carried: set[str], body_size: int) -> None:
    """Keep the properties under Service Bus's 64 KiB, and the message with its body under 256 KB:
    shorten ``GraphError`` first, then drop it, then drop the largest carried properties, naming
    them in ``DeadLetterPropertiesDropped`` (a retry copy's carried ones go on to its dead letter)."""
    budget = min(_PROPERTIES_BUDGET, max(_LEAST_PROPERTIES, _MESSAGE_BUDGET - body_size))
    excess = _size(properties) - budget
    if excess > 0 and "GraphError" in properties:
        raw = properties["GraphError"]
        kept = _utf8_prefix(raw, max(0, len(raw.encode("utf-8")) - excess))
        if kept:
            properties["GraphError"] = kept
        else:
            del properties["GraphError"]
    dropped: list[str] = []
    by_size = sorted(carried & properties.keys(), key=lambda key: _size({key: properties[key]}), reverse=True)
    while _size(properties) > budget and by_size:
        key = by_size.pop(0)
        del properties[key]
        dropped.append(key)
        properties["DeadLetterPropertiesDropped"] = ",".join(dropped)[:_MAX_TEXT]


def _utf8_prefix(text: str, limit: int) -> str:
    """The longest prefix of ``text`` that is at most ``limit`` bytes of UTF-8."""
    return text.encode("utf-8")[:limit].decode("utf-8", errors="ignore")


def _size(properties: Mapping[str, Any]) -> int:
    total = 0
    for key, value in properties.items():
        encoded = value if isinstance(value, bytes) else str(value).encode("utf-8")
        total += len(key.encode("utf-8")) + len(encoded) + 8
    return total


def carry_property(value: Any) -> Any:
    """A property value the AMQP encoder can carry as is, else its text (integers in decimal)."""
    if value is None or isinstance(value, bool | str | bytes | datetime | uuid.UUID):
        return value
    if isinstance(value, int):
        return value if value in _INT32 else str(value)
    if isinstance(value, float):
        return value if math.isfinite(value) else str(value)
    try:
        return json.dumps(value, separators=(",", ":"), default=str)
    except (TypeError, ValueError):
        return str(value)


def _one_line(text: str) -> str:
    line = " ".join(text.split())
    return line if len(line) <= _MAX_TEXT else line[: _MAX_TEXT - 1] + "…"


def _iso(moment: datetime | None) -> str | None:
    return iso_utc(moment) if moment is not None else None


def _message_id(delivery: Delivery) -> str:
    return delivery.message_id or str(uuid.uuid4())
