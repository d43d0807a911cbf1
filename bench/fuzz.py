"""Benchmark 5: a property-based fuzz of message bodies and ids through the handler.

The handler runs with its real Graph client over an in-process HTTP transport that records
every request (and answers 204 to upgrades, one installation to lookups, an empty page to group
reads), a token seam and a recording sender that refuses some sends on purpose. Three families
of inputs, from hypothesis:

- valid requests built from contract §1 (every scope, every way to name the app, envelopes,
  BOM, permission sets): never dead-lettered as ``InvalidMessage``;
- valid requests with one rule broken: dead-lettered as ``InvalidMessage``, no Graph request;
- arbitrary bodies (bytes, JSON of any shape, the real field names with arbitrary values).

For all of them: the handler returns an outcome or raises only the deliberate raise-to-retry
(the refused send); an ``InvalidMessage`` dead letter comes with no Graph request; and every
Graph request goes to the configured host, API version and path words, each id confined to
its own path segment (and, for valid requests, equal to the id in the message).

    python -m bench fuzz [--size 10000]      # examples per family
"""

from __future__ import annotations

import argparse
import asyncio
import codecs
import json
import time
import uuid
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any
from urllib.parse import unquote

import httpx
from azure.servicebus import ServiceBusMessage
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bench._common import ROOT, quiet_logs, table, write_result
from upgrade_handler.delivery import Delivery
from upgrade_handler.graph import GraphClient
from upgrade_handler.handler import UpgradeHandler
from upgrade_handler.outcome import Outcome
from upgrade_handler.ratelimit import AdaptiveRateLimiter
from upgrade_handler.settings import Settings

BASE = "http://127.0.0.1:8999"
UPGRADE_QUEUE, DEADLETTER_QUEUE = "upgrades", "deadletters"
LOOKED_UP = "Zm91bmQtYnktbG9va3Vw"  # the installation id every lookup answers with


class SendRefused(Exception):
    """The deliberate failure of a send: the handler must let it through (raise-to-retry)."""


@dataclass
class Sender:
    refuse: bool = False
    sent: list[tuple[str, ServiceBusMessage]] = field(default_factory=list)

    async def send(self, queue: str, messages: Sequence[ServiceBusMessage]) -> None:
        if self.refuse:
            raise SendRefused(queue)
        self.sent.extend((queue, m) for m in messages)


class Tokens:
    async def token(self, *, replacing: str | None = None) -> str:
        return "fuzz-token"

    async def aclose(self) -> None:
        return None


@dataclass
class Recorder:
    requests: list[httpx.Request] = field(default_factory=list)

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        if request.method == "POST":
            return httpx.Response(204)
        if "/groups/" in request.url.path:
            return httpx.Response(200, json={"value": []})
        return httpx.Response(200, json={"value": [{"id": LOOKED_UP}]})


def make_handler(recorder: Recorder, sender: Sender) -> UpgradeHandler:
    env = {
        "ServiceBusConnection": "Endpoint=sb://127.0.0.1:5672;SharedAccessKeyName=k;SharedAccessKey=k",
        "GRAPH_BASE_URL": BASE,
        "UPGRADE_QUEUE_NAME": UPGRADE_QUEUE,
        "DEADLETTER_QUEUE_NAME": DEADLETTER_QUEUE,
        "GRAPH_MAX_REQUESTS_PER_SECOND": "1000000",
    }
    settings_ = Settings.from_environment(env)
    http = httpx.AsyncClient(transport=httpx.MockTransport(recorder))
    graph = GraphClient(settings_.graph_base_url, limiter=AdaptiveRateLimiter(1_000_000), http=http)
    return UpgradeHandler(settings_, graph=graph, tokens=Tokens(), sender=sender)  # type: ignore[arg-type]


# --- strategies ------------------------------------------------------------------------------------

