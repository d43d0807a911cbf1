"""Contract §1 (one message = one upgrade request) and §6 (fan-out requests), as parse tests.

Every test starts from a real producer message in ``tests/fixtures`` (a release pipeline, an
Event Grid or CloudEvents publish event), changes the one thing it is about, and checks what
:func:`parse_request` makes of it. A refusal must name the field a producer has to fix.
"""

from __future__ import annotations

import codecs
import json
from pathlib import Path
from typing import Any

import pytest

from upgrade_handler.errors import InvalidMessageError
from upgrade_handler.messages import (
    AppKind,
    AppRef,
    FanOutRequest,
    Scope,
    Target,
    UpgradeRequest,
    parse_request,
)
from upgrade_handler.versions import Version

FIXTURES = Path(__file__).parent / "fixtures"

USER_GUID = "5b649834-7412-4cce-9e69-176e95a394f5"
TEAM_GUID = "02bd9fd6-8f93-4758-87c3-1fb73740a315"
TEAMS_APP_ID = "a6b63365-31a4-4f43-92ec-710b71557af9"
GROUP_GUID = "c2a7f0e4-6b1d-4f3a-9e8c-5d4b3a2f1e0d"
USER_INSTALLATION = (
    "NWI2NDk4MzQtNzQxMi00Y2NlLTllNjktMTc2ZTk1YTM5NGY1IyNhNmI2MzM2NS0zMWE0LTRmNDMtOTJlYy03MTBiNzE1NTdhZjk="
)
GUEST_UPN = "ann_fabrikam.com#EXT#@contoso.onmicrosoft.com"
MAX_BODY = 65_536

PIPELINE_FIXTURES = (
    "pipeline_user_guid_installation.json",
    "pipeline_user_upn_teams_app.json",
    "pipeline_team.json",
    "pipeline_chat_external_id.json",
    "pipeline_consented_permissions.json",
)


def fixture(name: str) -> dict[str, Any]:
    document = json.loads((FIXTURES / name).read_text(encoding="utf-8"))
    assert isinstance(document, dict)
    return document


def encode(document: Any) -> bytes:
    return json.dumps(document).encode("utf-8")


def with_fields(name: str, **changes: Any) -> bytes:
    """The fixture ``name`` with fields replaced; a value of ``...`` removes the field."""
    document = fixture(name)
    for field, value in changes.items():
        if value is ...:
            document.pop(field, None)
        else:
            document[field] = value
    return encode(document)


def refusal(body: bytes) -> str:
    with pytest.raises(InvalidMessageError) as refused:
        parse_request(body)
    return refused.value.reason


def upgrade(body: bytes) -> UpgradeRequest:
    request = parse_request(body)
    assert isinstance(request, UpgradeRequest)
    return request


def fan_out(body: bytes) -> FanOutRequest:
    request = parse_request(body)
    assert isinstance(request, FanOutRequest)
    return request


def event_grid(data: Any) -> dict[str, Any]:
    event = fixture("eventgrid_event.json")
    event["data"] = data
    return event


def cloud_event(data: Any) -> dict[str, Any]:
    event = fixture("cloudevent.json")
    event["data"] = data
    return event


def padded_to(size: int, *, bom: bool) -> bytes:
    """A valid pipeline request grown with an unknown field to exactly ``size`` bytes."""
    prefix = codecs.BOM_UTF8 if bom else b""
    document = fixture("pipeline_user_guid_installation.json")
    document["padding"] = ""
    base = len(prefix) + len(encode(document))
    document["padding"] = "x" * (size - base)
    body = prefix + encode(document)
    assert len(body) == size
    return body


# --- each producer kind parses to the request it means -----------------------------------------


def test_release_pipeline_user_by_guid_with_installation_id() -> None:
    # given a release pipeline's request naming a user by object id and an installation
    body = (FIXTURES / "pipeline_user_guid_installation.json").read_bytes()
    # when it is parsed
    request = parse_request(body)
    # then it is a personal-scope upgrade of exactly that installation, dead-lettered if missing
    assert request == UpgradeRequest(
        target=Target(Scope.USER, USER_GUID),
        app=AppRef(AppKind.INSTALLATION, USER_INSTALLATION),
        consented_permission_set=None,
        request_id="release-2026.11.29-42",
        skip_if_not_installed=False,
    )


