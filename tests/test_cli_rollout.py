"""``rollout status | list`` against the ledger in Azurite, as a release pipeline and an operator use them.

The commands run in-process with the real parser and ``dispatch`` (one in a subprocess, through
``python -m upgrade_handler``). ``--wait`` polls with a short interval through a sleep seam that
also tells the test when the command has read the ledger at least once: the test's "background
pipeline" writes the final rows only then, so each test shows the command waiting and then
seeing them. Nothing is timed.
"""

from __future__ import annotations

import asyncio
import io
import json
import os
import subprocess
import sys
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from rich.console import Console

from standins.azurite import Azurite
from standins.storage_proxy import StorageProxy
from upgrade_handler.__main__ import build_parser
from upgrade_handler.cli.app import dispatch
from upgrade_handler.cli.output import make_console
from upgrade_handler.ledger import Ledger, PageRecord, TargetRecord

# The fixtures azurite and storage_proxy.
pytest_plugins = ["tests.storage_support"]

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STORAGE_SETTINGS = ("AzureWebJobsStorage", "AzureWebJobsStorage__accountName", "AzureWebJobsStorage__tableServiceUri")


@dataclass(frozen=True)
class Result:
    code: int
    out: str
    err: str

    def json(self) -> Any:
        return json.loads(self.out)


class Polls:
    """The ``--wait`` loop's sleep: short, counted, and an event the test can wait on."""

    def __init__(self) -> None:
        self.count = 0
        self.waited = asyncio.Event()

    async def sleep(self, seconds: float) -> None:
        self.count += 1
        self.waited.set()
        await asyncio.sleep(min(seconds, 0.02))


@pytest.fixture
def table() -> str:
    return "rollouts" + uuid.uuid4().hex[:10]


@pytest.fixture
def store(azurite: Azurite, table: str, monkeypatch: pytest.MonkeyPatch) -> str:
    """The app settings name Azurite and a table of this test's own; returns the connection string."""
    for name in STORAGE_SETTINGS:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AzureWebJobsStorage", azurite.connection_string)
    monkeypatch.setenv("ROLLOUT_TABLE", table)
    return azurite.connection_string


@pytest.fixture
def ledger(store: str, table: str, ledgers: Callable[..., Ledger]) -> Ledger:
    """What the function writes with: a ledger on this test's table."""
    return ledgers(store, table)


RunCli = Callable[..., Awaitable[Result]]


@pytest.fixture
def run_cli() -> RunCli:
    async def run(*argv: str, **seams: Any) -> Result:
        args = build_parser().parse_args(list(argv))
        out, err = io.StringIO(), io.StringIO()
        code = await dispatch(args, make_console(out, width=220), errors=make_console(err, width=220), **seams)
        return Result(code, out.getvalue(), err.getvalue())

    return run


def rollout_id() -> str:
    return f"release-{uuid.uuid4().hex[:10]}"


def member(rollout: str, n: int, outcome: str = "upgraded", **fields: Any) -> TargetRecord:
    at = fields.pop("at", datetime.now(UTC))
    return TargetRecord(rollout, "user", f"member{n}@contoso.com", outcome, fields.pop("attempts", 1), at, **fields)


async def fan_out(ledger: Ledger, rollout: str, outcomes: list[str], *, expected: int | None = None) -> None:
    """A one-page fan-out of ``expected`` users (default: as many as ``outcomes``), the first ones recorded."""
    await ledger.record(PageRecord(rollout, "fan-1", 1, expected or len(outcomes), True, datetime.now(UTC)))
    for n, outcome in enumerate(outcomes):
        reason = "RetriesExhausted" if outcome == "deadlettered" else None
        await ledger.record(member(rollout, n, outcome, reason=reason))


async def wait_then(polls: Polls, *records: TargetRecord | PageRecord, ledger: Ledger) -> None:
    """The rest of the pipeline: once the command has read the ledger and gone to sleep, the last rows land."""
    await polls.waited.wait()
    for record in records:
        await ledger.record(record)


