"""The Microsoft Graph simulator, observed the way a client sees it: real httpx over loopback.

Each test gets a fresh simulator seeded with one tenant (two users, a team, a chat, a normal
app with three versions and a permanent app); the assertions are on status codes, headers and
bodies on the wire, plus the simulator's own records where a test needs to reconcile.
"""

from __future__ import annotations

import asyncio
import base64
import json
import re
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from email.utils import parsedate_to_datetime
from typing import Any

import aiohttp
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

UPN = "Adele.Vance@contoso.onmicrosoft.com"
PERMANENT_APP = "effe13ef-0d2b-4a3b-9d33-6b0d8f1a8a10"
GUID = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")


@pytest.fixture(scope="module")
def http() -> Iterator[httpx.Client]:
    # One client for the module: building an httpx client costs ~15 ms of TLS context setup.
    with httpx.Client(timeout=5) as client:
        yield client


@pytest.fixture
def graph() -> Iterator[GraphSimulator]:
    with GraphSimulator(token_validator=lambda token: token == GOOD_TOKEN) as sim:
        tenant = sim.tenant
        tenant.add_user(USER, UPN)
        tenant.add_user(OTHER_USER)
        tenant.add_team(TEAM)
        tenant.add_chat(CHAT)
        tenant.add_app(APP, EXTERNAL_ID, "Contoso Bot", versions=("1.0.0", "1.1.0", "2.0.0"))
        tenant.add_app(PERMANENT_APP, "activity", "Activity", permanent=True)
        yield sim


def upgrade_path(
    scope: str, target: str, installation_id: str, *, version: str = "v1.0", action: str = "upgrade"
) -> str:
    return f"{apps_path(scope, target, version)}/{seg(installation_id)}/{action}"


def upgrade(
    http: httpx.Client, graph: GraphSimulator, scope: str, target: str, iid: str, **kwargs: Any
) -> httpx.Response:
    headers = {**AUTH, **kwargs.pop("headers", {})}
    return http.post(graph.url + upgrade_path(scope, target, iid), headers=headers, **kwargs)


def lookup(
    http: httpx.Client, graph: GraphSimulator, scope: str, target: str, flt: str, **params: str
) -> httpx.Response:
    query = {"$expand": "teamsApp", "$filter": flt, **params}
    return http.get(graph.url + apps_path(scope, target), params=query, headers=AUTH)


# --- upgrade --------------------------------------------------------------------------------------


def test_user_upgrade_answers_204_and_moves_the_installation_to_the_latest_version(http, graph):
    # given an installation of the oldest version
    iid = graph.tenant.install("user", USER, APP)
    assert graph.tenant.installation_version(iid) == "1.0.0"
    # when the client upgrades it
    response = upgrade(http, graph, "user", USER, iid)
    # then Graph's documented success comes back and the installation is at the latest version
    assert response.status_code == 204
    assert response.content == b""
    assert graph.tenant.installation_version(iid) == "2.0.0"


def test_installation_id_is_base64_of_target_and_app_as_graph_builds_it(graph):
    iid = graph.tenant.install("user", USER, APP)
    assert base64.b64decode(iid).decode() == f"{USER}##{APP}"


def test_a_user_is_addressable_by_upn_in_any_letter_case(http, graph):
    iid = graph.tenant.install("user", UPN, APP)
    assert base64.b64decode(iid).decode() == f"{USER}##{APP}"  # the id is built from the object id
    response = upgrade(http, graph, "user", UPN.upper(), iid)
    assert response.status_code == 204
    assert graph.upgraded[0].target_id == UPN.upper()  # recorded as the path said it


@pytest.mark.parametrize(("version", "action"), [("v1.0", "microsoft.graph.upgrade"), ("beta", "upgrade")])
def test_beta_and_the_namespace_qualified_action_are_routed_too(http, graph, version, action):
    iid = graph.tenant.install("user", USER, APP)
    path = upgrade_path("user", USER, iid, version=version, action=action)
    assert http.post(graph.url + path, headers=AUTH).status_code == 204


@pytest.mark.parametrize("scope", ["team", "chat"])
def test_team_and_chat_upgrades(http, graph, scope):
    iid = graph.tenant.install(scope, TARGETS[scope], APP, version="1.1.0")
    response = upgrade(http, graph, scope, TARGETS[scope], iid)
    assert response.status_code == 204
    assert graph.tenant.installation_version(iid) == "2.0.0"
    assert graph.upgraded[0].scope == scope