def test_release_pipeline_user_by_upn_with_teams_app_id() -> None:
    body = (FIXTURES / "pipeline_user_upn_teams_app.json").read_bytes()
    request = parse_request(body)
    assert request == UpgradeRequest(
        target=Target(Scope.USER, "adele.vance@contoso.com"),
        app=AppRef(AppKind.TEAMS_APP_ID, TEAMS_APP_ID),
        consented_permission_set=None,
        request_id="release-2026.11.29-43",
        skip_if_not_installed=True,
    )


def test_release_pipeline_team_with_installation_id() -> None:
    body = (FIXTURES / "pipeline_team.json").read_bytes()
    request = upgrade(body)
    assert request.target == Target(Scope.TEAM, TEAM_GUID)
    assert request.app.kind is AppKind.INSTALLATION
    assert request.app.value == fixture("pipeline_team.json")["appInstallationId"]
    assert request.request_id is None


def test_release_pipeline_chat_with_external_id() -> None:
    body = (FIXTURES / "pipeline_chat_external_id.json").read_bytes()
    request = upgrade(body)
    assert request.target == Target(Scope.CHAT, "19:561082c0f3f847a58069deb8eb300807@thread.v2")
    assert request.app == AppRef(AppKind.EXTERNAL_ID, "cf1ba4c7-f94e-4d80-ba90-5594b641a8ee")


def test_release_pipeline_with_consented_permission_set_forwards_it_as_given() -> None:
    body = (FIXTURES / "pipeline_consented_permissions.json").read_bytes()
    request = upgrade(body)
    assert request.consented_permission_set == fixture("pipeline_consented_permissions.json")["consentedPermissionSet"]


def test_event_grid_event_is_unwrapped_and_its_data_read_as_the_request() -> None:
    # given a catalog publish event delivered by Event Grid to the queue
    body = (FIXTURES / "eventgrid_event.json").read_bytes()
    # when it is parsed
    request = parse_request(body)
    # then the request is the event's data, not the envelope
    assert request == UpgradeRequest(
        target=Target(Scope.USER, "adele.vance@contoso.com"),
        app=AppRef(AppKind.TEAMS_APP_ID, TEAMS_APP_ID),
        consented_permission_set=None,
        request_id="publish-2.3.0-adele",
        skip_if_not_installed=False,
    )


def test_cloudevents_event_is_unwrapped_and_its_data_read_as_the_request() -> None:
    body = (FIXTURES / "cloudevent.json").read_bytes()
    request = parse_request(body)
    assert request == UpgradeRequest(
        target=Target(Scope.TEAM, TEAM_GUID),
        app=AppRef(AppKind.EXTERNAL_ID, "com.contoso.helpdesk"),
        consented_permission_set=None,
        request_id="publish-2.3.0-team",
        skip_if_not_installed=False,
    )


@pytest.mark.parametrize("name", PIPELINE_FIXTURES)
@pytest.mark.parametrize("envelope", [event_grid, cloud_event], ids=["event-grid", "cloudevents"])
def test_every_request_means_the_same_inside_an_envelope(name: str, envelope: Any) -> None:
    # given a pipeline request, bare and wrapped in an event envelope
    bare = (FIXTURES / name).read_bytes()
    wrapped = encode(envelope(fixture(name)))
    # then both parse to the same request
    assert parse_request(wrapped) == parse_request(bare)


def test_user_ids_fan_out_names_every_user_and_one_app() -> None:
    body = (FIXTURES / "fanout_user_ids.json").read_bytes()
    request = parse_request(body)
    assert isinstance(request, FanOutRequest)
    assert request.user_ids == (USER_GUID, "adele.vance@contoso.com", GUEST_UPN)
    assert request.group_id is None
    assert request.app == AppRef(AppKind.TEAMS_APP_ID, TEAMS_APP_ID)
    assert request.consented_permission_set == fixture("fanout_user_ids.json")["consentedPermissionSet"]
    assert request.request_id == "publish-2.3.0-pilot"


