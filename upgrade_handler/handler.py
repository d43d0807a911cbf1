"""The upgrade handler: one delivery in, one settled outcome out (contract §2).

    validate → pick the job → token → job (resolve, check the version, upgrade; or fan out)
             → classify the failure → finish

One :class:`~upgrade_handler.context.DeliveryContext` carries the delivery through these steps
and owns how it finishes: return (the host completes the message), schedule a retry copy on the
upgrade queue, or send a dead-letter copy to the dead-letter queue. When such a send fails the
Service Bus error propagates, the host abandons the message and it is delivered again. The jobs
are :class:`~upgrade_handler.upgrade.SingleUpgrade` and :class:`~upgrade_handler.fanout.FanOut`.
"""

from __future__ import annotations

import random
from collections.abc import Awaitable, Callable
from typing import Any

from .auth import CredentialFactory, TokenProvider, default_credential
from .budget import LocalSchedule, shared_budget
from .catalog import Catalog
from .clock import Clock, SystemClock
from .context import DeliveryContext, Settler
from .delivery import Delivery, FunctionMessage
from .errors import (
    AuthenticationRejected,
    InstallationNotFoundError,
    InvalidMessageError,
    PermanentGraphError,
    TransientGraphError,
)
from .fanout import FanOut
from .graph import GraphClient
from .ledger import open_ledger
from .messages import FanOutRequest, parse_request
from .outcome import Outcome
from .ratelimit import HEADROOM, AdaptiveRateLimiter
from .retry import INLINE_ATTEMPTS, Backoff, RetryPolicy
from .schedule import Timeline
from .servicebus import MessageSender, ServiceBusMessageSender
from .settings import Settings
from .settlement import DeadLetterReason
from .upgrade import SingleUpgrade

__all__ = ["Backoff", "Job", "UpgradeHandler"]

#: One attempt's work after the token: a single upgrade or a fan-out, given the delivery, the token
#: and the longest acceptable throttle wait. It returns how the delivery ended, or raises a failure.
Job = Callable[[DeliveryContext, str, float], Awaitable[Outcome]]


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
        self.clock = clock or SystemClock()
        self.graph = graph or GraphClient(
            settings.graph_base_url,
            limiter=AdaptiveRateLimiter(
                settings.max_requests_per_second, clock=self.clock.monotonic, sleep=self.clock.sleep
            ),
            # The fleet's timeline is real time, whatever clock this handler's waits are measured on.
            budget=shared_budget(settings),
            budget_wait=settings.max_budget_wait_seconds,
        )
        self.tokens = tokens or TokenProvider(
            settings.graph_scope,
            credential_factory or (lambda: default_credential(settings.managed_identity_client_id)),
        )
        self.sender: MessageSender = sender or ServiceBusMessageSender(settings.service_bus)
        self._owns_sender = sender is None
        policy = RetryPolicy(settings.max_inline_wait_seconds, backoff or Backoff(), rng or random.Random())
        self.ledger = open_ledger(settings)
        self.settler = Settler(settings, self.sender, self.clock, policy, self.ledger)
        # Fan-out children are paced at the budget's rate: the fleet's, or this process's without a store.
        self.timeline: Timeline = self.graph.budget or LocalSchedule(
            settings.max_requests_per_second * HEADROOM, now=self.clock.now
        )
        self.catalog = Catalog(self.graph, self.clock.monotonic)

    @classmethod
    def from_environment(cls, **seams: Any) -> UpgradeHandler:
        """Read and validate the app settings now; open nothing until the first message."""
        return cls(Settings.from_environment(), **seams)

    async def aclose(self) -> None:
        """Close the clients this handler opened (a sender passed in is its owner's to close)."""
        if self.graph.budget is not None:
            await self.graph.budget.aclose()
        await self.graph.aclose()
        await self.tokens.aclose()
        if self.ledger is not None:
            await self.ledger.aclose()
        close = getattr(self.sender, "aclose", None)
        if self._owns_sender and close is not None:
            await close()

    async def handle_function_message(self, message: FunctionMessage) -> None:
        """The Azure Functions entry point: returns to complete, raises to abandon."""
        await self.handle(Delivery.from_function_message(message))

    async def handle(self, delivery: Delivery) -> Outcome:
        """Validate, pick the job, and run it until the delivery settles."""
        context = DeliveryContext.of(delivery, self.settler)
        if delivery.delivery_count >= self.settings.max_delivery_count:
            return await context.dead_letter(
                DeadLetterReason.RETRIES_EXHAUSTED,
                f"delivered {delivery.delivery_count} times, the limit set by UPGRADE_MAX_DELIVERY_COUNT "
                f"({self.settings.max_delivery_count}): earlier deliveries were abandoned, so it was "
                "dead-lettered without calling Graph",
            )
        try:
            request = parse_request(delivery.body)
        except InvalidMessageError as error:
            return await context.invalid(error)
        context.read(request)
        job: Job
        skip_if_not_installed = False
        if isinstance(request, FanOutRequest):
            job = FanOut(self.graph, request, self.timeline)
        else:
            skip_if_not_installed = request.skip_if_not_installed
            job = SingleUpgrade(self.graph, self.catalog, request)
        return await self._run(context, job, skip_if_not_installed)

    async def _run(self, context: DeliveryContext, job: Job, skip_if_not_installed: bool) -> Outcome:
        """Attempt ``job`` until it succeeds, fails for good, or is handed to a scheduled retry:

        token → job (lookup, upgrade or page read) → classify the failure → settle or try again.
        """
        replaced_token: str | None = None
        # A 401 is permanent only when it comes again for a token acquired after an earlier 401 (§2);
        # that earlier 401 may have been the last delivery's, recorded in its retry copy.
        renew = context.history.last_error_status == 401
        renewed = False
        while True:
            if context.attempts_spent:
                return await context.exhausted()
            context.begin_attempt()
            token: str | None = None
            try:
                token = await self.tokens.token(replacing=replaced_token)
                if renew:
                    token = await self.tokens.token(replacing=token)
                    renew, renewed = False, True
                return await job(context, token, context.inline_budget())
            except InvalidMessageError as error:
                return await context.invalid(error)
            except InstallationNotFoundError as error:
                if skip_if_not_installed:
                    return await context.complete(Outcome.SKIPPED, "upgrade.skipped", reason=str(error))
                return await context.dead_letter(DeadLetterReason.INSTALLATION_NOT_FOUND, str(error))
            except AuthenticationRejected as error:
                if renewed:
                    return await context.rejected(error.failure)
                context.failed(error.failure)
                if context.inline_attempts < INLINE_ATTEMPTS and not context.attempts_spent:
                    context.attempt_failed(error.failure, "retrying with a new token")
                    replaced_token, renewed = token, True
                    continue
                if context.attempts_spent:
                    return await context.exhausted()
                return await context.schedule_retry(error.failure)
            except PermanentGraphError as error:
                return await context.rejected(error.failure)
            except TransientGraphError as error:
                context.failed(error.failure)
                if context.attempts_spent:
                    return await context.exhausted()
                wait = self.settler.policy.inline_wait(
                    error, inline_attempts=context.inline_attempts, waited=context.waited
                )
                if wait is None:
                    return await context.schedule_retry(error.failure)
                context.attempt_failed(error.failure, f"retrying in {wait:.3f} s")
                await context.wait(wait)
