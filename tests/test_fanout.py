"""Fan-out requests (contract §6) end to end: one publish event becomes one request per user."""

from __future__ import annotations

import json
import uuid
from datetime import timedelta
from typing import Any

import pytest

from standins.graph_simulator import Fault, GraphSimulator
from standins.servicebus_broker import ServiceBusBroker
from tests.conftest import DEADLETTER_QUEUE, UPGRADE_QUEUE
from tests.support import APP, function_message, new_user
from upgrade_handler.fanout import child_message_id
from upgrade_handler.ratelimit import HEADROOM

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
            "rolloutId": "publish-2.3",  # §8: the requestId when it fits, inherited by every child
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


async def test_each_page_of_a_group_retries_under_its_own_name(invoke, graph, broker, clock):
    """Issue: page 2's retry took page 1's retry id, duplicate detection dropped it, and the rest of
    the group was never read. A continuation is a request of its own (§6)."""
    members = [new_user(graph.tenant)[0] for _ in range(4)]
    group = new_group(graph, members)
    graph.tenant.group_page_size = 2
    try:
        # page 1's read is throttled: its retry is named after the first message
        graph.script("group", Fault.throttled("60"))
        await invoke(function_message({"groupId": group, "teamsAppId": APP}, message_id="grp"))
        [retry] = queued(broker)
        assert retry.message_id == "grp:retry:1"
        broker.purge(UPGRADE_QUEUE)
        await clock.sleep(61)  # the retry comes due once the throttle gate has opened again
        # the retry reads page 1 and sends its children and the continuation for page 2
        await invoke(function_message(retry.body, message_id=retry.message_id, properties=retry.application_properties))
        continuation = next(m for m in queued(broker) if "groupId" in json.loads(m.body))
        seen = [b["userId"] for b in bodies(queued(broker)) if "userId" in b]
        assert not {"UpgradeAttempts", "OriginalMessageId", "FirstAttemptUtc", "DeferredAttempts"} & set(
            continuation.application_properties
        )
        assert continuation.application_properties["FanOutParentMessageId"] == "grp"
        broker.purge(UPGRADE_QUEUE)
        # page 2's read is throttled too: its retry has a name of its own
        graph.script("group", Fault.throttled("60"))
        await invoke(
            function_message(
                continuation.body, message_id=continuation.message_id, properties=continuation.application_properties
            )
        )
        [page_two_retry] = queued(broker)
        assert page_two_retry.message_id == f"{continuation.message_id}:retry:1"
        broker.purge(UPGRADE_QUEUE)
        await clock.sleep(61)
        await invoke(
            function_message(
                page_two_retry.body,
                message_id=page_two_retry.message_id,
                properties=page_two_retry.application_properties,
            )
        )
        seen += [b["userId"] for b in bodies(queued(broker)) if "userId" in b]
    finally:
        graph.tenant.group_page_size = 999

    # then every member got a child, each named after the fan-out's first message
    assert sorted(seen) == sorted(members)
    assert broker.messages(DEADLETTER_QUEUE) == []


async def test_children_come_due_at_the_tenants_pace(make_handler, graph, broker, clock):
    """§6: the children coming due in any one second need at most the budget's Graph calls."""
    # given a budget of 10 calls per second: a child (lookup and upgrade) costs 2, so 5 children a second
    handler = make_handler(max_requests_per_second=10)
    users = [new_user(graph.tenant)[0] for _ in range(12)]

    # when two fan-outs arrive one after the other
    await handler.handle_function_message(function_message({"userIds": users[:6], "teamsAppId": APP}, message_id="a"))
    await handler.handle_function_message(function_message({"userIds": users[6:], "teamsAppId": APP}, message_id="b"))

    # then the first child is due at once and the others follow one every 2 / (10 x 92% headroom) s,
    # the second fan-out continuing the first's timeline instead of doubling up on it
    children = queued(broker)
    due = sorted((m.scheduled_enqueue_time_utc or clock.now()) - clock.now() for m in children)
    step = 2 / (10 * HEADROOM)
    assert [d.total_seconds() for d in due] == pytest.approx([i * step for i in range(12)], abs=0.002)
    assert step * 5 <= 1.1  # at most 10 calls' worth of children come due in any second
    assert sum(1 for m in children if m.scheduled_enqueue_time_utc is None) == 1


async def test_a_groups_continuation_comes_due_just_before_its_pages_last_child(make_handler, graph, broker, clock):
    handler = make_handler(max_requests_per_second=1)  # one child every 2 s (and 8% headroom)
    members = [new_user(graph.tenant)[0] for _ in range(15)]
    group = new_group(graph, members)
    graph.tenant.group_page_size = 10
    try:
        await handler.handle_function_message(function_message({"groupId": group, "teamsAppId": APP}))
    finally:
        graph.tenant.group_page_size = 999

    messages = queued(broker)
    [continuation] = [m for m in messages if "groupId" in json.loads(m.body)]
    last_child = max(m.scheduled_enqueue_time_utc or clock.now() for m in messages if "userId" in json.loads(m.body))
    assert (last_child - clock.now()).total_seconds() == pytest.approx(9 * 2 / HEADROOM, abs=0.002)  # 10 children
    assert last_child - continuation.scheduled_enqueue_time_utc == timedelta(seconds=10)