def test_group_fan_out_names_the_group_and_one_app() -> None:
    body = (FIXTURES / "fanout_group.json").read_bytes()
    request = parse_request(body)
    assert isinstance(request, FanOutRequest)
    assert request.group_id == GROUP_GUID
    assert request.user_ids == ()
    assert request.app == AppRef(AppKind.EXTERNAL_ID, "com.contoso.helpdesk")
    assert request.request_id == "publish-2.3.0-all-staff"


def test_fan_out_inside_a_cloudevents_envelope() -> None:
    # §6: "Envelopes (§1) apply"
    body = encode(cloud_event(fixture("fanout_group.json")))
    assert fan_out(body).group_id == GROUP_GUID


# --- body: encoding, size, shape ----------------------------------------------------------------


def test_utf8_bom_is_tolerated() -> None:
    body = codecs.BOM_UTF8 + (FIXTURES / "pipeline_team.json").read_bytes()
    assert upgrade(body).target == Target(Scope.TEAM, TEAM_GUID)


@pytest.mark.parametrize(
    "body",
    [
        '{"userId": "jos\xe9@contoso.com", "teamsAppId": "' + TEAMS_APP_ID + '"}',
        '{"teamId": "' + TEAM_GUID + '", "externalId": "caf\xe9"}',
    ],
    ids=["latin-1-upn", "latin-1-external-id"],
)
def test_body_that_is_not_utf8_is_refused(body: str) -> None:
    assert "UTF-8" in refusal(body.encode("latin-1"))


def test_utf16_body_is_refused() -> None:
    body = (FIXTURES / "pipeline_team.json").read_text(encoding="utf-8").encode("utf-16")
    assert refusal(body)


def test_body_of_exactly_65536_bytes_with_bom_is_accepted() -> None:
    # given a valid request whose bytes, BOM included, are exactly the limit
    body = padded_to(MAX_BODY, bom=True)
    # then it is read like any other
    assert upgrade(body).target == Target(Scope.USER, USER_GUID)


def test_body_of_exactly_65536_bytes_without_bom_is_accepted() -> None:
    assert upgrade(padded_to(MAX_BODY, bom=False)).target == Target(Scope.USER, USER_GUID)


@pytest.mark.parametrize("bom", [True, False], ids=["with-bom", "without-bom"])
def test_body_of_65537_bytes_is_refused(bom: bool) -> None:
    reason = refusal(padded_to(MAX_BODY + 1, bom=bom))
    assert "65536" in reason.replace(",", "").replace("_", "")


def test_body_that_is_not_json_is_refused() -> None:
    assert "JSON" in refusal(b"userId=5b649834-7412-4cce-9e69-176e95a394f5&teamsAppId=x")


def test_json_array_body_is_refused_even_of_one_request() -> None:
    # given an Event Grid batch shape: an array holding one event
    body = encode([fixture("eventgrid_event.json")])
    assert "array" in refusal(body)


@pytest.mark.parametrize("body", [b"null", b"42", b'"upgrade"', b"true"])
def test_json_scalar_body_is_refused(body: bytes) -> None:
    assert refusal(body)


@pytest.mark.parametrize("data", [None, "userId=x", 7, [fixture("pipeline_team.json")]], ids=repr)
@pytest.mark.parametrize("envelope", [event_grid, cloud_event], ids=["event-grid", "cloudevents"])
def test_envelope_whose_data_is_not_an_object_is_refused(envelope: Any, data: Any) -> None:
    assert "data" in refusal(encode(envelope(data)))


def test_unknown_fields_are_ignored() -> None:
    body = with_fields(
        "pipeline_user_guid_installation.json",
        priority="high",
        UserID="not-a-guid",
        pipeline={"name": "release", "run": 42},
        tags=["pilot"],
    )
    assert upgrade(body) == upgrade((FIXTURES / "pipeline_user_guid_installation.json").read_bytes())


# --- exactly one scope, exactly one app ---------------------------------------------------------


def test_request_without_any_scope_field_is_refused() -> None:
    reason = refusal(with_fields("pipeline_user_guid_installation.json", userId=...))
    assert "userId" in reason
    assert "teamId" in reason
    assert "chatId" in reason


