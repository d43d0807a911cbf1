"""Contract §1/§2: the Graph paths, and that nothing from a message can leave its own segment.

Examples first (the three scopes, the lookup query), then properties checked by hypothesis for
any text and for ids that pass :func:`parse_request`: an id stays one percent-encoded segment, the
host, port, scheme and ``/v1.0/`` never change, and a lookup value never ends its OData literal
nor adds a query parameter.
"""

from __future__ import annotations

import json
import re
import string
from pathlib import Path
from urllib.parse import unquote

import httpx
import pytest
from hypothesis import assume, example, given
from hypothesis import strategies as st

from upgrade_handler.errors import InvalidMessageError
from upgrade_handler.graph import installed_apps_path, lookup_query, segment, upgrade_path
from upgrade_handler.messages import AppKind, AppRef, Scope, Target, UpgradeRequest, parse_request

FIXTURES = Path(__file__).parent / "fixtures"
BASES = (
    "https://graph.microsoft.com",
    "https://graph.microsoft.us",
    "https://dod-graph.microsoft.us",
    "https://microsoftgraph.chinacloudapi.cn",
    "http://localhost:8080",
    "https://127.0.0.1",
)
#: Path words around the ids: segments an upgrade path has, and where its ids sit.
SHAPES = {
    Scope.USER: (["", "v1.0", "users", None, "teamwork", "installedApps", None, "upgrade"], (3, 6)),
    Scope.TEAM: (["", "v1.0", "teams", None, "installedApps", None, "upgrade"], (3, 5)),
    Scope.CHAT: (["", "v1.0", "chats", None, "installedApps", None, "upgrade"], (3, 5)),
}


def path_of(url: httpx.URL) -> bytes:
    """The path as it goes on the wire, still percent-encoded (``raw_path`` holds the query too)."""
    return url.raw_path.partition(b"?")[0]


def request_of(name: str) -> UpgradeRequest:
    request = parse_request((FIXTURES / name).read_bytes())
    assert isinstance(request, UpgradeRequest)
    return request


# --- examples -----------------------------------------------------------------------------------


def test_upgrade_path_for_a_user_by_guid() -> None:
    request = request_of("pipeline_user_guid_installation.json")
    assert upgrade_path(request.target, request.app.value) == (
        "/v1.0/users/5b649834-7412-4cce-9e69-176e95a394f5/teamwork/installedApps/"
        "NWI2NDk4MzQtNzQxMi00Y2NlLTllNjktMTc2ZTk1YTM5NGY1IyNhNmI2MzM2NS0zMWE0LTRmNDMtOTJlYy03MTBiNzE1NTdhZjk%3D"
        "/upgrade"
    )


def test_upgrade_path_for_a_team() -> None:
    request = request_of("pipeline_team.json")
    assert upgrade_path(request.target, request.app.value) == (
        "/v1.0/teams/02bd9fd6-8f93-4758-87c3-1fb73740a315/installedApps/"
        "MDJiZDlmZDYtOGY5My00NzU4LTg3YzMtMWZiNzM3NDBhMzE1IyMwZDgyMGVjZC1kZWYyLTQyOTctYWRhZC03ODA1NmNkZTdjNzg%3D"
        "/upgrade"
    )


def test_upgrade_path_for_a_chat_encodes_its_colon_and_at() -> None:
    request = request_of("pipeline_chat_external_id.json")
    assert upgrade_path(request.target, "aW5zdGFsbGF0aW9u") == (
        "/v1.0/chats/19%3A561082c0f3f847a58069deb8eb300807%40thread.v2/installedApps/aW5zdGFsbGF0aW9u/upgrade"
    )


def test_installed_apps_of_a_guest_user_keep_the_hash_inside_the_segment() -> None:
    # given a guest whose UPN holds '#', which would otherwise start a URL fragment
    target = Target(Scope.USER, "ann_fabrikam.com#EXT#@contoso.onmicrosoft.com")
    path = installed_apps_path(target)
    # then it is one encoded segment and the URL keeps its whole path
    assert path == "/v1.0/users/ann_fabrikam.com%23EXT%23%40contoso.onmicrosoft.com/teamwork/installedApps"
    url = httpx.URL("https://graph.microsoft.com" + path)
    assert url.fragment == ""
    assert path_of(url) == path.encode()


@pytest.mark.parametrize(
    ("scope", "words"),
    [
        (Scope.USER, "/v1.0/users/{}/teamwork/installedApps"),
        (Scope.TEAM, "/v1.0/teams/{}/installedApps"),
        (Scope.CHAT, "/v1.0/chats/{}/installedApps"),
    ],
)
def test_installed_apps_path_per_scope(scope: Scope, words: str) -> None:
    assert installed_apps_path(Target(scope, "x")) == words.format("x")


