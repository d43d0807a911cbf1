"""``send``: requests onto the upgrade queue, validated with the function's own rules first."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.cli_support import UPGRADE_QUEUE, queue_bodies
from tests.support import APP, TEAM, USER_UPN
from upgrade_handler.cli.requests import message_id_for

CHAT = "19:561082c0f3f847a58069deb8eb300807@thread.v2"
USER = "5b649834-7412-4cce-9e69-176e95a394f5"
SAMPLES = Path(__file__).resolve().parent.parent / "upgrade_handler" / "samples"

# The fixtures run_cli and cli_bus.
pytest_plugins = ["tests.cli_support"]


def ids(broker) -> list[str]:
    return [message.message_id for message in broker.messages(UPGRADE_QUEUE)]


async def test_one_request_from_flags_is_sent_with_a_content_derived_id(run_cli, broker):
    result = await run_cli(
        "send",
        "--user-id",
        USER_UPN,
        "--teams-app-id",
        APP,
        "--permission",
        "TeamsActivity.Send.User",
        "--request-id",
        "rel-1",
        "--correlation-id",
        "build-77",
        "--property",
        "Source=release-pipeline",
    )

    assert result.code == 0, result.text
    expected = {
        "userId": USER_UPN,
        "teamsAppId": APP,
        "requestId": "rel-1",
        "consentedPermissionSet": {
            "resourceSpecificPermissions": [
                {"permissionValue": "TeamsActivity.Send.User", "permissionType": "Application"}
            ]
        },
    }
    [message] = broker.messages(UPGRADE_QUEUE)
    assert json.loads(message.body) == expected
    assert message.message_id == message_id_for(expected)
    assert message.content_type == "application/json"
    assert message.correlation_id == "build-77"
    assert message.application_properties == {"Source": "release-pipeline"}
    assert message.message_id in result.out
    assert f"Sent 1 message to {UPGRADE_QUEUE}" in result.out


async def test_a_jsonl_file_is_sent_line_by_line(run_cli, broker, tmp_path):
    lines = [
        {"userId": USER, "teamsAppId": APP, "requestId": "a"},
        {"teamId": TEAM, "externalId": "com.contoso.helpdesk"},
        {"userIds": [USER, USER_UPN], "teamsAppId": APP},
    ]
    path = tmp_path / "release.jsonl"
    path.write_text("\n".join(json.dumps(line) for line in lines) + "\n\n", encoding="utf-8")

    result = await run_cli("send", "--file", str(path))

    assert result.code == 0, result.text
    assert queue_bodies(broker) == lines
    assert ids(broker) == [message_id_for(line) for line in lines]
    assert f"3 valid requests in {path}" in result.out
    assert "line 3" in result.out and "2 users, teamsAppId" in result.out


async def test_a_csv_file_maps_columns_to_request_fields(run_cli, broker, tmp_path):
    path = tmp_path / "release.csv"
    path.write_text(
        "userId,chatId,userIds,teamsAppId,externalId,appInstallationId,permissions,ifNotInstalled,requestId\n"
        f"{USER_UPN},,,{APP},,,TeamsActivity.Send.User:Delegated;Chat.Read.Chat,skip,r1\n"
        f",{CHAT},,,,aW5zdGFsbGF0aW9u,,,r2\n"
        f",,{USER};{USER_UPN},,com.contoso.helpdesk,,,,r3\n",
        encoding="utf-8",
    )

    result = await run_cli("send", "--file", str(path))

    assert result.code == 0, result.text
    assert queue_bodies(broker) == [
        {
            "userId": USER_UPN,
            "teamsAppId": APP,
            "requestId": "r1",
            "ifNotInstalled": "skip",
            "consentedPermissionSet": {
                "resourceSpecificPermissions": [
                    {"permissionValue": "TeamsActivity.Send.User", "permissionType": "Delegated"},
                    {"permissionValue": "Chat.Read.Chat", "permissionType": "Application"},
                ]
            },
        },
        {"chatId": CHAT, "appInstallationId": "aW5zdGFsbGF0aW9u", "requestId": "r2"},
        {"userIds": [USER, USER_UPN], "externalId": "com.contoso.helpdesk", "requestId": "r3"},
    ]


async def test_an_invalid_line_stops_the_whole_file_before_anything_is_sent(run_cli, broker, tmp_path):
    path = tmp_path / "release.jsonl"
    path.write_text(
        json.dumps({"userId": USER, "teamsAppId": APP})
        + "\n"
        + json.dumps({"userId": "adele vance@contoso.com", "teamsAppId": APP})
        + "\n"
        + json.dumps({"userId": USER, "appInstallationId": "a/b"})
        + "\n"
        + '{"userId": \n',
        encoding="utf-8",
    )
    sent_before = broker.sent_count(UPGRADE_QUEUE)

    result = await run_cli("send", "--file", str(path))

    assert result.code == 2
    assert "nothing was sent: 3 of 4 requests are invalid" in result.err
    assert "line 2: userId has characters a user principal name cannot have before the @" in result.err
    assert "line 3: appInstallationId may hold only" in result.err
    assert "line 4: not JSON" in result.err
    assert "line 1" not in result.err
    assert broker.sent_count(UPGRADE_QUEUE) == sent_before
    assert broker.messages(UPGRADE_QUEUE) == []


async def test_an_invalid_csv_column_is_named(run_cli, broker, tmp_path):
    path = tmp_path / "release.csv"
    path.write_text(f"userID,teamsAppId\n{USER},{APP}\n", encoding="utf-8")

    result = await run_cli("send", "--file", str(path))

    assert result.code == 2
    assert "line 1: unknown column userID" in result.err
    assert broker.messages(UPGRADE_QUEUE) == []


async def test_invalid_flags_are_refused_with_the_functions_words(run_cli, broker):
    result = await run_cli("send", "--user-id", USER, "--team-id", TEAM, "--teams-app-id", APP)

    assert result.code == 2
    assert "exactly one of userId, teamId, chatId, userIds, groupId is required, found userId, teamId" in result.err
    assert broker.messages(UPGRADE_QUEUE) == []


async def test_sending_the_same_file_twice_gives_the_same_ids_and_the_queue_drops_the_resend(run_cli, broker, tmp_path):
    requests = [{"userId": USER, "teamsAppId": APP, "requestId": f"r{n}"} for n in range(3)]
    path = tmp_path / "release.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in requests), encoding="utf-8")
    # The same requests with other key order and spacing: still the same ids.
    again = tmp_path / "again.jsonl"
    again.write_text(
        "\n".join(f'{{ "requestId": "r{n}", "teamsAppId": "{APP}", "userId": "{USER}" }}' for n in range(3)),
        encoding="utf-8",
    )

    first = await run_cli("send", "--file", str(path))
    second = await run_cli("send", "--file", str(again))

    assert first.code == second.code == 0, first.text + second.text
    expected = [message_id_for(r) for r in requests]
    assert all(message_id in first.out and message_id in second.out for message_id in expected)
    # Duplicate detection on the queue (as in Azure) drops the second copies.
    assert ids(broker) == expected
    assert queue_bodies(broker) == requests


async def test_dry_run_validates_and_shows_ids_but_sends_nothing(run_cli, broker):
    result = await run_cli("send", "--chat-id", CHAT, "--external-id", "com.contoso.helpdesk", "--dry-run")

    assert result.code == 0, result.text
    assert message_id_for({"chatId": CHAT, "externalId": "com.contoso.helpdesk"}) in result.out
    assert "Dry run: nothing sent" in result.out
    assert broker.messages(UPGRADE_QUEUE) == []


async def test_a_large_file_goes_out_in_batches(run_cli, broker, tmp_path):
    path = tmp_path / "all-staff.jsonl"
    path.write_text(
        "\n".join(json.dumps({"userId": f"user{n}@contoso.com", "teamsAppId": APP}) for n in range(250)),
        encoding="utf-8",
    )

    result = await run_cli("send", "--file", str(path), "--batch-size", "100")

    assert result.code == 0, result.text
    assert "Sent 250 messages" in result.out
    assert len(broker.messages(UPGRADE_QUEUE)) == 250
    assert "line 1 " not in result.out, "a file this large is counted, not listed"


@pytest.mark.parametrize(
    "sample",
    ["pipeline-request.json", "pipeline-requests.jsonl", "pipeline-requests.csv", "app-published.eventgrid.json"],
)
async def test_the_samples_are_valid_requests(run_cli, broker, sample):
    path = SAMPLES / sample

    result = await run_cli("send", "--file", str(path), "--dry-run")

    assert result.code == 0, result.text
    assert "invalid" not in result.text
