"""``demo``: the whole product on one machine, in about fifteen seconds, with no Azure.

1. Start the local stand-ins on 127.0.0.1: the Microsoft Graph simulator (a small tenant with the
   "Contoso Helpdesk" app installed for users, a team and a chat), the managed identity endpoint,
   and the Service Bus broker (duplicate detection on, as in the Bicep).
2. Put sample requests on the upgrade queue with ``send``'s code: release pipeline requests, an
   Event Grid and a CloudEvents app-catalog event (the samples in ``upgrade_handler/samples``),
   requests Graph will throttle or fail, and one malformed body from a buggy producer.
3. Run :class:`~upgrade_handler.cli.worker.Worker`, the same handler as the Azure Function, until
   the queue is idle (a scheduled retry copy that is about to come due counts as work).
4. Print what happened to each request, then the dead-letter queue.
5. A rollout (:mod:`.demo_rollout`): one group fan-out with ``version`` and ``rolloutId``, a member
   already current, one deferred while the catalog lags and upgraded once it publishes, and the
   rollout's status from the ledger.

With Azurite installed (``make setup``) the demo starts it on a free loopback port and gives the
handler ``AzureWebJobsStorage``: the shared Graph budget and the rollout ledger run as in Azure.
Without it one process paces alone and the rollout's status is skipped, in one line.

The Graph simulator answers the first upgrade calls from a script (a 502, a short and a long
429, three 503s). The worker handles one message at a time here, so each scripted answer lands on
the request this module says it does; the worker's concurrency is tested on its own.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import time
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from importlib import resources
from typing import TYPE_CHECKING, Any

from azure.servicebus import ServiceBusMessage
from rich.console import Console
from rich.table import Table

from ..fanout import PARENT_PROPERTY
from ..handler import UpgradeHandler
from ..settings import Settings
from . import demo_rollout
from .bus import Bus
from .deadletters import Filters, Place, Source, collect, summary_table
from .output import describe_request, envelope_of, plain, shorten
from .report import OUTCOME_WORDS, journey
from .requests import canonical_json, prepare
from .send import send_requests
from .worker import Processed, Worker

if TYPE_CHECKING:
    from standins.graph_simulator import Fault, GraphSimulator

UPGRADE_QUEUE = "teams-app-upgrades"
DEADLETTER_QUEUE = "teams-app-upgrades-deadletter"
#: The demo's user-assigned managed identity.
CLIENT_ID = "3f6b2a94-1c2d-4e5f-8a9b-0c1d2e3f4a5b"
HELPDESK = "a6b63365-31a4-4f43-92ec-710b71557af9"
HELPDESK_EXTERNAL = "com.contoso.helpdesk"
COMPLIANCE = "effe13ef-4e2e-4a4e-9bd3-2e7a1e3c5b8d"  # a permanent app: Graph refuses to upgrade it
TEAM = "02bd9fd6-8f93-4758-87c3-1fb73740a315"
CHAT = "19:561082c0f3f847a58069deb8eb300807@thread.v2"
#: Settings that make retries play out in seconds (defaults: 8 attempts, 10 s of inline waiting).
DEMO_SETTINGS = {"UPGRADE_MAX_ATTEMPTS": "3", "UPGRADE_MAX_INLINE_WAIT_SECONDS": "2"}
UNTIL_IDLE = 1.0

_PEOPLE = (
    "megan.bowen",
    "adele.vance",
    "alex.wilber",
    "lee.gu",
    "diego.siciliani",
    "isaiah.langer",
    "johanna.lorenz",
    "lynne.robbins",
    "nestor.wilke",
    "patti.fernandez",
    "pradeep.gupta",
    "grady.archie",
    "miriam.graham",
)
_NOT_INSTALLED = ("nestor.wilke", "patti.fernandez", "pradeep.gupta")
#: The rollout's group, in the order the fan-out paces its members: a pilot user who already runs the
#: new version, then the first member behind (who meets the lagging catalog), then the others.
_FINANCE = ("megan.bowen", "lee.gu", "adele.vance", "johanna.lorenz", "miriam.graham")


def user_id(name: str) -> str:
    """A stable object id for a demo user."""
    return str(uuid.uuid5(uuid.UUID("1b4e28ba-2fa1-41d2-883f-0016d3cca427"), name))


def upn(name: str) -> str:
    return f"{name}@contoso.com"


@dataclass(frozen=True, slots=True)
class Case:
    """One sample request and what the demo arranges for it."""

    producer: str
    body: bytes
    graph_script: tuple[Fault, ...] = ()
    """Answers for this request's upgrade calls before the simulator's normal behaviour."""
    properties: dict[str, Any] = field(default_factory=dict)
    label: str | None = None
    """How the request column names it (default: what the body asks for)."""
    last: bool = False
    """Sent once everything else was handled (see :func:`_run`)."""

    @property
    def request(self) -> str:
        return self.label or describe_request(self.body)


def _sample(name: str) -> bytes:
    return resources.files("upgrade_handler").joinpath(f"samples/{name}").read_bytes()


def _json(document: dict[str, Any]) -> bytes:
    return json.dumps(document, separators=(",", ":")).encode()


def seed(graph: GraphSimulator) -> dict[str, str]:
    """The demo tenant; returns installation ids by user name (and ``team`` / ``chat``)."""
    tenant = graph.tenant
    tenant.add_app(HELPDESK, HELPDESK_EXTERNAL, "Contoso Helpdesk", versions=("2.2.0", "2.3.0"))
    tenant.add_app(COMPLIANCE, "com.contoso.compliance", "Contoso Compliance", permanent=True)
    installations: dict[str, str] = {}
    for name in _PEOPLE:
        tenant.add_user(user_id(name), upn(name))
        if name not in _NOT_INSTALLED:
            installations[name] = tenant.install("user", user_id(name), HELPDESK)
    tenant.install("user", user_id("grady.archie"), COMPLIANCE)
    tenant.add_team(TEAM)
    installations["team"] = tenant.install("team", TEAM, HELPDESK)
    tenant.add_chat(CHAT)
    installations["chat"] = tenant.install("chat", CHAT, HELPDESK)
    return installations


@contextlib.contextmanager
def _storage(console: Console) -> Iterator[str | None]:
    """Azurite's connection string when it is installed (it is then running), else ``None``."""
    from standins import azurite

    if not azurite.EXECUTABLE.exists():
        yield None
        return
    try:
        store = azurite.Azurite().start()
    except (RuntimeError, OSError) as error:
        console.print(f"Azurite is installed but did not start ({error}); going on without storage.", markup=False)
        yield None
        return
    try:
        yield store.connection_string
    finally:
        store.stop()