HEX = "0123456789abcdefABCDEF"
guids = st.uuids().map(str) | st.uuids().map(lambda u: str(u).upper())
upn_local = st.text("abcXYZ019'.-_!#^~", min_size=1, max_size=30).filter(lambda s: not s.startswith("."))
domains = st.lists(st.from_regex(r"[a-z0-9]([a-z0-9-]{0,8}[a-z0-9])?", fullmatch=True), min_size=1, max_size=3).map(
    lambda labels: ".".join([*labels, "com"])
)
upns = st.builds(lambda local, domain: f"{local}@{domain}", upn_local, domains).filter(lambda u: len(u) <= 113)
installation_ids = st.text("ABCXYZabcxyz0189+_-=", min_size=1, max_size=256)
chat_ids = st.builds(
    lambda core, tail: f"19:{core}@{tail}",
    st.text("abcXYZ019_.-", min_size=1, max_size=60),
    st.sampled_from(["thread.v2", "unq.gbl.spaces"]),
)
external_ids = st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7E), min_size=1, max_size=256)
permission_sets = st.builds(
    lambda entries: {"resourceSpecificPermissions": entries},
    st.lists(
        st.fixed_dictionaries(
            {
                "permissionValue": st.from_regex(r"[A-Za-z][A-Za-z0-9.]{0,30}", fullmatch=True),
                "permissionType": st.sampled_from(["Application", "Delegated", "application", "DELEGATED"]),
            }
        ),
        max_size=50,
    ),
)


@st.composite
def valid_requests(draw: st.DrawFn) -> dict[str, Any]:
    scope = draw(st.sampled_from(["userGuid", "userUpn", "teamId", "chatId"]))
    request: dict[str, Any] = {}
    if scope == "userGuid":
        request["userId"] = draw(guids)
    elif scope == "userUpn":
        request["userId"] = draw(upns)
    elif scope == "teamId":
        request["teamId"] = draw(guids)
    else:
        request["chatId"] = draw(chat_ids)
    app = draw(st.sampled_from(["appInstallationId", "teamsAppId", "externalId"]))
    request[app] = draw({"appInstallationId": installation_ids, "teamsAppId": guids, "externalId": external_ids}[app])
    if draw(st.booleans()):
        request["consentedPermissionSet"] = draw(permission_sets)
    if draw(st.booleans()):
        request["requestId"] = draw(st.text(max_size=40))
    if draw(st.booleans()):
        request["ifNotInstalled"] = draw(st.sampled_from(["deadletter", "skip"]))
    if draw(st.booleans()):
        request["someUnknownField"] = draw(st.integers() | st.text(max_size=10))
    return request


def wrap(request: dict[str, Any], envelope: str) -> dict[str, Any]:
    if envelope == "eventgrid":
        return {
            "id": "1",
            "eventType": "Contoso.Teams.AppPublished",
            "subject": "apps/1",
            "data": request,
            "dataVersion": "1.0",
            "eventTime": "2026-11-29T12:00:00Z",
        }
    if envelope == "cloudevents":
        return {
            "specversion": "1.0",
            "type": "Contoso.Teams.AppPublished",
            "source": "/apps",
            "id": "1",
            "data": request,
        }
    return request


def encode(document: Any, bom: bool) -> bytes:
    raw = json.dumps(document).encode()
    return codecs.BOM_UTF8 + raw if bom else raw


@st.composite
def valid_bodies(draw: st.DrawFn) -> tuple[dict[str, Any], bytes]:
    request = draw(valid_requests())
    body = encode(wrap(request, draw(st.sampled_from(["none", "eventgrid", "cloudevents"]))), draw(st.booleans()))
    return request, body