@pytest.mark.parametrize(
    ("extra_field", "extra_value"),
    [
        ("teamId", TEAM_GUID),
        ("chatId", "19:561082c0f3f847a58069deb8eb300807@thread.v2"),
        ("userIds", [USER_GUID]),
        ("groupId", GROUP_GUID),
    ],
)
def test_request_with_two_scope_fields_is_refused(extra_field: str, extra_value: Any) -> None:
    body = with_fields("pipeline_user_upn_teams_app.json", **{extra_field: extra_value})
    reason = refusal(body)
    assert "userId" in reason
    assert extra_field in reason


def test_request_without_any_app_field_is_refused() -> None:
    reason = refusal(with_fields("pipeline_user_guid_installation.json", appInstallationId=...))
    assert "appInstallationId" in reason
    assert "teamsAppId" in reason
    assert "externalId" in reason


@pytest.mark.parametrize(
    "extra",
    [
        {"teamsAppId": TEAMS_APP_ID},
        {"externalId": "com.contoso.helpdesk"},
        {"teamsAppId": TEAMS_APP_ID, "externalId": "com.contoso.helpdesk"},
    ],
    ids=["+teamsAppId", "+externalId", "+both"],
)
def test_request_with_two_app_fields_is_refused(extra: dict[str, str]) -> None:
    reason = refusal(with_fields("pipeline_user_guid_installation.json", **extra))
    assert "appInstallationId" in reason
    for field in extra:
        assert field in reason


# --- wrong types and empty values ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("fixture_name", "field", "value"),
    [
        ("pipeline_user_guid_installation.json", "userId", 42),
        ("pipeline_user_guid_installation.json", "userId", {"id": USER_GUID}),
        ("pipeline_team.json", "teamId", [TEAM_GUID]),
        ("pipeline_chat_external_id.json", "chatId", {"id": "19:a@thread.v2"}),
        ("pipeline_user_guid_installation.json", "appInstallationId", 123),
        ("pipeline_user_upn_teams_app.json", "teamsAppId", True),
        ("pipeline_chat_external_id.json", "externalId", 1.5),
        ("pipeline_user_guid_installation.json", "requestId", 7),
        ("pipeline_user_upn_teams_app.json", "ifNotInstalled", True),
        ("pipeline_consented_permissions.json", "consentedPermissionSet", "TeamsActivity.Send.User"),
        ("pipeline_consented_permissions.json", "consentedPermissionSet", [{"permissionValue": "A"}]),
        ("fanout_user_ids.json", "userIds", USER_GUID),
        ("fanout_group.json", "groupId", 12345),
    ],
    ids=lambda value: value if isinstance(value, str) and not value.endswith(".json") else None,
)
def test_field_of_the_wrong_type_is_refused_naming_the_field(fixture_name: str, field: str, value: Any) -> None:
    reason = refusal(with_fields(fixture_name, **{field: value}))
    assert field in reason


@pytest.mark.parametrize(
    ("fixture_name", "field"),
    [
        ("pipeline_user_guid_installation.json", "userId"),
        ("pipeline_team.json", "teamId"),
        ("pipeline_chat_external_id.json", "chatId"),
        ("pipeline_user_guid_installation.json", "appInstallationId"),
        ("pipeline_user_upn_teams_app.json", "teamsAppId"),
        ("pipeline_chat_external_id.json", "externalId"),
        ("fanout_group.json", "groupId"),
    ],
)
def test_empty_id_is_refused_naming_the_field(fixture_name: str, field: str) -> None:
    assert field in refusal(with_fields(fixture_name, **{field: ""}))


# --- a GUID where a GUID is required ------------------------------------------------------------


@pytest.mark.parametrize(
    ("fixture_name", "field"),
    [
        ("pipeline_team.json", "teamId"),
        ("pipeline_user_upn_teams_app.json", "teamsAppId"),
        ("fanout_group.json", "groupId"),
    ],
)
@pytest.mark.parametrize(
    "value",
    [
        "contoso-helpdesk",
        "{02bd9fd6-8f93-4758-87c3-1fb73740a315}",
        "02bd9fd68f93475887c31fb73740a315",
        "02bd9fd6-8f93-4758-87c3-1fb73740a31",
        "02bd9fd6-8f93-4758-87c3-1fb73740a315/../../me",
        "02bd9fd6-8f93-4758-87c3-1fb73740a315 ",
        "g2bd9fd6-8f93-4758-87c3-1fb73740a315",
    ],
)
def test_non_guid_where_a_guid_is_required_is_refused(fixture_name: str, field: str, value: str) -> None:
    assert field in refusal(with_fields(fixture_name, **{field: value}))


