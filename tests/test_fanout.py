"""Fan-out requests (contract §6) end to end: one publish event becomes one request per user."""

from __future__ import annotations

import json
import uuid
from typing import Any

import pytest

from standins.graph_simulator import Fault, GraphSimulator
from standins.servicebus_broker import ServiceBusBroker
from tests.conftest import DEADLETTER_QUEUE, UPGRADE_QUEUE
from tests.support import APP, function_message, new_user
from upgrade_handler.fanout import child_message_id

pytestmark = pytest.mark.usefixtures("reset_stand_ins")


def queued(broker: ServiceBusBroker) -> list[Any]:
    return broker.messages(UPGRADE_QUEUE)


def bodies(messages: list[Any]) -> list[dict[str, Any]]:
    return [json.loads(m.body) for m in messages]


def new_group(graph: GraphSimulator, members: list[str]) -> str:
    group_id = str(uuid.uuid4())
    graph.tenant.add_group(group_id, members)
    return group_id


async def deliver_queued(invoke: Any, broker: ServiceBusBroker) -> list[Any]:
    """Hand what is on the upgrade queue to the function once, as the host would, then clear it."""
    messages = queued(broker)
    broker.purge(UPGRADE_QUEUE)
    for message in messages:
        await invoke(
            function_message(
                message.body,
                message_id=message.message_id,
                properties=message.application_properties,
                correlation_id=message.correlation_id,
            )
        )
    return messages


async def test_user_ids_become_one_skip_if_missing_request_per_user(invoke, graph, broker):
    users = [new_user(graph.tenant) for _ in range(3)]
    ids = [users[0][0], users[1][1], users[2][0]]  # GUIDs and a UPN
    request = {"userIds": ids, "teamsAppId": APP, "requestId": "publish-2.3"}

    await invoke(function_message(request, message_id="publish-1", correlation_id="catalog"))

    children = queued(broker)
    assert graph.requests == []
    assert sorted(m.message_id for m in children) == sorted(child_message_id("publish-1", u) for u in ids)
    assert sorted(b["userId"] for b in bodies(children)) == sorted(ids)
    for body in bodies(children):
        assert body == {
            "userId": body["userId"],
            "teamsAppId": APP,
            "requestId": "publish-2.3",
            "ifNotInstalled": "skip",
        }
    assert all(m.correlation_id == "catalog" for m in children)
    assert broker.messages(DEADLETTER_QUEUE) == []

    # each child then takes the normal path
    await deliver_queued(invoke, broker)
    assert {graph.tenant.installation_version(i) for _, _, i in users} == {"1.1.0"}


async def test_redelivered_fan_out_enqueues_each_child_once(invoke, graph, broker):
    ids = [new_user(graph.tenant)[0] for _ in range(4)]
    message = {"userIds": ids, "externalId": "com.contoso.helpdesk"}

    await invoke(function_message(message, message_id="publish-twice"))
    await invoke(function_message(message, message_id="publish-twice", delivery_count=2))

    assert len(queued(broker)) == 4


async def test_group_is_read_one_page_per_invocation_through_continuations(invoke, graph, broker):
    members = [new_user(graph.tenant)[0] for _ in range(7)]
    group = new_group(graph, members)
    graph.tenant.group_page_size = 3
    try:
        await invoke(function_message({"groupId": group, "teamsAppId": APP}, message_id="publish-group"))
        seen: list[str] = []
        pages = 0
        while queued(broker):
            messages = await deliver_queued(invoke, broker)
            pages += sum(1 for b in bodies(messages) if "groupId" in b)
            seen += [b["userId"] for b in bodies(messages) if "userId" in b]
    finally:
        graph.tenant.group_page_size = 999

    assert sorted(seen) == sorted(members)
    assert pages == 2  # pages 2 and 3 arrived as continuations
    reads = [r for r in graph.requests if r.segments[1:2] == ("groups",)]
    assert len(reads) == 3
    assert reads[0].query["$select"] == "id" and reads[0].query["$top"] == "999"
    assert broker.messages(DEADLETTER_QUEUE) == []