def test_upgrade_of_an_installation_already_at_the_latest_version_is_a_204_no_op(http, graph):
    # GUESS pinned by the simulator (research §2.4: the real answer is unknown)
    iid = graph.tenant.install("user", USER, APP, version="2.0.0")
    assert upgrade(http, graph, "user", USER, iid).status_code == 204


def test_installation_id_without_base64_padding_is_accepted(http, graph):
    iid = graph.tenant.install("user", USER, APP)
    assert iid.endswith("=")
    assert upgrade(http, graph, "user", USER, iid.rstrip("=")).status_code == 204


@pytest.mark.parametrize("permission_type", ["Application", "delegated", "DELEGATED"])
def test_consented_permission_set_is_accepted_in_any_letter_case(http, graph, permission_type):
    iid = graph.tenant.install("user", USER, APP)
    permission_set = {
        "resourceSpecificPermissions": [
            {"permissionValue": "TeamsActivity.Send.User", "permissionType": permission_type}
        ]
    }
    response = upgrade(http, graph, "user", USER, iid, json={"consentedPermissionSet": permission_set})
    assert response.status_code == 204
    assert graph.upgraded[0].consented_permission_set == permission_set


@pytest.mark.parametrize(
    ("content_type", "body", "status", "message"),
    [
        (None, b'{"consentedPermissionSet": null}', 400, "must contain the Content-Type header"),
        ("text/plain", b"{}", 415, "not supported"),
        ("application/json", b"{not json", 400, "Unable to read JSON request payload"),
        ("application/json", b"[]", 400, "Unable to read JSON request payload"),
        ("application/json", b'{"teamsApp": {}}', 400, "not a valid parameter for the operation 'upgrade'"),
        ("application/json", b'{"consentedPermissionSet": []}', 400, "teamsAppPermissionSet"),
        (
            "application/json",
            b'{"consentedPermissionSet": {"resourceSpecificPermissions": {"permissionValue": "X"}}}',
            400,
            "resourceSpecificPermissions",
        ),
        (
            "application/json",
            b'{"consentedPermissionSet": {"resourceSpecificPermissions": [{"permissionValue": "X"}]}}',
            400,
            "permissionType",
        ),
        (
            "application/json",
            b'{"consentedPermissionSet": {"resourceSpecificPermissions": '
            b'[{"permissionValue": "X", "permissionType": "Both"}]}}',
            400,
            "Requested value 'Both' was not found.",
        ),
        (
            "application/json",
            b'{"consentedPermissionSet": {"resourceSpecificPermissions": '
            b'[{"permissionValue": "X", "permissionType": "Application", "scope": "user"}]}}',
            400,
            "The property 'scope' does not exist",
        ),
    ],
)
def test_malformed_upgrade_bodies_are_rejected_before_anything_changes(
    http, graph, content_type, body, status, message
):
    iid = graph.tenant.install("user", USER, APP)
    headers = {} if content_type is None else {"Content-Type": content_type}
    response = upgrade(http, graph, "user", USER, iid, content=body, headers=headers)
    assert response.status_code == status
    assert message in error_of(response)["message"]
    assert graph.tenant.installation_version(iid) == "1.0.0"


def test_an_empty_body_needs_no_content_type(http, graph):
    iid = graph.tenant.install("user", USER, APP)
    assert upgrade(http, graph, "user", USER, iid, content=b"").status_code == 204


@pytest.mark.parametrize(
    ("scope", "target", "message"),
    [
        ("user", "0b1c0b1c-0000-4000-8000-000000000000", "User Id '0b1c0b1c-0000-4000-8000-000000000000' not found."),
        ("user", "nobody@contoso.com", "User Id 'nobody@contoso.com' not found."),
        (
            "team",
            "11111111-2222-4333-8444-555555555555",
            "No team found with Group Id 11111111-2222-4333-8444-555555555555",
        ),
        ("chat", "19:nope@thread.v2", "Chat '19:nope@thread.v2' not found."),
    ],
)
def test_unknown_targets_are_404_not_found(http, graph, scope, target, message):
    response = upgrade(http, graph, scope, target, "bm9wZQ==")
    assert response.status_code == 404
    assert error_of(response)["code"] == "NotFound"
    assert error_of(response)["message"] == message


def test_unknown_installation_and_another_users_installation_are_404(http, graph):
    others = graph.tenant.install("user", OTHER_USER, APP)
    for iid in ("bm9wZQ==", others):
        response = upgrade(http, graph, "user", USER, iid)
        assert response.status_code == 404
        assert error_of(response)["code"] == "NotFound"
    assert graph.tenant.installation_version(others) == "1.0.0"