def test_upper_case_guid_is_accepted() -> None:
    body = with_fields("pipeline_team.json", teamId=TEAM_GUID.upper())
    assert upgrade(body).target == Target(Scope.TEAM, TEAM_GUID.upper())


# --- user principal names -----------------------------------------------------------------------

UPN_113 = "a" * (113 - len("@contoso.com")) + "@contoso.com"


@pytest.mark.parametrize(
    "upn",
    [
        "adele.vance@contoso.com",
        GUEST_UPN,
        "o'neil@contoso.com",
        "Megan.Bowen-Smith_2@sub.contoso.co.uk",
        "a!b#c^d~e'f.g-h_i@contoso.onmicrosoft.com",
        "ADELE@CONTOSO.COM",
        "x@a-b.contoso.io",
        UPN_113,
    ],
)
def test_user_principal_name_accepted(upn: str) -> None:
    # given a single-user request naming the user by UPN
    body = with_fields("pipeline_user_upn_teams_app.json", userId=upn)
    # then the UPN is the target, unchanged
    assert upgrade(body).target == Target(Scope.USER, upn)


@pytest.mark.parametrize(
    "upn",
    [
        "adele",
        "adele@",
        "@contoso.com",
        "adele vance@contoso.com",
        "ad\xe8le@contoso.com",
        "adele(x)@contoso.com",
        "adele/../me@contoso.com",
        "adele%40@contoso.com",
        "adele+tag@contoso.com",
        "adele@bob@contoso.com",
        "adele@contoso..com",
        "adele@-contoso.com",
        "adele@contoso-.com",
        "adele@contoso.com/",
        "adele@contoso.com/../../users",
        "adele@contoso.com?$select=id",
        "adele@contoso.com#x",
        "adele@contoso .com",
        "adele@[10.0.0.1]",
        "adele@contoso.com\n",
        "a" * (114 - len("@contoso.com")) + "@contoso.com",
    ],
    ids=repr,
)
def test_user_principal_name_refused(upn: str) -> None:
    assert "userId" in refusal(with_fields("pipeline_user_upn_teams_app.json", userId=upn))


# --- installation ids ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "installation_id",
    [
        USER_INSTALLATION,
        USER_INSTALLATION.rstrip("="),
        "ab+cd_ef-gh==",
        "Z" * 256,
    ],
    ids=["doc-example", "unpadded", "base64-and-base64url-chars", "256-chars"],
)
def test_installation_id_accepted(installation_id: str) -> None:
    body = with_fields("pipeline_user_guid_installation.json", appInstallationId=installation_id)
    assert upgrade(body).app == AppRef(AppKind.INSTALLATION, installation_id)


@pytest.mark.parametrize(
    "installation_id",
    [
        "NWI2NDk4/MzQt",
        "..",
        "abc.def",
        "abc%2Fdef",
        "abc def",
        "abc?x=1",
        "abc#x",
        "abc:def",
        "ab\xe7d",
        "Z" * 257,
    ],
    ids=repr,
)
def test_installation_id_refused(installation_id: str) -> None:
    body = with_fields("pipeline_user_guid_installation.json", appInstallationId=installation_id)
    assert "appInstallationId" in refusal(body)


# --- chat ids -----------------------------------------------------------------------------------

CHAT_512 = "19:" + "a" * (512 - len("19:") - len("@thread.v2")) + "@thread.v2"


