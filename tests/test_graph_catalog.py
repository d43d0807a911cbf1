"""The Graph simulator's app definitions: installed versions, the catalog, and upgrades that follow it.

Driven with httpx over loopback like tests/test_graph_simulator.py, then with the function's own
client (``GraphClient`` and ``Catalog``) to show that what it sends is understood and what it
parses is what the simulator answers (contract §8, research fleet §4).
"""

from __future__ import annotations

import base64
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from standins.graph_simulator import Fault, GraphSimulator
from tests.graph_support import (
    APP,
    AUTH,
    CHAT,
    EXTERNAL_ID,
    GOOD_TOKEN,
    OTHER_USER,
    TARGETS,
    TEAM,
    USER,
    apps_path,
    error_of,
    seg,
)
from upgrade_handler.catalog import Catalog
from upgrade_handler.errors import PermanentGraphError
from upgrade_handler.graph import GraphClient
from upgrade_handler.messages import AppKind, AppRef, Scope, Target
from upgrade_handler.ratelimit import AdaptiveRateLimiter
from upgrade_handler.versions import Version

OTHER_APP = "9d3c1a52-1111-4222-8333-444455556666"


@pytest.fixture(scope="module")
def http() -> Iterator[httpx.Client]:
    with httpx.Client(timeout=5) as client:
        yield client


@pytest.fixture
def graph() -> Iterator[GraphSimulator]:
    with GraphSimulator(token_validator=lambda token: token == GOOD_TOKEN) as sim:
        tenant = sim.tenant
        tenant.add_user(USER)
        tenant.add_user(OTHER_USER)
        tenant.add_team(TEAM)
        tenant.add_chat(CHAT)
        tenant.add_app(APP, EXTERNAL_ID, "Contoso Bot", versions=("2.2.0", "2.3.0"))
        tenant.add_app(OTHER_APP, "other-manifest", "Other", versions=("1.0.0",))
        yield sim


def get_installation(
    http: httpx.Client, graph: GraphSimulator, scope: str, target: str, iid: str, expand: str = "teamsAppDefinition"
) -> httpx.Response:
    url = f"{graph.url}{apps_path(scope, target)}/{seg(iid)}"
    return http.get(url, params={"$expand": expand} if expand else {}, headers=AUTH)


def read_catalog(
    http: httpx.Client, graph: GraphSimulator, flt: str | None, expand: str = "appDefinitions"
) -> httpx.Response:
    params = {"$expand": expand} if expand else {}
    if flt is not None:
        params["$filter"] = flt
    return http.get(f"{graph.url}/v1.0/appCatalogs/teamsApps", params=params, headers=AUTH)


def upgrade(http: httpx.Client, graph: GraphSimulator, iid: str, scope: str = "user") -> httpx.Response:
    url = f"{graph.url}{apps_path(scope, TARGETS[scope])}/{seg(iid)}/upgrade"
    return http.post(url, headers=AUTH)


def definitions_of(response: httpx.Response) -> list[tuple[str, str]]:
    (app,) = response.json()["value"]
    return [(d["version"], d["publishingState"]) for d in app["appDefinitions"]]


# --- installed versions ---------------------------------------------------------------------------


def test_a_lookup_expanding_the_definition_shows_the_installed_version_and_teams_app_alone_does_not(http, graph):
    graph.tenant.install("user", USER, APP, version="2.2.0")
    url = graph.url + apps_path("user", USER)
    flt = f"teamsApp/id eq '{APP}'"
    both = http.get(url, params={"$expand": "teamsApp,teamsAppDefinition", "$filter": flt}, headers=AUTH)
    (item,) = both.json()["value"]
    assert item["teamsApp"]["externalId"] == EXTERNAL_ID
    definition = item["teamsAppDefinition"]
    assert definition["version"] == "2.2.0"
    assert definition["teamsAppId"] == APP
    assert definition["displayName"] == "Contoso Bot"
    assert definition["publishingState"] == "published"
    assert base64.b64decode(definition["id"]).decode() == f"{APP}##2.2.0##Published"
    assert "(teamsApp(),teamsAppDefinition())" in both.json()["@odata.context"]

    alone = http.get(url, params={"$expand": "teamsApp", "$filter": flt}, headers=AUTH)
    (plain,) = alone.json()["value"]
    assert set(plain) == {"id", "teamsApp"}