#: One rule of contract §1 broken at a time.
MUTATIONS: dict[str, Callable[[dict[str, Any], st.DrawFn], Any]] = {
    "no scope": lambda r, d: {k: v for k, v in r.items() if k not in ("userId", "teamId", "chatId")},
    "two scopes": lambda r, d: {**r, "teamId" if "teamId" not in r else "userId": str(uuid.uuid4())},
    "no app": lambda r, d: {k: v for k, v in r.items() if k not in ("appInstallationId", "teamsAppId", "externalId")},
    "two apps": lambda r, d: {**r, "teamsAppId" if "teamsAppId" not in r else "appInstallationId": str(uuid.uuid4())},
    "slash in installation id": lambda r, d: {**_one_app(r), "appInstallationId": d(installation_ids) + "/" + "x"},
    "dots as installation id": lambda r, d: {**_one_app(r), "appInstallationId": d(st.sampled_from([".", ".."]))},
    "bad team guid": lambda r, d: {**_one_scope(r), "teamId": d(st.text(max_size=40).filter(_not_guid))},
    "bad teamsAppId": lambda r, d: {**_one_app(r), "teamsAppId": d(st.text(max_size=40).filter(_not_guid))},
    "long installation id": lambda r, d: {**_one_app(r), "appInstallationId": "A" * d(st.integers(257, 2000))},
    "bad chat id": lambda r, d: {**_one_scope(r), "chatId": d(st.text(max_size=60).filter(lambda s: "@" not in s))},
    "bad upn": lambda r, d: {
        **_one_scope(r),
        "userId": d(st.sampled_from(["a b@c.com", "@c.com", "a@", "a@b..c", "a/b@c.com", "../x@c.com", "a@b_c.com"])),
    },
    "long upn": lambda r, d: {**_one_scope(r), "userId": "a" * 110 + "@contoso.com"},
    "id not a string": lambda r, d: {**_one_scope(r), "userId": d(st.integers() | st.lists(st.text(), max_size=2))},
    "bad permission": lambda r, d: {
        **r,
        "consentedPermissionSet": {
            "resourceSpecificPermissions": [
                {
                    "permissionValue": d(st.sampled_from(["", "1abc", "a b", "a/b", "a-b"])),
                    "permissionType": "Application",
                }
            ]
        },
    },
    "bad permission type": lambda r, d: {
        **r,
        "consentedPermissionSet": {
            "resourceSpecificPermissions": [
                {"permissionValue": "Abc", "permissionType": d(st.sampled_from(["", "Other", 3]))}
            ]
        },
    },
    "too many permissions": lambda r, d: {
        **r,
        "consentedPermissionSet": {
            "resourceSpecificPermissions": [{"permissionValue": "Abc", "permissionType": "Application"}] * 51
        },
    },
    "bad ifNotInstalled": lambda r, d: {**r, "ifNotInstalled": d(st.sampled_from(["never", "", 1, None]))},
}


def _one_scope(r: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in r.items() if k not in ("userId", "teamId", "chatId")}


def _one_app(r: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in r.items() if k not in ("appInstallationId", "teamsAppId", "externalId")}


def _not_guid(text: str) -> bool:
    try:
        return str(uuid.UUID(text)).lower() != text.lower() or len(text) != 36
    except ValueError:
        return True


@st.composite
def invalid_bodies(draw: st.DrawFn) -> tuple[str, bytes]:
    shape = draw(st.sampled_from([*MUTATIONS, "not json", "not utf-8", "array", "scalar", "too big", "envelope"]))
    request = draw(valid_requests())
    if shape == "not json":
        return shape, draw(st.binary(max_size=50).filter(lambda b: not _is_json(b)))
    if shape == "not utf-8":
        return shape, b'{"userId": "\xff\xfe"}'
    if shape == "array":
        return shape, json.dumps([request]).encode()
    if shape == "scalar":
        return shape, json.dumps(draw(st.integers() | st.text() | st.none() | st.booleans())).encode()
    if shape == "too big":
        return shape, json.dumps({**request, "padding": "x" * 65_536}).encode()
    if shape == "envelope":
        data = draw(st.sampled_from([[request], "text", 3, None]))
        return shape, json.dumps(wrap({}, "eventgrid") | {"data": data}).encode()
    if shape == "bad ifNotInstalled" and request.get("ifNotInstalled") is None and "userId" not in request:
        request = {**_one_scope(request), "userId": str(uuid.uuid4())}
    mutated = MUTATIONS[shape](request, draw)
    if shape == "bad ifNotInstalled" and mutated.get("ifNotInstalled") is None:
        mutated["ifNotInstalled"] = "never"
    return shape, encode(mutated, draw(st.booleans()))


def _is_json(raw: bytes) -> bool:
    try:
        json.loads(raw)
    except ValueError:
        return False
    return True


