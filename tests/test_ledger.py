"""The rollout ledger (contract §8) against a real Table service: Azurite, over a real socket.

Rows are read back with the SDK's own ``TableClient``, not through the ledger, so what is asserted
is what a pipeline or an operator would find in the table. Store failures come from the
fault-injecting proxy in front of Azurite (``standins/storage_proxy.py``); what is asserted is the
log record and that ``record`` returned, never how long it took.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from azure.data.tables.aio import TableClient

from standins.azurite import Azurite
from standins.storage_proxy import StorageProxy
from tests.storage_support import settings_for
from upgrade_handler.ledger import (
    OUTCOMES,
    Ledger,
    PageRecord,
    TargetRecord,
    escape_key,
    open_ledger,
    summarise,
    target_key,
    target_of,
    unescape_key,
)

# The fixtures azurite and storage_proxy.
pytest_plugins = ["tests.storage_support"]

GUEST = "ann_fabrikam.com#EXT#@contoso.onmicrosoft.com"
USER_GUID = "7f3c2d1e-0a4b-4c5d-9e8f-112233445566"
TEAM = "02bd9fd6-8f93-4758-87c3-1fb73740a315"
CHAT = "19:8ea0e38b-efb3-4757-924a-5f94061cf8c2_97f62344-57dc-409c-88ad-c4af14158ff5@unq.gbl.spaces"
AT = datetime(2026, 11, 29, 15, 4, 5, 123000, tzinfo=UTC)


def new_rollout() -> str:
    return f"release-{uuid.uuid4().hex[:10]}"


def user(rollout: str, target: str, outcome: str = "upgraded", **fields: Any) -> TargetRecord:
    return TargetRecord(rollout, "user", target, outcome, fields.pop("attempts", 1), fields.pop("at", AT), **fields)


async def rows(connection_string: str, rollout: str, table: str = "rollouts") -> list[dict[str, Any]]:
    async with TableClient.from_connection_string(connection_string, table) as client:
        found = client.query_entities("PartitionKey eq @p", parameters={"p": escape_key(rollout)})
        return [dict(row) async for row in found]


def failures(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if getattr(r, "event", None) == "rollout.ledger_failed"]


# --- keys --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("scope", "target"),
    [
        ("user", GUEST),
        ("user", "o'brien@contoso.com"),
        ("user", USER_GUID),
        ("team", TEAM),
        ("chat", CHAT),
        ("fanout", "msg/with\\every?bad#char%and\x01control\x7f"),
    ],
)
def test_a_row_key_holds_no_forbidden_character_and_reads_back_to_its_target(scope: str, target: str) -> None:
    key = target_key(scope, target)

    assert not set(key) & set("/\\#?"), key
    assert all(c.isprintable() for c in key), key
    # Entra user and team ids ignore letter case, so their keys are lower-cased; the rest reads back as is.
    assert target_of(key) == (scope, target.lower() if scope in ("user", "team") else target)


def test_user_and_team_keys_ignore_letter_case_and_chat_keys_keep_it() -> None:
    assert target_key("user", "Adele.Vance@Contoso.com") == target_key("user", "adele.vance@contoso.com")
    assert target_key("team", TEAM.upper()) == target_key("team", TEAM)
    assert target_key("chat", CHAT.upper()) != target_key("chat", CHAT)
    assert unescape_key(escape_key("100%#")) == "100%#"


def test_records_refuse_an_unknown_outcome_or_scope() -> None:
    with pytest.raises(ValueError, match="outcome"):
        TargetRecord("r", "user", USER_GUID, "done", 1, AT)
    with pytest.raises(ValueError, match="scope"):
        TargetRecord("r", "group", USER_GUID, "upgraded", 1, AT)
    with pytest.raises(ValueError, match="pages count from 1"):
        PageRecord("r", "m-1", 0, 5, True, AT)


# --- writing -----------------------------------------------------------------------------------------


async def test_target_rows_and_the_header_are_written(azurite: Azurite, ledgers: Callable[..., Ledger]) -> None:
    ledger, rollout = ledgers(azurite.connection_string), new_rollout()

    await ledger.record(
        user(rollout, GUEST, "upgraded", attempts=2, version_before="1.3.0", version_after="1.4.0", message_id="m-1:u")
    )
    await ledger.record(TargetRecord(rollout, "team", TEAM, "deadlettered", 8, AT, reason="RetriesExhausted"))
    await ledger.record(TargetRecord(rollout, "chat", CHAT, "current", 1, AT, "1.4.0", "1.4.0"))
    await ledger.record(PageRecord(rollout, "m-1", 1, 3, True, AT))

    by_key = {row["RowKey"]: row for row in await rows(azurite.connection_string, rollout)}
    guest = by_key[target_key("user", GUEST)]
    assert guest["PartitionKey"] == rollout
    assert (guest["scope"], guest["target"], guest["outcome"]) == ("user", GUEST, "upgraded")
    assert (guest["versionBefore"], guest["versionAfter"], guest["attempts"]) == ("1.3.0", "1.4.0", 2)
    assert guest["at"] == AT
    assert guest["messageId"] == "m-1:u"
    assert "reason" not in guest
    team = by_key[target_key("team", TEAM)]
    assert (team["outcome"], team["reason"], team["attempts"]) == ("deadlettered", "RetriesExhausted", 8)
    assert by_key[target_key("chat", CHAT)]["outcome"] == "current"
    header = by_key["~page:m-1:000001"]
    assert (header["targets"], header["last"], header["page"], header["fanoutId"]) == (3, True, 1, "m-1")
    assert len(by_key) == 4


async def test_a_redelivered_record_writes_its_row_once(azurite: Azurite, ledgers: Callable[..., Ledger]) -> None:
    ledger, rollout = ledgers(azurite.connection_string), new_rollout()
    retrying = user(rollout, GUEST, "retrying", attempts=1, reason="TooManyRequests")
    upgraded = user(rollout, GUEST.upper(), "upgraded", attempts=2, version_after="1.4.0")

    for record in (retrying, retrying, upgraded, upgraded):
        await ledger.record(record)
    page = PageRecord(rollout, "m-1", 1, 1, True, AT)
    await ledger.record(page)
    await ledger.record(page)

    found = await rows(azurite.connection_string, rollout)
    assert sorted(row["RowKey"] for row in found) == sorted([target_key("user", GUEST), "~page:m-1:000001"])
    [row] = [row for row in found if row["RowKey"] != "~page:m-1:000001"]
    assert (row["outcome"], row["attempts"], row["versionAfter"]) == ("upgraded", 2, "1.4.0")
    assert "reason" not in row, "the latest delivery's row replaces the earlier one, reason included"


async def test_the_table_is_created_when_missing_and_again_when_deleted(
    azurite: Azurite, ledgers: Callable[..., Ledger]
) -> None:
    table, rollout = "rollouts" + uuid.uuid4().hex[:10], new_rollout()
    ledger = ledgers(azurite.connection_string, table)

    await ledger.record(user(rollout, USER_GUID))
    async with TableClient.from_connection_string(azurite.connection_string, table) as client:
        await client.delete_table()
    await ledger.record(user(rollout, GUEST))

    assert [row["target"] for row in await rows(azurite.connection_string, rollout, table)] == [GUEST]


# --- reading -----------------------------------------------------------------------------------------


async def test_a_paged_fan_out_is_complete_only_after_its_last_page(
    azurite: Azurite, ledgers: Callable[..., Ledger]
) -> None:
    ledger, rollout = ledgers(azurite.connection_string), new_rollout()
    members = [f"member{n}@contoso.com" for n in range(5)]

    await ledger.record(PageRecord(rollout, "fan-1", 1, 2, False, AT))
    for member in members[:2]:
        await ledger.record(user(rollout, member))
    first = await ledger.status(rollout)
    await ledger.record(PageRecord(rollout, "fan-1", 3, 1, True, AT))  # the last page's row, before page 2's
    before_page_two = await ledger.status(rollout)
    await ledger.record(PageRecord(rollout, "fan-1", 2, 2, False, AT))
    read = await ledger.status(rollout)
    for member in members[2:]:
        await ledger.record(user(rollout, member, "skipped" if member.startswith("member4") else "upgraded"))
    done = await ledger.status(rollout)

    assert (first.expected, first.complete, first.settled) == (2, False, False)
    assert (before_page_two.expected, before_page_two.complete) == (3, False)
    assert (read.expected, read.complete, read.settled, read.pages) == (5, True, False, 3)
    assert (done.expected, done.complete, done.settled) == (5, True, True)
    assert done.counts == {"upgraded": 4, "current": 0, "skipped": 1, "retrying": 0, "deadlettered": 0}


async def test_status_counts_outcomes_and_dead_letters_by_reason(
    azurite: Azurite, ledgers: Callable[..., Ledger]
) -> None:
    ledger, rollout = ledgers(azurite.connection_string), new_rollout()
    outcomes = ["upgraded"] * 3 + ["current"] * 2 + ["skipped", "retrying", "deadlettered", "deadlettered"]
    reasons = {7: "GraphRequestRejected", 8: "RetriesExhausted"}
    await ledger.record(PageRecord(rollout, "fan-1", 1, len(outcomes), True, AT))
    for n, outcome in enumerate(outcomes):
        await ledger.record(user(rollout, f"u{n}@contoso.com", outcome, reason=reasons.get(n)))

    status = await ledger.status(rollout)
    await ledger.record(user(rollout, "u6@contoso.com", "deadlettered", reason="RetriesExhausted"))
    settled = await ledger.status(rollout)

    assert status.counts == {"upgraded": 3, "current": 2, "skipped": 1, "retrying": 1, "deadlettered": 2}
    assert status.dead_letters == {"GraphRequestRejected": 1, "RetriesExhausted": 1}
    assert (status.expected, status.complete, status.settled, status.finished) == (9, True, False, 8)
    assert settled.settled
    assert settled.dead_letters == {"GraphRequestRejected": 1, "RetriesExhausted": 2}
    assert settled.to_json() == {
        "rolloutId": rollout,
        "expected": 9,
        "complete": True,
        "settled": True,
        "recorded": 9,
        "counts": {"upgraded": 3, "current": 2, "skipped": 1, "retrying": 0, "deadlettered": 3},
        "deadLetters": {"GraphRequestRejected": 1, "RetriesExhausted": 2},
        "pages": 1,
        "lastActivity": "2026-11-29T15:04:05.123Z",
    }


async def test_single_requests_without_a_fan_out_are_complete_once_recorded(
    azurite: Azurite, ledgers: Callable[..., Ledger]
) -> None:
    ledger, rollout = ledgers(azurite.connection_string), new_rollout()

    nothing = await ledger.status(rollout)
    await ledger.record(TargetRecord(rollout, "team", TEAM, "upgraded", 1, AT))
    await ledger.record(TargetRecord(rollout, "chat", CHAT, "retrying", 1, AT))
    one_left = await ledger.status(rollout)
    await ledger.record(TargetRecord(rollout, "chat", CHAT, "current", 2, AT))
    both = await ledger.status(rollout)

    assert (nothing.expected, nothing.complete, nothing.settled, nothing.recorded) == (0, False, False, 0)
    assert (one_left.expected, one_left.complete, one_left.settled) == (2, True, False)
    assert (both.expected, both.complete, both.settled) == (2, True, True)


async def test_a_child_recorded_before_its_fan_outs_page_does_not_complete_the_rollout(
    azurite: Azurite, ledgers: Callable[..., Ledger]
) -> None:
    ledger, rollout = ledgers(azurite.connection_string), new_rollout()

    # The first child is due at once: its row can land before the page row (or the page's write failed).
    await ledger.record(user(rollout, "a@contoso.com", fanout_id="fan-1"))
    early = await ledger.status(rollout)
    await ledger.record(PageRecord(rollout, "fan-1", 1, 2, True, AT))
    await ledger.record(user(rollout, "b@contoso.com", fanout_id="fan-1"))
    done = await ledger.status(rollout)

    assert (early.recorded, early.complete, early.settled) == (1, False, False)
    assert (done.expected, done.complete, done.settled) == (2, True, True)


def test_a_dead_lettered_fan_out_completes_its_rollout_with_the_pages_read_so_far() -> None:
    rows: list[dict[str, Any]] = [
        {"RowKey": "~page:fan-1:000001", "targets": 2, "last": False},
        {"RowKey": target_key("user", "a@contoso.com"), "outcome": "upgraded"},
        {"RowKey": target_key("user", "b@contoso.com"), "outcome": "upgraded"},
        {"RowKey": target_key("fanout", "fan-1"), "outcome": "deadlettered", "reason": "GraphRequestRejected"},
    ]

    status = summarise("r", rows)

    assert (status.expected, status.complete, status.settled) == (3, True, True)
    assert status.dead_letters == {"GraphRequestRejected": 1}
    assert not summarise("r", rows[:3]).complete


async def test_list_names_the_rollouts_written_since_a_time(azurite: Azurite, ledgers: Callable[..., Ledger]) -> None:
    table = "rollouts" + uuid.uuid4().hex[:10]
    ledger, old, recent = ledgers(azurite.connection_string, table), new_rollout(), new_rollout()
    now = datetime.now(UTC)
    await ledger.record(user(old, USER_GUID, at=now - timedelta(days=3)))
    await ledger.record(user(recent, USER_GUID, at=now - timedelta(hours=2)))
    await ledger.record(user(recent, GUEST, "deadlettered", reason="RetriesExhausted", at=now - timedelta(hours=1)))

    day = await ledger.rollouts(now - timedelta(days=1))
    week = await ledger.rollouts(now - timedelta(days=7))

    assert [seen.rollout_id for seen in day] == [recent]
    assert day[0].status.counts["deadlettered"] == 1
    assert day[0].last_activity == now - timedelta(hours=1)
    assert [seen.rollout_id for seen in week] == [recent, old]


async def test_reading_before_anything_was_recorded_finds_an_empty_rollout(
    azurite: Azurite, ledgers: Callable[..., Ledger]
) -> None:
    ledger = ledgers(azurite.connection_string, "rollouts" + uuid.uuid4().hex[:10])

    status = await ledger.status("release-1")

    assert (status.recorded, status.complete) == (0, False)
    assert await ledger.rollouts(datetime.now(UTC) - timedelta(days=1)) == []


def test_there_is_no_ledger_without_a_storage_account() -> None:
    assert open_ledger(settings_for(None)) is None


# --- the store failing -------------------------------------------------------------------------------


@pytest.mark.parametrize("fault", ["stall", "refuse", "503", "500"])
async def test_a_failing_store_is_logged_and_record_returns(
    fault: str,
    storage_proxy: StorageProxy,
    ledgers: Callable[..., Ledger],
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="upgrade_handler")
    ledger, rollout = ledgers(storage_proxy.connection_string, timeout=0.5), new_rollout()
    await ledger.record(user(rollout, USER_GUID))  # the table exists: what fails below is the store
    {"stall": storage_proxy.stall, "refuse": storage_proxy.refuse}.get(
        fault, lambda: storage_proxy.answer(int(fault))
    )()

    await ledger.record(user(rollout, GUEST, "deadlettered", reason="GraphRequestRejected"))
    await ledger.record(PageRecord(rollout, "fan-1", 1, 3, False, AT))

    target, page = failures(caplog)
    assert target.levelno == logging.WARNING
    assert target.fields["rollout_id"] == rollout  # type: ignore[attr-defined]
    assert target.fields["outcome"] == "deadlettered"  # type: ignore[attr-defined]
    assert target.fields["error"]  # type: ignore[attr-defined]
    assert page.fields["page"] == 1  # type: ignore[attr-defined]
    text = "\n".join(r.getMessage() for r in caplog.records)
    assert "ann_fabrikam" not in text and "contoso.onmicrosoft.com" not in text, text
    storage_proxy.forward()
    await ledger.record(user(rollout, GUEST, "upgraded"))
    assert len(failures(caplog)) == 2, "the store answers again: the next write succeeds"
    # A stalled write may still land once the store answers: only the target rows are certain.
    found = await rows(storage_proxy.connection_string, rollout)
    assert {row["target"] for row in found if row["kind"] == "target"} == {USER_GUID, GUEST}


async def test_a_record_that_cannot_be_serialised_is_logged_not_raised(
    azurite: Azurite, ledgers: Callable[..., Ledger], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="upgrade_handler")
    ledger = ledgers(azurite.connection_string)

    # A 64-bit attempts count does not fit the column's Int32: the SDK refuses it before sending.
    await ledger.record(user(new_rollout(), USER_GUID, attempts=2**40))

    [failure] = failures(caplog)
    assert failure.fields["operation"] == "ledger write"  # type: ignore[attr-defined]


def test_every_outcome_is_counted() -> None:
    status = summarise("r", [{"RowKey": f"user:u{n}", "outcome": o} for n, o in enumerate(OUTCOMES)])

    assert status.counts == dict.fromkeys(OUTCOMES, 1)