def test_permanent_app_upgrade_is_403_with_the_real_teams_body(http, graph):
    iid = graph.tenant.install("user", USER, PERMANENT_APP)
    response = upgrade(http, graph, "user", USER, iid)
    assert response.status_code == 403
    error = error_of(response)
    message = f"User operation (Upgrade) is not allowed on a permanent app (appId: {PERMANENT_APP})"
    assert error["code"] == "Forbidden"
    assert error["message"] == message
    assert error["innerError"]["code"] == "AccessDenied"
    assert error["innerError"]["message"] == message
    assert error["innerError"]["details"] == []
    assert error["innerError"]["request-id"] == response.headers["request-id"]


# --- lookup -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("scope", ["user", "team", "chat"])
def test_lookup_by_teams_app_id_returns_the_installation(http, graph, scope):
    iid = graph.tenant.install(scope, TARGETS[scope], APP)
    graph.tenant.install(scope, TARGETS[scope], PERMANENT_APP)
    response = lookup(http, graph, scope, TARGETS[scope], f"teamsApp/id eq '{APP}'")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("application/json")
    body = response.json()
    assert "$metadata#" in body["@odata.context"]
    assert body["value"] == [
        {
            "id": iid,
            "teamsApp": {
                "id": APP,
                "externalId": EXTERNAL_ID,
                "displayName": "Contoso Bot",
                "distributionMethod": "organization",
            },
        }
    ]


def test_lookup_by_external_id_with_a_quote_doubled_literal(http, graph):
    graph.tenant.add_app("9d3c1a52-1111-4222-8333-444455556666", "o'brien's-bot", "O'Brien")
    iid = graph.tenant.install("user", USER, "9d3c1a52-1111-4222-8333-444455556666")
    response = lookup(http, graph, "user", UPN, "teamsApp/externalId eq 'o''brien''s-bot'")
    assert response.status_code == 200
    assert [item["id"] for item in response.json()["value"]] == [iid]
    assert graph.requests[-1].query["$filter"] == "teamsApp/externalId eq 'o''brien''s-bot'"


def test_lookup_can_expand_the_app_definition_with_its_version(http, graph):
    graph.tenant.install("user", USER, APP, version="1.1.0")
    response = lookup(
        http,
        graph,
        "user",
        USER,
        f"teamsApp/externalId eq '{EXTERNAL_ID}'",
        **{"$expand": "teamsApp,teamsAppDefinition"},
    )
    (item,) = response.json()["value"]
    assert item["teamsAppDefinition"]["version"] == "1.1.0"
    assert item["teamsAppDefinition"]["teamsAppId"] == APP


def test_lookup_that_matches_nothing_is_an_empty_value(http, graph):
    response = lookup(http, graph, "user", USER, f"teamsApp/id eq '{APP}'")
    assert response.status_code == 200
    assert response.json()["value"] == []


@pytest.mark.parametrize(
    "flt",
    [f'teamsApp/id eq "{APP}"', f"teamsApp/id eq '{APP}", "startswith(teamsApp/id, 'a')", "teamsApp/id eq 'it's'"],
)
def test_unparseable_filters_are_400(http, graph, flt):
    response = lookup(http, graph, "user", USER, flt)
    assert response.status_code == 400
    assert error_of(response)["code"] == "BadRequest"


def test_lookup_for_an_unknown_user_is_404(http, graph):
    response = lookup(http, graph, "user", "ghost@contoso.com", f"teamsApp/id eq '{APP}'")
    assert response.status_code == 404
    assert error_of(response)["message"] == "User Id 'ghost@contoso.com' not found."


# --- group members ------------------------------------------------------------------------------------


def test_group_members_page_through_absolute_next_links(http, graph):
    # given a group of seven users and a page size of three
    members = [str(uuid.UUID(int=n)) for n in range(1, 8)]
    graph.tenant.add_group("g1", members)
    graph.tenant.group_page_size = 3
    url: str | None = f"{graph.url}/v1.0/groups/g1/transitiveMembers/microsoft.graph.user?$select=id&$top=999"
    # when the client follows nextLink until there is none
    pages: list[list[str]] = []
    while url is not None:
        response = http.get(url, headers=AUTH)
        assert response.status_code == 200
        body = response.json()
        pages.append([item["id"] for item in body["value"]])
        url = body.get("@odata.nextLink")
        if url is not None:
            assert url.startswith(f"{graph.url}/v1.0/groups/g1/transitiveMembers/microsoft.graph.user?")
            assert "$skiptoken=" in url
            assert "$top=999" in url
    # then every member came exactly once, in pages of at most three
    assert [len(page) for page in pages] == [3, 3, 1]
    assert [member for page in pages for member in page] == members