FIELDS = [
    "userId",
    "teamId",
    "chatId",
    "userIds",
    "groupId",
    "appInstallationId",
    "teamsAppId",
    "externalId",
    "consentedPermissionSet",
    "requestId",
    "ifNotInstalled",
    "groupNextLink",
    "data",
    "specversion",
    "eventType",
    "subject",
    "dataVersion",
    "id",
    "type",
    "source",
]
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=30),
    lambda children: st.lists(children, max_size=3) | st.dictionaries(st.sampled_from(FIELDS), children, max_size=3),
    max_leaves=8,
)
arbitrary_bodies = (
    st.binary(max_size=200)
    | st.dictionaries(st.sampled_from(FIELDS), json_values | st.text(max_size=300), max_size=6).map(
        lambda d: json.dumps(d).encode()
    )
    | valid_requests()
    .flatmap(
        lambda r: st.fixed_dictionaries({k: st.just(v) | json_values | st.text(max_size=80) for k, v in r.items()})
    )
    .map(lambda d: json.dumps(d).encode())
)


# --- properties ------------------------------------------------------------------------------------


@dataclass
class Tally:
    inputs: Counter[str] = field(default_factory=Counter)
    outcomes: Counter[str] = field(default_factory=Counter)
    invalid_shapes: Counter[str] = field(default_factory=Counter)
    graph_requests: int = 0
    raised_to_retry: int = 0


def run_one(body: bytes, refuse: bool) -> tuple[Outcome | None, Sender, Recorder]:
    """Hand one delivery to a fresh handler; ``None`` when it raised the deliberate send failure."""
    recorder, sender = Recorder(), Sender(refuse=refuse)
    handler = make_handler(recorder, sender)
    delivery = Delivery(body=body, message_id=str(uuid.uuid4()), delivery_count=1, enqueued_time_utc=datetime.now(UTC))

    async def go() -> Outcome | None:
        try:
            return await handler.handle(delivery)
        except SendRefused:
            return None
        finally:
            await handler.aclose()

    return asyncio.run(go()), sender, recorder


def dead_letter_reason(sender: Sender) -> str | None:
    for queue, message in sender.sent:
        if queue == DEADLETTER_QUEUE:
            return str((message.application_properties or {}).get("DeadLetterReason"))
    return None


def check_confined(request: httpx.Request, expected: dict[str, Any] | None = None) -> None:
    """Host, version and path words fixed; each id one segment (equal to the message's, if given)."""
    url = request.url
    assert (url.scheme, url.host, url.port) == ("http", "127.0.0.1", 8999), url
    raw = url.raw_path.decode("ascii").partition("?")[0]
    parts = raw.split("/")[1:]
    assert parts[0] == "v1.0", raw
    for part in parts:
        assert (part not in (".", "..", "") and "/" not in unquote(part)) or part.count("%2F") == 0, raw
        assert part not in (".", ".."), raw
    words = parts[1:]
    decoded = [unquote(w) for w in words]
    if words[0] == "groups":
        assert words[2:] == ["transitiveMembers", "microsoft.graph.user"], raw
        assert request.method == "GET", raw
        return
    if words[0] == "users":
        owner, rest = decoded[1], words[2:]
        assert rest[:2] == ["teamwork", "installedApps"], raw
        tail = rest[2:]
    else:
        assert words[0] in ("teams", "chats"), raw
        owner, tail = decoded[1], words[2:]
        assert tail[:1] == ["installedApps"], raw
        tail = tail[1:]
    if request.method == "GET":
        assert tail == [], raw
        assert url.query.decode().startswith("$expand=teamsApp&$filter="), url
    else:
        assert request.method == "POST", raw
        assert len(tail) == 2, raw
        assert tail[1] == "upgrade", raw
    if expected is not None:
        scope_id = expected.get("userId") or expected.get("teamId") or expected.get("chatId")
        assert owner == scope_id, (owner, scope_id)
        if request.method == "POST":
            installation = expected.get("appInstallationId", LOOKED_UP)
            assert unquote(tail[0]) == installation, (tail[0], installation)


def check_valid(request: dict[str, Any], body: bytes, refuse: bool, tally: Tally) -> None:
    outcome, sender, recorder = run_one(body, refuse)
    tally.inputs["valid"] += 1
    tally.graph_requests += len(recorder.requests)
    if outcome is None:
        tally.raised_to_retry += 1
        return
    tally.outcomes[str(outcome)] += 1
    assert dead_letter_reason(sender) != "InvalidMessage", (request, sender.sent)
    assert outcome is Outcome.UPGRADED, (request, outcome)
    assert recorder.requests, request
    for sent in recorder.requests:
        check_confined(sent, request)


