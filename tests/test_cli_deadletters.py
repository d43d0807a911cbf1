"""``deadletters list | show | replay``: triage of failed requests, and sending them again."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta

from azure.servicebus import ServiceBusMessage

from tests.cli_support import DEADLETTER_QUEUE, UPGRADE_QUEUE, dead_letter
from tests.support import APP, new_user
from upgrade_handler.settlement import BOOKKEEPING, DeadLetterReason

DLQ_OF_UPGRADE_QUEUE = f"{UPGRADE_QUEUE}/$DeadLetterQueue"
FAILURE_PROPERTIES = {
    "DeadLetterReason",
    "DeadLetterErrorDescription",
    "FailedAtUtc",
    "OriginalDeliveryCount",
    "DeadLetterPropertiesDropped",
}

# The fixtures run_cli and cli_bus.
pytest_plugins = ["tests.cli_support"]


def assert_no_failure_properties(properties: dict[str, object]) -> None:
    leftovers = {k for k in properties if k in FAILURE_PROPERTIES or k in BOOKKEEPING or k.startswith("Graph")}
    assert not leftovers, leftovers


async def put_dead_letters(cli_bus, *letters) -> None:
    await cli_bus.send(DEADLETTER_QUEUE, list(letters))


async def put_in_upgrade_queue_dlq(cli_bus, message: ServiceBusMessage) -> None:
    """What Service Bus does to a message that hit the queue's delivery limit."""
    await cli_bus.send(UPGRADE_QUEUE, [message])
    receiver = await cli_bus.receiver(UPGRADE_QUEUE)
    # Only ours: the receiver may still hold a message an earlier test left, which the broker has
    # since purged (its lock with it); settling that one would fail, so it is passed over.
    for _ in range(10):
        for received in await receiver.receive_messages(max_message_count=10, max_wait_time=3):
            if received.message_id != message.message_id:
                continue
            await receiver.dead_letter_message(
                received,
                reason="MaxDeliveryCountExceeded",
                error_description="Message could not be consumed after 10 attempts.",
            )
            return
    raise AssertionError(f"{message.message_id} never arrived on {UPGRADE_QUEUE}")


async def test_list_groups_by_reason_and_graph_error_with_counts(run_cli, cli_bus):
    await put_dead_letters(
        cli_bus,
        dead_letter({"userId": "a@contoso.com", "teamsAppId": APP}, message_id="m-1"),
        dead_letter({"userId": "b@contoso.com", "teamsAppId": APP}, message_id="m-2"),
        dead_letter(
            {"userId": "c@contoso.com", "teamsAppId": APP},
            message_id="m-3",
            reason=DeadLetterReason.RETRIES_EXHAUSTED,
            status=503,
            code="serviceNotAvailable",
        ),
        dead_letter(b"{not json", message_id="m-4", reason=DeadLetterReason.INVALID_MESSAGE),
    )
    await put_in_upgrade_queue_dlq(cli_bus, ServiceBusMessage(b'{"teamId": "x"}', message_id="m-5"))

    result = await run_cli("deadletters", "list")

    assert result.code == 0, result.text
    rows = [" ".join(line.replace("│", " ").split()) for line in result.out.splitlines()]
    assert any(r.startswith(f"{DEADLETTER_QUEUE} GraphRequestRejected 403 Forbidden 2 ") for r in rows), result.out
    assert any(r.startswith(f"{DEADLETTER_QUEUE} RetriesExhausted 503 serviceNotAvailable 1 ") for r in rows)
    assert any(r.startswith(f"{DEADLETTER_QUEUE} InvalidMessage - 1 ") for r in rows)
    assert any(r.startswith(f"{DLQ_OF_UPGRADE_QUEUE} MaxDeliveryCountExceeded - 1 ") for r in rows)
    for message_id in ("m-1", "m-2", "m-3", "m-4", "m-5"):
        assert any(r.startswith(message_id + " ") for r in rows), message_id
    assert "user a@contoso.com, teamsAppId" in result.out


async def test_list_filters_by_reason_and_limits_the_rows(run_cli, cli_bus):
    await put_dead_letters(
        cli_bus,
        *(dead_letter({"userId": f"u{n}@contoso.com", "teamsAppId": APP}, message_id=f"m-{n}") for n in range(3)),
        dead_letter(b"{", message_id="m-bad", reason=DeadLetterReason.INVALID_MESSAGE),
    )

    result = await run_cli("deadletters", "list", "--reason", "graphrequestrejected", "--limit", "2")

    assert result.code == 0, result.text
    assert "GraphRequestRejected" in result.out and "InvalidMessage" not in result.out
    assert "... 1 more (raise --limit to see them)." in result.out