@pytest.mark.parametrize("scope", ["user", "team", "chat"])
def test_one_installation_is_read_with_its_definition_in_every_scope(http, graph, scope):
    iid = graph.tenant.install(scope, TARGETS[scope], APP, version="2.3.0")
    response = get_installation(http, graph, scope, TARGETS[scope], iid)
    assert response.status_code == 200
    body = response.json()
    assert body["id"] == iid
    assert body["teamsAppDefinition"]["version"] == "2.3.0"
    assert body["teamsAppDefinition"]["teamsAppId"] == APP
    assert "teamsApp" not in body
    assert body["@odata.context"].endswith("/installedApps(teamsAppDefinition())/$entity")
    assert graph.requests[-1].route == "installation"


def test_reading_an_installation_the_target_does_not_have_is_404(http, graph):
    theirs = graph.tenant.install("user", OTHER_USER, APP)
    for iid in ("bm9wZQ==", theirs):
        response = get_installation(http, graph, "user", USER, iid)
        assert response.status_code == 404
        assert error_of(response)["code"] == "NotFound"
        assert error_of(response)["message"] == f"Teams app installation '{iid}' not found."
    ghost = get_installation(http, graph, "user", "ghost@contoso.com", theirs)
    assert ghost.status_code == 404
    assert error_of(ghost)["message"] == "User Id 'ghost@contoso.com' not found."
    bad_expand = get_installation(http, graph, "user", OTHER_USER, theirs, expand="teamsAppDefinition,owner")
    assert bad_expand.status_code == 400
    assert "'owner'" in error_of(bad_expand)["message"]
    # The same path under POST is not a read.
    assert http.post(f"{graph.url}{apps_path('user', OTHER_USER)}/{theirs}", headers=AUTH).status_code == 405


# --- the catalog ------------------------------------------------------------------------------------


@pytest.mark.parametrize("flt", [f"id eq '{APP}'", f"id eq '{APP.upper()}'", f"externalId eq '{EXTERNAL_ID}'"])
def test_the_catalog_lists_an_app_with_its_definitions(http, graph, flt):
    response = read_catalog(http, graph, flt)
    assert response.status_code == 200
    body = response.json()
    assert body["@odata.context"].endswith("/$metadata#appCatalogs/teamsApps(appDefinitions())")
    (app,) = body["value"]
    assert {k: app[k] for k in ("id", "externalId", "displayName", "distributionMethod")} == {
        "id": APP,
        "externalId": EXTERNAL_ID,
        "displayName": "Contoso Bot",
        "distributionMethod": "organization",
    }
    assert definitions_of(response) == [("2.2.0", "published"), ("2.3.0", "published")]
    assert all(d["teamsAppId"] == APP for d in app["appDefinitions"])
    assert graph.requests[-1].route == "catalog"


def test_catalog_queries_without_expand_with_and_and_that_match_nothing(http, graph):
    (bare,) = read_catalog(http, graph, f"id eq '{APP}'", expand="").json()["value"]
    assert "appDefinitions" not in bare
    both = read_catalog(http, graph, f"externalId eq '{EXTERNAL_ID}' and distributionMethod eq 'organization'")
    assert [app["id"] for app in both.json()["value"]] == [APP]
    assert [app["id"] for app in read_catalog(http, graph, None).json()["value"]] == [APP, OTHER_APP]
    nothing = read_catalog(http, graph, "externalId eq 'not-in-this-tenant'")
    assert nothing.status_code == 200
    assert nothing.json()["value"] == []


