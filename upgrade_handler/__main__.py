"""``python -m upgrade_handler`` (``teams-app-upgrader``): the operator command line.

Argument parsing and dispatch only; the commands live in :mod:`upgrade_handler.cli`, imported
when one runs. Settings come from the function's app settings in the environment (contract §5);
flags override them.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from .cli.options import add_graph_flags, add_service_bus_flags, duration, positive_int, seconds

DESCRIPTION = """\
Upgrades Microsoft Teams app installations through Microsoft Graph, from requests on a Service Bus
queue: the Azure Function's own handler, run from a terminal, a container or a VM.

Start with:  python -m upgrade_handler demo
"""

EPILOG = """\
Settings come from the same environment variables as the function (ServiceBusConnection or
ServiceBusConnection__fullyQualifiedNamespace, UPGRADE_QUEUE_NAME, DEADLETTER_QUEUE_NAME,
GRAPH_BASE_URL, AZURE_CLIENT_ID, UPGRADE_MAX_*; AzureWebJobsStorage for rollout); flags override
them. With a namespace, Service Bus and Graph are reached with your Azure sign-in (az login), or a
managed identity where one is set up.
Exit status: 0 done, 1 failed, 2 bad usage, setting or request (nothing sent), 3 (upgrade) try later;
rollout status --wait has its own (see rollout status --help).
See docs/operating.md.
"""


class _Formatter(argparse.RawDescriptionHelpFormatter):
    """Keeps the hand-wrapped descriptions; shows a flag's default when it has one."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help
        if text and action.default not in (None, False, argparse.SUPPRESS) and "%(default)" not in text:
            text += " (default: %(default)s)"
        return text