def cases(installations: dict[str, str]) -> list[Case]:
    """The sample requests, in the order they are sent (and, one at a time, handled)."""
    from standins.graph_simulator import Fault

    pipeline = {"Source": "release-pipeline"}
    catalog = {"Source": "app-catalog"}

    def by_installation(name: str, request_id: str, script: tuple[Fault, ...] = (), *, last: bool = False) -> Case:
        body = _json({"userId": user_id(name), "appInstallationId": installations[name], "requestId": request_id})
        return Case("pipeline", body, script, pipeline, f"user {upn(name)} by object id, appInstallationId", last)

    def single(document: dict[str, Any], label: str) -> Case:
        return Case("pipeline", _json(document), properties=pipeline, label=label)

    return [
        # Graph in trouble first: the simulator's scripted answers go to the first upgrade calls.
        by_installation("alex.wilber", "rel-43-alex", (Fault(502), Fault(passthrough=True))),
        by_installation("lee.gu", "rel-43-lee", (Fault.throttled("0.5"), Fault(passthrough=True))),
        by_installation("isaiah.langer", "rel-43-isaiah", (Fault(503),) * 3),
        # Graph well.
        Case(
            "pipeline",
            _sample("pipeline-request.json"),
            properties=pipeline,
            label=f"user {upn('adele.vance')}, Helpdesk by teamsAppId (looked up), with a consented permission",
        ),
        by_installation("miriam.graham", "rel-43-miriam"),
        single(
            {"teamId": TEAM, "externalId": HELPDESK_EXTERNAL, "requestId": "rel-43-team"},
            f"team {TEAM[:8]}…, Helpdesk by externalId (looked up)",
        ),
        single(
            {"chatId": CHAT, "appInstallationId": installations["chat"], "requestId": "rel-43-chat"},
            f"chat {CHAT[:12]}…@thread.v2, appInstallationId",
        ),
        Case(
            "app catalog",
            _sample("app-published.eventgrid.json"),
            properties=catalog,
            label=f"user {upn('megan.bowen')}, Helpdesk by teamsAppId (looked up)",
        ),
        Case(
            "app catalog",
            _sample("app-published.cloudevent.json"),
            properties=catalog,
            label="3 users (userIds), Helpdesk by teamsAppId: a fan-out",
        ),
        single(
            {
                "userId": upn("patti.fernandez"),
                "teamsAppId": HELPDESK,
                "ifNotInstalled": "skip",
                "requestId": "rel-43-patti",
            },
            f"user {upn('patti.fernandez')} (has no Helpdesk), ifNotInstalled: skip",
        ),
        single(
            {"userId": upn("pradeep.gupta"), "externalId": HELPDESK_EXTERNAL, "requestId": "rel-43-pradeep"},
            f"user {upn('pradeep.gupta')} (has no Helpdesk), Helpdesk by externalId",
        ),
        single(
            {"userId": upn("grady.archie"), "teamsAppId": COMPLIANCE, "requestId": "rel-43-grady"},
            f"user {upn('grady.archie')}, Contoso Compliance (a permanent app) by teamsAppId",
        ),
        Case(
            "buggy producer",
            b'{"userId": "adele.vance@contoso.com", "teamsAppId": ',
            properties={"Source": "ad-hoc-script"},
            label="a JSON body cut off after teamsAppId",
        ),
        # A long throttle shuts the gate for the whole worker (every caller waits out Retry-After),
        # so it comes last, to show on one request only.
        by_installation("diego.siciliani", "rel-43-diego", (Fault.throttled("3"),), last=True),
    ]