@pytest.mark.parametrize("flt", [f'id eq "{APP}"', f"id eq '{APP}", f"id eq '{APP}' or id eq 'x'", "version eq '1'"])
def test_unparseable_catalog_filters_and_expands_are_400(http, graph, flt):
    response = read_catalog(http, graph, flt)
    assert response.status_code == 400
    assert error_of(response)["code"] == "BadRequest"
    wrong = read_catalog(http, graph, f"id eq '{APP}'", expand="appDefinitions,installedApps")
    assert wrong.status_code == 400
    assert "'installedapps'" in error_of(wrong)["message"]


def test_a_catalog_that_lags_holds_upgrades_back_until_the_version_is_published(http, graph):
    iid = graph.tenant.install("user", USER, APP, version="2.2.0")
    # Given 2.4.0 submitted but not published,
    graph.tenant.publish(APP, "2.4.0", state="submitted")
    assert definitions_of(read_catalog(http, graph, f"id eq '{APP}'"))[-1] == ("2.4.0", "submitted")
    # an upgrade goes to the latest published version, 2.3.0, and no further;
    assert upgrade(http, graph, iid).status_code == 204
    assert graph.tenant.installation_version(iid) == "2.3.0"
    assert upgrade(http, graph, iid).status_code == 204  # already there: a no-op
    assert graph.tenant.installation_version(iid) == "2.3.0"
    # once published, the next upgrade reaches it.
    graph.tenant.publish(APP, "2.4.0")
    assert definitions_of(read_catalog(http, graph, f"id eq '{APP}'"))[-1] == ("2.4.0", "published")
    assert upgrade(http, graph, iid).status_code == 204
    assert graph.tenant.installation_version(iid) == "2.4.0"
    assert [(r.from_version, r.version) for r in graph.upgraded] == [
        ("2.2.0", "2.3.0"),
        ("2.3.0", "2.3.0"),
        ("2.3.0", "2.4.0"),
    ]
    assert get_installation(http, graph, "user", USER, iid).json()["teamsAppDefinition"]["version"] == "2.4.0"


def test_the_latest_published_version_is_compared_as_numbers_and_rejected_ones_never_count(http, graph):
    iid = graph.tenant.install("team", TEAM, APP, version="2.2.0")
    graph.tenant.publish(APP, "2.10.0")
    graph.tenant.publish(APP, "2.9.0")
    graph.tenant.publish(APP, "3.0.0", state="rejected")
    assert upgrade(http, graph, iid, "team").status_code == 204
    assert graph.tenant.installation_version(iid) == "2.10.0"
    assert graph.tenant.catalog_versions(APP)["3.0.0"] == "rejected"


def test_an_installation_ahead_of_the_catalog_is_never_moved_back(http, graph):
    iid = graph.tenant.install("chat", CHAT, APP, version="2.3.0")
    graph.tenant.set_installed_version(iid, "2.5.0")
    assert upgrade(http, graph, iid, "chat").status_code == 204
    assert graph.tenant.installation_version(iid) == "2.5.0"


def test_publishing_refuses_unknown_apps_and_states(graph):
    with pytest.raises(ValueError, match="unknown app"):
        graph.tenant.publish("no-such-app", "1.0.0")
    with pytest.raises(ValueError, match="publishingState"):
        graph.tenant.publish(APP, "2.4.0", state="live")
    with pytest.raises(KeyError):
        graph.tenant.set_installed_version("bm9wZQ==", "1.0.0")