def test_group_page_size_follows_top_when_smaller(http, graph):
    graph.tenant.add_group("g2", ["a", "b", "c"])
    response = http.get(f"{graph.url}/v1.0/groups/g2/transitiveMembers/microsoft.graph.user?$top=2", headers=AUTH)
    assert [item["id"] for item in response.json()["value"]] == ["a", "b"]


def test_unknown_group_and_bad_page_size(http, graph):
    response = http.get(f"{graph.url}/v1.0/groups/missing/transitiveMembers/microsoft.graph.user", headers=AUTH)
    assert response.status_code == 404
    assert error_of(response)["code"] == "Request_ResourceNotFound"
    assert error_of(response)["message"] == (
        "Resource 'missing' does not exist or one of its queried reference-property objects are not present."
    )
    graph.tenant.add_group("g3", ["a"])
    response = http.get(f"{graph.url}/v1.0/groups/g3/transitiveMembers/microsoft.graph.user?$top=1000", headers=AUTH)
    assert response.status_code == 400


# --- authentication, routing, headers -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("authorization", "message"),
    [
        (None, "Access token is empty."),
        ("Bearer", "Access token is empty."),
        ("Basic dXNlcjpwYXNz", "Access token is empty."),
        ("Bearer stale-token", "Access token has expired or is not yet valid."),
    ],
)
def test_missing_or_rejected_tokens_are_401_with_a_bearer_challenge(http, graph, authorization, message):
    iid = graph.tenant.install("user", USER, APP)
    headers = {} if authorization is None else {"Authorization": authorization}
    response = http.post(graph.url + upgrade_path("user", USER, iid), headers=headers)
    assert response.status_code == 401
    assert error_of(response)["code"] == "InvalidAuthenticationToken"
    assert error_of(response)["message"] == message
    assert response.headers["WWW-Authenticate"] == (
        'Bearer realm="", authorization_uri="https://login.microsoftonline.com/common/oauth2/authorize", '
        'client_id="00000003-0000-0000-c000-000000000000"'
    )
    assert graph.tenant.installation_version(iid) == "1.0.0"


def test_without_a_validator_any_non_empty_token_is_accepted(http):
    with GraphSimulator() as sim:
        sim.tenant.add_user(USER)
        response = http.get(sim.url + apps_path("user", USER), headers={"Authorization": "Bearer anything"})
        assert response.status_code == 200


@pytest.mark.parametrize(
    ("method", "path", "status", "message"),
    [
        ("GET", "/v1.0/foo", 400, "Resource not found for the segment 'foo'."),
        (
            "GET",
            f"/v1.0/users/{USER}/teamwork/installedThings",
            400,
            "Resource not found for the segment 'installedThings'.",
        ),
        ("GET", "/v2.0/users", 400, "Invalid version: v2.0"),
        (
            "GET",
            "/v1.0/me/teamwork/installedApps",
            400,
            "/me request is only valid with delegated authentication flow.",
        ),
        ("GET", f"/v1.0/users/{USER}/teamwork/installedApps/x/upgrade", 405, "not allowed for the request target"),
    ],
)
def test_unknown_paths_answer_like_graph(http, graph, method, path, status, message):
    response = http.request(method, graph.url + path, headers=AUTH)
    assert response.status_code == status
    assert error_of(response)["code"] == "BadRequest"
    assert message in error_of(response)["message"]


def test_every_answer_carries_graphs_headers_and_error_ids_match_them(http, graph):
    iid = graph.tenant.install("user", USER, APP)
    sent_id = str(uuid.uuid4())
    ok = upgrade(http, graph, "user", USER, iid, headers={"client-request-id": sent_id})
    missing = upgrade(http, graph, "user", OTHER_USER, iid)  # 404, no client-request-id sent
    for response in (ok, missing):
        assert GUID.match(response.headers["request-id"])
        assert abs(parsedate_to_datetime(response.headers["Date"]) - datetime.now(UTC)) < timedelta(minutes=1)
        assert response.headers["Date"].endswith(" GMT")
        assert "ServerInfo" in json.loads(response.headers["x-ms-ags-diagnostic"])
        assert response.headers["Strict-Transport-Security"] == "max-age=31536000"
        assert response.headers["Cache-Control"] == "no-store"
    assert ok.headers["client-request-id"] == sent_id
    assert missing.headers["client-request-id"] == missing.headers["request-id"]
    assert missing.headers["Content-Type"] == "application/json"
    inner = error_of(missing)["innerError"]
    assert inner["request-id"] == missing.headers["request-id"]
    assert inner["client-request-id"] == missing.headers["client-request-id"]
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d", inner["date"])