# --- status ------------------------------------------------------------------------------------------


async def test_status_prints_counts_by_outcome_and_a_progress_bar(run_cli: RunCli, ledger: Ledger) -> None:
    rollout = rollout_id()
    await fan_out(ledger, rollout, ["upgraded", "upgraded", "current", "retrying", "deadlettered"], expected=8)

    result = await run_cli("rollout", "status", rollout)

    assert result.code == 0, result.err
    rows = [" ".join(line.split()) for line in result.out.splitlines()]
    assert rows[0].startswith(f"Rollout {rollout}: in progress"), rows
    assert any("━" in row and row.endswith("4/8 finished (50%)") for row in rows), result.out
    for outcome, count in {"upgraded": 2, "current": 1, "skipped": 0, "retrying": 1, "deadlettered": 1}.items():
        assert f"{outcome} {count}" in rows, (outcome, result.out)
    assert "RetriesExhausted 1" in rows
    assert "deadletters list" in result.out


async def test_status_json_is_one_object_with_counts_and_dead_letters(run_cli: RunCli, ledger: Ledger) -> None:
    rollout = rollout_id()
    await fan_out(ledger, rollout, ["upgraded", "skipped", "deadlettered"])

    result = await run_cli("rollout", "status", rollout, "--json")

    assert result.code == 0, result.err
    document = result.json()
    assert {k: document[k] for k in ("rolloutId", "expected", "complete", "settled", "recorded")} == {
        "rolloutId": rollout,
        "expected": 3,
        "complete": True,
        "settled": True,
        "recorded": 3,
    }
    assert document["counts"] == {"upgraded": 1, "current": 0, "skipped": 1, "retrying": 0, "deadlettered": 1}
    assert document["deadLetters"] == {"RetriesExhausted": 1}


async def test_status_of_a_rollout_with_nothing_recorded_says_so(run_cli: RunCli, ledger: Ledger) -> None:
    result = await run_cli("rollout", "status", "release-unknown")

    assert result.code == 0, result.err
    assert "Rollout release-unknown: nothing recorded yet" in result.out
    assert "0/0 finished" in result.out