def test_lookup_by_teams_app_id() -> None:
    request = request_of("pipeline_user_upn_teams_app.json")
    url = httpx.URL(
        "https://graph.microsoft.com" + installed_apps_path(request.target) + "?" + lookup_query(request.app)
    )
    assert dict(url.params) == {
        "$expand": "teamsApp",
        "$filter": "teamsApp/id eq 'a6b63365-31a4-4f43-92ec-710b71557af9'",
    }
    assert path_of(url) == b"/v1.0/users/adele.vance%40contoso.com/teamwork/installedApps"


def test_lookup_by_external_id_doubles_single_quotes() -> None:
    query = lookup_query(AppRef(AppKind.EXTERNAL_ID, "O'Brien's Helpdesk"))
    url = httpx.URL("https://graph.microsoft.com/v1.0/chats/x/installedApps?" + query)
    assert dict(url.params) == {"$expand": "teamsApp", "$filter": "teamsApp/externalId eq 'O''Brien''s Helpdesk'"}


def test_lookup_by_external_id_keeps_ampersand_and_hash_encoded() -> None:
    query = lookup_query(AppRef(AppKind.EXTERNAL_ID, "a&$top=1#x"))
    assert "&$top" not in query
    assert "#" not in query
    url = httpx.URL("https://graph.microsoft.com/v1.0/teams/x/installedApps?" + query)
    assert [key for key, _ in url.params.multi_items()] == ["$expand", "$filter"]


@pytest.mark.parametrize("value", [".", ".."])
def test_dot_segments_cannot_climb_the_path(value: str) -> None:
    path = upgrade_path(Target(Scope.USER, value), value)
    assert path_of(httpx.URL("https://graph.microsoft.com" + path)) == path.encode()


# --- properties over any text -------------------------------------------------------------------

#: Text with the pieces that matter in URLs drawn often, plus anything unicode.
URL_PIECES = st.sampled_from([*"/%?#@:'&=+;$\\. ", "''", "..", "//", "%2F", "%2e", "%00", "\u2215", "\uff0f", "\u2028"])
#: Lone surrogates are left out, as st.text() does: no JSON string that passes parse_request holds one.
URL_HOSTILE = st.lists(st.one_of(URL_PIECES, st.characters(exclude_categories=["Cs"])), max_size=20).map("".join)
ANY_TEXT = st.one_of(st.text(), URL_HOSTILE)


@given(ANY_TEXT)
@example("/")
@example("../../../me")
@example("a?b#c")
@example("adele@contoso.com")
@example("%2F%2e%2e")
@example("19:abc@thread.v2")
def test_segment_never_holds_a_path_query_or_fragment_delimiter(value: str) -> None:
    encoded = segment(value)
    assert "/" not in encoded
    assert "?" not in encoded
    assert "#" not in encoded
    assert unquote(encoded, errors="strict") == value


@given(st.sampled_from(list(Scope)), ANY_TEXT, ANY_TEXT)
@example(Scope.USER, "../..", "../../..")
@example(Scope.CHAT, "19:x@thread.v2/../../../beta", "a/b")
def test_upgrade_path_has_fixed_words_and_each_id_decodes_back(scope: Scope, owner: str, installation: str) -> None:
    words, id_positions = SHAPES[scope]
    segments = upgrade_path(Target(scope, owner), installation).split("/")
    assert len(segments) == len(words)
    for position, (word, found) in enumerate(zip(words, segments, strict=True)):
        if position not in id_positions:
            assert found == word
    assert unquote(segments[id_positions[0]], errors="strict") == owner
    assert unquote(segments[id_positions[1]], errors="strict") == installation


@given(st.sampled_from(BASES), st.sampled_from(list(Scope)), ANY_TEXT, ANY_TEXT)
@example("https://graph.microsoft.com", Scope.USER, "..", "..")
@example("http://localhost:8080", Scope.USER, "@evil.com", ":443")
@example("https://graph.microsoft.com", Scope.TEAM, "//evil.com", "x")
def test_joined_url_keeps_scheme_host_port_and_api_version(
    base: str, scope: Scope, owner: str, installation: str
) -> None:
    # given any owner and installation id, joined to the configured base URL
    expected = httpx.URL(base)
    url = httpx.URL(base + upgrade_path(Target(scope, owner), installation))
    # then the request goes to the same place, same API version
    assert url.scheme == expected.scheme
    assert url.host == expected.host
    assert url.port == expected.port
    assert url.userinfo == b""
    assert path_of(url).startswith(b"/v1.0/")
    assert url.query == b""
    assert url.fragment == ""


@given(st.sampled_from(BASES), st.sampled_from(list(Scope)), ANY_TEXT, ANY_TEXT)
def test_joined_url_path_is_exactly_the_built_path(base: str, scope: Scope, owner: str, installation: str) -> None:
    # dot segments are held to this in test_dot_segments_cannot_climb_the_path
    assume(owner not in (".", "..") and installation not in (".", ".."))
    path = upgrade_path(Target(scope, owner), installation)
    assert path_of(httpx.URL(base + path)) == path.encode()


_LITERAL = re.compile(r"(?:[^']|'')*")