# --- recorded requests ---------------------------------------------------------------------------------


def test_an_encoded_slash_stays_inside_its_segment(http, graph):
    # given an installation whose id contains "/" (base64 can)
    iid = graph.tenant.install("user", USER, APP, installation_id="ab/cd+ef==")
    # when the client percent-encodes it as one segment
    response = upgrade(http, graph, "user", USER, iid)
    # then it is routed as one id, and the record shows both the raw and the decoded path
    assert response.status_code == 204
    (record,) = graph.requests
    assert record.raw_path == f"/v1.0/users/{USER}/teamwork/installedApps/ab%2Fcd%2Bef%3D%3D/upgrade"
    assert record.segments == ("v1.0", "users", USER, "teamwork", "installedApps", "ab/cd+ef==", "upgrade")
    assert record.method == "POST"
    assert record.status == 204


async def test_a_literal_dot_dot_segment_is_not_normalised():
    # httpx would normalise "..", so speak HTTP/1.1 on a raw socket
    with GraphSimulator() as sim:
        host, port = sim.url.removeprefix("http://").split(":")
        reader, writer = await asyncio.open_connection(host, int(port))
        writer.write(
            b"GET /v1.0/users/../teamwork/installedApps HTTP/1.1\r\nHost: x\r\n"
            b"Authorization: Bearer t\r\nConnection: close\r\n\r\n"
        )
        await writer.drain()
        raw = await reader.read()
        writer.close()
        assert raw.startswith(b"HTTP/1.1 404")
        assert b"User Id '..' not found." in raw
        assert sim.requests[0].segments == ("v1.0", "users", "..", "teamwork", "installedApps")


def test_percent_encoded_dots_reach_the_route_as_an_id(http, graph):
    response = http.get(f"{graph.url}/v1.0/users/%2E%2E/teamwork/installedApps", headers=AUTH)
    assert response.status_code == 404
    assert error_of(response)["message"] == "User Id '..' not found."
    assert graph.requests[-1].raw_path == "/v1.0/users/%2E%2E/teamwork/installedApps"


def test_every_request_is_recorded_including_rejected_ones(http, graph):
    iid = graph.tenant.install("user", USER, APP)
    http.post(graph.url + upgrade_path("user", USER, iid))  # unauthenticated
    http.get(graph.url + "/v1.0/nowhere", headers=AUTH)  # unroutable
    body = {"consentedPermissionSet": None}
    upgrade(http, graph, "user", USER, iid, json=body, headers={"Client-Request-Id": "abc"})
    lookup(http, graph, "user", USER, f"teamsApp/id eq '{APP}'")
    records = graph.requests
    assert [r.status for r in records] == [401, 400, 204, 200]
    assert records[2].headers["client-request-id"] == "abc"
    assert records[2].headers["authorization"] == AUTH["Authorization"]
    assert json.loads(records[2].body) == body
    assert records[3].query == {"$expand": "teamsApp", "$filter": f"teamsApp/id eq '{APP}'"}
    assert "%24filter=" in records[3].raw_query
    assert records[0].received_at <= records[1].received_at <= records[3].received_at
    graph.clear_requests()
    assert graph.requests == []


# --- scripted faults ----------------------------------------------------------------------------------


def test_scripted_status_body_and_headers_are_served_with_graphs_ids(http, graph):
    iid = graph.tenant.install("user", USER, APP)
    graph.script(
        "upgrade",
        Fault(503, body={"error": {"code": "X", "message": "m", "innerError": {}}}, headers={"Retry-After": "7"}),
    )
    response = upgrade(http, graph, "user", USER, iid)
    assert response.status_code == 503
    assert response.headers["Retry-After"] == "7"
    assert error_of(response)["code"] == "X"
    assert error_of(response)["innerError"]["request-id"] == response.headers["request-id"]
    assert graph.tenant.installation_version(iid) == "1.0.0"  # the fault replaced the upgrade


