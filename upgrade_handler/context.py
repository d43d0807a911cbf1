"""One delivery's work in progress, and every way it can end (contract §2, §3, §4).

A :class:`DeliveryContext` holds what the steps of one delivery share: the message, what its
properties say about earlier attempts (:class:`~upgrade_handler.settlement.History`), the fields
every log line about it carries, and the attempts and waits of this invocation. It owns the ways
a delivery settles:

- :meth:`complete` (return; the host completes the message),
- :meth:`schedule_retry` (a copy due later on the upgrade queue, then complete),
- :meth:`dead_letter` and its named cases (a copy with the reason on the dead-letter queue),

and sends the messages a job produces (:meth:`enqueue`). A send that fails raises out of here:
the host abandons the message and Service Bus delivers it again.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from azure.servicebus import ServiceBusMessage

from .clock import Clock
from .delivery import Delivery
from .errors import GraphFailure, InvalidMessageError
from .ledger import Ledger, PageRecord, TargetRecord
from .logs import log_event, redact_user
from .messages import FanOutRequest, Request, Scope, Target, is_rollout_id
from .outcome import Outcome
from .retry import RetryPolicy, is_deferral
from .servicebus import MessageSender
from .settings import Settings
from .settlement import DeadLetterReason, History, dead_letter_message, describe, iso_utc, retry_message

#: Set on every fan-out child and continuation: the message id of the request that named the users.
PARENT_PROPERTY = "FanOutParentMessageId"


@dataclass(frozen=True, slots=True)
class Settler:
    """What settling needs, shared by every delivery of a process: where to send, and when."""

    settings: Settings
    sender: MessageSender
    clock: Clock
    policy: RetryPolicy
    ledger: Ledger | None = None
    """Where requests record how they ended (§8); ``None`` without a storage account."""


@dataclass(slots=True)
class DeliveryContext:
    """One delivery: the message, its history, its log fields, and this invocation's attempts."""

    delivery: Delivery
    history: History
    settler: Settler
    log: dict[str, Any]
    """Fields of every log line about this delivery (ids, scope, redacted target, request id)."""
    attempts: int
    """Attempts for this request so far, all deliveries together."""
    deferred: int
    """Those of ``attempts`` that were deferrals (§2): not held against ``UPGRADE_MAX_ATTEMPTS``."""
    first_attempt_utc: str | None
    inline_attempts: int = 0
    waited: float = 0.0
    """Seconds this invocation has waited inline between attempts."""
    last_failure: GraphFailure | None = None
    budget_deadline: float = float("inf")
    """When (on the clock's monotonic seconds) this invocation stops waiting for the shared budget."""
    rollout_id: str | None = None
    """The rollout the request belongs to (§8), once the request is read."""
    target: Target | None = None
    """The one installation owner of a single request, once it is read (``None`` for a fan-out)."""
    fanout_id: str | None = None
    """The id of the message that named the users: for a fan-out, the one every child and
    continuation derives its id from (a continuation names it in ``FanOutParentMessageId``); for
    a child, its fan-out's (so the ledger waits for that fan-out's last page before it settles)."""

    @classmethod
    def of(cls, delivery: Delivery, settler: Settler) -> DeliveryContext:
        history = History.of(delivery)
        log = {
            "message_id": delivery.message_id,
            "original_message_id": history.original_message_id
            if history.original_message_id != delivery.message_id
            else None,
            "correlation_id": delivery.correlation_id,
            "delivery_count": delivery.delivery_count,
        }
        return cls(
            delivery=delivery,
            history=history,
            settler=settler,
            log=log,
            attempts=history.attempts,
            deferred=history.deferred_attempts,
            # An unreadable FirstAttemptUtc starts the horizon afresh (once, with this attempt).
            first_attempt_utc=history.first_attempt_utc if _parse_utc(history.first_attempt_utc) else None,
            budget_deadline=settler.clock.monotonic() + settler.settings.max_budget_wait_seconds,
        )

    @property
    def settings(self) -> Settings:
        return self.settler.settings

    @property
    def failed_attempts(self) -> int:
        """Attempts held against ``UPGRADE_MAX_ATTEMPTS``: every attempt but the deferrals."""
        return self.attempts - self.deferred

    @property
    def attempts_spent(self) -> bool:
        return self.failed_attempts >= self.settings.max_attempts

    def read(self, request: Request) -> None:
        """Take in what the parsed request adds to every log line and to the ledger."""
        self.log["request_id"] = request.request_id
        # §8: the rolloutId given, else the requestId when it fits the alphabet, else the first message's id.
        candidates = (request.rollout_id, request.request_id, self.history.original_message_id)
        self.rollout_id = next((c for c in candidates if c is not None and is_rollout_id(c)), None)
        self.log["rollout_id"] = self.rollout_id
        parent = self.delivery.application_properties.get(PARENT_PROPERTY)
        parent = parent if isinstance(parent, str) and parent else None
        if isinstance(request, FanOutRequest):
            self.fanout_id = parent if request.next_link is not None and parent else self.history.original_message_id
        else:
            self.fanout_id = parent  # a child: the fan-out that named it
            target = self.target = request.target
            self.log["scope"] = target.scope.value
            self.log["target"] = redact_user(target.id) if target.scope is Scope.USER else target.id

    def begin_attempt(self) -> None:
        self.attempts += 1
        self.inline_attempts += 1
        self.first_attempt_utc = self.first_attempt_utc or iso_utc(self.settler.clock.now())

    def failed(self, failure: GraphFailure) -> None:
        """Record the failure of the current attempt; a deferral is counted as one."""
        self.last_failure = failure
        if is_deferral(failure):
            self.deferred += 1

    def budget_wait_left(self) -> float:
        """How much longer a Graph call may wait for its turn in the shared budget: every call of the
        invocation draws on one ``UPGRADE_MAX_BUDGET_WAIT_SECONDS``, so a lookup and an upgrade
        together stay within the function's timeout."""
        return max(0.0, self.budget_deadline - self.settler.clock.monotonic())

    def inline_budget(self) -> float:
        return self.settler.policy.inline_budget(self.waited)

    async def wait(self, seconds: float) -> None:
        await self.settler.clock.sleep(seconds)
        self.waited += seconds

    def log_event(self, event: str, level: int = logging.INFO, **fields: Any) -> None:
        log_event(event, level, **self.log, **fields)

    def attempt_failed(self, failure: GraphFailure, next_step: str) -> None:
        self.log_event(
            "upgrade.attempt_failed", logging.WARNING, attempt=self.attempts, next=next_step, **failure_fields(failure)
        )

    # --- the ways a delivery ends --------------------------------------------------------------

    async def complete(
        self,
        outcome: Outcome,
        event: str,
        *,
        version_before: str | None = None,
        version_after: str | None = None,
        **fields: Any,
    ) -> Outcome:
        """The work is done; the host completes the message when the function returns."""
        self.log_event(event, attempt=self.attempts or None, **fields)
        await self.record(_LEDGER_OUTCOMES[outcome], version_before=version_before, version_after=version_after)
        return outcome

    async def record(self, outcome: str, **details: Any) -> None:
        """Write how this request for its one target ended to the rollout ledger (§8), when there is
        one; the ledger never raises, so it never changes what happens to the message."""
        ledger, target = self.settler.ledger, self.target
        fanout_id = self.fanout_id
        if target is not None:
            scope, target_id = target.scope.value, target.id
        elif fanout_id is not None and outcome == "deadlettered":  # the rollout's pages end here
            scope, target_id, fanout_id = "fanout", fanout_id, None
        else:
            return
        if ledger is None or self.rollout_id is None:
            return
        await ledger.record(
            TargetRecord(
                rollout_id=self.rollout_id,
                scope=scope,
                target_id=target_id,
                outcome=outcome,
                attempts=self.attempts,
                at=self.settler.clock.now(),
                message_id=self.history.original_message_id,
                fanout_id=fanout_id,
                **details,
            )
        )

    async def record_page(self, fanout_id: str, page: int, targets: int, *, last: bool) -> None:
        """Write a fan-out page's header row: how many targets it expects, and whether it is the last."""
        ledger = self.settler.ledger
        if ledger is None or self.rollout_id is None:
            return
        await ledger.record(
            PageRecord(self.rollout_id, fanout_id, page, targets, last=last, at=self.settler.clock.now())
        )

    async def enqueue(self, messages: Sequence[ServiceBusMessage]) -> None:
        """Send ``messages`` to the upgrade queue (fan-out children and continuations)."""
        await self.settler.sender.send(self.settings.upgrade_queue, messages)

    async def schedule_retry(self, failure: GraphFailure) -> Outcome:
        """A copy of the message on the upgrade queue, due after the failure's wait; or, when that
        would come due past ``UPGRADE_MAX_RETRY_HOURS`` after the first attempt, a dead letter."""
        clock, settings = self.settler.clock, self.settings
        now = clock.now()
        horizon = (_parse_utc(self.first_attempt_utc) or now) + timedelta(hours=settings.max_retry_hours)
        room = (horizon - now).total_seconds()
        delay = self.settler.policy.retry_delay(failure, self.attempts)
        if delay > room:
            return await self.exhausted(
                f"the next retry would come due after UPGRADE_MAX_RETRY_HOURS ({settings.max_retry_hours:g} h) "
                "from the first attempt"
            )
        not_before = now + timedelta(seconds=delay)
        assert self.first_attempt_utc is not None
        message = retry_message(
            self.delivery,
            self.history,
            attempts=self.attempts,
            first_attempt_utc=self.first_attempt_utc,
            failure=failure,
            not_before=not_before,
            deferred_attempts=self.deferred,
        )
        await self.settler.sender.send(settings.upgrade_queue, [message])
        await self.record("retrying")
        self.log_event(
            "upgrade.retry_scheduled",
            logging.WARNING,
            attempt=self.attempts,
            deferred=self.deferred,
            retry_at=iso_utc(not_before),
            retry_message_id=message.message_id,
            **failure_fields(failure),
        )
        return Outcome.RETRY_SCHEDULED

    async def dead_letter(
        self, reason: DeadLetterReason, description: str, *, failure: GraphFailure | None = None
    ) -> Outcome:
        message = dead_letter_message(
            self.delivery,
            self.history,
            reason=reason,
            description=description,
            attempts=self.attempts,
            failed_at=self.settler.clock.now(),
            failure=failure,
            deferred_attempts=self.deferred,
        )
        await self.settler.sender.send(self.settings.deadletter_queue, [message])
        await self.record("deadlettered", reason=str(reason))
        properties = message.application_properties or {}
        self.log_event(
            "upgrade.dead_lettered",
            logging.ERROR,
            reason=str(reason),
            attempts=self.attempts,
            description=properties.get("DeadLetterErrorDescription"),
            **(failure_fields(failure) if failure else {}),
        )
        return Outcome.DEAD_LETTERED

    async def invalid(self, error: InvalidMessageError) -> Outcome:
        return await self.dead_letter(DeadLetterReason.INVALID_MESSAGE, f"invalid message: {error.reason}")

    async def rejected(self, failure: GraphFailure) -> Outcome:
        return await self.dead_letter(DeadLetterReason.GRAPH_REQUEST_REJECTED, describe(failure), failure=failure)

    async def exhausted(self, why: str | None = None) -> Outcome:
        failure = self.last_failure
        settings = self.settings
        why = why or (
            f"gave up after {self.attempts} attempts (UPGRADE_MAX_ATTEMPTS is {settings.max_attempts}"
            + (f", not counting {self.deferred} deferred" if self.deferred else "")
            + ")"
        )
        last = f"; last error: {describe(failure)}" if failure is not None else ""
        return await self.dead_letter(DeadLetterReason.RETRIES_EXHAUSTED, why + last, failure=failure)


#: The ledger's outcome (§8) of each way a request completes.
_LEDGER_OUTCOMES = {
    Outcome.UPGRADED: "upgraded",
    Outcome.CURRENT: "current",
    Outcome.SKIPPED: "skipped",
}


def failure_fields(failure: GraphFailure) -> dict[str, Any]:
    """The log fields of a failed attempt."""
    return {
        "graph_status": failure.status,
        "graph_error_code": failure.code,
        "graph_request_id": failure.request_id,
        "client_request_id": failure.client_request_id,
    }


def _parse_utc(text: str | None) -> datetime | None:
    """``FirstAttemptUtc`` as a UTC time, or ``None`` when it is missing or unreadable."""
    if text is None:
        return None
    try:
        moment = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        return None
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=UTC)
