"""A local Microsoft Graph stand-in for the Teams ``installedApps`` family.

What it simulates (``/v1.0`` and ``/beta`` alike):

- ``POST /users/{id|UPN}/teamwork/installedApps/{installationId}/upgrade``, the same under
  ``/teams/{teamId}`` and ``/chats/{chatId}``, also with the ``microsoft.graph.upgrade``
  segment: 204 and the installation moves to its app's latest published version; the optional
  ``consentedPermissionSet`` body is checked for shape;
- ``GET .../installedApps?$expand=teamsApp&$filter=teamsApp/id eq '…'`` (or
  ``teamsApp/externalId``, or ``teamsAppDefinition/displayName``), the installation lookup, with
  ``teamsAppDefinition`` (the installed version) when expanded;
- ``GET .../installedApps/{id}?$expand=teamsAppDefinition`` and ``GET /appCatalogs/teamsApps``
  with ``$filter`` and ``$expand=appDefinitions`` (:mod:`standins.graph_catalog`): an upgrade
  moves to the catalog's latest *published* version, so ``Tenant.publish`` can make it lag;
- ``GET /groups/{id}/transitiveMembers/microsoft.graph.user`` with ``$top`` and
  ``@odata.nextLink`` paging (``Tenant.group_page_size`` caps the page);
- Graph's error bodies, headers (``request-id``, ``client-request-id``, ``Date``,
  ``x-ms-ags-diagnostic``, ``Retry-After``, ``WWW-Authenticate``) and status codes for unknown
  users, teams, chats and installations, permanent apps, bad bodies, bad tokens and unknown
  path segments (400 ``BadRequest`` "Resource not found for the segment '…'.", as Graph does);
- trouble on demand: scripted responses (:meth:`GraphSimulator.script`), seeded random faults
  (:meth:`GraphSimulator.set_chaos`), a per-tenant sliding-window rate limit that answers 429
  with a decimal ``Retry-After`` (:meth:`GraphSimulator.set_rate_limit`) and seeded latency.

What it does not: token contents (a ``token_validator`` callback decides), permissions and
consent rules (but ``Tenant.deny_catalog``), installing or uninstalling through HTTP, ``$batch``, ``$select``
on installations, HTTPS or HTTP/2. Its behaviour where Graph's is unknown (an upgrade of an
installation already at the latest version answers 204) is marked GUESS where it is decided.

Use from a test::

    with GraphSimulator(token_validator=lambda t: t == "good") as graph:
        graph.tenant.add_user(USER, "adele@contoso.com")
        graph.tenant.add_app(APP, "manifest-id")
        iid = graph.tenant.install("user", USER, APP)
        graph.script("upgrade", Fault.throttled("0.01"), Fault(502))   # then normal behaviour
        ...point the code under test at graph.url ("http://127.0.0.1:<port>")...
        assert graph.tenant.installation_version(iid) == "1.1.0"
        assert [r.status for r in graph.requests] == [429, 502, 204]

Per request, in order: record it; decide its scripted fault (the route's queue, then "*") or
chaos fault and its latency, all at arrival so concurrency cannot reshuffle who gets what;
sleep the latency; serve the fault if any (it bypasses authentication, so anything can be
scripted); authenticate; count it against the rate limit; route it.

The server runs on its own thread and loop (:class:`BackgroundServer`), so it works with sync
and async clients alike. Every knob is thread-safe and takes effect for the next request;
``token_validator`` is called on the server's thread and must not block. ``stop()`` cancels
requests still held (by a "timeout" fault, say), so it returns at once.
"""

from __future__ import annotations

import asyncio
import logging
import math
import random
import re
import threading
import time
import uuid
from collections import Counter, deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from typing import Any, Self
from urllib.parse import parse_qsl, quote, unquote, urlencode

from aiohttp import web