def test_scripted_faults_are_served_fifo_then_normal_behaviour_resumes(http, graph):
    iid = graph.tenant.install("user", USER, APP)
    graph.script("upgrade", Fault(500), Fault(502), Fault.throttled())
    statuses = [upgrade(http, graph, "user", USER, iid).status_code for _ in range(4)]
    assert statuses == [500, 502, 429, 204]
    assert [r.fault for r in graph.requests] == ["scripted", "scripted", "scripted", None]


def test_default_fault_bodies_are_graphs(http, graph):
    iid = graph.tenant.install("user", USER, APP)
    graph.script("upgrade", Fault(502), Fault.throttled(), Fault(503), Fault(204, body=None))
    bad_gateway = upgrade(http, graph, "user", USER, iid)
    assert error_of(bad_gateway)["code"] == "BadGateway"
    assert error_of(bad_gateway)["message"] == "Failed to execute backend request."
    throttled = upgrade(http, graph, "user", USER, iid)
    assert throttled.headers["Retry-After"] == "2.128"
    error = error_of(throttled)
    assert (error["code"], error["message"]) == ("TooManyRequests", "Please retry again later.")
    assert error["innerError"]["code"] == "429"
    assert error["innerError"]["status"] == "429"
    assert error["innerError"]["message"] == "Please retry after"
    unavailable = upgrade(http, graph, "user", USER, iid)
    assert unavailable.status_code == 503
    assert "Retry-After" not in unavailable.headers
    no_content = upgrade(http, graph, "user", USER, iid)
    assert (no_content.status_code, no_content.content) == (204, b"")
    assert graph.tenant.installation_version(iid) == "1.0.0"  # a scripted 204 is not an upgrade


def test_graph_error_builder_and_raw_bodies(http, graph):
    iid = graph.tenant.install("user", USER, APP)
    settings_store = "Failed to execute settings store request: StatusCode: 400, ReasonPhrase: Schema validation errors"
    graph.script(
        "upgrade",
        Fault.graph_error(400, "BadRequest", settings_store, inner_code="SettingsStore", headers={"x-extra": "1"}),
        Fault(502, body="<html>Bad Gateway</html>", headers={"Content-Type": "text/html"}),
    )
    flake = upgrade(http, graph, "user", USER, iid)
    assert flake.status_code == 400
    assert flake.headers["x-extra"] == "1"
    assert error_of(flake)["message"] == settings_store
    assert error_of(flake)["innerError"]["code"] == "SettingsStore"
    assert error_of(flake)["innerError"]["client-request-id"] == flake.headers["client-request-id"]
    gateway = upgrade(http, graph, "user", USER, iid)
    assert gateway.text == "<html>Bad Gateway</html>"
    assert gateway.headers["Content-Type"] == "text/html"


def test_scripts_apply_to_their_route_only_and_star_to_any_request(http, graph):
    iid = graph.tenant.install("user", USER, APP)
    graph.script("list", Fault(500))
    graph.script("group", Fault(500))
    assert upgrade(http, graph, "user", USER, iid).status_code == 204
    assert lookup(http, graph, "user", USER, f"teamsApp/id eq '{APP}'").status_code == 500
    graph.script("*", Fault(418))
    # a scripted answer bypasses authentication and routing
    assert http.get(graph.url + "/nowhere").status_code == 418
    with pytest.raises(ValueError, match="route must be one of"):
        graph.script("install", Fault())


def test_scripted_delay_and_passthrough(http, graph):
    iid = graph.tenant.install("user", USER, APP)
    graph.script("upgrade", Fault(503, delay=0.2), Fault(passthrough=True, delay=0.1))
    started = time.monotonic()
    assert upgrade(http, graph, "user", USER, iid).status_code == 503
    assert time.monotonic() - started >= 0.2
    started = time.monotonic()
    assert upgrade(http, graph, "user", USER, iid).status_code == 204  # behaves normally, only later
    assert time.monotonic() - started >= 0.1
    assert graph.tenant.installation_version(iid) == "2.0.0"
    assert graph.stats()["faults"] == 1


def test_passthrough_still_authenticates(http, graph):
    iid = graph.tenant.install("user", USER, APP)
    graph.script("upgrade", Fault(passthrough=True))
    assert http.post(graph.url + upgrade_path("user", USER, iid)).status_code == 401


def test_a_scripted_reset_is_a_connection_error_for_the_client(http, graph):
    iid = graph.tenant.install("user", USER, APP)
    graph.script("upgrade", Fault(reset=True))
    with pytest.raises(httpx.TransportError):
        upgrade(http, graph, "user", USER, iid)
    assert upgrade(http, graph, "user", USER, iid).status_code == 204  # the next one, on a new connection
    assert [r.status for r in graph.requests] == [None, 204]
    assert graph.stats()["resets"] == 1


