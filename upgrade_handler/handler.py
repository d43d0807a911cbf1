"""The upgrade handler: one delivery in, one settled outcome out (contract §2).

    validate → resolve the installation if needed → token → upgrade → classify → finish

Finishing is one of: return (the host completes the message), schedule a retry copy on the
upgrade queue, or send a dead-letter copy to the dead-letter queue. When such a send fails the
Service Bus error propagates, the host abandons the message and it is delivered again.
"""

from __future__ import annotations

import logging
import random
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import timedelta
from functools import partial
from typing import Any

from .auth import CredentialFactory, TokenProvider, default_credential
from .clock import Clock, SystemClock
from .delivery import Delivery, FunctionMessage
from .errors import (
    AuthenticationRejected,
    GraphConnectionError,
    GraphFailure,
    GraphTimeout,
    InstallationNotFoundError,
    InvalidMessageError,
    PermanentGraphError,
    TransientGraphError,
)
from .fanout import FanOut
from .graph import GraphCall, GraphClient
from .logs import log_event, redact_user
from .messages import AppKind, FanOutRequest, Scope, UpgradeRequest, parse_request
from .outcome import Outcome
from .ratelimit import AdaptiveRateLimiter
from .servicebus import MessageSender, ServiceBusMessageSender
from .settings import Settings
from .settlement import DeadLetterReason, History, dead_letter_message, describe, iso_utc, retry_message

#: Attempts one invocation makes before handing the request to a scheduled retry.
INLINE_ATTEMPTS = 3
#: Inline backoff before the n-th repeat of a 5xx or a lost connection: 0.5 s, 1 s (± 20%).
INLINE_BACKOFF_SECONDS = 0.5
#: A Graph Retry-After is honoured plus at most this share of jitter.
RETRY_AFTER_JITTER = 0.1
#: Deliveries remembered when the handler had to raise, so their attempts still count.
_REMEMBERED_DELIVERIES = 10_000


@dataclass(frozen=True, slots=True)
class Backoff:
    """How long a scheduled retry waits when Graph gave no ``Retry-After``, in seconds.

    ``base * 2^(attempts-1)``, capped at ``cap``, stretched by up to ``jitter`` (a share) so that
    requests failing together do not come back together: 10, 20, 40, 80 s ... 15 minutes.
    """

    base: float = 10.0
    cap: float = 900.0
    jitter: float = 0.2

    def delay(self, attempts: int, rng: random.Random) -> float:
        return float(min(self.cap, self.base * 2 ** max(0, attempts - 1)) * (1 + rng.uniform(0, self.jitter)))


#: One attempt's work after the token: given the token and the longest acceptable throttle wait.
Job = Callable[[str, float], Awaitable[Outcome]]


@dataclass(slots=True)
class _Progress:
    """One request's attempts within this invocation."""

    attempts: int
    first_attempt_utc: str | None
    inline_attempts: int = 0
    waited: float = 0.0
    last_failure: GraphFailure | None = None