def test_a_denied_catalog_answers_graphs_missing_role_403_and_nothing_else_changes(http, graph):
    iid = graph.tenant.install("user", USER, APP, version="2.2.0")
    graph.tenant.deny_catalog(True)
    response = http.get(
        f"{graph.url}/v1.0/appCatalogs/teamsApps",
        params={"$filter": f"id eq '{APP}'", "$expand": "appDefinitions"},
        headers={**AUTH, "client-request-id": "7d9c5a3e-0000-4000-8000-000000000001"},
    )
    assert response.status_code == 403
    error = error_of(response)
    assert error["code"] == "Forbidden"
    assert error["message"] == (
        "Missing role permissions on the request. API requires one of "
        "'AppCatalog.Read.All, AppCatalog.ReadWrite.All'. "
        "Roles on the request 'TeamsAppInstallation.ReadWriteForUser.All'."
    )
    assert set(error["innerError"]) == {"date", "request-id", "client-request-id"}
    assert error["innerError"]["request-id"] == response.headers["request-id"]
    assert error["innerError"]["client-request-id"] == "7d9c5a3e-0000-4000-8000-000000000001"
    # Installations are still readable and upgradable; the roles named are the knob's.
    assert get_installation(http, graph, "user", USER, iid).status_code == 200
    assert upgrade(http, graph, iid).status_code == 204
    graph.tenant.deny_catalog(True, roles=())
    assert error_of(read_catalog(http, graph, None))["message"].endswith("Roles on the request ''.")
    graph.tenant.deny_catalog(False)
    assert read_catalog(http, graph, f"id eq '{APP}'").status_code == 200


def test_catalog_reads_are_counted_and_scriptable_on_their_own_routes(http, graph):
    iid = graph.tenant.install("user", USER, APP)
    graph.script("catalog", Fault(503, headers={"Retry-After": "3"}))
    graph.script("installation", Fault.throttled("0.5"))
    assert get_installation(http, graph, "user", USER, iid).status_code == 429
    assert get_installation(http, graph, "user", USER, iid).status_code == 200
    assert read_catalog(http, graph, f"id eq '{APP}'").status_code == 503
    assert read_catalog(http, graph, f"id eq '{APP}'").status_code == 200
    assert [r.route for r in graph.requests] == ["installation", "installation", "catalog", "catalog"]
    assert [r.fault for r in graph.requests if r.route == "catalog"] == ["scripted", None]


def test_an_app_hidden_from_the_catalog_is_an_empty_value_but_still_upgrades(http, graph):
    iid = graph.tenant.install("user", USER, APP, version="2.2.0")
    graph.tenant.hide_from_catalog(APP)
    assert read_catalog(http, graph, f"id eq '{APP}'").json()["value"] == []
    assert upgrade(http, graph, iid).status_code == 204
    assert graph.tenant.installation_version(iid) == "2.3.0"
    graph.tenant.hide_from_catalog(APP, hidden=False)
    assert len(read_catalog(http, graph, f"id eq '{APP}'").json()["value"]) == 1


# --- malformed answers, on demand ---------------------------------------------------------------------------


@pytest.mark.parametrize(("shape", "expected"), [("absent", "missing"), ("null", None), ("empty", [])])
def test_a_catalog_app_can_come_without_its_definitions(http, graph, shape, expected):
    graph.tenant.set_catalog_definitions(APP, shape)
    (app,) = read_catalog(http, graph, f"id eq '{APP}'").json()["value"]
    assert app.get("appDefinitions", "missing") == expected
    graph.tenant.set_catalog_definitions(APP, None)
    assert len(definitions_of(read_catalog(http, graph, f"id eq '{APP}'"))) == 2


def test_a_definition_whose_version_is_not_dotted_numbers_is_served_but_never_the_upgrade_target(http, graph):
    iid = graph.tenant.install("user", USER, APP, version="2.2.0")
    graph.tenant.publish(APP, "2.4.0-beta")
    assert ("2.4.0-beta", "published") in definitions_of(read_catalog(http, graph, f"id eq '{APP}'"))
    upgrade(http, graph, iid)
    assert graph.tenant.installation_version(iid) == "2.3.0"


def test_an_installation_can_report_an_unparseable_version_and_an_upgrade_repairs_it(http, graph):
    iid = graph.tenant.install("user", USER, APP, version="2.2.0")
    graph.tenant.set_installed_version(iid, "two point two")
    single = get_installation(http, graph, "user", USER, iid).json()
    assert single["teamsAppDefinition"]["version"] == "two point two"
    listed = http.get(
        graph.url + apps_path("user", USER),
        params={"$expand": "teamsApp,teamsAppDefinition", "$filter": f"teamsApp/id eq '{APP}'"},
        headers=AUTH,
    )
    assert listed.json()["value"][0]["teamsAppDefinition"]["version"] == "two point two"
    upgrade(http, graph, iid)
    assert graph.tenant.installation_version(iid) == "2.3.0"


