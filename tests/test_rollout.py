"""The rollout ledger as the function writes it (contract §8), over the wire: the handler against the
Graph simulator, the broker and Azurite."""

from __future__ import annotations

import logging
import uuid
from typing import Any

import pytest

from standins.azurite import Azurite
from standins.graph_simulator import Fault
from standins.servicebus_broker import ServiceBusBroker
from standins.storage_proxy import StorageProxy
from tests.conftest import DEADLETTER_QUEUE, UPGRADE_QUEUE
from tests.support import APP, function_message, new_user
from upgrade_handler.delivery import Delivery
from upgrade_handler.ledger import Ledger, RolloutStatus, open_ledger
from upgrade_handler.outcome import Outcome
from upgrade_handler.settings import StorageConnection

pytestmark = pytest.mark.usefixtures("reset_stand_ins")


@pytest.fixture
def with_ledger(make_handler: Any, azurite: Azurite) -> Any:
    """Builds handlers whose storage account is the session's Azurite, each test with a table of its own."""
    table = "rollouts" + uuid.uuid4().hex[:12]

    def build(connection_string: str | None = None, **overrides: Any) -> Any:
        storage = StorageConnection(connection_string=connection_string or azurite.connection_string)
        return make_handler(storage=storage, rollout_table=table, **overrides)

    return build


async def status_of(handler: Any, rollout_id: str) -> RolloutStatus:
    ledger = handler.ledger
    assert isinstance(ledger, Ledger)
    return await ledger.status(rollout_id)


async def deliver_all(handler: Any, broker: ServiceBusBroker) -> list[Outcome]:
    """Hand what is on the upgrade queue to ``handler`` until nothing is left, as the host would."""
    outcomes = []
    while messages := broker.messages(UPGRADE_QUEUE):
        broker.purge(UPGRADE_QUEUE)
        for message in messages:
            delivery = Delivery.from_function_message(
                function_message(
                    message.body,
                    message_id=message.message_id,
                    properties=message.application_properties,
                    correlation_id=message.correlation_id,
                )
            )
            outcomes.append(await handler.handle(delivery))
    return outcomes


async def test_each_outcome_is_recorded_under_the_requests_rollout(with_ledger, graph, broker):
    handler = with_ledger()
    upgraded_user, _, installation = new_user(graph.tenant)
    unknown_user = new_user(graph.tenant, app=None)[0]
    throttled_user, _, throttled_installation = new_user(graph.tenant)
    rejected_user, _, rejected_installation = new_user(graph.tenant)
    graph.script("upgrade", Fault.graph_error(403, "Forbidden", "Not allowed."))

    for body in (
        {"userId": rejected_user, "appInstallationId": rejected_installation, "rolloutId": "r1"},
        {"userId": upgraded_user, "appInstallationId": installation, "rolloutId": "r1"},
        {"userId": unknown_user, "teamsAppId": APP, "ifNotInstalled": "skip", "rolloutId": "r1"},
    ):
        await handler.handle_function_message(function_message(body))
    graph.script("upgrade", Fault.throttled("60"))
    await handler.handle_function_message(
        function_message({"userId": throttled_user, "appInstallationId": throttled_installation, "rolloutId": "r1"})
    )

    status = await status_of(handler, "r1")
    assert status.counts == {"upgraded": 1, "current": 0, "skipped": 1, "retrying": 1, "deadlettered": 1}
    assert status.dead_letters == {"GraphRequestRejected": 1}
    assert status.complete and not status.settled  # one target is still being retried


async def test_the_rollout_defaults_to_the_request_id_then_the_message_id(with_ledger, graph):
    handler = with_ledger()
    first, _, first_installation = new_user(graph.tenant)
    second, _, second_installation = new_user(graph.tenant)

    await handler.handle_function_message(
        function_message({"userId": first, "appInstallationId": first_installation, "requestId": "release-7"})
    )
    await handler.handle_function_message(
        function_message({"userId": second, "appInstallationId": second_installation}, message_id="m-plain")
    )

    assert (await status_of(handler, "release-7")).counts["upgraded"] == 1
    assert (await status_of(handler, "m-plain")).counts["upgraded"] == 1


async def test_a_redelivered_request_writes_its_row_once(with_ledger, graph):
    handler = with_ledger()
    user_id, _, installation = new_user(graph.tenant)
    message = function_message({"userId": user_id, "appInstallationId": installation, "rolloutId": "r-twice"})

    await handler.handle_function_message(message)
    await handler.handle_function_message(message)

    status = await status_of(handler, "r-twice")
    assert status.recorded == 1 and status.counts["upgraded"] == 1