@contextlib.contextmanager
def _environment(values: dict[str, str]) -> Iterator[None]:
    """The identity endpoint's variables, which azure-identity reads from the process environment."""
    saved = {name: os.environ.get(name) for name in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


async def run_command(args: argparse.Namespace, console: Console) -> int:
    # The stand-ins are test equipment beside the package, imported only when the demo runs.
    from standins.graph_simulator import GraphSimulator
    from standins.identity_endpoint import IdentityEndpoint
    from standins.servicebus_broker import ServiceBusBroker

    started = time.monotonic()
    console.print("Teams App Upgrader demo: the Azure Function's handler against local stand-ins, no Azure needed.\n")
    identity = IdentityEndpoint(client_id=CLIENT_ID)
    with (
        identity,
        GraphSimulator(token_validator=identity.is_valid) as graph,
        ServiceBusBroker(duplicate_detection=(UPGRADE_QUEUE, DEADLETTER_QUEUE)) as broker,
        _storage(console) as storage,
    ):
        installations = seed(graph)
        rollout_tenant = demo_rollout.seed(graph, [(user_id(name), upn(name)) for name in _FINANCE])
        environment = {
            **identity.environment(),
            "ServiceBusConnection": broker.connection_string,
            "GRAPH_BASE_URL": graph.url,
            "AZURE_CLIENT_ID": CLIENT_ID,
            "UPGRADE_QUEUE_NAME": UPGRADE_QUEUE,
            "DEADLETTER_QUEUE_NAME": DEADLETTER_QUEUE,
            **({"AzureWebJobsStorage": storage} if storage else {}),
            **DEMO_SETTINGS,
        }
        settings = Settings.from_environment(environment)
        console.print(
            f"Started on 127.0.0.1: Microsoft Graph simulator {graph.url}, managed identity endpoint "
            f"{identity.url}, Service Bus broker port {broker.port} (queues {UPGRADE_QUEUE} and {DEADLETTER_QUEUE}).",
            markup=False,
        )
        console.print(demo_rollout.storage_line(settings, storage), markup=False)
        console.print(
            "Tenant: the app Contoso Helpdesk 2.2.0 is installed for 10 users, a team and a chat; 2.3.0 is in the "
            "catalog. Contoso Compliance is a permanent app, which Graph refuses to upgrade.",
            markup=False,
        )
        console.print(
            f"Settings as in Azure, except {', '.join(f'{k}={v}' for k, v in DEMO_SETTINGS.items())} so that retries "
            "play out in seconds.\n",
            markup=False,
        )
        demo_cases = cases(installations)
        with _environment(identity.environment()):
            processed = await _run(console, settings, graph, demo_cases, args.concurrency)
            letters = await _dead_letters(settings)
            helpdesk_upgrades = sum(1 for call in graph.upgraded if call.teams_app_id == HELPDESK)
            stats = graph.stats()
            _print_outcomes(console, demo_cases, processed)
            _print_dead_letters(console, letters)
            console.print(
                f"\nGraph simulator: {stats['requests']} requests, {helpdesk_upgrades} installations upgraded "
                f"(2.2.0 → 2.3.0), {stats['throttled']} answered 429, {stats['faults']} scripted faults.",
                markup=False,
            )
            if storage is not None:
                demo_rollout.print_budget(console, settings, processed)
            rollout = await demo_rollout.run(console, settings, rollout_tenant)
            demo_rollout.print_run(console, rollout_tenant, rollout)
            await demo_rollout.print_status(console, settings)
    _print_legend(console)
    console.print(f"\nDemo finished in {time.monotonic() - started:.1f} s.")
    return 0


async def _send(bus: Bus, settings: Settings, demo_cases: Sequence[Case]) -> None:
    for case in demo_cases:
        if describe_request(case.body).startswith("invalid:"):
            # What a buggy producer sends; send would have refused it.
            raw = ServiceBusMessage(
                case.body,
                message_id=str(uuid.uuid5(uuid.NAMESPACE_URL, case.body.decode())),
                content_type="application/json",
                application_properties=case.properties,  # type: ignore[arg-type]
            )
            await bus.send(settings.upgrade_queue, [raw])
            continue
        [request] = prepare([("sample", json.loads(case.body))])  # send's validation and message id
        await send_requests(bus, settings.upgrade_queue, [request], properties=case.properties)


async def _run(
    console: Console, settings: Settings, graph: GraphSimulator, demo_cases: Sequence[Case], concurrency: int
) -> list[Processed]:
    """Send the cases and run the worker until idle; then the ``last`` ones, and the worker again.

    Before each round the simulator is given that round's scripted answers, in sending order.
    """
    bus = Bus(settings.service_bus)
    handler = UpgradeHandler(settings, sender=bus)
    processed: list[Processed] = []
    first = [case for case in demo_cases if not case.last]
    last = [case for case in demo_cases if case.last]
    try:
        for number, batch in enumerate((first, last)):
            graph.script("upgrade", *(fault for case in batch for fault in case.graph_script))
            await _send(bus, settings, batch)
            if number == 0:
                console.print(
                    f"Sent {len(batch)} requests to {settings.upgrade_queue} with send's validation and "
                    "content-derived message ids (the malformed one as a buggy producer would send it).",
                    markup=False,
                )
            else:
                console.print(
                    f"Sent {len(batch)} more, which Graph will answer 429 with Retry-After: 3, longer than the "
                    "inline wait allows.",
                    markup=False,
                )
            worker = Worker(
                handler.handle,
                bus,
                settings.upgrade_queue,
                concurrency=concurrency,
                until_idle=UNTIL_IDLE,
                on_processed=processed.append,
            )
            started = time.monotonic()
            stats = await worker.run()
            console.print(
                f"  Worker ({concurrency} at a time, same handler as the function) ran until the queue was idle "
                f"for {UNTIL_IDLE:g} s: {stats.received} deliveries, {stats.completed} completed, "
                f"{stats.abandoned} abandoned, {time.monotonic() - started:.1f} s.",
                markup=False,
            )
        console.print()
    finally:
        await handler.aclose()
        await bus.aclose()
    return processed


async def _dead_letters(settings: Settings) -> list[Any]:
    bus = Bus(settings.service_bus)
    try:
        place = Place(Source.DEADLETTER_QUEUE, settings.deadletter_queue, False)
        return await collect(bus, [place], Filters())
    finally:
        await bus.aclose()


def _print_outcomes(console: Console, demo_cases: Sequence[Case], processed: Sequence[Processed]) -> None:
    by_request: dict[str, list[Processed]] = {}
    children: dict[str, list[Processed]] = {}
    for item in processed:
        parent = item.delivery.application_properties.get(PARENT_PROPERTY)
        if isinstance(parent, str):
            children.setdefault(parent, []).append(item)
        else:
            by_request.setdefault(item.original_message_id, []).append(item)
    table = Table(title="What happened to each request", title_justify="left", show_lines=True)
    table.add_column("#", justify="right")
    table.add_column("request (producer: what it asks for)", overflow="fold", max_width=30)
    table.add_column("outcome", overflow="fold", max_width=20)
    table.add_column("Graph", overflow="fold", max_width=23)
    table.add_column("tries", justify="right")
    table.add_column("what happened", overflow="fold")
    labels = {_same_request(case.body): case.request for case in demo_cases}
    rows = 0
    for number, (first_id, deliveries) in enumerate(by_request.items(), start=1):
        body = deliveries[0].delivery.body
        envelope = envelope_of(body)
        producer = plain(deliveries[0].delivery.application_properties.get("Source")) or "?"
        summary = journey(item.summary for item in deliveries)
        outcomes = " → ".join(
            OUTCOME_WORDS[item.outcome] if item.outcome is not None else "abandoned" for item in deliveries
        )
        if summary.reason:
            outcomes += f": {summary.reason}"
        label = labels.get(_same_request(body)) or describe_request(body)
        table.add_row(
            str(number),
            f"{producer}{f' ({envelope})' if envelope else ''}: {label}",
            outcomes,
            summary.graph or "-",
            str(summary.attempts) if summary.attempts is not None else "-",
            "\n".join(summary.steps),
        )
        rows += 1
        for child in children.get(first_id, []):
            child_summary = child.summary
            table.add_row(
                "",
                f"↳ fan-out child: {describe_request(child.delivery.body).replace(HELPDESK, 'Helpdesk')}",
                child_summary.outcome,
                child_summary.graph or "-",
                str(child_summary.attempts) if child_summary.attempts is not None else "-",
                "\n".join(child_summary.steps),
            )
    console.print(table)
    counts: dict[str, int] = {}
    for item in processed:
        word = OUTCOME_WORDS[item.outcome] if item.outcome is not None else "abandoned"
        counts[word] = counts.get(word, 0) + 1
    order = [*OUTCOME_WORDS.values(), "abandoned"]
    console.print(
        f"{rows} requests, {len(processed)} deliveries: "
        + ", ".join(f"{counts[word]} {word}" for word in order if word in counts)
        + f". ({len(demo_cases)} sent; fan-out children and retry copies are deliveries too.)\n"
    )


def _same_request(body: bytes) -> str:
    """The same text for a sample file and the compact body ``send`` made of it."""
    try:
        return canonical_json(json.loads(body))
    except ValueError:
        return body.decode("utf-8", errors="replace")


def _print_dead_letters(console: Console, letters: Sequence[Any]) -> None:
    place = Place(Source.DEADLETTER_QUEUE, DEADLETTER_QUEUE, False)
    console.print(summary_table(letters, [place]))
    table = Table(title=f"The dead-letter queue ({DEADLETTER_QUEUE}), message by message", title_justify="left")
    table.add_column("message id", overflow="fold", max_width=36)
    table.add_column("DeadLetterReason")
    table.add_column("Graph error", overflow="fold")
    table.add_column("attempts", justify="right")
    table.add_column("why (DeadLetterErrorDescription)", overflow="fold")
    for letter in letters:
        table.add_row(
            letter.message_id,
            letter.reason,
            letter.graph or "-",
            letter.attempts,
            shorten(letter.description, 160),
        )
    console.print(table)


def _print_legend(console: Console) -> None:
    console.print(
        "\nHow to read this:\n"
        "  upgraded         Graph answered 2xx; the message was completed. Short waits (a 5xx, a 429 with a short\n"
        "                   Retry-After) are retried inside the same delivery: more attempts, same row.\n"
        "  retry scheduled  Graph asked for a longer wait, or the catalog does not publish the request's version\n"
        "                   yet (CatalogNotUpdated): a copy was scheduled on the upgrade queue for then, and the\n"
        "                   original completed. The worker picked the copy up when it came due.\n"
        "  current          the installation already runs the request's version: no upgrade call.\n"
        "  skipped          the app is not installed there and the request said ifNotInstalled: skip.\n"
        "  fanned out       a request for many users became one request per user on the queue.\n"
        "  dead-lettered    sent to the dead-letter queue with the reason and Graph's error, then completed:\n"
        "                   InvalidMessage (the body breaks the contract; Graph is not called),\n"
        "                   InstallationNotFound (the lookup found nothing), GraphRequestRejected (a permanent\n"
        "                   Graph error), RetriesExhausted (UPGRADE_MAX_ATTEMPTS spent on transient errors).\n"
        "In Azure: python -m upgrade_handler deadletters list | show ID | replay --reason ... (see --help);\n"
        "          python -m upgrade_handler rollout status ROLLOUT_ID --wait, to wait on a rollout from a pipeline.",
        markup=False,
    )
