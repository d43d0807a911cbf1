"""The function end to end: its real entry point, the Graph simulator, the identity endpoint and
the broker, with the real httpx, azure-identity and azure-servicebus clients on loopback.

One test per outcome of contract §2 and per row of the error classification.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import subprocess
import sys
import uuid
from datetime import timedelta
from typing import Any

import pytest
from azure.servicebus.exceptions import ServiceBusConnectionError

from standins.graph_simulator import Fault, GraphSimulator
from standins.servicebus_broker import ServiceBusBroker
from tests.conftest import DEADLETTER_QUEUE, UPGRADE_QUEUE
from tests.support import APP, APP_EXTERNAL, CHAT, TEAM, FakeClock, function_message, new_user
from upgrade_handler.handler import UpgradeHandler
from upgrade_handler.logs import redact_user
from upgrade_handler.settlement import iso_utc

pytestmark = pytest.mark.usefixtures("reset_stand_ins")


def dead_letters(broker: ServiceBusBroker) -> list[Any]:
    return broker.messages(DEADLETTER_QUEUE)


def retries(broker: ServiceBusBroker) -> list[Any]:
    return broker.messages(UPGRADE_QUEUE)


def upgrade_calls(graph: GraphSimulator) -> list[Any]:
    return [r for r in graph.requests if r.method == "POST"]


def only_dead_letter(broker: ServiceBusBroker) -> Any:
    letters = dead_letters(broker)
    assert len(letters) == 1, letters
    assert retries(broker) == []
    return letters[0]


# --- success ---------------------------------------------------------------------------------


async def test_upgrade_by_installation_id_upgrades_and_completes(invoke, graph, broker):
    user_id, _, installation = new_user(graph.tenant)
    message = function_message({"userId": user_id, "appInstallationId": installation, "requestId": "rel-42"})

    await invoke(message)

    assert graph.tenant.installation_version(installation) == "1.1.0"
    [call] = graph.requests
    assert call.method == "POST"
    assert call.segments == ("v1.0", "users", user_id, "teamwork", "installedApps", installation, "upgrade")
    assert call.headers["authorization"].startswith("Bearer sim-token-")
    assert uuid.UUID(call.headers["client-request-id"])
    assert call.headers["user-agent"].startswith("teams-app-upgrader/")
    assert call.body == b""
    assert dead_letters(broker) == [] and retries(broker) == []


@pytest.mark.parametrize("scope", ["upn", "team", "chat"])
async def test_every_scope_is_upgraded_at_its_own_path(invoke, graph, broker, scope):
    words: tuple[str, ...]
    if scope == "upn":
        _, upn, installation = new_user(graph.tenant)
        body, words = {"userId": upn}, ("users", upn, "teamwork", "installedApps")
    else:
        target = TEAM if scope == "team" else CHAT
        app = str(uuid.uuid4())
        graph.tenant.add_app(app, f"ext-{app}")
        installation = graph.tenant.install(scope, target, app)
        body = {"teamId": TEAM} if scope == "team" else {"chatId": CHAT}
        words = ("teams" if scope == "team" else "chats", target, "installedApps")

    await invoke(function_message({**body, "appInstallationId": installation}))

    [call] = graph.requests
    assert call.segments[1:] == (*words, installation, "upgrade")
    assert call.status == 204
    assert graph.tenant.installation_version(installation) == "1.1.0"
    assert dead_letters(broker) == []


async def test_consented_permission_set_is_forwarded_as_given(invoke, graph):
    user_id, _, installation = new_user(graph.tenant)
    permissions = {
        "resourceSpecificPermissions": [
            {"permissionValue": "TeamsActivity.Send.User", "permissionType": "application"},
            {"permissionValue": "OnlineMeeting.ReadBasic.Chat", "permissionType": "Delegated"},
        ]
    }

    await invoke(
        function_message({"userId": user_id, "appInstallationId": installation, "consentedPermissionSet": permissions})
    )

    [call] = graph.requests
    assert call.status == 204
    assert call.headers["content-type"].startswith("application/json")
    assert json.loads(call.body) == {"consentedPermissionSet": permissions}


@pytest.mark.parametrize("field", ["teamsAppId", "externalId"])
async def test_lookup_finds_the_installation_then_upgrades_it(invoke, graph, broker, field):
    app = str(uuid.uuid4())
    external = f"com.contoso.o'brien.{app[:8]}"
    graph.tenant.add_app(app, external)
    user_id, _, installation = new_user(graph.tenant, app=app)
    value = app if field == "teamsAppId" else external

    await invoke(function_message({"userId": user_id, field: value}))

    lookup, upgrade = graph.requests
    assert lookup.method == "GET" and lookup.status == 200
    filter_field = "id" if field == "teamsAppId" else "externalId"
    assert lookup.query["$filter"] == f"teamsApp/{filter_field} eq '{value.replace(chr(39), chr(39) * 2)}'"
    assert lookup.query["$expand"] == "teamsApp"
    assert upgrade.segments[-2:] == (installation, "upgrade") and upgrade.status == 204
    assert dead_letters(broker) == []


async def test_lookup_that_finds_nothing_is_dead_lettered_as_installation_not_found(invoke, graph, broker):
    user_id, _, _ = new_user(graph.tenant, app=None)

    await invoke(function_message({"userId": user_id, "teamsAppId": APP}, message_id="m-notfound"))

    letter = only_dead_letter(broker)
    assert letter.subject == "InstallationNotFound"
    assert letter.application_properties["DeadLetterReason"] == "InstallationNotFound"
    assert "GraphStatus" not in letter.application_properties
    assert letter.application_properties["UpgradeAttempts"] == 1
    assert [r.method for r in graph.requests] == ["GET"]


async def test_lookup_that_finds_nothing_with_skip_completes_quietly(invoke, graph, broker, caplog):
    user_id, _, _ = new_user(graph.tenant, app=None)
    caplog.set_level(logging.INFO, "upgrade_handler")

    await invoke(function_message({"userId": user_id, "externalId": APP_EXTERNAL, "ifNotInstalled": "skip"}))

    assert dead_letters(broker) == [] and retries(broker) == []
    assert any(r.getMessage().startswith("upgrade.skipped") for r in caplog.records)


@pytest.mark.parametrize("envelope", ["eventgrid", "cloudevents"])
async def test_envelopes_are_unwrapped(invoke, graph, broker, envelope):
    user_id, _, installation = new_user(graph.tenant)
    data = {"userId": user_id, "appInstallationId": installation}
    if envelope == "eventgrid":
        body = {
            "id": "evt-1",
            "eventType": "Contoso.AppCatalog.AppPublished",
            "subject": "apps/helpdesk",
            "dataVersion": "1.0",
            "eventTime": "2026-11-29T12:00:00Z",
            "data": data,
        }
    else:
        body = {"specversion": "1.0", "type": "Contoso.AppCatalog.AppPublished", "source": "/catalog", "id": "e1"}
        body["data"] = data

    await invoke(function_message(body))

    assert [r.status for r in graph.requests] == [204]
    assert dead_letters(broker) == []


# --- invalid messages -----------------------------------------------------------------------

INVALID_BODIES = {
    "not json": b"upgrade please",
    "not utf-8": b'{"userId": "\xff"}',
    "array": b'[{"userId": "a@b.com", "appInstallationId": "abc"}]',
    "no scope": b'{"appInstallationId": "abc"}',
    "two scopes": json.dumps({"userId": "a@contoso.com", "teamId": TEAM, "appInstallationId": "abc"}).encode(),
    "no app": json.dumps({"userId": "a@contoso.com"}).encode(),
    "slash in installation id": json.dumps({"userId": "a@contoso.com", "appInstallationId": "../../me"}).encode(),
    "team id not a guid": json.dumps({"teamId": "graph.microsoft.com", "appInstallationId": "abc"}).encode(),
    "bad upn": json.dumps({"userId": "a b@contoso.com", "appInstallationId": "abc"}).encode(),
    "bad chat id": json.dumps({"chatId": "19:abc@evil.com/x", "appInstallationId": "abc"}).encode(),
    "event data not object": json.dumps(
        {"id": "1", "eventType": "x", "subject": "s", "dataVersion": "1", "data": "userId"}
    ).encode(),
    "too big": b'{"userId": "a@contoso.com", "appInstallationId": "abc", "pad": "' + b"x" * 65_536 + b'"}',
}


@pytest.mark.parametrize("kind", INVALID_BODIES)
async def test_invalid_message_is_dead_lettered_without_calling_graph(invoke, graph, broker, identity, kind):
    tokens_before = identity.tokens_issued
    body = INVALID_BODIES[kind]

    await invoke(function_message(body, message_id=f"invalid-{kind}", correlation_id="corr-1"))

    letter = only_dead_letter(broker)
    assert letter.subject == "InvalidMessage"
    assert letter.body == body
    assert letter.message_id == f"invalid-{kind}"
    assert letter.correlation_id == "corr-1"
    properties = letter.application_properties
    assert properties["DeadLetterReason"] == "InvalidMessage"
    assert properties["DeadLetterErrorDescription"].startswith("invalid message: ")
    assert properties["UpgradeAttempts"] == 0
    assert graph.requests == []
    assert identity.tokens_issued == tokens_before


# --- permanent Graph errors -------------------------------------------------------------------


async def test_permanent_app_403_is_dead_lettered_with_the_graph_error(invoke, graph, broker, clock):
    app = str(uuid.uuid4())
    graph.tenant.add_app(app, f"builtin-{app}", permanent=True)
    user_id, _, installation = new_user(graph.tenant, app=app)
    message = function_message(
        {"userId": user_id, "appInstallationId": installation, "requestId": "rel-7"},
        message_id="m-403",
        correlation_id="release-2026.11",
        properties={"Producer": "release-pipeline", "BuildNumber": 20261129, "Big": 2**40},
        delivery_count=2,
    )

    await invoke(message)

    letter = only_dead_letter(broker)
    [call] = graph.requests
    p = letter.application_properties
    assert letter.body == message.get_body()
    assert letter.content_type == "application/json"
    assert letter.correlation_id == "release-2026.11"
    assert letter.message_id == "m-403"
    assert letter.subject == "GraphRequestRejected"
    assert p["Producer"] == "release-pipeline" and p["BuildNumber"] == 20261129
    assert p["Big"] == str(2**40)
    assert p["DeadLetterReason"] == "GraphRequestRejected"
    assert "403" in p["DeadLetterErrorDescription"] and "permanent app" in p["DeadLetterErrorDescription"]
    assert p["UpgradeAttempts"] == 1
    assert p["FailedAtUtc"] == iso_utc(clock.start)
    assert p["OriginalMessageId"] == "m-403"
    assert p["OriginalEnqueuedTimeUtc"] == "2026-11-29T11:59:00.250Z"
    assert p["OriginalDeliveryCount"] == 2
    assert p["GraphStatus"] == 403
    assert p["GraphErrorCode"] == "Forbidden"
    assert p["GraphInnerErrorCode"] == "AccessDenied"
    assert "permanent app" in p["GraphErrorMessage"]
    response_ids = json.loads(p["GraphError"])["error"]["innerError"]
    assert p["GraphRequestId"] == response_ids["request-id"]
    assert p["GraphClientRequestId"] == call.headers["client-request-id"]
    assert p["GraphDate"].endswith("GMT")
    assert not any(key in p for key in ("FirstAttemptUtc", "LastErrorStatus", "LastErrorCode"))


@pytest.mark.parametrize(
    ("status", "code", "message"),
    [
        (400, "BadRequest", "Invalid request body."),
        (404, "NotFound", "Not Found"),
        (409, "Conflict", "The app is being upgraded."),
        (412, "PreconditionFailed", "Failed to execute TeamsGraphService backend request IsUserAuthorized."),
        (403, "Forbidden", "Missing role permissions on the request."),
    ],
)
async def test_permanent_graph_errors_are_dead_lettered_at_once(invoke, graph, broker, clock, status, code, message):
    user_id, _, installation = new_user(graph.tenant)
    graph.script("upgrade", Fault.graph_error(status, code, message))

    await invoke(function_message({"userId": user_id, "appInstallationId": installation}))

    letter = only_dead_letter(broker)
    assert letter.application_properties["GraphStatus"] == status
    assert letter.application_properties["GraphErrorCode"] == code
    assert letter.application_properties["UpgradeAttempts"] == 1
    assert len(upgrade_calls(graph)) == 1
    assert clock.waits == []


async def test_unknown_installation_404_from_graph_is_rejected(invoke, graph, broker):
    user_id, _, _ = new_user(graph.tenant)

    await invoke(function_message({"userId": user_id, "appInstallationId": "bm90LWluc3RhbGxlZA=="}))

    letter = only_dead_letter(broker)
    assert letter.application_properties["GraphStatus"] == 404


# --- transient errors, inline --------------------------------------------------------------


async def test_backend_flake_400_is_retried_inline(invoke, graph, broker, clock):
    user_id, _, installation = new_user(graph.tenant)
    flake = (
        "Exception in CreateOrUpdateUserAppEntitlementForTeamsAsync. Microsoft.SkypeSpaces.MiddleTier.Common."
        "ServiceException: Failed to execute settings store request: https://amer.settings.teams.internal.office.com"
        ", StatusCode: 400, ReasonPhrase: Schema validation errors"
    )
    graph.script("upgrade", Fault.graph_error(400, "BadRequest", flake))

    await invoke(function_message({"userId": user_id, "appInstallationId": installation}))

    assert [r.status for r in upgrade_calls(graph)] == [400, 204]
    assert len(clock.waits) == 1 and 0.39 <= clock.waits[0] <= 0.61
    assert dead_letters(broker) == [] and retries(broker) == []


@pytest.mark.parametrize("status", [500, 502, 503, 504])
async def test_server_errors_are_retried_inline_then_succeed(invoke, graph, broker, clock, status):
    user_id, _, installation = new_user(graph.tenant)
    graph.script("upgrade", Fault(status), Fault(status))

    await invoke(function_message({"userId": user_id, "appInstallationId": installation}))

    assert [r.status for r in upgrade_calls(graph)] == [status, status, 204]
    assert len(clock.waits) == 2 and sum(clock.waits) <= 10
    assert dead_letters(broker) == [] and retries(broker) == []


async def test_connection_reset_is_retried_inline(invoke, graph, broker):
    user_id, _, installation = new_user(graph.tenant)
    graph.script("upgrade", Fault(reset=True))

    await invoke(function_message({"userId": user_id, "appInstallationId": installation}))

    assert [r.status for r in upgrade_calls(graph)] == [None, 204]
    assert dead_letters(broker) == [] and retries(broker) == []


@pytest.mark.parametrize(("retry_after", "waited"), [("2.128", 2.128), ("0", None), ("10", 10.0)])
async def test_short_retry_after_is_waited_inside_the_invocation(invoke, graph, broker, clock, retry_after, waited):
    user_id, _, installation = new_user(graph.tenant)
    graph.script("upgrade", Fault.throttled(retry_after))

    await invoke(function_message({"userId": user_id, "appInstallationId": installation}))

    assert [r.status for r in upgrade_calls(graph)] == [429, 204]
    assert clock.waits == ([] if waited is None else [waited])
    assert dead_letters(broker) == [] and retries(broker) == []


async def test_expired_token_401_is_retried_once_with_a_new_token(invoke, graph, broker, identity):
    user_id, _, installation = new_user(graph.tenant)
    await invoke(function_message({"userId": user_id, "appInstallationId": installation}))
    first_token = graph.requests[0].headers["authorization"]
    graph.clear_requests()
    identity.revoke_all()
    before = identity.tokens_issued

    await invoke(function_message({"userId": user_id, "appInstallationId": installation}))

    first, second = upgrade_calls(graph)
    assert (first.status, second.status) == (401, 204)
    assert first.headers["authorization"] == first_token
    assert second.headers["authorization"] != first_token
    assert identity.tokens_issued == before + 1
    assert dead_letters(broker) == []


async def test_401_that_comes_again_with_a_new_token_is_rejected(invoke, graph, broker, identity):
    user_id, _, installation = new_user(graph.tenant)
    graph.script("upgrade", Fault.graph_error(401, "InvalidAuthenticationToken", "Access token validation failure."))
    graph.script("upgrade", Fault.graph_error(401, "InvalidAuthenticationToken", "Access token validation failure."))

    await invoke(function_message({"userId": user_id, "appInstallationId": installation}))

    first, second = upgrade_calls(graph)
    assert first.headers["authorization"] != second.headers["authorization"]
    letter = only_dead_letter(broker)
    assert letter.subject == "GraphRequestRejected"
    assert letter.application_properties["GraphStatus"] == 401
    assert letter.application_properties["UpgradeAttempts"] == 2


# --- transient errors, scheduled -------------------------------------------------------------


@pytest.mark.parametrize(("retry_after", "delay"), [("30,120", 120.0), ("60", 60.0), ("10.5", 10.5)])
async def test_long_retry_after_schedules_a_retry_copy(invoke, graph, broker, clock, retry_after, delay):
    user_id, _, installation = new_user(graph.tenant)
    graph.script("upgrade", Fault.throttled(retry_after))
    message = function_message(
        {"userId": user_id, "appInstallationId": installation},
        message_id="m-throttled",
        correlation_id="corr-9",
        subject="upgrade",
        properties={"Producer": "pipeline"},
    )

    await invoke(message)

    assert len(upgrade_calls(graph)) == 1
    assert clock.waits == []
    assert dead_letters(broker) == []
    [retry] = retries(broker)
    assert retry.state == "scheduled"
    assert retry.message_id == "m-throttled:retry:1"
    assert retry.body == message.get_body()
    assert (retry.correlation_id, retry.subject, retry.content_type) == ("corr-9", "upgrade", "application/json")
    wait = (retry.scheduled_enqueue_time_utc - clock.now()).total_seconds()
    assert delay <= wait <= delay * 1.1 + 0.01
    p = retry.application_properties
    assert p["Producer"] == "pipeline"
    assert p["UpgradeAttempts"] == 1
    assert p["OriginalMessageId"] == "m-throttled"
    assert p["OriginalEnqueuedTimeUtc"] == "2026-11-29T11:59:00.250Z"
    assert p["FirstAttemptUtc"] == iso_utc(clock.start)
    assert p["LastErrorStatus"] == 429
    assert p["LastErrorCode"] == "TooManyRequests"


async def test_three_server_errors_hand_over_to_a_scheduled_retry_with_backoff(invoke, graph, broker, clock):
    user_id, _, installation = new_user(graph.tenant)
    graph.script("upgrade", Fault(503), Fault(502), Fault(500))

    await invoke(function_message({"userId": user_id, "appInstallationId": installation}, message_id="m-5xx"))

    assert len(upgrade_calls(graph)) == 3
    [retry] = retries(broker)
    assert retry.message_id == "m-5xx:retry:3"
    assert retry.application_properties["LastErrorStatus"] == 500
    wait = (retry.scheduled_enqueue_time_utc - clock.now()).total_seconds()
    assert 40 <= wait <= 48  # 10 s * 2^(3-1), plus at most 20% jitter


async def test_timeout_is_not_repeated_inline(invoke, graph, broker, clock):
    user_id, _, installation = new_user(graph.tenant)
    graph.script("upgrade", Fault(204, delay=2.0, passthrough=True))

    await invoke(function_message({"userId": user_id, "appInstallationId": installation}), graph_timeout=0.3)

    assert len(upgrade_calls(graph)) == 1
    [retry] = retries(broker)
    assert retry.application_properties["LastErrorCode"] == "Timeout"
    assert "LastErrorStatus" not in retry.application_properties


async def test_identity_endpoint_down_schedules_a_retry(invoke, graph, broker, identity):
    user_id, _, installation = new_user(graph.tenant)
    identity.fail_next(1, status=503)

    await invoke(function_message({"userId": user_id, "appInstallationId": installation}))

    assert graph.requests == []
    [retry] = retries(broker)
    assert retry.application_properties["LastErrorCode"] == "TokenUnavailable"
    assert "LastErrorStatus" not in retry.application_properties


async def test_a_retry_copy_carries_the_first_message_identity(invoke, graph, broker, clock):
    user_id, _, installation = new_user(graph.tenant)
    graph.script("upgrade", Fault.throttled("60"), Fault.throttled("60"))
    await invoke(function_message({"userId": user_id, "appInstallationId": installation}, message_id="first"))
    [copy] = retries(broker)
    broker.purge(UPGRADE_QUEUE)

    await invoke(
        function_message(
            copy.body, message_id=copy.message_id, properties=copy.application_properties, subject=copy.subject
        )
    )

    [second] = retries(broker)
    assert second.message_id == "first:retry:2"
    assert second.application_properties["OriginalMessageId"] == "first"
    assert second.application_properties["UpgradeAttempts"] == 2
    assert second.application_properties["FirstAttemptUtc"] == copy.application_properties["FirstAttemptUtc"]


async def test_spent_budget_dead_letters_with_retries_exhausted(invoke, graph, broker, clock):
    user_id, _, installation = new_user(graph.tenant)
    graph.script("upgrade", Fault(503))
    carried = {
        "UpgradeAttempts": 7,
        "OriginalMessageId": "orig-1",
        "OriginalEnqueuedTimeUtc": "2026-11-29T10:00:00.000Z",
        "FirstAttemptUtc": iso_utc(clock.now() - timedelta(hours=1)),
        "LastErrorStatus": 503,
        "LastErrorCode": "ServiceUnavailable",
        "Producer": "pipeline",
    }

    await invoke(
        function_message(
            {"userId": user_id, "appInstallationId": installation}, message_id="orig-1:retry:7", properties=carried
        )
    )

    letter = only_dead_letter(broker)
    p = letter.application_properties
    assert letter.message_id == "orig-1"
    assert p["DeadLetterReason"] == "RetriesExhausted"
    assert p["UpgradeAttempts"] == 8
    assert p["DeferredAttempts"] == 0
    assert p["OriginalMessageId"] == "orig-1"
    assert p["OriginalEnqueuedTimeUtc"] == "2026-11-29T10:00:00.000Z"
    assert p["GraphStatus"] == 503
    assert p["Producer"] == "pipeline"
    assert not any(key in p for key in ("FirstAttemptUtc", "LastErrorStatus", "LastErrorCode"))


async def test_a_throttling_storm_defers_and_never_spends_the_attempt_budget(invoke, graph, broker, clock):
    # given a request throttled on each of its 7 earlier attempts, all of them deferrals
    user_id, _, installation = new_user(graph.tenant)
    graph.script("upgrade", Fault.throttled("60"))
    carried = {
        "UpgradeAttempts": 7,
        "DeferredAttempts": 7,
        "OriginalMessageId": "storm",
        "FirstAttemptUtc": iso_utc(clock.now() - timedelta(hours=1)),
        "LastErrorStatus": 429,
        "LastErrorCode": "TooManyRequests",
    }
    # when Graph throttles it an eighth time (UPGRADE_MAX_ATTEMPTS is 8)
    await invoke(
        function_message(
            {"userId": user_id, "appInstallationId": installation}, message_id="storm:retry:7", properties=carried
        )
    )
    # then a retry is scheduled, counted as a deferral, and nothing is dead-lettered
    assert dead_letters(broker) == []
    [retry] = retries(broker)
    assert retry.message_id == "storm:retry:8"
    assert retry.application_properties["UpgradeAttempts"] == 8
    assert retry.application_properties["DeferredAttempts"] == 8


async def test_deferrals_end_at_the_retry_horizon(invoke, graph, broker, clock):
    # given a request first tried almost UPGRADE_MAX_RETRY_HOURS (24) ago
    user_id, _, installation = new_user(graph.tenant)
    graph.script("upgrade", Fault.throttled("60"))
    carried = {
        "UpgradeAttempts": 40,
        "DeferredAttempts": 40,
        "OriginalMessageId": "late",
        "FirstAttemptUtc": iso_utc(clock.now() - timedelta(hours=24) + timedelta(seconds=30)),
    }
    # when Graph asks for another minute
    await invoke(
        function_message(
            {"userId": user_id, "appInstallationId": installation}, message_id="late:retry:40", properties=carried
        )
    )
    # then the retry would come due past the horizon: RetriesExhausted with the last error
    letter = only_dead_letter(broker)
    p = letter.application_properties
    assert p["DeadLetterReason"] == "RetriesExhausted"
    assert "UPGRADE_MAX_RETRY_HOURS" in p["DeadLetterErrorDescription"]
    assert (p["GraphStatus"], p["UpgradeAttempts"], p["DeferredAttempts"]) == (429, 41, 41)


@pytest.mark.parametrize("retry_after", ["Fri, 31 Dec 9999 23:59:59 GMT", "99999999999999999999999", "864000"])
async def test_a_retry_after_beyond_the_horizon_ends_the_request_without_raising(invoke, graph, broker, retry_after):
    user_id, _, installation = new_user(graph.tenant)
    graph.script("upgrade", Fault.throttled(retry_after))

    await invoke(function_message({"userId": user_id, "appInstallationId": installation}))

    letter = only_dead_letter(broker)
    assert letter.application_properties["DeadLetterReason"] == "RetriesExhausted"
    assert letter.application_properties["GraphStatus"] == 429


async def test_a_first_401_on_the_last_inline_attempt_schedules_a_retry_with_a_new_token(
    invoke, graph, broker, identity
):
    user_id, _, installation = new_user(graph.tenant)
    expired = Fault.graph_error(401, "InvalidAuthenticationToken", "Access token validation failure.")
    graph.script("upgrade", Fault(503), Fault(503), expired)

    await invoke(function_message({"userId": user_id, "appInstallationId": installation}, message_id="m401"))

    # then the 401 is not yet permanent: a retry is scheduled
    assert dead_letters(broker) == []
    [retry] = retries(broker)
    assert retry.application_properties["LastErrorStatus"] == 401
    last_token = upgrade_calls(graph)[-1].headers["authorization"]
    broker.purge(UPGRADE_QUEUE)
    graph.clear_requests()
    before = identity.tokens_issued

    # when the retry comes and Graph refuses the newly acquired token too
    graph.script("upgrade", expired)
    await invoke(
        function_message(
            retry.body, message_id=retry.message_id, properties=retry.application_properties, delivery_count=1
        )
    )

    [call] = upgrade_calls(graph)
    assert call.headers["authorization"] != last_token
    assert identity.tokens_issued == before + 1
    letter = only_dead_letter(broker)
    assert letter.subject == "GraphRequestRejected"
    assert letter.application_properties["GraphStatus"] == 401
    assert letter.application_properties["UpgradeAttempts"] == 4


async def test_poison_guard_dead_letters_a_message_delivered_too_often(invoke, graph, broker):
    user_id, _, installation = new_user(graph.tenant)

    await invoke(function_message({"userId": user_id, "appInstallationId": installation}, delivery_count=5))

    letter = only_dead_letter(broker)
    assert letter.application_properties["DeadLetterReason"] == "RetriesExhausted"
    assert letter.application_properties["UpgradeAttempts"] == 0
    assert letter.application_properties["OriginalDeliveryCount"] == 5
    assert graph.requests == []


async def test_below_the_poison_guard_a_redelivered_message_is_processed(invoke, graph, broker):
    user_id, _, installation = new_user(graph.tenant)

    await invoke(function_message({"userId": user_id, "appInstallationId": installation}, delivery_count=4))

    assert [r.status for r in graph.requests] == [204]
    assert dead_letters(broker) == []


# --- settlement sends failing ------------------------------------------------------------------


async def test_dead_letter_send_failing_makes_the_function_raise(invoke, graph, broker):
    broker.fail_sends(DEADLETTER_QUEUE)
    try:
        with pytest.raises(Exception, match=r"(?i)error|refused|fail"):
            await invoke(function_message(b"not json"))
    finally:
        broker.fail_sends(DEADLETTER_QUEUE, count=0)
    assert dead_letters(broker) == []


async def test_retry_send_failing_makes_the_function_raise_and_the_redelivery_schedules_the_same_retry(
    invoke, graph, broker
):
    user_id, _, installation = new_user(graph.tenant)
    graph.script("upgrade", Fault.throttled("60"), Fault.throttled("60"))
    message = function_message({"userId": user_id, "appInstallationId": installation}, message_id="m-redeliver")
    broker.fail_sends(UPGRADE_QUEUE, count=1)

    with pytest.raises(Exception):  # noqa: B017, PT011 - whatever the SDK raises must reach the host
        await invoke(message)
    assert retries(broker) == []

    # Service Bus delivers the abandoned message again: it names its retry as the first delivery did
    # (§4), since that delivery's send may have reached the queue after all.
    await invoke(
        function_message(message.get_body(), message_id="m-redeliver", delivery_count=2),
    )
    [retry] = retries(broker)
    assert retry.application_properties["UpgradeAttempts"] == 1
    assert retry.message_id == "m-redeliver:retry:1"


async def test_a_send_that_reached_the_queue_but_failed_starts_no_second_retry_chain(make_handler, graph, broker):
    """Issue: the queue held both m1:retry:1 and m1:retry:2 after an acknowledgement was lost."""
    user_id, _, installation = new_user(graph.tenant)
    graph.script("upgrade", Fault.throttled("60"), Fault.throttled("60"))
    handler = make_handler()
    real = handler.sender

    class AcknowledgementLost:
        """Sends for real, then reports a failure, as a link that drops after the broker accepted."""

        async def send(self, queue: str, messages: Any) -> None:
            await real.send(queue, messages)
            raise ServiceBusConnectionError(message="link detached after the send")

    lossy = UpgradeHandler(
        handler.settings, graph=handler.graph, tokens=handler.tokens, sender=AcknowledgementLost(), clock=handler.clock
    )
    message = function_message({"userId": user_id, "appInstallationId": installation}, message_id="m1")
    with pytest.raises(ServiceBusConnectionError):
        await lossy.handle_function_message(message)

    await handler.handle_function_message(function_message(message.get_body(), message_id="m1", delivery_count=2))

    assert sorted(r.message_id for r in retries(broker)) == ["m1:retry:1"]


# --- process-wide behaviour ------------------------------------------------------------------


async def test_one_hundred_concurrent_invocations_share_one_token(invoke, graph, broker, identity):
    users = [new_user(graph.tenant) for _ in range(100)]
    before = identity.tokens_issued

    await asyncio.gather(*(invoke(function_message({"userId": u, "appInstallationId": i})) for u, _, i in users))

    assert identity.tokens_issued == before + 1
    assert sorted(r.status for r in graph.requests) == [204] * 100
    assert dead_letters(broker) == [] and retries(broker) == []


async def test_logs_carry_ids_but_never_secrets_or_user_names(invoke, graph, broker, identity, caplog):
    caplog.set_level(logging.DEBUG)
    _, upn, installation = new_user(graph.tenant)
    graph.script("upgrade", Fault(502))
    await invoke(function_message({"userId": upn, "appInstallationId": installation, "requestId": "rel-1"}))
    await invoke(function_message({"userId": upn, "appInstallationId": "bm90LWluc3RhbGxlZA=="}))

    text = "\n".join(record.getMessage() for record in caplog.records)
    tokens = {r.headers["authorization"].removeprefix("Bearer ") for r in graph.requests}
    assert tokens and not any(token in text for token in tokens)
    assert identity.environment()["IDENTITY_HEADER"] not in text
    assert re.search(r"Bearer\s+[\w.-]", text) is None
    ours = "\n".join(r.getMessage() for r in caplog.records if r.name.startswith("upgrade_handler"))
    assert "authorization" not in ours.lower() and "sim-token" not in ours
    assert upn not in text
    assert "upgrade.succeeded" in text and "upgrade.dead_lettered" in text and "upgrade.attempt_failed" in text
    succeeded = next(r.getMessage() for r in caplog.records if r.getMessage().startswith("upgrade.succeeded"))
    assert "request_id=rel-1" in succeeded and "graph_request_id=" in succeeded and "client_request_id=" in succeeded
    assert "budget_wait_ms=0" in succeeded  # §7: every success says how long it waited for its turn


async def test_a_user_name_that_graph_quotes_never_reaches_the_logs(invoke, graph, broker, caplog):
    """Issue: ``upgrade.dead_lettered`` quoted Graph's "User Id 'nobody.here@contoso.com' not found"."""
    caplog.set_level(logging.DEBUG)
    upn = "nobody.here@contoso.com"
    graph.script("upgrade", Fault.graph_error(404, "NotFound", f"User Id '{upn}' not found"))

    await invoke(function_message({"userId": upn, "appInstallationId": "bm90LWluc3RhbGxlZA=="}))

    letter = only_dead_letter(broker)
    assert upn in letter.application_properties["GraphErrorMessage"]  # the operator's copy keeps it
    lines = [r.getMessage() for r in caplog.records]
    fields = [str(getattr(r, "fields", "")) for r in caplog.records]
    assert any("upgrade.dead_lettered" in line for line in lines)
    assert not any(upn in text for text in lines + fields)
    pseudonym = redact_user(upn)
    assert any(f"User Id '{pseudonym}' not found" in line for line in lines)