def _request_flags(parser: argparse.ArgumentParser, *, fan_out: bool) -> None:
    target = parser.add_argument_group("whose installation (exactly one)")
    target.add_argument("--user-id", metavar="ID", help="a user: Entra object id (GUID) or user principal name")
    target.add_argument("--team-id", metavar="GUID", help="a team")
    target.add_argument("--chat-id", metavar="ID", help="a chat: 19:...@thread.v2 or 19:...@unq.gbl.spaces")
    if fan_out:
        target.add_argument(
            "--user-ids",
            metavar="ID,ID",
            action="append",
            help="fan-out: many users (comma-separated, repeatable); needs --teams-app-id or --external-id",
        )
        target.add_argument("--group-id", metavar="GUID", help="fan-out: every user in this Entra group")
    app = parser.add_argument_group("which app (exactly one)")
    app.add_argument("--app-installation-id", metavar="ID", help="the installation's id, as Graph gives it")
    app.add_argument("--teams-app-id", metavar="GUID", help="the app's id in the tenant catalog; looked up")
    app.add_argument("--external-id", metavar="ID", help="the app's manifest id; looked up")
    more = parser.add_argument_group("optional")
    more.add_argument(
        "--permission",
        metavar="VALUE[:TYPE]",
        action="append",
        help="a resource-specific permission to consent to, TYPE Application (default) or Delegated; repeatable",
    )
    more.add_argument("--request-id", metavar="TEXT", help="your id for the request, carried into logs")
    if fan_out:
        more.add_argument(
            "--if-not-installed",
            choices=["deadletter", "skip"],
            help="what a lookup that finds no installation does (the function's default: deadletter)",
        )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m upgrade_handler", description=DESCRIPTION, epilog=EPILOG, formatter_class=_Formatter
    )
    parser.add_argument("--verbose", "-v", action="store_true", help="also print the handler's upgrade.* log events")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")

    demo = commands.add_parser(
        "demo",
        help="see it work: local stand-ins, sample requests, every outcome",
        formatter_class=_Formatter,
        description="""\
Shows every outcome of the product in one run. Starts a local Microsoft Graph simulator, managed
identity endpoint and Service Bus broker on 127.0.0.1, puts sample requests on the upgrade queue
(release pipeline requests, an Event Grid and a CloudEvents app-catalog event, a fan-out,
throttled, failing and invalid ones), runs the worker until the queue is idle, and prints what
happened to each request, then the dead-letter queue; then a version rollout to a group, with its
ledger when Azurite is installed (make setup). Needs no Azure and no network; takes about 25
seconds.""",
    )
    demo.add_argument("--concurrency", type=positive_int, default=1, help=argparse.SUPPRESS)

    worker = commands.add_parser(
        "worker",
        help="run the function outside Azure Functions: receive, handle, settle",
        formatter_class=_Formatter,
        description="""\
Receives from the upgrade queue and runs each message through the same handler as the Azure
Function, settling as the Functions host does: complete when the handler returns, abandon when it
raises (Service Bus then delivers the message again). Locks are renewed while a message is
handled. Scheduled retry copies are received when they come due. Prints one line per message.
SIGINT or SIGTERM stops receiving and lets the messages in hand finish; a second one cancels them.""",
    )
    worker.add_argument(
        "--concurrency", type=positive_int, default=16, help="messages handled at once (host.json maxConcurrentCalls)"
    )
    worker.add_argument(
        "--max-lock-renewal",
        type=seconds,
        default=300.0,
        metavar="SECONDS",
        help="renew a message's lock for at most this long (host.json maxAutoLockRenewalDuration)",
    )
    worker.add_argument(
        "--until-idle",
        type=seconds,
        metavar="SECONDS",
        help="stop once nothing came for this long and no scheduled retry copy is waiting (default: run until stopped)",
    )
    add_service_bus_flags(worker)
    add_graph_flags(worker)

    send = commands.add_parser(
        "send",
        help="put upgrade requests on the queue, from flags or a JSONL / CSV / JSON file",
        formatter_class=_Formatter,
        description="""\
Puts upgrade requests on the upgrade queue: one from flags, or many from a file. Every request is
checked with the function's own rules (and the JSON Schema) before anything is sent; if one is
invalid, nothing is sent and each bad line is named. Message ids are derived from the requests'
content, so sending the same file again within the queue's duplicate-detection window (1 hour)
sends nothing new; change requestId to send a request again on purpose.

File formats: JSON Lines (one request per line; .jsonl, .ndjson), CSV (a header row of request field
names: userId, teamId, chatId, userIds, groupId, appInstallationId, teamsAppId, externalId,
requestId, ifNotInstalled, permissions; userIds and permissions are ;-separated lists,
permissions as Value:Type), or JSON (.json: one request or an array). Events (Event Grid,
CloudEvents) are sent as they are.

Examples:
  python -m upgrade_handler send --user-id adele@contoso.com --teams-app-id 8a1ed7a3-...
  python -m upgrade_handler send --file release-42.jsonl --correlation-id "$BUILD_ID"
""",
    )
    send.add_argument("--file", "-f", metavar="PATH", help="requests from this file ('-': standard input)")
    send.add_argument("--format", choices=["jsonl", "csv", "json"], help="the file's format (default: by extension)")
    _request_flags(send, fan_out=True)
    send.add_argument("--correlation-id", metavar="TEXT", help="correlation id of every message (a pipeline run id)")
    send.add_argument(
        "--property",
        metavar="NAME=VALUE",
        action="append",
        help="an application property on every message, e.g. Source=release-pipeline; repeatable",
    )
    send.add_argument("--batch-size", type=positive_int, default=100, help="messages per send")
    send.add_argument("--dry-run", action="store_true", help="validate and show the message ids; send nothing")
    send.add_argument("--no-progress", action="store_true", help="no progress bar for large files")
    add_service_bus_flags(send, deadletter_queue=False)

    deadletters = commands.add_parser(
        "deadletters",
        help="triage failed requests: list, show, replay",
        formatter_class=_Formatter,
        description="""\
Failed requests wait in the dead-letter queue (DEADLETTER_QUEUE_NAME), each with the reason
(DeadLetterReason) and Graph's error (GraphStatus, GraphErrorCode, GraphError, ...). Service Bus
puts messages that hit the upgrade queue's delivery limit in its own $DeadLetterQueue. These
commands read both.""",
    )
    actions = deadletters.add_subparsers(dest="action", metavar="ACTION", required=True)

    def add_filters(sub: argparse.ArgumentParser, *, limit_help: str, limit: int | None = None) -> None:
        group = sub.add_argument_group("which dead letters")
        group.add_argument(
            "--source",
            choices=["both", "deadletter-queue", "upgrade-queue-dlq"],
            default="both",
            help="the function's dead-letter queue, the upgrade queue's $DeadLetterQueue, or both",
        )
        group.add_argument(
            "--reason", action="append", metavar="REASON", help="DeadLetterReason, e.g. RetriesExhausted"
        )
        group.add_argument("--graph-code", action="append", metavar="CODE", help="GraphErrorCode, e.g. Forbidden")
        group.add_argument("--id", action="append", metavar="MESSAGE_ID", help="a message id (or OriginalMessageId)")
        group.add_argument(
            "--older-than", type=duration, metavar="AGE", help="failed at least this long ago: 90s, 15m, 2h, 7d"
        )
        group.add_argument("--newer-than", type=duration, metavar="AGE", help="failed at most this long ago")
        group.add_argument("--limit", type=positive_int, metavar="N", default=limit, help=limit_help)

    listing = actions.add_parser(
        "list",
        help="counts by reason and Graph error, then the messages",
        formatter_class=_Formatter,
        description="Peeks at the dead letters (nothing is locked or changed) and prints them grouped by "
        "DeadLetterReason and Graph error, with counts, then one row per message.",
    )
    add_filters(listing, limit_help="list at most N messages (the counts cover all)", limit=50)
    add_service_bus_flags(listing)

    show = actions.add_parser(
        "show",
        help="everything about one dead letter",
        formatter_class=_Formatter,
        description="Prints one dead letter: reason, Graph's error and request ids, every property "
        "(and whether a replay keeps it), and the body. Peeks only.",
    )
    show.add_argument("message_id", metavar="MESSAGE_ID", help="its message id (or OriginalMessageId)")
    show.add_argument(
        "--source", choices=["both", "deadletter-queue", "upgrade-queue-dlq"], default="both", help="where to look"
    )
    add_service_bus_flags(show)

    replay = actions.add_parser(
        "replay",
        help="send dead letters to the upgrade queue again",
        formatter_class=_Formatter,
        description="""\
Sends the chosen dead letters to the upgrade queue again: the original body, content type,
correlation id and application properties, without the failure properties (DeadLetter*,
FailedAtUtc, OriginalDeliveryCount, Graph*) and without the retry bookkeeping (UpgradeAttempts,
OriginalMessageId, ...), so each starts with a fresh attempt budget. The copy's message id is
<first id>:replay:<n> (properties ReplayOf and ReplayCount). Each dead letter is removed only
after its copy was sent. Name what to replay with the filters, or pass --all.""",
    )
    add_filters(replay, limit_help="replay at most N")
    replay.add_argument("--all", action="store_true", help="replay every dead letter (when no filter is given)")
    replay.add_argument("--dry-run", action="store_true", help="show what would be replayed; send and remove nothing")
    add_service_bus_flags(replay)

    upgrade = commands.add_parser(
        "upgrade",
        help="one upgrade now, from the terminal, with your Azure sign-in (no queue)",
        formatter_class=_Formatter,
        description="""\
Upgrades one installation now and prints Graph's answer, through the function's own handler:
same validation, lookup, retries and error classification, but nothing goes to a queue. Signs in
as you (az login, or the other DefaultAzureCredential sources); your account needs the Graph
permission to upgrade the installation (e.g. TeamsAppInstallation.ReadWriteForUser).""",
    )
    _request_flags(upgrade, fan_out=False)
    add_graph_flags(upgrade)
    rollout_status, rollout_list = _rollout_commands(commands)
    for sub in (demo, worker, send, listing, show, replay, upgrade, rollout_status, rollout_list):
        # Also after the command: "worker -v" as well as "-v worker".
        sub.add_argument("--verbose", "-v", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    return parser


def _rollout_commands(
    commands: argparse._SubParsersAction[argparse.ArgumentParser],
) -> tuple[argparse.ArgumentParser, argparse.ArgumentParser]:
    rollout = commands.add_parser(
        "rollout",
        help="how a rollout is going, from the ledger: status (--wait for pipelines), list",
        formatter_class=_Formatter,
        description="""\
Every request with a rolloutId (default: its requestId) records how it ended in the rollout ledger,
the ROLLOUT_TABLE table (default rollouts) of the function's storage account (AzureWebJobsStorage,
or AzureWebJobsStorage__accountName with your Azure sign-in). These commands read it.""",
    )
    actions = rollout.add_subparsers(dest="action", metavar="ACTION", required=True)
    status = actions.add_parser(
        "status",
        help="counts by outcome, dead letters by reason, a progress bar; --wait until settled",
        formatter_class=_Formatter,
        description="""\
Prints one rollout: how many targets are expected (the users its fan-out pages named), whether the
last page has been read, the targets by outcome (upgraded, current, skipped, retrying,
deadlettered) and the dead letters by reason. With --wait, reads the ledger again every few
seconds until the rollout is settled: the last page read and every expected target upgraded,
current, skipped or dead-lettered.

Exit status: 0 printed (--wait: settled, nothing dead-lettered); 1 --wait: settled with dead
letters, or the ledger could not be read; 2 --timeout passed first; 3 no ledger to read
(AzureWebJobsStorage is not set).

Example (a release pipeline):
  python -m upgrade_handler rollout status "$ROLLOUT" --wait --timeout 3600 --json
""",
    )
    status.add_argument("rollout_id", metavar="ROLLOUT_ID", help="the rollout: the requests' rolloutId")
    status.add_argument("--wait", action="store_true", help="wait until the rollout is settled")
    status.add_argument(
        "--timeout", type=seconds, metavar="SECONDS", help="with --wait: give up after this long (exit 2)"
    )
    status.add_argument("--json", action="store_true", help="print one JSON object (with --wait: at the end)")
    listing = actions.add_parser(
        "list",
        help="the rollouts recorded lately, with their progress",
        formatter_class=_Formatter,
        description="Lists the rollouts with a ledger record written within --since, most recent first, "
        "each with its state and counts by outcome.",
    )
    listing.add_argument("--since", type=duration, metavar="DURATION", default="24h", help="how far back: 30m, 24h, 7d")
    listing.add_argument("--json", action="store_true", help="print one JSON object: {since, rollouts: [...]}")
    return status, listing


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    try:
        from .cli.app import run
    except ModuleNotFoundError as missing:  # the [cli] extra is not installed
        print(
            f"error: the command line needs {missing.name}: pip install 'teams-app-upgrader[cli]'",
            file=sys.stderr,
        )
        return 2
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
