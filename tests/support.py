"""Helpers shared by the over-the-wire tests: a driven clock and message builders."""

from __future__ import annotations

import asyncio
import json
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

from azure.functions.servicebus import ServiceBusMessage as FunctionMessage

USER = "7f3c2d1e-0a4b-4c5d-9e8f-112233445566"
USER_UPN = "adele.vance@contoso.com"
TEAM = "02bd9fd6-8f93-4758-87c3-1fb73740a315"
CHAT = "19:8ea0e38b-efb3-4757-924a-5f94061cf8c2_97f62344-57dc-409c-88ad-c4af14158ff5@unq.gbl.spaces"
APP = "12345678-aaaa-4bbb-8ccc-1234567890ab"
APP_EXTERNAL = "com.contoso.helpdesk"
MI_CLIENT_ID = "0b1c2d3e-4f50-6172-8394-a5b6c7d8e9f0"


class FakeClock:
    """A clock that only moves when someone sleeps on it; every sleep is recorded."""

    def __init__(self, start: datetime | None = None) -> None:
        # Real "now" (to the second), so scheduled messages really lie in the broker's future.
        self._start = start or datetime.now(UTC).replace(microsecond=0)
        self._elapsed = 0.0
        self.sleeps: list[float] = []

    @property
    def start(self) -> datetime:
        return self._start

    def monotonic(self) -> float:
        return 1_000.0 + self._elapsed

    def now(self) -> datetime:
        return self._start + timedelta(seconds=self._elapsed)

    async def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self._elapsed += max(0.0, seconds)
        await asyncio.sleep(0)

    @property
    def waits(self) -> list[float]:
        """The sleeps a person would notice (pacing slots of a fraction of a millisecond left out)."""
        return [round(s, 3) for s in self.sleeps if s >= 0.001]


def function_message(
    body: dict[str, Any] | bytes,
    *,
    message_id: str | None = None,
    delivery_count: int = 1,
    properties: dict[str, Any] | None = None,
    content_type: str | None = "application/json",
    correlation_id: str | None = None,
    subject: str | None = None,
    enqueued: datetime = datetime(2026, 11, 29, 11, 59, 0, 250000, tzinfo=UTC),
) -> FunctionMessage:
    """A message as the Functions host hands it to the function."""
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    props = dict(properties or {})
    return FunctionMessage(
        body=raw,
        message_id=message_id or str(uuid.uuid4()),
        application_properties=props,
        user_properties=props,
        delivery_count=delivery_count,
        content_type=content_type,
        correlation_id=correlation_id,
        label=subject,
        subject=subject,
        enqueued_time_utc=enqueued,
    )


def new_user(tenant: Any, *, app: str | None = APP, version: str | None = None) -> tuple[str, str, str | None]:
    """A fresh user (id, UPN) with ``app`` installed; returns the installation id too."""
    user_id = str(uuid.uuid4())
    upn = f"user.{user_id[:8]}@contoso.com"
    tenant.add_user(user_id, upn)
    installation = tenant.install("user", user_id, app, version=version) if app else None
    return user_id, upn, installation
