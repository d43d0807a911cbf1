"""One delivery of a queue message, whoever received it (the Functions host or the worker)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Protocol


class FunctionMessage(Protocol):
    """What the handler reads of ``azure.functions.ServiceBusMessage``."""

    def get_body(self) -> bytes: ...

    @property
    def message_id(self) -> str | None: ...

    @property
    def content_type(self) -> str | None: ...

    @property
    def correlation_id(self) -> str | None: ...

    @property
    def subject(self) -> str | None: ...

    @property
    def application_properties(self) -> dict[str, Any]: ...

    @property
    def delivery_count(self) -> int | None: ...

    @property
    def enqueued_time_utc(self) -> datetime | None: ...


@dataclass(frozen=True, slots=True)
class Delivery:
    """The parts of a received message the handler uses; properties have ``str`` keys."""

    body: bytes
    message_id: str
    delivery_count: int
    content_type: str | None = None
    correlation_id: str | None = None
    subject: str | None = None
    enqueued_time_utc: datetime | None = None
    application_properties: Mapping[str, Any] = field(default_factory=dict)

    @classmethod
    def from_function_message(cls, message: FunctionMessage) -> Delivery:
        return cls(
            body=message.get_body() or b"",
            message_id=message.message_id or "",
            delivery_count=message.delivery_count or 1,  # the host's .NET SDK already counts from 1
            content_type=message.content_type or None,
            correlation_id=message.correlation_id or None,
            subject=getattr(message, "subject", None) or None,
            enqueued_time_utc=_utc(message.enqueued_time_utc),
            application_properties=_str_keys(message.application_properties or {}),
        )

    @classmethod
    def from_received_message(cls, message: Any) -> Delivery:
        """From an ``azure.servicebus.ServiceBusReceivedMessage`` (the worker's path).

        The Python SDK shows Service Bus's zero-based count as is (0 on a first delivery); the
        Functions host's .NET SDK adds 1. Adding it here makes the poison guard count alike in both.
        """
        return cls(
            body=b"".join(message.body) if not isinstance(message.body, bytes) else message.body,
            message_id=message.message_id or "",
            delivery_count=(message.delivery_count or 0) + 1,
            content_type=message.content_type,
            correlation_id=message.correlation_id,
            subject=message.subject,
            enqueued_time_utc=_utc(message.enqueued_time_utc),
            application_properties=_str_keys(message.application_properties or {}),
        )


def _utc(value: datetime | None) -> datetime | None:
    if value is None:
        return None
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


def _str_keys(properties: Mapping[Any, Any]) -> dict[str, Any]:
    """Service Bus hands string keys and values back as bytes; the handler works in ``str``."""

    def text(value: Any) -> Any:
        return value.decode("utf-8", errors="replace") if isinstance(value, bytes) else value

    return {str(text(key)): text(value) for key, value in properties.items()}