from ._background import BackgroundServer
from .graph_catalog import catalog_page, installation_entity
from .graph_faults import CHAOS_KINDS, ROUTES, Chaos, Fault, RateLimit
from .graph_requests import (
    GraphError,
    Route,
    check_upgrade_body,
    decode_skiptoken,
    encode_skiptoken,
    installation_json,
    parse_route,
    target_not_found,
)
from .graph_responses import (
    ODATA_JSON,
    WWW_AUTHENTICATE,
    error_response,
    fault_response,
    graph_headers,
    json_response,
    reset_connection,
)
from .graph_tenant import Scope, Tenant, parse_installed_apps_filter

__all__ = ["CHAOS_KINDS", "Fault", "GraphSimulator", "RecordedRequest", "Tenant", "UpgradeRecord"]

log = logging.getLogger(__name__)

_MAX_BODY = 4 * 1024 * 1024  # Graph's own request size limit


@dataclass(frozen=True)
class RecordedRequest:
    method: str
    raw_path: str  # path only, exactly as received (percent-encoding intact); the query is raw_query
    segments: tuple[str, ...]  # raw_path split on "/" (leading empty one dropped), each percent-decoded
    query: dict[str, str]
    headers: dict[str, str]
    body: bytes
    status: int | None  # None while in flight and for a reset connection
    received_at: float  # time.monotonic()
    raw_query: str = ""
    fault: str | None = None  # "scripted", "passthrough" or "chaos:<kind>" when one applied
    route: str | None = None  # "upgrade", "list", "installation", "catalog", "group"; None: unroutable


@dataclass(frozen=True)
class UpgradeRecord:
    scope: Scope
    target_id: str  # as in the path (a UPN stays a UPN)
    installation_id: str  # as in the path
    client_request_id: str | None  # as the client sent it
    time: float  # time.monotonic() when answered
    request_id: str = ""
    teams_app_id: str = ""
    from_version: str = ""
    version: str = ""
    consented_permission_set: dict[str, Any] | None = None


class _Slot:
    """Mutable holder, so the final status can be filled in after clear_requests() swapped lists."""

    __slots__ = ("record",)

    def __init__(self, record: RecordedRequest) -> None:
        self.record = record