async def test_show_prints_the_reason_the_graph_error_and_what_a_replay_keeps(run_cli, cli_bus):
    await put_dead_letters(
        cli_bus,
        dead_letter(
            {"userId": "adele@contoso.com", "teamsAppId": APP, "requestId": "rel-7"},
            message_id="m-show",
            properties={"Source": "release-pipeline"},
            correlation_id="build-1",
        ),
    )

    result = await run_cli("deadletters", "show", "m-show")

    assert result.code == 0, result.text
    out = result.out
    assert f"Dead letter m-show in {DEADLETTER_QUEUE}" in out
    assert "GraphRequestRejected" in out and "403 Forbidden" in out and "Graph said Forbidden" in out
    assert "req-1" in out and "client-1" in out and "build-1" in out
    rows = [" ".join(line.replace("│", " ").split()) for line in out.splitlines()]
    assert "Source release-pipeline kept" in rows
    assert any(r.startswith("DeadLetterReason GraphRequestRejected dropped") for r in rows)
    assert any(r.startswith("UpgradeAttempts 1 dropped") for r in rows)
    assert '"requestId": "rel-7"' in out
    assert "deadletters replay --id m-show" in out


async def test_show_of_an_unknown_id_says_so(run_cli):
    result = await run_cli("deadletters", "show", "nope")

    assert result.code == 1
    assert "No dead letter with message id nope" in result.out


async def test_replay_without_a_filter_asks_for_one(run_cli, cli_bus, broker):
    await put_dead_letters(cli_bus, dead_letter({"userId": "a@contoso.com", "teamsAppId": APP}))

    result = await run_cli("deadletters", "replay")

    assert result.code == 2
    assert "or pass --all" in result.out
    assert broker.messages(UPGRADE_QUEUE) == [] and len(broker.messages(DEADLETTER_QUEUE)) == 1


async def test_replay_dry_run_sends_nothing_and_removes_nothing(run_cli, cli_bus, broker):
    await put_dead_letters(cli_bus, dead_letter({"userId": "a@contoso.com", "teamsAppId": APP}, message_id="m-dry"))

    result = await run_cli("deadletters", "replay", "--all", "--dry-run")

    assert result.code == 0, result.text
    assert "Would replay (dry run: nothing sent, nothing removed)" in result.out and "m-dry" in result.out
    assert broker.messages(UPGRADE_QUEUE) == []
    [letter] = broker.messages(DEADLETTER_QUEUE)
    assert letter.message_id == "m-dry" and letter.delivery_count == 0, "a dry run only peeks"


async def test_replay_round_trip_keeps_body_and_original_properties_and_starts_a_fresh_budget(
    run_cli, cli_bus, graph, broker
):
    # Given a request that failed because the app was not installed yet ...
    user, upn, _ = new_user(graph.tenant, app=None)
    sent = await run_cli(
        "send",
        "--user-id",
        upn,
        "--teams-app-id",
        APP,
        "--request-id",
        "rel-9",
        "--correlation-id",
        "build-9",
        "--property",
        "Source=release-pipeline",
        "--property",
        "Ticket=CHG-42",
    )
    [original] = broker.messages(UPGRADE_QUEUE)
    worked = await run_cli("worker", "--until-idle", "0.3")
    assert sent.code == worked.code == 0
    [letter] = broker.messages(DEADLETTER_QUEUE)
    assert letter.application_properties["DeadLetterReason"] == "InstallationNotFound"

    # ... when the operator installs it and replays the dead letter ...
    installation = graph.tenant.install("user", user, APP)
    replayed = await run_cli("deadletters", "replay", "--reason", "InstallationNotFound")

    # ... then the upgrade queue holds the original request again, and the dead letter is gone.
    assert replayed.code == 0, replayed.text
    assert f"{original.message_id}:replay:1" in replayed.out
    assert "Replayed 1 of 1 selected" in replayed.out
    assert broker.messages(DEADLETTER_QUEUE) == []
    [copy] = broker.messages(UPGRADE_QUEUE)
    assert copy.body == original.body
    assert copy.content_type == original.content_type == "application/json"
    assert copy.correlation_id == original.correlation_id == "build-9"
    assert copy.message_id == f"{original.message_id}:replay:1"
    assert copy.application_properties == {
        "Source": "release-pipeline",
        "Ticket": "CHG-42",
        "ReplayOf": original.message_id,
        "ReplayCount": 1,
    }
    assert_no_failure_properties(copy.application_properties)

    # And the worker upgrades it on a fresh attempt budget.
    again = await run_cli("worker", "--until-idle", "0.3")
    assert f"upgraded         {original.message_id}:replay:1  delivery 1  attempt 1  Graph 204" in again.out
    assert graph.tenant.installation_version(installation) == "1.1.0"