def check_invalid(shape: str, body: bytes, refuse: bool, tally: Tally) -> None:
    outcome, sender, recorder = run_one(body, refuse)
    tally.inputs["invalid"] += 1
    tally.invalid_shapes[shape] += 1
    assert recorder.requests == [], (shape, body[:200])
    if outcome is None:
        tally.raised_to_retry += 1
        return
    tally.outcomes[str(outcome)] += 1
    assert outcome is Outcome.DEAD_LETTERED, (shape, body[:200])
    assert dead_letter_reason(sender) == "InvalidMessage", (shape, body[:200])


def check_arbitrary(body: bytes, refuse: bool, tally: Tally) -> None:
    outcome, sender, recorder = run_one(body, refuse)
    tally.inputs["arbitrary"] += 1
    tally.graph_requests += len(recorder.requests)
    if outcome is None:
        tally.raised_to_retry += 1
        return
    tally.outcomes[str(outcome)] += 1
    if dead_letter_reason(sender) == "InvalidMessage":
        assert recorder.requests == [], body[:200]
    for sent in recorder.requests:
        check_confined(sent)


def run_properties(examples: int, tally: Tally, *, derandomize: bool = False) -> None:
    """The three properties, ``examples`` inputs each. Raises on the first counterexample."""
    config = settings(
        max_examples=examples,
        deadline=None,
        derandomize=derandomize,
        database=None,
        suppress_health_check=list(HealthCheck),
    )
    refuse = st.booleans().map(lambda b: b) | st.just(False)

    @config
    @given(valid_bodies(), refuse)
    def valid(case: tuple[dict[str, Any], bytes], refused: bool) -> None:
        check_valid(case[0], case[1], refused, tally)

    @config
    @given(invalid_bodies(), refuse)
    def invalid(case: tuple[str, bytes], refused: bool) -> None:
        check_invalid(case[0], case[1], refused, tally)

    @config
    @given(arbitrary_bodies, refuse)
    def arbitrary(body: bytes, refused: bool) -> None:
        check_arbitrary(body, refused, tally)

    valid()
    invalid()
    arbitrary()


def run(size: int = 10_000) -> dict[str, Any]:
    quiet_logs()
    tally = Tally()
    started = time.perf_counter()
    failure = None
    try:
        run_properties(size, tally)
    except Exception as error:  # report the counterexample, then fail
        failure = f"{type(error).__name__}: {error}"
    elapsed = time.perf_counter() - started
    total = sum(tally.inputs.values())
    print(
        table(
            ("family", "inputs"),
            [*tally.inputs.items(), ["total", total]],
        )
    )
    print()
    print(
        table(
            ("what the handler did", "count"),
            [
                *sorted(tally.outcomes.items()),
                ["raised to retry (refused send)", tally.raised_to_retry],
                ["Graph requests, all confined to their path", tally.graph_requests],
                ["crashes / property failures", 0 if failure is None else 1],
                ["seconds", round(elapsed, 1)],
            ],
        )
    )
    print()
    print(table(("broken rule", "inputs, all dead-lettered InvalidMessage"), sorted(tally.invalid_shapes.items())))
    results = {
        "examples_per_family": size,
        "inputs": dict(tally.inputs),
        "total_inputs": total,
        "outcomes": dict(tally.outcomes),
        "raised_to_retry": tally.raised_to_retry,
        "graph_requests": tally.graph_requests,
        "invalid_shapes": dict(tally.invalid_shapes),
        "failure": failure,
        "elapsed_s": round(elapsed, 1),
    }
    path = write_result("fuzz", results)
    print(f"\nwritten to {path.relative_to(ROOT)}")
    if failure:
        print(f"\nFAILED: {failure}")
    return results


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench fuzz")
    parser.add_argument("--size", type=int, default=10_000, help="examples per family (three families)")
    args = parser.parse_args(argv)
    if run(args.size)["failure"]:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