@given(ANY_TEXT, st.sampled_from([AppKind.EXTERNAL_ID, AppKind.TEAMS_APP_ID]))
@example("'", AppKind.EXTERNAL_ID)
@example("x' or teamsApp/id ne '", AppKind.EXTERNAL_ID)
@example("a&$top=1", AppKind.EXTERNAL_ID)
@example("a#frag", AppKind.EXTERNAL_ID)
@example("a+b%20c", AppKind.EXTERNAL_ID)
def test_lookup_value_never_ends_its_literal_nor_adds_a_parameter(value: str, kind: AppKind) -> None:
    query = lookup_query(AppRef(kind, value))
    field = "id" if kind is AppKind.TEAMS_APP_ID else "externalId"
    # the query string has exactly its two parameters, and no fragment
    assert "#" not in query
    parameters = query.split("&")
    assert [p.split("=", 1)[0] for p in parameters] == ["$expand", "$filter"]
    assert parameters[0] == "$expand=teamsApp"
    # after undoing the percent-encoding, the filter is one comparison with one quoted literal
    condition = unquote(parameters[1].split("=", 1)[1], errors="strict")
    prefix = f"teamsApp/{field} eq '"
    assert condition.startswith(prefix)
    assert condition.endswith("'")
    literal = condition[len(prefix) : -1]
    assert _LITERAL.fullmatch(literal)
    assert literal.replace("''", "'") == value
    # and an HTTP client reads it back the same way
    url = httpx.URL("https://graph.microsoft.com/v1.0/users/x/teamwork/installedApps?" + query)
    assert url.params.multi_items() == [("$expand", "teamsApp"), ("$filter", condition)]


# --- properties over ids that pass parse_request ------------------------------------------------

_DNS_LABEL = st.text(alphabet=string.ascii_lowercase + string.digits, min_size=1, max_size=12)
_UPN_LOCAL = st.text(alphabet=string.ascii_letters + string.digits + "'.-_!#^~", min_size=1, max_size=40)
UPNS = st.builds(
    lambda local, labels, tld: f"{local}@{'.'.join(labels)}.{tld}",
    _UPN_LOCAL,
    st.lists(_DNS_LABEL, min_size=1, max_size=3),
    st.sampled_from(["com", "onmicrosoft.com", "co.uk", "io"]),
)
GUIDS = st.uuids().map(str)
CHAT_IDS = st.builds(
    lambda body, kind: f"19:{body}@{kind}",
    st.text(alphabet=string.ascii_letters + string.digits + "_.-", min_size=1, max_size=80),
    st.sampled_from(["thread.v2", "unq.gbl.spaces"]),
)
INSTALLATION_IDS = st.text(alphabet=string.ascii_letters + string.digits + "+_-=", min_size=1, max_size=256)
EXTERNAL_IDS = st.text(min_size=1, max_size=256).filter(str.isprintable)

SCOPE_IDS = st.one_of(
    st.tuples(st.just("userId"), st.one_of(UPNS, GUIDS)),
    st.tuples(st.just("teamId"), GUIDS),
    st.tuples(st.just("chatId"), CHAT_IDS),
)
APP_IDS = st.one_of(
    st.tuples(st.just("appInstallationId"), INSTALLATION_IDS),
    st.tuples(st.just("teamsAppId"), GUIDS),
    st.tuples(st.just("externalId"), EXTERNAL_IDS),
)


def accepted(scope: tuple[str, str], app: tuple[str, str]) -> UpgradeRequest:
    try:
        request = parse_request(json.dumps(dict([scope, app])).encode())
    except InvalidMessageError:
        assume(False)
        raise
    assert isinstance(request, UpgradeRequest)
    return request


@given(st.sampled_from(BASES), SCOPE_IDS, APP_IDS)
def test_accepted_request_builds_urls_that_stay_on_the_configured_graph(
    base: str, scope: tuple[str, str], app: tuple[str, str]
) -> None:
    # given any request parse_request accepts
    request = accepted(scope, app)
    expected = httpx.URL(base)
    if request.app.kind is AppKind.INSTALLATION:
        path = upgrade_path(request.target, request.app.value)
        url = httpx.URL(base + path)
        assert path_of(url) == path.encode()
        segments = path.split("/")
        owner, installation = (segments[3], segments[-2])
        assert unquote(owner) == request.target.id
        assert unquote(installation) == request.app.value
    else:
        path = installed_apps_path(request.target)
        url = httpx.URL(base + path + "?" + lookup_query(request.app))
        assert path_of(url) == path.encode()
        assert [key for key, _ in url.params.multi_items()] == ["$expand", "$filter"]
        field = "id" if request.app.kind is AppKind.TEAMS_APP_ID else "externalId"
        literal = request.app.value.replace("'", "''")
        assert url.params["$filter"] == f"teamsApp/{field} eq '{literal}'"
    # then the call goes to the configured Graph, same API version
    assert (url.scheme, url.host, url.port) == (expected.scheme, expected.host, expected.port)
    assert path_of(url).startswith(b"/v1.0/")
    assert url.fragment == ""