class UpgradeHandler:
    """Handles deliveries with one set of process-wide clients.

    Every collaborator is a seam: ``graph``, ``tokens``, ``sender``, ``clock`` and ``backoff``
    default to the real ones built from ``settings``; tests and tools pass their own.
    """

    def __init__(
        self,
        settings: Settings,
        *,
        graph: GraphClient | None = None,
        tokens: TokenProvider | None = None,
        sender: MessageSender | None = None,
        clock: Clock | None = None,
        rng: random.Random | None = None,
        credential_factory: CredentialFactory | None = None,
        backoff: Backoff | None = None,
    ) -> None:
        self.settings = settings
        self.backoff = backoff or Backoff()
        self.clock = clock or SystemClock()
        self.graph = graph or GraphClient(
            settings.graph_base_url,
            limiter=AdaptiveRateLimiter(
                settings.max_requests_per_second, clock=self.clock.monotonic, sleep=self.clock.sleep
            ),
        )
        self.tokens = tokens or TokenProvider(
            settings.graph_scope,
            credential_factory or (lambda: default_credential(settings.managed_identity_client_id)),
        )
        self.sender: MessageSender = sender or ServiceBusMessageSender(settings.service_bus)
        self._rng = rng or random.Random()
        self._unrecorded_attempts: OrderedDict[str, int] = OrderedDict()

    @classmethod
    def from_environment(cls, **seams: Any) -> UpgradeHandler:
        """Read and validate the app settings now; open nothing until the first message."""
        return cls(Settings.from_environment(), **seams)

    async def aclose(self) -> None:
        await self.graph.aclose()
        await self.tokens.aclose()
        close = getattr(self.sender, "aclose", None)
        if close is not None:
            await close()

    async def handle_function_message(self, message: FunctionMessage) -> None:
        """The Azure Functions entry point: returns to complete, raises to abandon."""
        await self.handle(Delivery.from_function_message(message))

    async def handle(self, delivery: Delivery) -> Outcome:
        history = History.of(delivery)
        prior_attempts = history.attempts + self._unrecorded_attempts.pop(delivery.message_id, 0)
        context = {
            "message_id": delivery.message_id,
            "original_message_id": history.original_message_id
            if history.original_message_id != delivery.message_id
            else None,
            "correlation_id": delivery.correlation_id,
            "delivery_count": delivery.delivery_count,
        }
        if delivery.delivery_count >= self.settings.max_delivery_count:
            return await self._dead_letter(
                delivery,
                history,
                context,
                DeadLetterReason.RETRIES_EXHAUSTED,
                f"delivered {delivery.delivery_count} times, the limit set by UPGRADE_MAX_DELIVERY_COUNT "
                f"({self.settings.max_delivery_count}): earlier deliveries were abandoned, so it was "
                "dead-lettered without calling Graph",
                attempts=prior_attempts,
            )
        try:
            request = parse_request(delivery.body)
        except InvalidMessageError as error:
            return await self._invalid(delivery, history, context, error, prior_attempts)
        context["request_id"] = request.request_id
        progress = _Progress(prior_attempts, history.first_attempt_utc)
        job: Job
        skip_if_not_installed = False
        if isinstance(request, FanOutRequest):
            job = FanOut(self, delivery, history, request, context)
        else:
            skip_if_not_installed = request.skip_if_not_installed
            context["scope"] = request.target.scope.value
            target = request.target
            context["target"] = redact_user(target.id) if target.scope is Scope.USER else target.id
            job = partial(self._upgrade, request, context, progress)
        try:
            return await self._run(delivery, history, context, progress, job, skip_if_not_installed)
        except BaseException:
            # The message will be delivered again; remember what this delivery spent.
            spent = progress.attempts - history.attempts
            if spent > 0 and delivery.message_id:
                self._unrecorded_attempts[delivery.message_id] = spent
                while len(self._unrecorded_attempts) > _REMEMBERED_DELIVERIES:
                    self._unrecorded_attempts.popitem(last=False)
            raise

    async def _run(
        self,
        delivery: Delivery,
        history: History,
        context: dict[str, Any],
        progress: _Progress,
        job: Job,
        skip_if_not_installed: bool,
    ) -> Outcome:
        """Attempt ``job`` until it succeeds, fails for good, or is handed to a scheduled retry."""
        replaced_token: str | None = None
        while True:
            if progress.attempts >= self.settings.max_attempts:
                return await self._exhausted(delivery, history, context, progress)
            progress.attempts += 1
            progress.inline_attempts += 1
            progress.first_attempt_utc = progress.first_attempt_utc or iso_utc(self.clock.now())
            token: str | None = None
            try:
                token = await self.tokens.token(replacing=replaced_token)
                return await job(token, self._inline_budget(progress))
            except InvalidMessageError as error:
                return await self._invalid(delivery, history, context, error, progress.attempts)
            except InstallationNotFoundError as error:
                if skip_if_not_installed:
                    log_event("upgrade.skipped", **context, attempt=progress.attempts, reason=str(error))
                    return Outcome.SKIPPED
                return await self._dead_letter(
                    delivery,
                    history,
                    context,
                    DeadLetterReason.INSTALLATION_NOT_FOUND,
                    str(error),
                    attempts=progress.attempts,
                )
            except AuthenticationRejected as error:
                if replaced_token is None and progress.inline_attempts < INLINE_ATTEMPTS:
                    self._log_attempt_failed(context, progress, error.failure, "retrying with a new token")
                    replaced_token = token
                    continue
                return await self._rejected(delivery, history, context, progress, error.failure)
            except PermanentGraphError as error:
                return await self._rejected(delivery, history, context, progress, error.failure)
            except TransientGraphError as error:
                progress.last_failure = error.failure
                if progress.attempts >= self.settings.max_attempts:
                    return await self._exhausted(delivery, history, context, progress)
                wait = self._inline_wait(error, progress)
                if wait is None:
                    return await self._schedule_retry(delivery, history, context, progress, error.failure)
                self._log_attempt_failed(context, progress, error.failure, f"retrying in {wait:.3f} s")
                await self.clock.sleep(wait)
                progress.waited += wait

    async def _upgrade(
        self, request: UpgradeRequest, context: dict[str, Any], progress: _Progress, token: str, gate_wait: float
    ) -> Outcome:
        started = self.clock.monotonic()
        call = await self._attempt(request, token, context, gate_wait)
        log_event(
            "upgrade.succeeded",
            **context,
            attempt=progress.attempts,
            graph_status=call.status,
            graph_request_id=call.request_id,
            client_request_id=call.client_request_id,
            duration_ms=round((self.clock.monotonic() - started) * 1000),
        )
        return Outcome.UPGRADED

    async def _attempt(
        self, request: UpgradeRequest, token: str, context: dict[str, Any], gate_wait: float
    ) -> GraphCall:
        installation_id = request.app.value
        if request.app.kind is not AppKind.INSTALLATION:
            found = await self.graph.find_installation(request.target, request.app, token, max_gate_wait=gate_wait)
            if found is None:
                raise InstallationNotFoundError(
                    f"no installation of {request.app.kind.value} {request.app.value!r} "
                    f"for the {request.target.scope.value} in the request"
                )
            if found.matches > 1:
                log_event(
                    "upgrade.lookup_ambiguous",
                    logging.WARNING,
                    **context,
                    matches=found.matches,
                    installation_id=found.id,
                    graph_request_id=found.call.request_id,
                )
            installation_id = found.id
        return await self.graph.upgrade(
            request.target, installation_id, request.consented_permission_set, token, max_gate_wait=gate_wait
        )

    def _inline_budget(self, progress: _Progress) -> float:
        return max(0.0, self.settings.max_inline_wait_seconds - progress.waited)

    def _inline_wait(self, error: TransientGraphError, progress: _Progress) -> float | None:
        """Seconds to wait before repeating within this invocation, or ``None`` to schedule a retry."""
        if isinstance(error, GraphTimeout) or progress.inline_attempts >= INLINE_ATTEMPTS:
            return None
        failure = error.failure
        budget = self._inline_budget(progress)
        if failure.retry_after is not None:
            short = failure.retry_after <= self.settings.max_inline_wait_seconds
            return failure.retry_after if short and failure.retry_after <= budget else None
        repeatable = isinstance(error, GraphConnectionError) or (
            failure.status is not None and (failure.status >= 500 or failure.status == 400)
        )
        if not repeatable:
            return None
        wait = INLINE_BACKOFF_SECONDS * 2 ** (progress.inline_attempts - 1) * self._rng.uniform(0.8, 1.2)
        return wait if wait <= budget else None

    def _retry_delay(self, failure: GraphFailure, attempts: int) -> float:
        if failure.retry_after is not None:
            return failure.retry_after * (1 + self._rng.uniform(0, RETRY_AFTER_JITTER))
        return self.backoff.delay(attempts, self._rng)

    async def _schedule_retry(
        self,
        delivery: Delivery,
        history: History,
        context: dict[str, Any],
        progress: _Progress,
        failure: GraphFailure,
    ) -> Outcome:
        delay = self._retry_delay(failure, progress.attempts)
        not_before = self.clock.now() + timedelta(seconds=delay)
        assert progress.first_attempt_utc is not None
        message = retry_message(
            delivery,
            history,
            attempts=progress.attempts,
            first_attempt_utc=progress.first_attempt_utc,
            failure=failure,
            not_before=not_before,
        )
        await self.sender.send(self.settings.upgrade_queue, [message])
        log_event(
            "upgrade.retry_scheduled",
            logging.WARNING,
            **context,
            attempt=progress.attempts,
            retry_at=iso_utc(not_before),
            retry_message_id=message.message_id,
            **_failure_fields(failure),
        )
        return Outcome.RETRY_SCHEDULED

    async def _rejected(
        self,
        delivery: Delivery,
        history: History,
        context: dict[str, Any],
        progress: _Progress,
        failure: GraphFailure,
    ) -> Outcome:
        return await self._dead_letter(
            delivery,
            history,
            context,
            DeadLetterReason.GRAPH_REQUEST_REJECTED,
            describe(failure),
            attempts=progress.attempts,
            failure=failure,
        )

    async def _invalid(
        self, delivery: Delivery, history: History, context: dict[str, Any], error: InvalidMessageError, attempts: int
    ) -> Outcome:
        return await self._dead_letter(
            delivery,
            history,
            context,
            DeadLetterReason.INVALID_MESSAGE,
            f"invalid message: {error.reason}",
            attempts=attempts,
        )

    async def _exhausted(
        self, delivery: Delivery, history: History, context: dict[str, Any], progress: _Progress
    ) -> Outcome:
        failure = progress.last_failure
        last = f"; last error: {describe(failure)}" if failure is not None else ""
        return await self._dead_letter(
            delivery,
            history,
            context,
            DeadLetterReason.RETRIES_EXHAUSTED,
            f"gave up after {progress.attempts} attempts (UPGRADE_MAX_ATTEMPTS is {self.settings.max_attempts}){last}",
            attempts=progress.attempts,
            failure=failure,
        )

    async def _dead_letter(
        self,
        delivery: Delivery,
        history: History,
        context: dict[str, Any],
        reason: DeadLetterReason,
        description: str,
        *,
        attempts: int,
        failure: GraphFailure | None = None,
    ) -> Outcome:
        message = dead_letter_message(
            delivery,
            history,
            reason=reason,
            description=description,
            attempts=attempts,
            failed_at=self.clock.now(),
            failure=failure,
        )
        await self.sender.send(self.settings.deadletter_queue, [message])
        log_event(
            "upgrade.dead_lettered",
            logging.ERROR,
            **context,
            reason=str(reason),
            attempts=attempts,
            description=message.application_properties["DeadLetterErrorDescription"]
            if message.application_properties
            else None,
            **(_failure_fields(failure) if failure else {}),
        )
        return Outcome.DEAD_LETTERED

    def _log_attempt_failed(
        self, context: dict[str, Any], progress: _Progress, failure: GraphFailure, next_step: str
    ) -> None:
        log_event(
            "upgrade.attempt_failed",
            logging.WARNING,
            **context,
            attempt=progress.attempts,
            next=next_step,
            **_failure_fields(failure),
        )


def _failure_fields(failure: GraphFailure) -> dict[str, Any]:
    return {
        "graph_status": failure.status,
        "graph_error_code": failure.code,
        "graph_request_id": failure.request_id,
        "client_request_id": failure.client_request_id,
    }
