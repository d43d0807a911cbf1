"""The command line's surface: ``--help`` everywhere, the demo end to end, and the function's cold start."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from upgrade_handler.__main__ import main

ROOT = Path(__file__).resolve().parent.parent

HELP = {
    (): ["demo", "worker", "send", "deadletters", "upgrade", "ServiceBusConnection", "Exit status"],
    ("demo",): ["127.0.0.1", "every outcome", "no Azure"],
    ("worker",): ["--concurrency", "--until-idle", "--max-lock-renewal", "abandon", "SIGTERM", "--namespace"],
    ("send",): ["--file", "JSON Lines", "CSV", "--dry-run", "--batch-size", "duplicate-detection", "--user-id"],
    ("deadletters",): ["list", "show", "replay", "$DeadLetterQueue"],
    ("deadletters", "list"): ["--reason", "--graph-code", "--older-than", "--limit", "--source"],
    ("deadletters", "show"): ["MESSAGE_ID", "Peeks only"],
    ("deadletters", "replay"): ["--dry-run", "--all", "ReplayOf", "removed only", "fresh attempt budget"],
    ("upgrade",): ["--user-id", "--teams-app-id", "Signs in as you", "--graph-base-url"],
}


@pytest.mark.parametrize("command", HELP, ids=lambda c: " ".join(c) or "top")
def test_every_command_explains_itself(command, capsys):
    with pytest.raises(SystemExit) as exit_:
        main([*command, "--help"])

    assert exit_.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    for phrase in HELP[command]:
        assert phrase in text, phrase


def test_no_command_prints_the_help_and_fails(capsys):
    assert main([]) == 2
    assert "python -m upgrade_handler demo" in capsys.readouterr().out


def test_a_bad_setting_is_named_before_anything_is_sent(capsys, monkeypatch):
    monkeypatch.delenv("ServiceBusConnection", raising=False)
    monkeypatch.delenv("ServiceBusConnection__fullyQualifiedNamespace", raising=False)

    code = main(["send", "--user-id", "a@contoso.com", "--teams-app-id", "a6b63365-31a4-4f43-92ec-710b71557af9"])

    assert code == 2
    assert "error: app setting ServiceBusConnection" in capsys.readouterr().err


def test_the_function_does_not_import_the_command_line(environment):
    """The function's cold start pays for none of the command line's modules or dependencies."""
    script = (
        "import function_app, sys; "
        "print(sorted(m for m in sys.modules if m.startswith(('upgrade_handler.cli', 'upgrade_handler.__main__', "
        "'rich', 'jsonschema', 'referencing', 'standins'))))"
    )
    result = subprocess.run(  # noqa: S603 - this interpreter, a fixed script
        [sys.executable, "-c", script],
        cwd=ROOT,
        env={**os.environ, **environment},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


def unwrap_tables(text: str) -> list[str]:
    """The text with each table cell's wrapped lines joined, cell by cell, so phrases read whole."""
    pieces: list[str] = []
    row: list[list[str]] = []

    def flush() -> None:
        pieces.extend(" ".join(" ".join(part).split()) for part in row)
        row.clear()

    for line in text.splitlines():
        if line.startswith("│") and line.endswith("│"):
            cells = line[1:-1].split("│")
            if len(row) != len(cells):
                flush()
                row.extend([] for _ in cells)
            for column, cell in zip(row, cells, strict=True):
                column.append(cell.strip())
        else:
            flush()
            pieces.append(line)
    flush()
    return pieces


def run_demo(*python: str) -> subprocess.CompletedProcess[str]:
    """``python -m upgrade_handler demo`` (or ``python`` given), wide enough that no table cell wraps."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("IDENTITY_", "ServiceBus", "GRAPH_", "UPGRADE_"))}
    env.pop("AzureWebJobsStorage", None)
    env["COLUMNS"] = "400"
    return subprocess.run(  # noqa: S603 - this interpreter, this package
        [sys.executable, *(python or ("-m", "upgrade_handler", "demo"))],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )


def rollout_rows(pieces: list[str]) -> dict[str, list[str]]:
    """The rollout table's member rows: UPN -> [version, outcome, what happened]."""
    start = next(i for i, piece in enumerate(pieces) if piece.startswith("Rollout demo-2.4.0, request by request"))
    rows: dict[str, list[str]] = {}
    for i in range(start, len(pieces)):
        if pieces[i].startswith("↳ fan-out child: user "):
            rows[pieces[i].removeprefix("↳ fan-out child: user ")] = pieces[i + 1 : i + 4]
    return rows


def assert_the_rollout_ran(flat: str, pieces: list[str]) -> None:
    """One member current, one deferred while the catalog lagged then upgraded, three upgraded at once."""
    rows = rollout_rows(pieces)
    assert rows["megan.bowen@contoso.com"][:2] == ["2.4.0 (no change)", "current"]
    assert "already current, no upgrade call" in rows["megan.bowen@contoso.com"][2]
    assert rows["lee.gu@contoso.com"][:2] == ["2.3.0 → 2.4.0", "retry scheduled → upgraded"]
    assert "deferred (CatalogNotUpdated), retry copy scheduled for" in rows["lee.gu@contoso.com"][2]
    assert "attempt 2: Graph 204, upgraded" in rows["lee.gu@contoso.com"][2]
    for upn in ("adele.vance@contoso.com", "johanna.lorenz@contoso.com", "miriam.graham@contoso.com"):
        assert rows[upn] == ["2.3.0 → 2.4.0", "upgraded", "attempt 1: Graph 204, upgraded"], upn
    assert len(rows) == 5
    assert "release-pipeline: group Finance, version 2.4.0" in flat
    assert "5 single-user requests put on the queue" in flat
    assert "The request for lee.gu@contoso.com was deferred (CatalogNotUpdated" in flat
    assert (
        "Rollout demo-2.4.0 by its deliveries: 5 members: current 1, upgraded 4 (1 after a CatalogNotUpdated "
        "deferral); 4 upgrade calls to Graph, none for a member already on 2.4.0." in flat
    )