@pytest.mark.parametrize(
    "chat_id",
    [
        "19:561082c0f3f847a58069deb8eb300807@thread.v2",
        "19:8ea0e38b-efb3-4757-924a-5f94061cf8c2_97f62344-57dc-409c-88ad-c4af14158ff5@unq.gbl.spaces",
        "19:meeting_MjdhNjM4YzUtYzExZi00OTFkLTkzZTAtNTVlNmZmMDhkNGU2@thread.v2",
        CHAT_512,
    ],
    ids=["group-chat", "one-on-one", "meeting-chat", "512-chars"],
)
def test_chat_id_accepted(chat_id: str) -> None:
    body = with_fields("pipeline_chat_external_id.json", chatId=chat_id)
    assert upgrade(body).target == Target(Scope.CHAT, chat_id)


@pytest.mark.parametrize(
    "chat_id",
    [
        "561082c0f3f847a58069deb8eb300807",
        "19:561082c0f3f847a58069deb8eb300807",
        "19:561082c0f3f847a58069deb8eb300807@thread.tacv2",
        "20:561082c0f3f847a58069deb8eb300807@thread.v2",
        "19:@thread.v2",
        "19:561082c0/../../users@thread.v2",
        "19:561082c0f3f847a58069deb8eb300807@thread.v2/installedApps",
        "19:561082c0f3f847a58069deb8eb300807@thread.v2?x=1",
        "19:5610 82c0@thread.v2",
        "19:" + "a" * (513 - len("19:") - len("@thread.v2")) + "@thread.v2",
    ],
    ids=repr,
)
def test_chat_id_refused(chat_id: str) -> None:
    assert "chatId" in refusal(with_fields("pipeline_chat_external_id.json", chatId=chat_id))


# --- external ids -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "external_id",
    [
        "com.contoso.helpdesk",
        "cf1ba4c7-f94e-4d80-ba90-5594b641a8ee",
        "O'Brien's Helpdesk",
        "''",
        "Contoso \xdcn\xeec\xf6d\xe9 \u52a9\u624b",
        "a & b / c ? d # e % f",
        "x" * 256,
    ],
    ids=repr,
)
def test_external_id_accepted_as_given(external_id: str) -> None:
    body = with_fields("pipeline_chat_external_id.json", externalId=external_id)
    assert upgrade(body).app == AppRef(AppKind.EXTERNAL_ID, external_id)


@pytest.mark.parametrize(
    "external_id",
    ["com.contoso\nhelpdesk", "tab\there", "nul\x00", "bell\x07", "del\x7f", "x" * 257],
    ids=repr,
)
def test_external_id_refused(external_id: str) -> None:
    body = with_fields("pipeline_chat_external_id.json", externalId=external_id)
    assert "externalId" in refusal(body)


# --- consentedPermissionSet ---------------------------------------------------------------------


def permissions(*entries: dict[str, Any]) -> dict[str, Any]:
    return {"resourceSpecificPermissions": list(entries)}


def entry(value: Any = "TeamsActivity.Send.User", kind: Any = "Application") -> dict[str, Any]:
    return {"permissionValue": value, "permissionType": kind}


@pytest.mark.parametrize("kind", ["Application", "Delegated", "application", "delegated", "APPLICATION", "dElEgAtEd"])
def test_permission_type_in_any_letter_case_is_accepted_and_sent_as_given(kind: str) -> None:
    # given a permission type spelled as the producer likes
    consent = permissions(entry("ChatMember.Read.Chat", kind))
    body = with_fields("pipeline_consented_permissions.json", consentedPermissionSet=consent)
    # then Graph gets it exactly as the producer spelled it
    assert upgrade(body).consented_permission_set == consent


def test_docs_chat_example_with_mixed_permission_types_is_forwarded_as_is() -> None:
    consent = permissions(
        entry("OnlineMeeting.ReadBasic.Chat", "Delegated"),
        entry("ChatMember.Read.Chat", "Application"),
    )
    body = with_fields("pipeline_chat_external_id.json", consentedPermissionSet=consent)
    assert upgrade(body).consented_permission_set == consent


@pytest.mark.parametrize("value", ["TeamsActivity.Send.User", "A", "Chat.Manage.Chat", "a1.b2"])
def test_permission_value_matching_the_rule_is_accepted(value: str) -> None:
    consent = permissions(entry(value))
    body = with_fields("pipeline_consented_permissions.json", consentedPermissionSet=consent)
    assert upgrade(body).consented_permission_set == consent