# --- chaos ----------------------------------------------------------------------------------------------


def _statuses(http: httpx.Client, graph: GraphSimulator, count: int) -> list[int]:
    url = graph.url + apps_path("user", USER)
    return [http.get(url, headers=AUTH).status_code for _ in range(count)]


def test_chaos_is_reproducible_for_a_seed_and_close_to_its_rates(http, graph):
    rates = {"503": 0.2, "429": 0.1, "500": 0.05}
    graph.set_chaos(rates, seed=42)
    first = _statuses(http, graph, 400)
    graph.set_chaos(rates, seed=42)
    second = _statuses(http, graph, 400)
    graph.set_chaos(rates, seed=43)
    other = _statuses(http, graph, 400)
    assert first == second
    assert first != other
    for status, rate in ((503, 0.2), (429, 0.1), (500, 0.05)):
        assert abs(first.count(status) / 400 - rate) < 0.05
    assert first.count(200) + first.count(503) + first.count(429) + first.count(500) == 400
    graph.set_chaos({})
    assert set(_statuses(http, graph, 20)) == {200}


def test_chaos_throttling_and_unavailability_carry_retry_after(http, graph):
    graph.set_chaos({"429": 0.5, "503": 0.5}, retry_after="0.25")
    response = http.get(graph.url + apps_path("user", USER), headers=AUTH)
    assert response.status_code in (429, 503)
    assert response.headers["Retry-After"] == "0.25"


def test_chaos_timeout_holds_the_request_then_answers_504(http, graph):
    graph.set_chaos({"timeout": 1.0}, timeout_delay=0.2)
    started = time.monotonic()
    response = http.get(graph.url + apps_path("user", USER), headers=AUTH)
    assert response.status_code == 504
    assert time.monotonic() - started >= 0.2
    assert error_of(response)["code"] == "GatewayTimeout"


def test_chaos_reset_aborts_the_connection(http, graph):
    graph.set_chaos({"reset": 1.0})
    with pytest.raises(httpx.TransportError):
        http.get(graph.url + apps_path("user", USER), headers=AUTH)
    assert graph.requests[0].fault == "chaos:reset"


def test_chaos_rejects_unknown_kinds_and_rates_over_one(graph):
    with pytest.raises(ValueError, match="unknown chaos kinds"):
        graph.set_chaos({"418": 0.1})
    with pytest.raises(ValueError, match="at most 1"):
        graph.set_chaos({"500": 0.6, "503": 0.6})


def test_stop_is_prompt_while_a_request_is_held(http):
    sim = GraphSimulator().start()
    sim.set_chaos({"timeout": 1.0}, timeout_delay=30)
    with pytest.raises(httpx.TimeoutException):
        http.get(sim.url + "/v1.0/foo", timeout=0.2)
    started = time.monotonic()
    sim.stop()
    assert time.monotonic() - started < 2


# --- rate limit and latency -------------------------------------------------------------------------------


async def test_rate_limit_admits_exactly_the_window_and_retry_after_is_enough(graph):
    # given 30 requests per half-second window
    graph.set_rate_limit(30, window=0.5)
    url = graph.url + apps_path("user", USER)
    async with httpx.AsyncClient(headers=AUTH, timeout=5) as client:
        # when 40 arrive at once
        burst = await asyncio.gather(*(client.get(url) for _ in range(40)))
        # then exactly 30 pass and the rest are throttled with a decimal Retry-After and Graph's body
        assert sorted(r.status_code for r in burst) == [200] * 30 + [429] * 10
        for response in (r for r in burst if r.status_code == 429):
            assert re.fullmatch(r"\d+\.\d{3}", response.headers["Retry-After"])
            assert 0.001 <= float(response.headers["Retry-After"]) <= 0.5
            assert error_of(response)["code"] == "TooManyRequests"
            assert error_of(response)["innerError"]["code"] == "429"
        # and a client that waits what it is told gets through
        again = await client.get(url)
        assert again.status_code == 429
        await asyncio.sleep(float(again.headers["Retry-After"]))
        assert (await client.get(url)).status_code == 200
    stats = graph.stats()
    assert (stats["rate_limited"], stats["throttled"], stats["status_200"]) == (11, 11, 31)