async def test_a_paged_group_is_complete_only_after_its_last_page(with_ledger, graph, broker):
    handler = with_ledger()
    members = [new_user(graph.tenant)[0] for _ in range(5)]
    group = str(uuid.uuid4())
    graph.tenant.add_group(group, members)
    graph.tenant.group_page_size = 2
    try:
        await handler.handle_function_message(
            function_message({"groupId": group, "teamsAppId": APP, "rolloutId": "r-group"}, message_id="grp")
        )
        # after the first page: two members expected, more to come
        status = await status_of(handler, "r-group")
        assert (status.expected, status.complete, status.settled) == (2, False, False)

        await deliver_all(handler, broker)
    finally:
        graph.tenant.group_page_size = 999

    status = await status_of(handler, "r-group")
    assert (status.expected, status.pages, status.complete, status.settled) == (5, 3, True, True)
    assert status.counts["upgraded"] == 5
    assert broker.messages(DEADLETTER_QUEUE) == []


async def test_a_group_that_cannot_be_read_settles_its_rollout_as_dead_lettered(with_ledger, graph, broker):
    handler = with_ledger()
    graph.script("group", Fault.graph_error(403, "Authorization_RequestDenied", "Insufficient privileges."))

    await handler.handle_function_message(
        function_message({"groupId": str(uuid.uuid4()), "teamsAppId": APP, "rolloutId": "r-denied"})
    )

    status = await status_of(handler, "r-denied")
    assert status.settled and status.dead_letters == {"GraphRequestRejected": 1}


@pytest.mark.parametrize("fault", ["stall", "503", "refuse"])
async def test_a_ledger_that_cannot_be_written_changes_no_outcome(
    with_ledger, graph, broker, storage_proxy: StorageProxy, caplog, fault
):
    caplog.set_level(logging.WARNING)
    handler = with_ledger(storage_proxy.connection_string)
    {"stall": storage_proxy.stall, "503": lambda: storage_proxy.answer(503), "refuse": storage_proxy.refuse}[fault]()
    user_id, _, installation = new_user(graph.tenant)
    other, _, other_installation = new_user(graph.tenant)
    graph.script("upgrade", Fault.graph_error(404, "NotFound", "No such installation."))

    await handler.handle_function_message(
        function_message({"userId": user_id, "appInstallationId": installation, "rolloutId": "r-down"})
    )
    await handler.handle_function_message(
        function_message({"userId": other, "appInstallationId": other_installation, "rolloutId": "r-down"})
    )

    # the first is dead-lettered, the second upgraded, exactly as without a ledger
    [letter] = broker.messages(DEADLETTER_QUEUE)
    assert letter.application_properties["DeadLetterReason"] == "GraphRequestRejected"
    assert graph.tenant.installation_version(other_installation) == "1.1.0"
    assert broker.messages(UPGRADE_QUEUE) == []
    failed = [r.getMessage() for r in caplog.records if r.getMessage().startswith("rollout.ledger_failed")]
    assert len(failed) == 2 and all("rollout_id=r-down" in line for line in failed)


def test_without_a_storage_account_there_is_no_ledger(environment):
    from upgrade_handler.settings import Settings

    assert open_ledger(Settings.from_environment()) is None


async def test_a_child_recorded_before_its_page_keeps_the_rollout_open(with_ledger, graph, broker):
    """A child may finish before its fan-out's page row lands (or that write may fail): the child's row
    names its fan-out, so the rollout waits for that fan-out's pages instead of settling early."""
    handler = with_ledger()
    user, _, _ = new_user(graph.tenant)
    child = {"userId": user, "teamsAppId": APP, "ifNotInstalled": "skip", "rolloutId": "r-early"}

    await handler.handle_function_message(function_message(child, properties={"FanOutParentMessageId": "fan-1"}))

    status = await status_of(handler, "r-early")
    assert status.counts["upgraded"] == 1
    assert not status.complete and not status.settled


async def test_a_call_the_shared_budget_holds_back_is_a_deferral_not_a_failure(
    environment, sender, clock, graph, broker, azurite
):
    """§7: with the storage account set the handler waits for its turn in the fleet's budget; an
    invocation out of UPGRADE_MAX_BUDGET_WAIT_SECONDS schedules a retry counted as a deferral."""
    from dataclasses import replace

    from tests.conftest import fast_credential
    from upgrade_handler.auth import TokenProvider
    from upgrade_handler.handler import UpgradeHandler
    from upgrade_handler.settings import Settings

    settings = replace(
        Settings.from_environment(),
        storage=StorageConnection(connection_string=azurite.connection_string),
        budget_table="budget" + uuid.uuid4().hex[:12],
        max_budget_wait_seconds=0.0,  # a newcomer's first slot is about a second away
    )
    handler = UpgradeHandler(
        settings, sender=sender, clock=clock, tokens=TokenProvider(settings.graph_scope, fast_credential)
    )
    user, _, installation = new_user(graph.tenant)
    try:
        await handler.handle_function_message(
            function_message({"userId": user, "appInstallationId": installation}, message_id="m-held")
        )
    finally:
        await handler.aclose()

    assert [r for r in graph.requests if r.method == "POST"] == []
    [retry] = broker.messages(UPGRADE_QUEUE)
    p = retry.application_properties
    assert (p["LastErrorCode"], p["UpgradeAttempts"], p["DeferredAttempts"]) == ("TooManyRequests", 1, 1)
    assert "LastErrorStatus" not in p
    assert broker.messages(DEADLETTER_QUEUE) == []