async def test_status_reports_an_unreadable_ledger_and_fails(
    run_cli: RunCli, storage_proxy: StorageProxy, table: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AzureWebJobsStorage", storage_proxy.connection_string)
    monkeypatch.setenv("ROLLOUT_TABLE", table)
    storage_proxy.answer(503)

    result = await run_cli("rollout", "status", rollout_id())

    assert result.code == 1
    assert f"the rollout ledger ({table}) could not be read" in result.err


# --- status --wait -----------------------------------------------------------------------------------


async def test_wait_exits_0_once_every_target_is_settled_without_dead_letters(run_cli: RunCli, ledger: Ledger) -> None:
    rollout, polls = rollout_id(), Polls()
    await fan_out(ledger, rollout, ["upgraded", "retrying"], expected=3)
    late = [member(rollout, 1, "upgraded", attempts=2), member(rollout, 2, "current")]

    result, _ = await asyncio.gather(
        run_cli("rollout", "status", rollout, "--wait", "--json", poll_interval=0.02, sleep=polls.sleep),
        wait_then(polls, *late, ledger=ledger),
    )

    assert result.code == 0, result.err
    assert polls.count >= 1, "it waited"
    document = result.json()  # one object, at the end, nothing before it
    assert (document["settled"], document["expected"], document["counts"]["upgraded"]) == (True, 3, 2)


async def test_wait_exits_1_when_something_was_dead_lettered(run_cli: RunCli, ledger: Ledger) -> None:
    rollout, polls = rollout_id(), Polls()
    await fan_out(ledger, rollout, ["upgraded"], expected=2)
    late = member(rollout, 1, "deadlettered", reason="GraphRequestRejected")

    result, _ = await asyncio.gather(
        run_cli("rollout", "status", rollout, "--wait", "--json", poll_interval=0.02, sleep=polls.sleep),
        wait_then(polls, late, ledger=ledger),
    )

    assert result.code == 1, result.err
    assert result.json()["deadLetters"] == {"GraphRequestRejected": 1}


async def test_wait_waits_for_the_last_page_of_a_fan_out(run_cli: RunCli, ledger: Ledger) -> None:
    rollout, polls = rollout_id(), Polls()
    now = datetime.now(UTC)
    await ledger.record(PageRecord(rollout, "fan-1", 1, 1, False, now))
    await ledger.record(member(rollout, 0))  # everything read so far is done, but a page is still to come
    late: list[TargetRecord | PageRecord] = [
        PageRecord(rollout, "fan-1", 2, 1, True, now),
        member(rollout, 1, "skipped"),
    ]

    result, _ = await asyncio.gather(
        run_cli("rollout", "status", rollout, "--wait", "--json", poll_interval=0.02, sleep=polls.sleep),
        wait_then(polls, *late, ledger=ledger),
    )

    assert result.code == 0, result.err
    assert (result.json()["expected"], result.json()["pages"]) == (2, 2)


async def test_wait_exits_2_when_the_timeout_passes_first(run_cli: RunCli, ledger: Ledger) -> None:
    rollout = rollout_id()
    await fan_out(ledger, rollout, ["upgraded", "retrying"])

    result = await run_cli("rollout", "status", rollout, "--wait", "--timeout", "1", "--json", poll_interval=0.1)

    assert result.code == 2
    document = result.json()  # the last status read, for the pipeline's log
    assert (document["settled"], document["counts"]["retrying"]) == (False, 1)
    assert "timed out after 1 s" in result.err


async def test_wait_exits_3_without_a_storage_account(run_cli: RunCli, monkeypatch: pytest.MonkeyPatch) -> None:
    for name in STORAGE_SETTINGS:
        monkeypatch.delenv(name, raising=False)

    result = await run_cli("rollout", "status", "release-1", "--wait", "--timeout", "5", "--json")

    assert result.code == 3
    assert result.out == ""
    assert "AzureWebJobsStorage" in result.err


async def test_wait_waits_for_a_rollout_the_function_has_not_reached_yet(run_cli: RunCli, ledger: Ledger) -> None:
    rollout, polls = rollout_id(), Polls()
    now = datetime.now(UTC)
    late: list[TargetRecord | PageRecord] = [PageRecord(rollout, "fan-1", 1, 1, True, now), member(rollout, 0)]

    result, _ = await asyncio.gather(
        run_cli("rollout", "status", rollout, "--wait", poll_interval=0.02, sleep=polls.sleep),
        wait_then(polls, *late, ledger=ledger),
    )

    assert result.code == 0, result.err
    lines = result.out.splitlines()
    # Not a terminal (a CI log): one line per change, then the rollout as "status" prints it.
    assert lines[0].startswith(f"{rollout}: nothing recorded yet, 0/0 finished"), lines
    assert any(line.startswith(f"{rollout}: settled, 1/1 finished; upgraded 1") for line in lines), lines
    assert f"Rollout {rollout}: settled" in result.out


async def test_wait_reads_again_when_the_ledger_does_not_answer(
    run_cli: RunCli,
    storage_proxy: StorageProxy,
    table: str,
    monkeypatch: pytest.MonkeyPatch,
    ledgers: Callable[..., Ledger],
    azurite: Azurite,
) -> None:
    monkeypatch.setenv("AzureWebJobsStorage", storage_proxy.connection_string)
    monkeypatch.setenv("ROLLOUT_TABLE", table)
    ledger, rollout, polls = ledgers(azurite.connection_string, table), rollout_id(), Polls()
    await fan_out(ledger, rollout, ["upgraded"])
    storage_proxy.answer(503)

    async def store_comes_back() -> None:
        await polls.waited.wait()
        storage_proxy.forward()

    result, _ = await asyncio.gather(
        run_cli("rollout", "status", rollout, "--wait", "--json", poll_interval=0.02, sleep=polls.sleep),
        store_comes_back(),
    )

    assert result.code == 0, result.err
    assert result.err.count("warning: the rollout ledger does not answer") == 1
    assert "answers again" in result.err
    assert result.json()["settled"] is True


async def test_wait_on_a_terminal_shows_a_live_progress_bar_and_then_the_rollout(ledger: Ledger) -> None:
    rollout, polls = rollout_id(), Polls()
    await fan_out(ledger, rollout, ["upgraded"], expected=2)
    out = io.StringIO()
    terminal = Console(file=out, force_terminal=True, width=160, color_system=None)
    args = build_parser().parse_args(["rollout", "status", rollout, "--wait"])

    code, _ = await asyncio.gather(
        dispatch(args, terminal, errors=make_console(io.StringIO()), poll_interval=0.02, sleep=polls.sleep),
        wait_then(polls, member(rollout, 1, "current"), ledger=ledger),
    )

    assert code == 0
    assert f"Rollout {rollout}: settled" in out.getvalue()
    assert f"{rollout}: in progress, 1/2 finished" not in out.getvalue(), "a terminal gets the bar, not log lines"


# --- list --------------------------------------------------------------------------------------------


async def test_list_shows_the_rollouts_recorded_since_a_duration(run_cli: RunCli, ledger: Ledger) -> None:
    old, recent = rollout_id(), rollout_id()
    now = datetime.now(UTC)
    await ledger.record(member(old, 0, at=now - timedelta(days=2)))
    await fan_out(ledger, recent, ["upgraded", "deadlettered"], expected=3)

    day = await run_cli("rollout", "list", "--json")
    week = await run_cli("rollout", "list", "--since", "7d")
    minutes = await run_cli("rollout", "list", "--since", "30m", "--json")

    assert day.code == 0, day.err
    [listed] = day.json()["rollouts"]
    assert (listed["rolloutId"], listed["expected"], listed["counts"]["deadlettered"]) == (recent, 3, 1)
    assert [r["rolloutId"] for r in minutes.json()["rollouts"]] == [recent]
    assert week.code == 0, week.err
    rows = [" ".join(line.replace("│", " ").split()) for line in week.out.splitlines()]
    assert any(row.startswith(f"{recent} ") and " in progress 2/3 1 0 0 0 1" in row for row in rows), week.out
    assert any(row.startswith(f"{old} ") and " settled 1/1 1 0 0 0 0" in row for row in rows), week.out


async def test_list_with_nothing_recorded_says_so(run_cli: RunCli, store: str) -> None:
    result = await run_cli("rollout", "list", "--since", "1h")

    assert result.code == 0, result.err
    assert "No rollout recorded since" in result.out


def test_a_duration_that_is_not_one_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        build_parser().parse_args(["rollout", "list", "--since", "yesterday"])

    assert exit_.value.code == 2
    assert "is not a duration" in capsys.readouterr().err


# --- the real entry point ----------------------------------------------------------------------------


async def test_python_dash_m_prints_the_status_as_json(store: str, table: str, ledger: Ledger) -> None:
    rollout = rollout_id()
    await fan_out(ledger, rollout, ["current"])
    environment = {
        **{k: v for k, v in os.environ.items() if k not in STORAGE_SETTINGS},
        "AzureWebJobsStorage": store,
        "ROLLOUT_TABLE": table,
    }

    completed = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "upgrade_handler", "rollout", "status", rollout, "--wait", "--timeout", "30", "--json"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=environment,
        timeout=120,
        check=False,
    )

    assert completed.returncode == 0, completed.stderr
    assert json.loads(completed.stdout)["counts"]["current"] == 1