# --- the function's own client against it --------------------------------------------------------------------


@pytest.fixture
async def client(graph: GraphSimulator) -> Any:
    graph_client = GraphClient(graph.url, limiter=AdaptiveRateLimiter(1000))
    try:
        yield graph_client
    finally:
        await graph_client.aclose()


async def test_the_functions_client_reads_installed_and_published_versions(graph, client):
    iid = graph.tenant.install("user", USER, APP, version="2.2.0")
    graph.tenant.publish(APP, "2.4.0", state="submitted")
    ticks = iter(range(1000))
    catalog = Catalog(client, clock=lambda: float(next(ticks)), ttl=0.5)
    target = Target(Scope.USER, USER)

    found = await client.find_installation(
        target, AppRef(AppKind.EXTERNAL_ID, EXTERNAL_ID), GOOD_TOKEN, with_version=True
    )
    assert found is not None
    assert (found.id, found.version) == (iid, "2.2.0")
    installed = await catalog.installed(target, iid, GOOD_TOKEN, max_gate_wait=1.0)
    assert (installed.version, installed.teams_app_id) == ("2.2.0", APP)
    by_id = await catalog.latest_published(AppRef(AppKind.TEAMS_APP_ID, APP), GOOD_TOKEN, max_gate_wait=1.0)
    assert by_id == Version.parse("2.3.0")
    graph.tenant.publish(APP, "2.4.0")
    by_external = await catalog.latest_published(
        AppRef(AppKind.EXTERNAL_ID, EXTERNAL_ID), GOOD_TOKEN, max_gate_wait=1.0
    )
    assert by_external == Version.parse("2.4.0")
    missing = await catalog.latest_published(AppRef(AppKind.EXTERNAL_ID, "nowhere"), GOOD_TOKEN, max_gate_wait=1.0)
    assert missing is None
    assert [r.route for r in graph.requests] == ["list", "installation", "catalog", "catalog", "catalog"]
    assert catalog.reads == 3


async def test_the_functions_client_rejects_the_malformed_answers_and_the_403(graph, client):
    iid = graph.tenant.install("user", USER, APP, version="2.2.0")
    ticks = iter(range(1000))
    catalog = Catalog(client, clock=lambda: float(next(ticks)), ttl=0.5)
    target = Target(Scope.USER, USER)
    app = AppRef(AppKind.TEAMS_APP_ID, APP)

    graph.tenant.set_catalog_definitions(APP, "absent")
    with pytest.raises(PermanentGraphError) as no_definitions:
        await catalog.latest_published(app, GOOD_TOKEN, max_gate_wait=1.0)
    assert no_definitions.value.failure.code == "UnreadableResponse"
    graph.tenant.set_catalog_definitions(APP, None)

    graph.tenant.publish(APP, "2.4-beta")
    with pytest.raises(PermanentGraphError) as bad_definition:
        await catalog.latest_published(app, GOOD_TOKEN, max_gate_wait=1.0)
    assert bad_definition.value.failure.code == "UnreadableResponse"

    graph.tenant.set_installed_version(iid, "latest")
    with pytest.raises(PermanentGraphError) as bad_installed:
        await catalog.installed(target, iid, GOOD_TOKEN, max_gate_wait=1.0)
    assert bad_installed.value.failure.code == "UnreadableResponse"

    graph.tenant.deny_catalog(True)
    with pytest.raises(PermanentGraphError) as denied:
        await catalog.latest_published(app, GOOD_TOKEN, max_gate_wait=1.0)
    assert (denied.value.failure.status, denied.value.failure.code) == (403, "Forbidden")
    assert denied.value.failure.message.startswith("Missing role permissions on the request.")
