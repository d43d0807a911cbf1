"""The command line's surface: ``--help`` everywhere, the demo end to end, and the function's cold start."""

from __future__ import annotations

import os
import subprocess
import sys
import time
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


def test_the_demo_shows_every_outcome_within_a_minute():
    env = {k: v for k, v in os.environ.items() if not k.startswith(("IDENTITY_", "ServiceBus", "GRAPH_", "UPGRADE_"))}
    env["COLUMNS"] = "400"  # wide enough that no table cell wraps
    started = time.monotonic()
    result = subprocess.run(
        [sys.executable, "-m", "upgrade_handler", "demo"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    elapsed = time.monotonic() - started

    assert result.returncode == 0, result.stderr
    assert elapsed < 60
    out = result.stdout
    flat = " ".join(unwrap_tables(out))
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