async def test_redelivered_continuation_does_not_duplicate_children(invoke, graph, broker):
    members = [new_user(graph.tenant)[0] for _ in range(4)]
    group = new_group(graph, members)
    graph.tenant.group_page_size = 2
    try:
        await invoke(function_message({"groupId": group, "teamsAppId": APP}, message_id="publish-dup"))
        first = queued(broker)
        continuation = next(m for m in first if "groupId" in json.loads(m.body))
        again = function_message(
            continuation.body,
            message_id=continuation.message_id,
            properties=continuation.application_properties,
        )
        await invoke(again)
        await invoke(again)  # delivered twice
    finally:
        graph.tenant.group_page_size = 999

    children = [b["userId"] for b in bodies(queued(broker)) if "userId" in b]
    assert sorted(children) == sorted(members)


async def test_next_link_to_another_host_is_refused_and_never_called(invoke, graph, broker, identity):
    with GraphSimulator(token_validator=identity.is_valid) as elsewhere:
        group = new_group(graph, [new_user(graph.tenant)[0]])
        link = f"{elsewhere.url}/v1.0/groups/{group}/transitiveMembers/microsoft.graph.user?$skiptoken=x"
        await invoke(function_message({"groupId": group, "teamsAppId": APP, "groupNextLink": link}))
        letter = broker.messages(DEADLETTER_QUEUE)[0]
        assert letter.application_properties["DeadLetterReason"] == "InvalidMessage"
        assert "groupNextLink" in letter.application_properties["DeadLetterErrorDescription"]

        broker.purge()
        graph.script("group", Fault(200, body={"value": [], "@odata.nextLink": link}))
        await invoke(function_message({"groupId": group, "teamsAppId": APP}))
        letter = broker.messages(DEADLETTER_QUEUE)[0]
        assert letter.application_properties["DeadLetterReason"] == "GraphRequestRejected"
        assert letter.application_properties["GraphErrorCode"] == "UntrustedNextLink"
        assert elsewhere.requests == []
    assert queued(broker) == []


@pytest.mark.parametrize("failure", ["missing", "forbidden"])
async def test_unreadable_group_is_dead_lettered_with_the_graph_error(invoke, graph, broker, failure):
    group = str(uuid.uuid4())
    if failure == "forbidden":
        graph.tenant.add_group(group, [])
        graph.script(
            "group",
            Fault.graph_error(403, "Authorization_RequestDenied", "Insufficient privileges to complete the operation."),
        )

    await invoke(function_message({"groupId": group, "teamsAppId": APP}))

    [letter] = broker.messages(DEADLETTER_QUEUE)
    p = letter.application_properties
    assert p["DeadLetterReason"] == "GraphRequestRejected"
    assert p["GraphStatus"] == (404 if failure == "missing" else 403)
    assert queued(broker) == []


async def test_child_of_a_user_without_the_app_is_skipped_not_dead_lettered(invoke, graph, broker):
    with_app, _, installation = new_user(graph.tenant)
    without_app = new_user(graph.tenant, app=None)[0]

    await invoke(function_message({"userIds": [with_app, without_app], "teamsAppId": APP}))
    await deliver_queued(invoke, broker)

    assert graph.tenant.installation_version(installation) == "1.1.0"
    assert broker.messages(DEADLETTER_QUEUE) == []
    assert queued(broker) == []


@pytest.mark.parametrize(
    "body",
    [
        {"userIds": ["a@contoso.com"], "groupId": str(uuid.uuid4()), "teamsAppId": APP},
        {"userIds": ["a@contoso.com"], "appInstallationId": "abc"},
        {"userIds": [f"u{i}@contoso.com" for i in range(1001)], "teamsAppId": APP},
        {"userIds": ["a@contoso.com", "not a user"], "teamsAppId": APP},
    ],
    ids=["both-scopes", "installation-id", "1001-users", "bad-user"],
)
async def test_invalid_fan_out_is_dead_lettered_without_graph_calls(invoke, graph, broker, body):
    await invoke(function_message(body))

    [letter] = broker.messages(DEADLETTER_QUEUE)
    assert letter.application_properties["DeadLetterReason"] == "InvalidMessage"
    assert graph.requests == []
    assert queued(broker) == []
