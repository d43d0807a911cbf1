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
from typing import TYPE_CHECKING, Any

from azure.servicebus import ServiceBusMessage

from .delivery import Delivery
from .errors import GraphFailure, InvalidMessageError, PermanentGraphError
from .graph import API_VERSION, segment
from .logs import log_event
from .messages import NEXT_LINK_FIELD, FanOutRequest, validate_user_id
from .outcome import Outcome
from .settlement import History, carry_property

if TYPE_CHECKING:
    from .handler import UpgradeHandler

#: Namespace of the derived message ids (a fixed, project-specific UUID).
_IDS = uuid.UUID("5f0f7c1e-3c1a-4d39-9a59-0b6f4c7a2e11")
#: Where a continuation records which page it is, so its id is stable across redeliveries.
PAGE_PROPERTY = "FanOutPage"
#: Set on every child: the message id of the request that named the users.
PARENT_PROPERTY = "FanOutParentMessageId"


def child_message_id(parent_message_id: str, user_id: str) -> str:
    return str(uuid.uuid5(_IDS, f"{parent_message_id}\nuser\n{user_id.lower()}"))


def continuation_message_id(parent_message_id: str, page: int) -> str:
    return str(uuid.uuid5(_IDS, f"{parent_message_id}\npage\n{page}"))


class FanOut:
    """One attempt at a fan-out request; called by the handler with a token (see ``Job``)."""

    def __init__(
        self,
        handler: UpgradeHandler,
        delivery: Delivery,
        history: History,
        request: FanOutRequest,
        context: dict[str, Any],
    ) -> None:
        self._handler = handler
        self._delivery = delivery
        self._history = history
        self._request = request
        self._context = context

    async def __call__(self, token: str, gate_wait: float) -> Outcome:
        request = self._request
        if request.group_id is None:
            await self._enqueue(request.user_ids, next_link=None)
            return Outcome.FANNED_OUT
        url = request.next_link or self._first_page_url(request.group_id)
        if not self._handler.graph.owns(url):
            raise InvalidMessageError(f"{NEXT_LINK_FIELD} does not point at the configured Graph API")
        page, call = await self._handler.graph.get_page(url, token, max_gate_wait=gate_wait)
        users = self._member_ids(page)
        next_link = page.get("@odata.nextLink")
        if next_link is not None and not (isinstance(next_link, str) and self._handler.graph.owns(next_link)):
            raise PermanentGraphError(
                GraphFailure(
                    status=call.status,
                    code="UntrustedNextLink",
                    message="Graph returned an @odata.nextLink outside the configured Graph API; not followed",
                    request_id=call.request_id,
                    client_request_id=call.client_request_id,
                )
            )
        await self._enqueue(users, next_link=next_link)
        return Outcome.FANNED_OUT

    def _first_page_url(self, group_id: str) -> str:
        base = self._handler.graph.base_url
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

    async def _enqueue(self, user_ids: Iterable[str], *, next_link: str | None) -> None:
        request, delivery = self._request, self._delivery
        parent_id = self._history.original_message_id
        base_properties = {
            key: carry_property(value)
            for key, value in delivery.application_properties.items()
            if key not in (PAGE_PROPERTY, "UpgradeAttempts", "FirstAttemptUtc", "LastErrorStatus", "LastErrorCode")
        }
        base_properties.setdefault("OriginalMessageId", parent_id)
        children = [
            self._message(
                {"userId": user_id, "ifNotInstalled": "skip"},
                child_message_id(parent_id, user_id),
                {**base_properties, PARENT_PROPERTY: parent_id, "OriginalMessageId": None},
            )
            for user_id in user_ids
        ]
        sender, queue = self._handler.sender, self._handler.settings.upgrade_queue
        await sender.send(queue, children)
        page = int(delivery.application_properties.get(PAGE_PROPERTY, 1) or 1)
        continuation = None
        if next_link is not None:
            continuation = self._message(
                {"groupId": request.group_id, NEXT_LINK_FIELD: next_link},
                continuation_message_id(parent_id, page + 1),
                {**base_properties, PAGE_PROPERTY: page + 1},
            )
            await sender.send(queue, [continuation])
        log_event(
            "upgrade.fanned_out",
            **self._context,
            children=len(children),
            page=page if request.group_id else None,
            continuation_message_id=continuation.message_id if continuation else None,
        )

    def _message(self, fields: dict[str, Any], message_id: str, properties: dict[str, Any]) -> ServiceBusMessage:
        request = self._request
        body: dict[str, Any] = {**fields, request.app.kind.value: request.app.value}
        if request.consented_permission_set is not None:
            body["consentedPermissionSet"] = request.consented_permission_set
        if request.request_id is not None:
            body["requestId"] = request.request_id
        return ServiceBusMessage(
            json.dumps(body, separators=(",", ":")).encode(),
            message_id=message_id,
            content_type="application/json",
            correlation_id=self._delivery.correlation_id or self._history.original_message_id,
            application_properties={key: value for key, value in properties.items() if value is not None},
        )