@pytest.mark.parametrize(
    "value",
    ["", "1Team.Read", ".Read", "Teams Activity", "Team/Read", "Team_Read", "Team-Read", "Tëam", 5, None],
    ids=repr,
)
def test_permission_value_breaking_the_rule_is_refused(value: Any) -> None:
    consent = permissions(entry(value))
    reason = refusal(with_fields("pipeline_consented_permissions.json", consentedPermissionSet=consent))
    assert "permissionValue" in reason


@pytest.mark.parametrize("kind", ["", "Both", "App", "Applications", 1, None], ids=repr)
def test_permission_type_other_than_application_or_delegated_is_refused(kind: Any) -> None:
    consent = permissions(entry(kind=kind))
    reason = refusal(with_fields("pipeline_consented_permissions.json", consentedPermissionSet=consent))
    assert "permissionType" in reason


def test_fifty_permissions_are_accepted() -> None:
    consent = permissions(*[entry(f"Perm{i}.Read") for i in range(50)])
    body = with_fields("pipeline_consented_permissions.json", consentedPermissionSet=consent)
    assert upgrade(body).consented_permission_set == consent


def test_fifty_one_permissions_are_refused() -> None:
    consent = permissions(*[entry(f"Perm{i}.Read") for i in range(51)])
    reason = refusal(with_fields("pipeline_consented_permissions.json", consentedPermissionSet=consent))
    assert "consentedPermissionSet" in reason


@pytest.mark.parametrize(
    "consent",
    [
        {},
        {"resourceSpecificPermissions": "TeamsActivity.Send.User"},
        {"resourceSpecificPermissions": {"permissionValue": "A", "permissionType": "Application"}},
        {"resourceSpecificPermissions": ["TeamsActivity.Send.User"]},
        {"permissions": [entry()]},
    ],
    ids=["empty-object", "list-is-a-string", "list-is-an-object", "entry-is-a-string", "wrong-key"],
)
def test_permission_set_of_the_wrong_shape_is_refused(consent: Any) -> None:
    reason = refusal(with_fields("pipeline_consented_permissions.json", consentedPermissionSet=consent))
    assert "consentedPermissionSet" in reason


# --- ifNotInstalled -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "skips"),
    [(..., False), ("deadletter", False), ("skip", True)],
    ids=["absent-defaults-to-deadletter", "deadletter", "skip"],
)
def test_if_not_installed_decides_what_a_missing_installation_does(value: Any, skips: bool) -> None:
    body = with_fields("pipeline_user_upn_teams_app.json", ifNotInstalled=value)
    assert upgrade(body).skip_if_not_installed is skips


@pytest.mark.parametrize("value", ["", "ignore", "dead-letter", "complete", 0, ["skip"]], ids=repr)
def test_if_not_installed_other_values_are_refused(value: Any) -> None:
    body = with_fields("pipeline_user_upn_teams_app.json", ifNotInstalled=value)
    assert "ifNotInstalled" in refusal(body)


# --- requestId ----------------------------------------------------------------------------------


def test_request_id_is_carried() -> None:
    body = with_fields("pipeline_team.json", requestId="ado-run-8812/stage-prod")
    assert upgrade(body).request_id == "ado-run-8812/stage-prod"


def test_long_request_id_does_not_make_a_valid_request_invalid() -> None:
    # given a producer whose ids are longer than 256 characters (e.g. a composed pipeline run URL)
    request_id = "https://dev.azure.com/contoso/releases/_build/results?buildId=8812&view=" + "x" * 250
    body = with_fields("pipeline_team.json", requestId=request_id)
    # then the upgrade still goes ahead and the id is carried
    assert upgrade(body).request_id == request_id


# --- fan-out (§6) -------------------------------------------------------------------------------


def test_fan_out_with_both_user_ids_and_group_id_is_refused() -> None:
    reason = refusal(with_fields("fanout_user_ids.json", groupId=GROUP_GUID))
    assert "userIds" in reason
    assert "groupId" in reason