async def test_replay_filters_by_graph_code_age_and_limit(run_cli, cli_bus, broker):
    old = datetime.now(UTC) - timedelta(hours=3)
    await put_dead_letters(
        cli_bus,
        dead_letter({"userId": "old@contoso.com", "teamsAppId": APP}, message_id="m-old", failed_at=old),
        dead_letter({"userId": "new@contoso.com", "teamsAppId": APP}, message_id="m-new"),
        dead_letter(
            {"userId": "busy@contoso.com", "teamsAppId": APP},
            message_id="m-503",
            reason=DeadLetterReason.RETRIES_EXHAUSTED,
            status=503,
            code="serviceNotAvailable",
            failed_at=old,
        ),
    )

    by_age = await run_cli("deadletters", "replay", "--graph-code", "Forbidden", "--older-than", "2h")
    assert by_age.code == 0, by_age.text
    assert [m.message_id for m in broker.messages(UPGRADE_QUEUE)] == ["m-old:replay:1"]

    limited = await run_cli("deadletters", "replay", "--all", "--limit", "1")
    assert limited.code == 0, limited.text
    assert [m.message_id for m in broker.messages(UPGRADE_QUEUE)] == ["m-old:replay:1", "m-new:replay:1"]
    assert [m.message_id for m in broker.messages(DEADLETTER_QUEUE)] == ["m-503"]


async def test_a_failed_send_leaves_the_dead_letter_where_it_was(run_cli, cli_bus, broker):
    await put_dead_letters(cli_bus, dead_letter({"userId": "a@contoso.com", "teamsAppId": APP}, message_id="m-keep"))
    broker.fail_sends(UPGRADE_QUEUE, count=1)

    result = await run_cli("deadletters", "replay", "--id", "m-keep")

    assert result.code == 1
    assert "Not replayed: m-keep: send failed" in result.out
    assert broker.messages(UPGRADE_QUEUE) == []
    [letter] = broker.messages(DEADLETTER_QUEUE)
    assert letter.message_id == "m-keep" and letter.state == "available"


async def test_replay_from_the_upgrade_queues_own_dead_letter_queue_strips_the_retry_bookkeeping(
    run_cli, cli_bus, broker
):
    body = json.dumps({"userId": "a@contoso.com", "teamsAppId": APP}).encode()
    await put_in_upgrade_queue_dlq(
        cli_bus,
        ServiceBusMessage(
            body,
            message_id="m-first:retry:3",
            subject="release 42",
            content_type="application/json",
            application_properties={
                "Source": "release-pipeline",
                "UpgradeAttempts": 3,
                "OriginalMessageId": "m-first",
                "FirstAttemptUtc": "2026-11-29T12:00:00.000Z",
                "LastErrorStatus": 503,
                "LastErrorCode": "serviceNotAvailable",
            },
        ),
    )

    result = await run_cli(
        "deadletters", "replay", "--source", "upgrade-queue-dlq", "--reason", "MaxDeliveryCountExceeded"
    )

    assert result.code == 0, result.text
    assert broker.messages(DLQ_OF_UPGRADE_QUEUE) == []
    [copy] = broker.messages(UPGRADE_QUEUE)
    assert copy.message_id == "m-first:replay:1"
    assert copy.body == body and copy.subject == "release 42"
    assert copy.application_properties == {"Source": "release-pipeline", "ReplayOf": "m-first", "ReplayCount": 1}


async def test_a_second_replay_of_the_same_request_gets_the_next_id(run_cli, cli_bus, broker):
    # The replayed copy failed again: its dead letter carries ReplayOf and ReplayCount.
    await put_dead_letters(
        cli_bus,
        dead_letter(
            {"userId": "a@contoso.com", "teamsAppId": APP},
            message_id="m-x:replay:1",
            properties={"ReplayOf": "m-x", "ReplayCount": 1},
        ),
    )

    result = await run_cli("deadletters", "replay", "--id", "m-x:replay:1")

    assert result.code == 0, result.text
    [copy] = broker.messages(UPGRADE_QUEUE)
    assert copy.message_id == "m-x:replay:2"
    assert copy.application_properties == {"ReplayOf": "m-x", "ReplayCount": 2}
