"""Fan-out requests (contract §6): one single-user request per user on the upgrade queue.

A ``userIds`` request is split at once. A ``groupId`` request reads one page of the group's
transitive members per invocation, enqueues those users, then enqueues a continuation carrying
Graph's ``@odata.nextLink``. The order (children, continuation, complete) and ids derived from
the first message's id make a redelivery harmless: Service Bus duplicate detection drops what
was already sent, and a crash half-way loses nobody.
"""

from __future__ import annotations

import json
import logging
import uuid
from collections.abc import Iterable
from datetime import datetime, timedelta
from typing import Any

from azure.servicebus import ServiceBusMessage

from .context import PARENT_PROPERTY as PARENT_PROPERTY
from .context import DeliveryContext
from .errors import GraphFailure, InvalidMessageError, PermanentGraphError
from .graph import API_VERSION, GraphClient, segment
from .logs import log_event
from .messages import NEXT_LINK_FIELD, FanOutRequest, validate_user_id
from .outcome import Outcome
from .schedule import Timeline, due_times
from .settlement import BOOKKEEPING, carry_property, count_property

#: Namespace of the derived message ids (a fixed, project-specific UUID).
_IDS = uuid.UUID("5f0f7c1e-3c1a-4d39-9a59-0b6f4c7a2e11")
#: Where a continuation records which page it is, so its id is stable across redeliveries.
PAGE_PROPERTY = "FanOutPage"
#: Graph calls one child makes: the lookup of its installation, then the upgrade.
CHILD_CALLS = 2
#: A group's continuation comes due this long before its page's last child, so that the next page
#: is read just in time and the tenant's timeline has no gap (§6).
CONTINUATION_LEAD = timedelta(seconds=10)


def child_message_id(parent_message_id: str, user_id: str) -> str:
    return str(uuid.uuid5(_IDS, f"{parent_message_id}\nuser\n{user_id.lower()}"))


def continuation_message_id(parent_message_id: str, page: int) -> str:
    return str(uuid.uuid5(_IDS, f"{parent_message_id}\npage\n{page}"))


class FanOut:
    """One attempt at a fan-out request, given a token and the longest acceptable gate wait."""

    def __init__(self, graph: GraphClient, request: FanOutRequest, timeline: Timeline) -> None:
        self._graph = graph
        self._request = request
        self._timeline = timeline

    async def __call__(self, context: DeliveryContext, token: str, gate_wait: float) -> Outcome:
        request = self._request
        if request.group_id is None:
            await self._enqueue(context, request.user_ids, next_link=None)
            return Outcome.FANNED_OUT
        url = request.next_link or self._first_page_url(request.group_id)
        if not self._graph.owns(url):
            raise InvalidMessageError(f"{NEXT_LINK_FIELD} does not point at the configured Graph API")
        page, call = await self._graph.get_page(
            url, token, max_gate_wait=gate_wait, max_budget_wait=context.budget_wait_left()
        )
        users = self._member_ids(page)
        next_link = page.get("@odata.nextLink")
        if next_link is not None and not (isinstance(next_link, str) and self._graph.owns(next_link)):
            raise PermanentGraphError(
                GraphFailure(
                    status=call.status,
                    code="UntrustedNextLink",
                    message="Graph returned an @odata.nextLink outside the configured Graph API; not followed",
                    request_id=call.request_id,
                    client_request_id=call.client_request_id,
                )
            )
        await self._enqueue(context, users, next_link=next_link)
        return Outcome.FANNED_OUT

    def _first_page_url(self, group_id: str) -> str:
        base = self._graph.base_url
        return (
            f"{base}/{API_VERSION}/groups/{segment(group_id)}/transitiveMembers/microsoft.graph.user"
            "?$select=id&$top=999"
        )

    @staticmethod
    def _member_ids(page: dict[str, Any]) -> list[str]:
        members = page.get("value")
        if not isinstance(members, list):
            members = []
        ids = []
        for member in members:
            member_id = member.get("id") if isinstance(member, dict) else None
            try:
                ids.append(validate_user_id("member id", member_id))
            except InvalidMessageError as error:
                log_event("upgrade.fanout_member_skipped", logging.WARNING, reason=error.reason)
        return ids

    async def _enqueue(self, context: DeliveryContext, user_ids: Iterable[str], *, next_link: str | None) -> None:
        request, properties = self._request, context.delivery.application_properties
        root_id = self._fanout_id(context)
        # Children and continuations are requests of their own (§6): none of this request's retry
        # bookkeeping goes with them, so their retries and dead letters are named after their own ids.
        carried = {
            key: carry_property(value)
            for key, value in properties.items()
            if key not in BOOKKEEPING and key not in (PAGE_PROPERTY, PARENT_PROPERTY)
        }
        carried[PARENT_PROPERTY] = root_id
        users = list(user_ids)
        now = context.settler.clock.now()
        start = await self._timeline.reserve_schedule(len(users) * CHILD_CALLS) if users else now
        due = due_times(start, len(users), CHILD_CALLS, self._timeline.rate)
        children = [
            self._message(
                context,
                {"userId": user_id, "ifNotInstalled": "skip"},
                child_message_id(root_id, user_id),
                carried,
                due=when,
            )
            for user_id, when in zip(users, due, strict=True)
        ]
        page = count_property(properties.get(PAGE_PROPERTY)) or 1
        # The header row first: a child that finishes at once must find its page expected.
        await context.record_page(root_id, page, len(children), last=next_link is None)
        await context.enqueue(children)
        continuation = None
        if next_link is not None:
            continuation = self._message(
                context,
                {"groupId": request.group_id, NEXT_LINK_FIELD: next_link},
                continuation_message_id(root_id, page + 1),
                {**carried, PAGE_PROPERTY: page + 1},
                due=due[-1] - CONTINUATION_LEAD if due else None,
            )
            await context.enqueue([continuation])
        context.log_event(
            "upgrade.fanned_out",
            children=len(children),
            page=page if request.group_id else None,
            continuation_message_id=continuation.message_id if continuation else None,
        )

    @staticmethod
    def _fanout_id(context: DeliveryContext) -> str:
        assert context.fanout_id is not None, "the handler reads the request before running its job"
        return context.fanout_id

    def _message(
        self,
        context: DeliveryContext,
        fields: dict[str, Any],
        message_id: str,
        properties: dict[str, Any],
        *,
        due: datetime | None,
    ) -> ServiceBusMessage:
        request = self._request
        body: dict[str, Any] = {**fields, request.app.kind.value: request.app.value}
        if request.consented_permission_set is not None:
            body["consentedPermissionSet"] = request.consented_permission_set
        if request.request_id is not None:
            body["requestId"] = request.request_id
        if request.version is not None:
            body["version"] = request.version.text
        if context.rollout_id is not None:
            body["rolloutId"] = context.rollout_id
        return ServiceBusMessage(
            json.dumps(body, separators=(",", ":")).encode(),
            message_id=message_id,
            content_type="application/json",
            correlation_id=context.delivery.correlation_id or self._fanout_id(context),
            application_properties={key: value for key, value in properties.items() if value is not None},
            # A child due now is sent plain: it is active at once.
            scheduled_enqueue_time_utc=due if due is not None and due > context.settler.clock.now() else None,
        )