def test_the_demo_shows_every_outcome_and_a_rollout_with_its_ledger():
    result = run_demo()

    assert result.returncode == 0, result.stderr
    out = result.stdout
    pieces = unwrap_tables(out)
    flat = " ".join(pieces)
    for shown in (
        "upgraded",
        "attempt 1: Graph 502 BadGateway, retrying in",  # an inline retry
        "attempt 1: Graph 429 TooManyRequests, retrying in 0.500 s",  # a short Retry-After, waited inline
        "retry scheduled →",  # a long Retry-After: a scheduled copy, picked up when due ...
        "retry copy scheduled for",
        "attempt 2: Graph 204, upgraded",  # ... and upgraded then
        "skipped",
        "fanned out",
        "fan-out child",
        "dead-lettered: InvalidMessage",
        "dead-lettered: InstallationNotFound",
        "dead-lettered: GraphRequestRejected",
        "dead-lettered: RetriesExhausted",
        "(Event Grid)",
        "(CloudEvents)",
        "403 Forbidden",
        "503 serviceNotAvailable",
        "The dead-letter queue",
    ):
        assert shown in flat, shown
    assert "abandoned" not in flat.split("How to read this")[0].replace("0 abandoned", "")
    assert result.stderr == "", "nothing but the summary without --verbose"
    # Azurite is the project's test equipment (make setup): with it, the budget is shared and the ledger kept.
    assert "Storage: Azurite's Table service on 127.0.0.1 as AzureWebJobsStorage" in flat
    assert "Shared Graph budget (table graphbudget): each of the " in flat
    assert_the_rollout_ran(flat, pieces)
    assert "The ledger, as `python -m upgrade_handler rollout status demo-2.4.0` prints it" in flat
    assert "Rollout demo-2.4.0: settled" in flat
    assert "5/5 finished (100%)" in flat
    [document] = [json.loads(line) for line in out.splitlines() if line.startswith('{"rolloutId": "demo-2.4.0"')]
    assert document["expected"] == 5
    assert document["complete"] is True
    assert document["settled"] is True
    assert document["counts"] == {"upgraded": 4, "current": 1, "skipped": 0, "retrying": 0, "deadlettered": 0}
    assert "(--wait exits 0: settled, nothing dead-lettered)" in flat
    assert "Rollout status: skipped" not in flat


def test_the_demo_without_storage_shows_the_rollout_and_says_in_one_line_why_its_status_is_not():
    script = (
        "import pathlib, standins.azurite as azurite; "
        "azurite.EXECUTABLE = pathlib.Path('/nonexistent/node_modules/.bin/azurite-table'); "
        "from upgrade_handler.__main__ import main; raise SystemExit(main(['demo']))"
    )
    result = run_demo("-c", script)

    assert result.returncode == 0, result.stderr
    pieces = unwrap_tables(result.stdout)
    flat = " ".join(pieces)
    assert "Storage: none (Azurite is not installed; `make setup` installs it)" in flat
    assert_the_rollout_ran(flat, pieces)
    skipped = [line for line in result.stdout.splitlines() if line.startswith("Rollout status: skipped")]
    assert skipped == [
        "Rollout status: skipped, the rollout ledger needs a storage account (AzureWebJobsStorage); "
        "`make setup` installs Azurite, with which the demo shows it."
    ]
    assert "The ledger, as" not in flat
    assert "Shared Graph budget" not in flat
    assert "dead-lettered: RetriesExhausted" in flat  # the rest of the demo is unchanged
    assert result.stderr == ""


def test_the_handlers_log_events_show_only_with_verbose(environment, graph):
    from tests.support import new_user

    outputs = []
    for verbose in ([], ["--verbose"]):
        user, _, installation = new_user(graph.tenant)
        assert installation is not None
        outputs.append(
            subprocess.run(  # noqa: S603 - this interpreter, this package
                [
                    sys.executable,
                    "-m",
                    "upgrade_handler",
                    "upgrade",
                    "--user-id",
                    user,
                    "--app-installation-id",
                    installation,
                    *verbose,
                ],
                cwd=ROOT,
                env={**os.environ, **environment},
                capture_output=True,
                text=True,
                timeout=60,
                check=False,
            )
        )
    quiet, verbose_run = outputs

    assert quiet.returncode == verbose_run.returncode == 0, quiet.stderr + verbose_run.stderr
    assert "Upgraded: Graph answered 204" in quiet.stdout and quiet.stderr == ""
    assert "Upgraded: Graph answered 204" in verbose_run.stdout
    assert "upgrade.succeeded message_id=" in verbose_run.stderr