def test_trigger_binding_matches_the_contract(trigger):
    binding = json.loads(trigger.get_raw_bindings()[0])
    assert binding["type"] == "serviceBusTrigger"
    assert binding["queueName"] == "%UPGRADE_QUEUE_NAME%"
    assert binding["connection"] == "ServiceBusConnection"


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("GRAPH_BASE_URL", "https://graph.microsoft.com.evil.example"),
        ("UPGRADE_MAX_ATTEMPTS", "many"),
        ("ServiceBusConnection", ""),
    ],
)
def test_bad_app_setting_stops_the_function_from_starting(environment, name, value):
    env = {**environment, name: value}
    if name == "ServiceBusConnection":
        env.pop(name)
    result = subprocess.run(
        [sys.executable, "-c", "import function_app"], env=env, capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode != 0
    assert name in result.stderr and "ConfigurationError" in result.stderr


def test_fake_clock_moves_only_when_slept(clock: FakeClock) -> None:
    before = clock.now()
    asyncio.run(clock.sleep(1.5))
    assert clock.now() - before == timedelta(seconds=1.5)


async def test_an_unreadable_first_attempt_time_starts_the_retry_horizon_afresh(invoke, graph, broker, clock):
    user_id, _, installation = new_user(graph.tenant)
    graph.script("upgrade", Fault.throttled("60"))
    carried = {"UpgradeAttempts": 2, "DeferredAttempts": 2, "OriginalMessageId": "odd", "FirstAttemptUtc": "soon"}

    await invoke(
        function_message(
            {"userId": user_id, "appInstallationId": installation}, message_id="odd:retry:2", properties=carried
        )
    )

    [retry] = retries(broker)
    assert retry.application_properties["FirstAttemptUtc"] == iso_utc(clock.now())