@pytest.mark.parametrize("name", ["fanout_user_ids.json", "fanout_group.json"])
def test_fan_out_with_an_installation_id_is_refused(name: str) -> None:
    # an installation id belongs to one user, so it cannot fan out
    document = fixture(name)
    document.pop("teamsAppId", None)
    document.pop("externalId", None)
    document["appInstallationId"] = USER_INSTALLATION
    assert "appInstallationId" in refusal(encode(document))


def test_fan_out_with_both_teams_app_id_and_external_id_is_refused() -> None:
    reason = refusal(with_fields("fanout_user_ids.json", externalId="com.contoso.helpdesk"))
    assert "teamsAppId" in reason
    assert "externalId" in reason


def test_fan_out_to_1000_users_is_accepted() -> None:
    users = [f"user{i}@contoso.com" for i in range(1000)]
    request = fan_out(with_fields("fanout_user_ids.json", userIds=users))
    assert request.user_ids == tuple(users)


def test_fan_out_to_1001_users_is_refused() -> None:
    users = [f"user{i}@contoso.com" for i in range(1001)]
    assert "userIds" in refusal(with_fields("fanout_user_ids.json", userIds=users))


def test_fan_out_to_no_users_is_refused() -> None:
    assert "userIds" in refusal(with_fields("fanout_user_ids.json", userIds=[]))


@pytest.mark.parametrize(
    "bad",
    ["adele", "adele@contoso.com/../../x", "", 42, None, "a" * 114 + "@contoso.com"],
    ids=repr,
)
def test_fan_out_with_one_invalid_user_id_is_refused_naming_it(bad: Any) -> None:
    # given three good users and one bad one at index 2
    users = [USER_GUID, "adele.vance@contoso.com", bad, GUEST_UPN]
    reason = refusal(with_fields("fanout_user_ids.json", userIds=users))
    # then the refusal points at the bad entry
    assert "userIds" in reason
    assert "2" in reason


def test_group_id_must_be_a_guid() -> None:
    assert "groupId" in refusal(with_fields("fanout_group.json", groupId="all-staff@contoso.com"))


# --- versions and rollouts (§8) -----------------------------------------------------------------


def test_version_and_rollout_id_are_read_and_compared_part_by_part() -> None:
    request = parse_request(
        encode({"userId": USER_GUID, "teamsAppId": TEAMS_APP_ID, "version": "2.4", "rolloutId": "rel-2.4_a"})
    )
    assert isinstance(request, UpgradeRequest)
    assert request.rollout_id == "rel-2.4_a"
    assert request.version == Version.parse("2.4.0")  # a missing part counts as 0
    assert Version.parse("2.10.0") > Version.parse("2.9.9") > Version.parse("2.9")
    assert str(request.version) == "2.4"


def test_a_fan_out_carries_its_version_and_rollout() -> None:
    request = parse_request(
        encode({"groupId": GROUP_GUID, "teamsAppId": TEAMS_APP_ID, "version": "1.4.0", "rolloutId": "r1"})
    )
    assert isinstance(request, FanOutRequest)
    assert (str(request.version), request.rollout_id) == ("1.4.0", "r1")


@pytest.mark.parametrize("version", ["", "v1.4", "1.4.0-beta", "1..4", "1.4.", "1.2.3.4.5", "\uff11.4", 14, "1e3"])
def test_a_version_that_is_not_dotted_numbers_is_invalid(version: Any) -> None:
    with pytest.raises(InvalidMessageError, match="version"):
        parse_request(encode({"userId": USER_GUID, "teamsAppId": TEAMS_APP_ID, "version": version}))


@pytest.mark.parametrize("rollout_id", ["", "x" * 129, "rel 2.4", "rel/2.4", "rel#1", "réel", 7])
def test_a_rollout_id_outside_its_alphabet_or_length_is_invalid(rollout_id: Any) -> None:
    with pytest.raises(InvalidMessageError, match="rolloutId"):
        parse_request(encode({"userId": USER_GUID, "teamsAppId": TEAMS_APP_ID, "rolloutId": rollout_id}))


def test_a_rollout_id_of_128_characters_is_accepted() -> None:
    request = parse_request(encode({"userId": USER_GUID, "teamsAppId": TEAMS_APP_ID, "rolloutId": "r" * 128}))
    assert request.rollout_id == "r" * 128
