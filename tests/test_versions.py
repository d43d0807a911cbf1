"""Version-aware upgrades (contract §8) over the wire: the handler against the Graph simulator's
installed versions and app catalog, and the broker."""

from __future__ import annotations

import json
import logging
import uuid
from typing import Any

import pytest

from standins.graph_simulator import GraphSimulator
from tests.conftest import DEADLETTER_QUEUE, UPGRADE_QUEUE
from tests.support import function_message, new_user

pytestmark = pytest.mark.usefixtures("reset_stand_ins")

LOOKUP_KINDS = ["teamsAppId", "externalId", "appInstallationId"]


def new_app(graph: GraphSimulator, versions: tuple[str, ...] = ("1.0.0", "1.1.0")) -> tuple[str, str]:
    """A catalog app of its own for one test: (teams app id, external id)."""
    app = str(uuid.uuid4())
    external = f"com.contoso.app-{app[:8]}"
    graph.tenant.add_app(app, external, "Contoso Tasks", versions=versions)
    return app, external


def request_for(
    kind: str, user: str, app: str, external: str, installation: str | None, **extra: Any
) -> dict[str, Any]:
    value = {"teamsAppId": app, "externalId": external, "appInstallationId": installation}[kind]
    return {"userId": user, kind: value, **extra}


def calls(graph: GraphSimulator, route: str) -> list[Any]:
    return [r for r in graph.requests if r.route == route]


def upgrades(graph: GraphSimulator) -> list[Any]:
    return [r for r in graph.requests if r.method == "POST"]


@pytest.mark.parametrize("kind", LOOKUP_KINDS)
async def test_an_installation_already_at_the_version_is_not_upgraded(invoke, graph, broker, caplog, kind):
    caplog.set_level(logging.INFO)
    app, external = new_app(graph)
    user, _, installation = new_user(graph.tenant, app=app, version="1.1.0")

    await invoke(function_message(request_for(kind, user, app, external, installation, version="1.1")))

    assert upgrades(graph) == []
    assert calls(graph, "catalog") == []
    assert broker.messages(UPGRADE_QUEUE) == [] and broker.messages(DEADLETTER_QUEUE) == []
    assert any(r.getMessage().startswith("upgrade.already_current") for r in caplog.records)


@pytest.mark.parametrize("kind", LOOKUP_KINDS)
async def test_an_installation_behind_a_published_version_is_upgraded_to_it(invoke, graph, broker, kind):
    app, external = new_app(graph)
    user, _, installation = new_user(graph.tenant, app=app, version="1.0.0")

    await invoke(function_message(request_for(kind, user, app, external, installation, version="1.1.0")))

    assert [r.status for r in upgrades(graph)] == [204]
    assert graph.tenant.installation_version(installation) == "1.1.0"
    assert len(calls(graph, "catalog")) == 1
    assert broker.messages(UPGRADE_QUEUE) == [] and broker.messages(DEADLETTER_QUEUE) == []


@pytest.mark.parametrize("kind", LOOKUP_KINDS)
async def test_a_catalog_that_does_not_publish_the_version_yet_defers_without_an_upgrade_call(
    invoke, graph, broker, clock, kind
):
    app, external = new_app(graph)
    graph.tenant.publish(app, "2.4.0", state="submitted")
    user, _, installation = new_user(graph.tenant, app=app, version="1.0.0")
    message = request_for(kind, user, app, external, installation, version="2.4.0")

    await invoke(function_message(message, message_id="m-lag"))

    # then nothing is upgraded (it would be a silent no-op) and a retry is scheduled as a deferral
    assert upgrades(graph) == []
    [retry] = broker.messages(UPGRADE_QUEUE)
    p = retry.application_properties
    assert (p["LastErrorCode"], p["UpgradeAttempts"], p["DeferredAttempts"]) == ("CatalogNotUpdated", 1, 1)
    assert "LastErrorStatus" not in p
    assert broker.messages(DEADLETTER_QUEUE) == []

    # when the catalog publishes it and the retry comes
    graph.tenant.publish(app, "2.4.0")
    broker.purge(UPGRADE_QUEUE)
    await clock.sleep(61)  # past the catalog cache's minute
    await invoke(function_message(retry.body, message_id=retry.message_id, properties=p))

    assert [r.status for r in upgrades(graph)] == [204]
    assert graph.tenant.installation_version(installation) == "2.4.0"


