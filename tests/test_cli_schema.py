"""The JSON Schema of a request agrees with the function's parser, which stays the authority."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from upgrade_handler.cli.schema import request_schema, schema_error
from upgrade_handler.errors import InvalidMessageError
from upgrade_handler.messages import parse_request

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = sorted((ROOT / "tests" / "fixtures").glob("*.json"))
SAMPLES = sorted((ROOT / "upgrade_handler" / "samples").glob("*.json"))
GUID = "a6b63365-31a4-4f43-92ec-710b71557af9"
CHAT = "19:561082c0f3f847a58069deb8eb300807@thread.v2"


def parser_accepts(document: Any) -> bool:
    try:
        parse_request(json.dumps(document).encode())
    except InvalidMessageError:
        return False
    return True


def test_the_schema_is_a_valid_draft_2020_12_schema():
    from jsonschema import Draft202012Validator

    Draft202012Validator.check_schema(request_schema())


@pytest.mark.parametrize("path", FIXTURES + SAMPLES, ids=lambda p: p.name)
def test_every_fixture_and_sample_is_valid_for_both(path):
    document = json.loads(path.read_text(encoding="utf-8"))
    assert parser_accepts(document)
    assert schema_error(document) is None


INVALID = {
    "no scope": {"teamsAppId": GUID},
    "two scopes": {"userId": GUID, "teamId": GUID, "teamsAppId": GUID},
    "no app": {"userId": GUID},
    "two apps": {"userId": GUID, "teamsAppId": GUID, "externalId": "x"},
    "user id with a space": {"userId": "adele vance@contoso.com", "teamsAppId": GUID},
    "user id without a domain": {"userId": "adele@", "teamsAppId": GUID},
    "UPN too long": {"userId": "a" * 110 + "@contoso.com", "teamsAppId": GUID},
    "team id not a GUID": {"teamId": "team-1", "teamsAppId": GUID},
    "chat id of another shape": {"chatId": "19:abc@thread.skype", "teamsAppId": GUID},
    "installation id with a slash": {"userId": GUID, "appInstallationId": "a/b"},
    "installation id too long": {"userId": GUID, "appInstallationId": "a" * 257},
    "teamsAppId not a GUID": {"userId": GUID, "teamsAppId": "helpdesk"},
    "externalId with a control character": {"userId": GUID, "externalId": "com.contoso\u0007"},
    "empty externalId": {"userId": GUID, "externalId": ""},
    "userId a number": {"userId": 42, "teamsAppId": GUID},
    "permission of no type": {
        "userId": GUID,
        "teamsAppId": GUID,
        "consentedPermissionSet": {"resourceSpecificPermissions": [{"permissionValue": "A.B"}]},
    },
    "permission of an unknown type": {
        "userId": GUID,
        "teamsAppId": GUID,
        "consentedPermissionSet": {
            "resourceSpecificPermissions": [{"permissionValue": "A.B", "permissionType": "Admin"}]
        },
    },
    "permission value with a space": {
        "userId": GUID,
        "teamsAppId": GUID,
        "consentedPermissionSet": {
            "resourceSpecificPermissions": [{"permissionValue": "A B", "permissionType": "Application"}]
        },
    },
    "51 permissions": {
        "userId": GUID,
        "teamsAppId": GUID,
        "consentedPermissionSet": {
            "resourceSpecificPermissions": [{"permissionValue": "A", "permissionType": "Application"}] * 51
        },
    },
    "permission set without its list": {"userId": GUID, "teamsAppId": GUID, "consentedPermissionSet": {}},
    "ifNotInstalled of another word": {"userId": GUID, "teamsAppId": GUID, "ifNotInstalled": "ignore"},
    "requestId a number": {"userId": GUID, "teamsAppId": GUID, "requestId": 7},
    "fan-out by installation id": {"userIds": [GUID], "appInstallationId": "abc"},
    "fan-out of nobody": {"userIds": [], "teamsAppId": GUID},
    "fan-out of 1001": {"userIds": [GUID] * 1001, "teamsAppId": GUID},
    "fan-out with a bad user": {"userIds": [GUID, "nobody"], "teamsAppId": GUID},
    "group id not a GUID": {"groupId": "all-staff", "teamsAppId": GUID},
    "group continuation empty": {"groupId": GUID, "teamsAppId": GUID, "groupNextLink": ""},
    "array body": [{"userId": GUID, "teamsAppId": GUID}],
    "string body": "upgrade please",
    "CloudEvent of another version": {
        "specversion": "0.3",
        "type": "t",
        "source": "s",
        "id": "1",
        "data": {"userId": GUID, "teamsAppId": GUID},
    },
    "CloudEvent without source": {
        "specversion": "1.0",
        "type": "t",
        "id": "1",
        "data": {"userId": GUID, "teamsAppId": GUID},
    },
    "CloudEvent data a string": {"specversion": "1.0", "type": "t", "source": "s", "id": "1", "data": "x"},
    "Event Grid without dataVersion": {
        "eventType": "e",
        "subject": "s",
        "id": "1",
        "data": {"userId": GUID, "teamsAppId": GUID},
    },
    "Event Grid data invalid": {
        "eventType": "e",
        "subject": "s",
        "id": "1",
        "dataVersion": "1",
        "data": {"userId": GUID},
    },
}


@pytest.mark.parametrize("document", INVALID.values(), ids=INVALID.keys())
def test_invalid_bodies_are_invalid_for_both(document):
    assert not parser_accepts(document)
    assert schema_error(document) is not None


VALID_EDGES = {
    "null counts as absent": {"userId": None, "teamId": GUID, "teamsAppId": GUID},
    "ifNotInstalled in any case": {"userId": GUID, "teamsAppId": GUID, "ifNotInstalled": "SKIP"},
    "permission type in any case": {
        "chatId": CHAT,
        "externalId": "x",
        "consentedPermissionSet": {
            "resourceSpecificPermissions": [{"permissionValue": "Chat.Read.Chat", "permissionType": "delegated"}]
        },
    },
    "guest UPN": {"userId": "ann_fabrikam.com#EXT#@contoso.onmicrosoft.com", "teamsAppId": GUID},
    "unknown fields": {"userId": GUID, "teamsAppId": GUID, "priority": "high"},
    "fan-out ignores ifNotInstalled": {"userIds": [GUID], "teamsAppId": GUID, "ifNotInstalled": "whatever"},
    "group continuation": {"groupId": GUID, "externalId": "x", "groupNextLink": "https://graph.microsoft.com/v1.0/x"},
}


@pytest.mark.parametrize("document", VALID_EDGES.values(), ids=VALID_EDGES.keys())
def test_edge_cases_are_valid_for_both(document):
    assert parser_accepts(document)
    assert schema_error(document) is None


# Values each field may take, good and bad, from which random requests are drawn.
FIELD_VALUES: dict[str, list[Any]] = {
    "userId": [GUID, "adele.vance@contoso.com", "adele vance@contoso.com", "x@y", "", None, 5],
    "teamId": [GUID, "team", None],
    "chatId": [CHAT, "19:x@thread.skype", None],
    "userIds": [[GUID], ["a@contoso.com", GUID], [], ["bad"], None, "a@contoso.com"],
    "groupId": [GUID, "g", None],
    "appInstallationId": ["YWJj", "a/b", "", None],
    "teamsAppId": [GUID, "app", None],
    "externalId": ["com.contoso.helpdesk", "", "x\n", None],
    "requestId": ["r-1", "", 3, None],
    "ifNotInstalled": ["skip", "DeadLetter", "no", None],
    "consentedPermissionSet": [
        None,
        {"resourceSpecificPermissions": []},
        {"resourceSpecificPermissions": [{"permissionValue": "A.B", "permissionType": "Application"}]},
        {"resourceSpecificPermissions": [{"permissionValue": "1A", "permissionType": "Application"}]},
        {"resourceSpecificPermissions": "all"},
        [],
    ],
    "groupNextLink": ["https://graph.microsoft.com/v1.0/groups", "", 1, None],
}

requests = st.fixed_dictionaries({}, optional={name: st.sampled_from(values) for name, values in FIELD_VALUES.items()})
envelopes = st.one_of(
    requests,
    requests.map(lambda data: {"specversion": "1.0", "type": "t", "source": "s", "id": "1", "data": data}),
    requests.map(lambda data: {"eventType": "e", "subject": "s", "dataVersion": "1", "id": "1", "data": data}),
)


@settings(max_examples=400, deadline=None)
@given(envelopes)
def test_schema_and_parser_agree_on_random_requests(document):
    assert parser_accepts(document) == (schema_error(document) is None), schema_error(document)