def test_rate_limit_counts_authenticated_requests_only_and_can_be_switched_off(http, graph):
    graph.set_rate_limit(1, window=5)
    url = graph.url + apps_path("user", USER)
    assert [http.get(url).status_code for _ in range(3)] == [401, 401, 401]
    assert http.get(url, headers=AUTH).status_code == 200
    assert http.get(url, headers=AUTH).status_code == 429
    graph.set_rate_limit(None)
    assert http.get(url, headers=AUTH).status_code == 200


async def test_latency_delays_every_answer_without_blocking_the_server(graph):
    graph.set_latency(0.1, 0.02)
    url = graph.url + apps_path("user", USER)
    async with httpx.AsyncClient(headers=AUTH, timeout=5) as client:
        started = time.monotonic()
        assert (await client.get(url)).status_code == 200
        assert time.monotonic() - started >= 0.08
        started = time.monotonic()
        responses = await asyncio.gather(*(client.get(url) for _ in range(32)))
        assert {r.status_code for r in responses} == {200}
        assert time.monotonic() - started < 1.0  # 32 x 0.1 s served concurrently, not one after another


async def test_sustains_a_thousand_concurrent_upgrades(graph):
    # given 1,000 users with an installation each, and 20 ms of latency
    users = [str(uuid.UUID(int=n)) for n in range(1, 1001)]
    installs = {}
    for user in users:
        graph.tenant.add_user(user)
        installs[user] = graph.tenant.install("user", user, APP)
    graph.set_latency(0.02, 0.01)
    # when 64 connections upgrade them all; aiohttp's client here, because httpx's AsyncClient
    # pool itself tops out near 200 requests/s at 64 connections and would be what we measure
    started = time.monotonic()
    connector = aiohttp.TCPConnector(limit=64)
    async with aiohttp.ClientSession(headers=AUTH, connector=connector) as session:

        async def one(user: str) -> int:
            async with session.post(graph.url + upgrade_path("user", user, installs[user])) as response:
                await response.read()
                return response.status

        statuses = await asyncio.gather(*(one(user) for user in users))
    elapsed = time.monotonic() - started
    # then all succeed in a small multiple of the ideal 1000 / 64 x 20 ms = 0.3 s
    assert set(statuses) == {204}
    assert elapsed < 3
    assert {record.target_id for record in graph.upgraded} == set(users)


# --- stats and the upgrade log ----------------------------------------------------------------------------


def test_stats_and_upgraded_reconcile_what_clients_saw(http, graph):
    mine = graph.tenant.install("user", USER, APP)
    team = graph.tenant.install("team", TEAM, APP)
    graph.script("upgrade", Fault.throttled("0.1"))
    statuses = [
        upgrade(http, graph, "user", USER, mine, headers={"client-request-id": "crid-1"}).status_code,  # scripted 429
        upgrade(http, graph, "user", UPN, mine, headers={"client-request-id": "crid-2"}).status_code,
        upgrade(http, graph, "team", TEAM, team).status_code,
        http.post(graph.url + upgrade_path("user", USER, mine)).status_code,  # no token
        upgrade(http, graph, "user", OTHER_USER, mine).status_code,
    ]
    assert statuses == [429, 204, 204, 401, 404]
    assert graph.stats() == {
        "requests": 5,
        "upgrades_ok": 2,
        "throttled": 1,
        "rate_limited": 0,
        "faults": 1,
        "resets": 0,
        "status_429": 1,
        "status_204": 2,
        "status_401": 1,
        "status_404": 1,
    }
    first, second = graph.upgraded
    assert (first.scope, first.target_id, first.installation_id) == ("user", UPN, mine)
    assert first.client_request_id == "crid-2"
    assert (first.from_version, first.version, first.teams_app_id) == ("1.0.0", "2.0.0", APP)
    assert (second.scope, second.target_id, second.installation_id) == ("team", TEAM, team)
    assert second.client_request_id is None
    assert GUID.match(second.request_id)
    assert first.time <= second.time


# --- tenant seeding ------------------------------------------------------------------------------------------


def test_tenant_refuses_inconsistent_seeding(graph):
    tenant = graph.tenant
    with pytest.raises(ValueError, match="unknown user"):
        tenant.install("user", "ghost", APP)
    with pytest.raises(ValueError, match="unknown app"):
        tenant.install("user", USER, "no-such-app")
    with pytest.raises(ValueError, match="no version"):
        tenant.install("user", USER, APP, version="9.9.9")
    tenant.install("user", USER, APP)
    with pytest.raises(ValueError, match="already installed"):
        tenant.install("user", UPN, APP)
    with pytest.raises(KeyError):
        tenant.installation_version("bm9wZQ==")