class GraphSimulator:
    """Microsoft Graph (Teams installedApps, group members) on ``http://127.0.0.1:<port>``.

    ``seed`` seeds the latency jitter (chaos has its own seed); ``port`` 0 picks a free one.
    Start it once: a stopped simulator cannot be started again.
    """

    def __init__(
        self,
        *,
        token_validator: Callable[[str], bool] | None = None,
        seed: int = 0,
        port: int = 0,
    ) -> None:
        self.tenant = Tenant()
        self._token_validator = token_validator
        self._lock = threading.Lock()
        self._slots: list[_Slot] = []
        self._scripts: dict[str, deque[Fault]] = {route: deque() for route in ROUTES}
        self._chaos: Chaos | None = None
        self._rate: RateLimit | None = None
        self._latency = (0.0, 0.0)
        self._latency_rng = random.Random(seed)
        self._stats: Counter[str] = Counter()
        self._upgraded: list[UpgradeRecord] = []
        self._inflight: set[asyncio.Task[Any]] = set()  # touched on the server loop only
        app = web.Application(client_max_size=_MAX_BODY)
        app.router.add_route("*", "/{tail:.*}", self._handle)
        app.on_shutdown.append(self._cancel_inflight)
        self._server = BackgroundServer(app, port=port)

    # --- lifecycle ---------------------------------------------------------------------------

    @property
    def url(self) -> str:
        return self._server.url

    def start(self) -> Self:
        self._server.start()
        return self

    def stop(self) -> None:
        self._server.stop()

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    async def _cancel_inflight(self, _app: web.Application) -> None:
        # A request held by a "timeout" fault would otherwise keep the runner's graceful
        # shutdown waiting for up to a minute.
        for task in list(self._inflight):
            task.cancel()

    # --- knobs (any thread) ------------------------------------------------------------------

    @property
    def requests(self) -> list[RecordedRequest]:
        with self._lock:
            return [slot.record for slot in self._slots]

    def clear_requests(self) -> None:
        with self._lock:
            self._slots = []

    def reset(self) -> None:
        """Back to plain behaviour between tests: no scripts, chaos, rate limit, latency or records.

        The tenant is kept."""
        with self._lock:
            self._slots = []
            for queue in self._scripts.values():
                queue.clear()
            self._chaos = None
            self._rate = None
            self._latency = (0.0, 0.0)

    @property
    def upgraded(self) -> list[UpgradeRecord]:
        with self._lock:
            return list(self._upgraded)

    def script(self, route: str, *responses: Fault) -> None:
        """Queue responses for the next requests on ``route``; a route's own queue goes before "*"."""
        if route not in ROUTES:
            raise ValueError(f"route must be one of {ROUTES}, not {route!r}")
        with self._lock:
            self._scripts[route].extend(responses)

    def set_chaos(
        self,
        rates: Mapping[str, float],
        *,
        seed: int = 0,
        timeout_delay: float = 40.0,
        retry_after: str | None = "1.5",
    ) -> None:
        """Random faults: each request draws once from a generator seeded here, so the n-th
        request after this call gets the same fault for the same seed. ``retry_after`` is the
        ``Retry-After`` sent on chaos 429s and 503s (None: none)."""
        unknown = set(rates) - set(CHAOS_KINDS)
        if unknown:
            raise ValueError(f"unknown chaos kinds {sorted(unknown)}; known: {CHAOS_KINDS}")
        if any(rate < 0 for rate in rates.values()) or sum(rates.values()) > 1:
            raise ValueError("chaos rates must be >= 0 and add up to at most 1")
        thresholds, total = [], 0.0
        for kind in CHAOS_KINDS:
            if rates.get(kind, 0.0) > 0:
                total += rates[kind]
                thresholds.append((total, kind))
        chaos = Chaos(thresholds, random.Random(seed), timeout_delay, retry_after) if thresholds else None
        with self._lock:
            self._chaos = chaos

    def set_rate_limit(self, requests_per_window: int | None, *, window: float = 1.0) -> None:
        if requests_per_window is not None and (requests_per_window < 1 or window <= 0):
            raise ValueError("need requests_per_window >= 1 and window > 0")
        with self._lock:
            self._rate = None if requests_per_window is None else RateLimit(requests_per_window, window)

    def set_latency(self, mean: float, jitter: float = 0.0) -> None:
        if mean < 0 or jitter < 0:
            raise ValueError("latency and jitter must be >= 0")
        with self._lock:
            self._latency = (mean, jitter)

    def stats(self) -> dict[str, int]:
        """requests, upgrades_ok, throttled (every 429), rate_limited (429s of the rate limit),
        faults (scripted or chaos answers, resets included), resets, status_<code>."""
        with self._lock:
            counts = dict.fromkeys(("requests", "upgrades_ok", "throttled", "rate_limited", "faults", "resets"), 0)
            counts.update(self._stats)
            return counts

    # --- request handling (server loop) ------------------------------------------------------

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        task = asyncio.current_task()
        assert task is not None
        self._inflight.add(task)
        try:
            return await self._serve(request)
        finally:
            self._inflight.discard(task)

    async def _serve(self, request: web.Request) -> web.StreamResponse:
        received_at = time.monotonic()
        raw_path, _, raw_query = request.raw_path.partition("?")
        body = await request.read()
        headers: dict[str, str] = {}
        for name, value in request.headers.items():
            key = name.lower()
            headers[key] = f"{headers[key]}, {value}" if key in headers else value
        segments = tuple(unquote(part) for part in raw_path.split("/")[1:])
        query = dict(parse_qsl(raw_query, keep_blank_values=True))
        route = parse_route(request.method, segments)
        request_id = str(uuid.uuid4())
        client_request_id = headers.get("client-request-id")

        # Decide everything random or FIFO at arrival, in arrival order, so that latency jitter
        # cannot reorder which request gets which scripted or seeded fault.
        with self._lock:
            fault, fault_label = self._take_fault(route.kind)
            mean, jitter = self._latency
            delay = max(0.0, self._latency_rng.uniform(mean - jitter, mean + jitter)) if mean or jitter else 0.0
            record = RecordedRequest(
                request.method,
                raw_path,
                segments,
                query,
                headers,
                body,
                None,
                received_at,
                raw_query,
                fault_label,
                route.kind,
            )
            slot = _Slot(record)
            self._slots.append(slot)
            self._stats["requests"] += 1

        ids = (request_id, client_request_id or request_id)
        if delay:
            await asyncio.sleep(delay)
        if fault is not None:
            if fault.delay:
                await asyncio.sleep(fault.delay)
            if fault.reset:
                self._finish(slot, None, fault=True)
                reset_connection(request)
                return web.Response(status=204)  # never written: the connection is gone
            if not fault.passthrough:
                response = fault_response(fault, ids)
                self._finish(slot, response.status, fault=True)
                return response
        try:
            response = self._answer(request, route, body, headers, query, ids)
        except GraphError as answer:
            response = error_response(answer.status, answer.code, answer.message, ids, answer.headers, answer.inner)
        except Exception as exc:  # a simulator bug must still produce a recorded answer
            log.exception("graph simulator failed on %s %s", request.method, raw_path)
            response = error_response(500, "InternalServerError", f"Simulator error: {exc!r}", ids)
        self._finish(slot, response.status, fault=False)
        return response

    def _take_fault(self, kind: str | None) -> tuple[Fault | None, str | None]:
        # The chaos draw happens for every request, scripted or not, so that chaos outcomes
        # depend only on the request's position after set_chaos().
        chaos_kind = self._chaos.draw() if self._chaos is not None else None
        for route in (kind, "*"):
            queue = self._scripts.get(route) if route else None
            if queue:
                fault = queue.popleft()
                return fault, "passthrough" if fault.passthrough else "scripted"
        if chaos_kind is not None and self._chaos is not None:
            return self._chaos.fault(chaos_kind), f"chaos:{chaos_kind}"
        return None, None

    def _finish(self, slot: _Slot, status: int | None, *, fault: bool) -> None:
        with self._lock:
            slot.record = replace(slot.record, status=status)
            if fault:
                self._stats["faults"] += 1
            if status is None:
                self._stats["resets"] += 1
                return
            self._stats[f"status_{status}"] += 1
            if status == 429:
                self._stats["throttled"] += 1

    def _answer(
        self,
        request: web.Request,
        route: Route,
        body: bytes,
        headers: dict[str, str],
        query: dict[str, str],
        ids: tuple[str, str],
    ) -> web.Response:
        self._authenticate(headers.get("authorization", ""))
        with self._lock:
            wait = self._rate.admit(time.monotonic()) if self._rate is not None else None
            if wait is not None:
                self._stats["rate_limited"] += 1
        if wait is not None:
            retry_after = f"{max(math.ceil(wait * 1000) / 1000, 0.001):.3f}"
            raise GraphError(429, "TooManyRequests", "Please retry again later.", {"Retry-After": retry_after})
        if route.error is not None:
            raise GraphError(*route.error)
        base = f"{request.scheme}://{request.host}/{route.version}"
        if route.kind == "upgrade":
            return self._upgrade(route, body, headers, ids)
        if route.kind == "list":
            return json_response(200, self._list(route, query, base), ids, ODATA_JSON)
        if route.kind == "installation":
            return json_response(200, installation_entity(self.tenant, route, query, base), ids, ODATA_JSON)
        if route.kind == "catalog":
            return json_response(200, catalog_page(self.tenant, query, base), ids, ODATA_JSON)
        return json_response(200, self._group_page(route, query, base, request), ids, ODATA_JSON)

    def _authenticate(self, authorization: str) -> None:
        scheme, _, token = authorization.strip().partition(" ")
        challenge = {"WWW-Authenticate": WWW_AUTHENTICATE}
        if scheme.lower() != "bearer" or not token.strip():
            raise GraphError(401, "InvalidAuthenticationToken", "Access token is empty.", challenge)
        if self._token_validator is not None and not self._token_validator(token.strip()):
            msg = "Access token has expired or is not yet valid."
            raise GraphError(401, "InvalidAuthenticationToken", msg, challenge)

    def _upgrade(self, route: Route, body: bytes, headers: dict[str, str], ids: tuple[str, str]) -> web.Response:
        permission_set = check_upgrade_body(body, headers.get("content-type"))
        outcome = self.tenant.upgrade(route.scope, route.target, route.installation)
        if outcome.status == "no_target":
            raise GraphError(404, "NotFound", target_not_found(route.scope, route.target))
        if outcome.status == "no_installation":
            raise GraphError(404, "NotFound", f"Teams app installation '{route.installation}' not found.")
        if outcome.status == "permanent":
            msg = f"User operation (Upgrade) is not allowed on a permanent app (appId: {outcome.teams_app_id})"
            inner = {"code": "AccessDenied", "message": msg, "details": []}
            raise GraphError(403, "Forbidden", msg, inner=inner)
        # GUESS (research §2.4): an installation already at the latest version answers 204 too.
        record = UpgradeRecord(
            route.scope,
            route.target,
            route.installation,
            headers.get("client-request-id"),
            time.monotonic(),
            ids[0],
            outcome.teams_app_id,
            outcome.from_version,
            outcome.version,
            permission_set,
        )
        with self._lock:
            self._upgraded.append(record)
            self._stats["upgrades_ok"] += 1
        return web.Response(status=204, headers=graph_headers(ids))

    def _list(self, route: Route, query: dict[str, str], base: str) -> dict[str, Any]:
        expand = {part.strip().lower() for part in re.sub(r"\([^()]*\)", "", query.get("$expand", "")).split(",")}
        expand.discard("")
        for prop in expand - {"teamsapp", "teamsappdefinition"}:
            msg = f"Could not find a property named '{prop}' on type 'microsoft.graph.teamsAppInstallation'."
            raise GraphError(400, "BadRequest", msg)
        flt = None
        if "$filter" in query:
            try:
                flt = parse_installed_apps_filter(query["$filter"])
            except ValueError as exc:
                raise GraphError(400, "BadRequest", str(exc)) from None
        views = self.tenant.list_installations(route.scope, route.target, flt)
        if views is None:
            raise GraphError(404, "NotFound", target_not_found(route.scope, route.target))
        owner = {"user": "users('{}')/teamwork", "team": "teams('{}')", "chat": "chats('{}')"}[route.scope]
        expanded = ",".join(f"{p}()" for p in ("teamsApp", "teamsAppDefinition") if p.lower() in expand)
        context = f"{base}/$metadata#{owner.format(route.target)}/installedApps" + (f"({expanded})" if expanded else "")
        return {"@odata.context": context, "value": [installation_json(v, expand) for v in views]}

    def _group_page(self, route: Route, query: dict[str, str], base: str, request: web.Request) -> dict[str, Any]:
        top_text = query.get("$top", "100")
        if not top_text.isdigit() or not 1 <= int(top_text) <= 999:
            msg = f"Invalid page size specified: '{top_text}'. Must be between 1 and 999 inclusive."
            raise GraphError(400, "Request_UnsupportedQuery", msg)
        members = self.tenant.group_members(route.target)
        if members is None:
            msg = (
                f"Resource '{route.target}' does not exist or one of its queried "
                "reference-property objects are not present."
            )
            raise GraphError(404, "Request_ResourceNotFound", msg)
        offset = 0
        if "$skiptoken" in query:
            offset = decode_skiptoken(query["$skiptoken"], route.target)
        size = max(1, min(int(top_text), self.tenant.group_page_size))
        page = {
            "@odata.context": f"{base}/$metadata#users(id)",
            "value": [{"id": member} for member in members[offset : offset + size]],
        }
        if offset + size < len(members):
            params = {k: v for k, v in query.items() if k != "$skiptoken"}
            params["$skiptoken"] = encode_skiptoken(route.target, offset + size)
            path = request.raw_path.partition("?")[0]
            encoded = urlencode(params, safe="$'(),=", quote_via=quote)
            page["@odata.nextLink"] = f"{request.scheme}://{request.host}{path}?{encoded}"
        return page