async def test_requests_without_a_version_cost_no_extra_call(invoke, graph, broker):
    app, _ = new_app(graph)
    user, _, installation = new_user(graph.tenant, app=app, version="1.0.0")

    await invoke(function_message({"userId": user, "teamsAppId": app}))
    await invoke(function_message({"userId": user, "appInstallationId": installation}))

    routes = [r.route for r in graph.requests]
    assert routes == ["list", "upgrade", "upgrade"]
    assert graph.requests[0].query["$expand"] == "teamsApp"


async def test_the_children_of_a_fan_out_share_one_catalog_read(make_handler, graph, broker):
    handler = make_handler()
    app, _ = new_app(graph)
    users = [new_user(graph.tenant, app=app, version="1.0.0")[0] for _ in range(6)]

    await handler.handle_function_message(
        function_message({"userIds": users, "teamsAppId": app, "version": "1.1.0"}, message_id="fan")
    )
    children = broker.messages(UPGRADE_QUEUE)
    assert {json.loads(m.body)["version"] for m in children} == {"1.1.0"}
    broker.purge(UPGRADE_QUEUE)
    for child in children:
        await handler.handle_function_message(
            function_message(child.body, message_id=child.message_id, properties=child.application_properties)
        )

    assert len(upgrades(graph)) == 6
    assert len(calls(graph, "catalog")) == 1
    assert handler.catalog.reads == 1


async def test_a_catalog_the_app_may_not_read_is_a_rejection(invoke, graph, broker):
    app, _ = new_app(graph)
    user, _, _ = new_user(graph.tenant, app=app, version="1.0.0")
    graph.tenant.deny_catalog(True)
    try:
        await invoke(function_message({"userId": user, "teamsAppId": app, "version": "1.1.0"}))
    finally:
        graph.tenant.deny_catalog(False)

    [letter] = broker.messages(DEADLETTER_QUEUE)
    p = letter.application_properties
    assert (p["DeadLetterReason"], p["GraphStatus"], p["GraphErrorCode"]) == ("GraphRequestRejected", 403, "Forbidden")
    assert "AppCatalog.Read.All" in p["GraphErrorMessage"]
    assert upgrades(graph) == []


@pytest.mark.parametrize("definitions", ["absent", "null"])
async def test_a_catalog_answer_without_definitions_is_rejected_with_the_answer(invoke, graph, broker, definitions):
    app, _ = new_app(graph)
    user, _, _ = new_user(graph.tenant, app=app, version="1.0.0")
    graph.tenant.set_catalog_definitions(app, definitions)

    await invoke(function_message({"userId": user, "teamsAppId": app, "version": "1.1.0"}))

    [letter] = broker.messages(DEADLETTER_QUEUE)
    p = letter.application_properties
    assert (p["DeadLetterReason"], p["GraphErrorCode"]) == ("GraphRequestRejected", "UnreadableResponse")
    assert app in p["GraphError"]  # the answer is attached for the operator
    assert upgrades(graph) == []


async def test_a_published_definition_with_an_unreadable_version_is_rejected(invoke, graph, broker):
    app, _ = new_app(graph)
    user, _, _ = new_user(graph.tenant, app=app, version="1.0.0")
    graph.tenant.publish(app, "2.4-beta")

    await invoke(function_message({"userId": user, "teamsAppId": app, "version": "2.4.0"}))

    [letter] = broker.messages(DEADLETTER_QUEUE)
    assert letter.application_properties["GraphErrorCode"] == "UnreadableResponse"


@pytest.mark.parametrize("kind", ["teamsAppId", "appInstallationId"])
async def test_an_installed_version_that_is_not_a_version_is_rejected(invoke, graph, broker, kind):
    app, external = new_app(graph)
    user, _, installation = new_user(graph.tenant, app=app, version="1.0.0")
    graph.tenant.set_installed_version(installation, "latest")

    await invoke(function_message(request_for(kind, user, app, external, installation, version="1.1.0")))

    [letter] = broker.messages(DEADLETTER_QUEUE)
    assert letter.application_properties["GraphErrorCode"] == "UnreadableResponse"
    assert upgrades(graph) == []


async def test_an_invalid_version_is_dead_lettered_without_calling_graph(invoke, graph, broker):
    await invoke(function_message({"userId": str(uuid.uuid4()), "teamsAppId": str(uuid.uuid4()), "version": "v2"}))

    [letter] = broker.messages(DEADLETTER_QUEUE)
    assert letter.application_properties["DeadLetterReason"] == "InvalidMessage"
    assert graph.requests == []
