"""The Microsoft Graph client: installation lookups and upgrades, one ``httpx.AsyncClient`` per process.

Every URL is the configured base URL, a fixed API version and fixed path words, with each id
percent-encoded as exactly one path segment (RFC 6570 simple expansion, as the Graph SDKs do),
so nothing from a message can reach another host, version or path.

Every request is bounded as a whole (contract §2): connected within 5 s and answered, body and
all, within 30 s however slowly the bytes arrive; past that it is a :class:`GraphTimeout`. Any
other failure of the HTTP client (connection, protocol, a body that cannot be decoded) is a
:class:`GraphConnectionError`: nothing from ``httpx`` reaches the caller unclassified.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any
from urllib.parse import quote, urlsplit

import httpx

from . import __version__
from .budget import BudgetWaitExceeded, SharedBudget
from .errors import (
    GraphConnectionError,
    GraphError,
    GraphFailure,
    GraphTimeout,
    HeldBack,
    PermanentGraphError,
    TransientGraphError,
    classify_response,
)
from .messages import AppKind, AppRef, Scope, Target
from .ratelimit import AdaptiveRateLimiter, GateClosed
from .versions import Version

API_VERSION = "v1.0"
USER_AGENT = f"teams-app-upgrader/{__version__}"
#: The whole request, from asking the pool for a connection to the last byte of the answer.
REQUEST_TIMEOUT_SECONDS = 30.0
#: httpx's own limits apply to each step (connect, each read or write) inside that bound.
TIMEOUT = httpx.Timeout(REQUEST_TIMEOUT_SECONDS, connect=5.0)
LIMITS = httpx.Limits(max_connections=64, max_keepalive_connections=32, keepalive_expiry=60)


@dataclass(frozen=True, slots=True)
class GraphCall:
    """A successful Graph response: what to log about it."""

    status: int
    request_id: str | None
    client_request_id: str
    duration_ms: int
    budget_wait_ms: int = 0
    """How long the call waited for its turn in the shared budget (§7)."""


@dataclass(frozen=True, slots=True)
class Installation:
    """The installation a lookup found, and how many matched."""

    id: str
    matches: int
    call: GraphCall
    version: str | None = None
    """The installed ``teamsAppDefinition.version``, when the lookup asked for it."""


def segment(value: str) -> str:
    """Percent-encode ``value`` so it is one path segment and nothing else.

    ``.`` is unreserved and stays as it is, except in a segment of dots only, which URL
    normalisation would read as "this" or "parent" segment.
    """
    encoded = quote(value, safe="")
    return encoded.replace(".", "%2E") if not encoded.strip(".") else encoded


def installed_apps_path(target: Target) -> str:
    """The ``installedApps`` collection of a user, team or chat."""
    owner = segment(target.id)
    if target.scope is Scope.USER:
        return f"/{API_VERSION}/users/{owner}/teamwork/installedApps"
    if target.scope is Scope.TEAM:
        return f"/{API_VERSION}/teams/{owner}/installedApps"
    return f"/{API_VERSION}/chats/{owner}/installedApps"


def upgrade_path(target: Target, installation_id: str) -> str:
    return f"{installed_apps_path(target)}/{segment(installation_id)}/upgrade"


def lookup_query(app: AppRef, *, with_definition: bool = False) -> str:
    """``$expand=teamsApp&$filter=teamsApp/<field> eq '<value>'`` with the literal quoted for OData;
    ``$expand=teamsApp,teamsAppDefinition`` when the installed version is wanted (§8)."""
    field = "id" if app.kind is AppKind.TEAMS_APP_ID else "externalId"
    expand = "teamsApp,teamsAppDefinition" if with_definition else "teamsApp"
    return f"$expand={expand}&$filter=" + quote(f"teamsApp/{field} eq '{odata_literal(app.value)}'", safe="/'")


def odata_literal(value: str) -> str:
    """The inside of an OData string literal: single quotes doubled."""
    return value.replace("'", "''")


class GraphClient:
    """Calls Graph on behalf of the handler; raises :class:`~upgrade_handler.errors.GraphError` kinds.

    ``http`` is the seam for tests and tools; by default one client with explicit timeouts and
    connection limits is created. ``limiter`` paces calls across the whole process; ``budget``, when
    there is a store, paces them across every instance first: a call waits up to ``budget_wait``
    seconds for its turn there, and is held back (a transient 429-like failure whose ``retry_after``
    is the expected wait) when its turn is further away.
    ``request_timeout`` bounds each request as a whole, in seconds; ``timeout`` is httpx's limit
    for each step of it (connect, each read).
    """

    def __init__(
        self,
        base_url: str,
        *,
        limiter: AdaptiveRateLimiter,
        http: httpx.AsyncClient | None = None,
        timeout: httpx.Timeout = TIMEOUT,
        request_timeout: float = REQUEST_TIMEOUT_SECONDS,
        budget: SharedBudget | None = None,
        budget_wait: float = 240.0,
    ) -> None:
        if not request_timeout > 0:
            raise ValueError("request_timeout must be positive")
        self._base_url = base_url.rstrip("/")
        self._request_timeout = request_timeout
        self.limiter = limiter
        self.budget = budget
        self._budget_wait = budget_wait
        self._http = http or httpx.AsyncClient(timeout=timeout, limits=LIMITS, follow_redirects=False, trust_env=False)

    async def aclose(self) -> None:
        await self._http.aclose()

    async def find_installation(
        self,
        target: Target,
        app: AppRef,
        token: str,
        *,
        max_gate_wait: float = float("inf"),
        max_budget_wait: float | None = None,
        with_version: bool = False,
    ) -> Installation | None:
        """The installation of ``app`` for ``target``, or ``None`` when it is not installed.

        ``with_version`` also reads the installed version, in the same call."""
        url = f"{self._base_url}{installed_apps_path(target)}?{lookup_query(app, with_definition=with_version)}"
        response, call = await self._send(
            "GET", url, token, max_gate_wait=max_gate_wait, max_budget_wait=max_budget_wait
        )
        try:
            document = json.loads(response.content)
            values = document["value"]
            if not isinstance(values, list):
                raise TypeError("value is not a list")
            ids = [item["id"] for item in values]
            if not all(isinstance(item, str) and item for item in ids):
                raise TypeError("an installation has no id")
            version = installed_version(values[0]) if values and with_version else None
        except (ValueError, KeyError, TypeError) as error:
            raise PermanentGraphError(
                _failure_from(response, call, code="UnreadableResponse", message=f"lookup answer unreadable: {error}")
            ) from None
        if not ids:
            return None
        return Installation(ids[0], len(ids), call, version)

    async def upgrade(
        self,
        target: Target,
        installation_id: str,
        permissions: Mapping[str, Any] | None,
        token: str,
        *,
        max_gate_wait: float = float("inf"),
        max_budget_wait: float | None = None,
    ) -> GraphCall:
        url = f"{self._base_url}{upgrade_path(target, installation_id)}"
        body = None if permissions is None else {"consentedPermissionSet": permissions}
        _, call = await self._send(
            "POST", url, token, body, max_gate_wait=max_gate_wait, max_budget_wait=max_budget_wait
        )
        return call

    async def get_page(
        self,
        url: str,
        token: str,
        *,
        max_gate_wait: float = float("inf"),
        max_budget_wait: float | None = None,
    ) -> tuple[dict[str, Any], GraphCall]:
        """GET a URL that the caller built from this client's base URL (paging), as JSON."""
        if not self.owns(url):
            raise ValueError("refusing a URL outside the configured Graph API")
        response, call = await self._send(
            "GET", url, token, max_gate_wait=max_gate_wait, max_budget_wait=max_budget_wait
        )
        try:
            document = json.loads(response.content)
            if not isinstance(document, dict):
                raise TypeError("not an object")
        except (ValueError, TypeError) as error:
            raise PermanentGraphError(
                _failure_from(response, call, code="UnreadableResponse", message=f"page unreadable: {error}")
            ) from None
        return document, call

    def owns(self, url: str) -> bool:
        """Whether ``url`` is on the configured Graph: same scheme, host and port, no user info,
        and the API version this client speaks (a paging link from Graph must be, to be followed)."""
        base = urlsplit(self._base_url)
        try:
            link = urlsplit(url)
            same_port = link.port == base.port
        except ValueError:
            return False
        return (
            link.scheme == base.scheme
            and link.hostname == base.hostname
            and same_port
            and link.username is None
            and link.path.startswith(f"/{API_VERSION}/")
        )

    @property
    def base_url(self) -> str:
        return self._base_url

    async def _send(
        self,
        method: str,
        url: str,
        token: str,
        body: Mapping[str, Any] | None = None,
        *,
        max_gate_wait: float,
        max_budget_wait: float | None = None,
    ) -> tuple[httpx.Response, GraphCall]:
        client_request_id = str(uuid.uuid4())
        headers = {
            "Authorization": f"Bearer {token}",
            "client-request-id": client_request_id,
            "return-client-request-id": "true",
            "User-Agent": USER_AGENT,
            "Accept": "application/json",
        }
        content = None
        if body is not None:
            headers["Content-Type"] = "application/json"
            content = json.dumps(body, separators=(",", ":")).encode()
        waited = 0.0
        if self.budget is not None:  # the fleet's pace first (§7), then this process's gate and rate
            try:
                waited = await self.budget.acquire(self._budget_wait if max_budget_wait is None else max_budget_wait)
            except BudgetWaitExceeded as held:
                raise HeldBack(
                    GraphFailure(
                        status=None,
                        code="TooManyRequests",
                        message=f"held back: {held}",
                        client_request_id=client_request_id,
                        retry_after=held.expected_wait,
                    )
                ) from None
        try:
            await self.limiter.acquire(max_gate_wait)
        except GateClosed as closed:
            raise TransientGraphError(
                GraphFailure(
                    status=429,
                    code="TooManyRequests",
                    message=f"not sent: {closed}",
                    client_request_id=client_request_id,
                    retry_after=closed.remaining,
                )
            ) from None
        started = time.monotonic()
        try:
            async with asyncio.timeout(self._request_timeout):
                response = await self._http.request(method, url, headers=headers, content=content)
        except TimeoutError:
            detail = f"no complete answer within {self._request_timeout:g} s"
            raise _transport_failure(GraphTimeout, "Timeout", detail, client_request_id) from None
        except httpx.ConnectTimeout as error:
            # Nothing was sent: as safe to repeat at once as a refused connection.
            raise _transport_failure(GraphConnectionError, "ConnectionError", error, client_request_id) from None
        except httpx.TimeoutException as error:
            raise _transport_failure(GraphTimeout, "Timeout", error, client_request_id) from None
        except httpx.HTTPError as error:
            # Transport and protocol errors, a body that cannot be decoded, too many redirects.
            raise _transport_failure(GraphConnectionError, "ConnectionError", error, client_request_id) from None
        call = GraphCall(
            status=response.status_code,
            request_id=response.headers.get("request-id"),
            client_request_id=response.headers.get("client-request-id") or client_request_id,
            duration_ms=round((time.monotonic() - started) * 1000),
            budget_wait_ms=round(waited * 1000),
        )
        if response.is_success:
            self.limiter.on_success()
            return response, call
        rejected = classify_response(response.status_code, response.headers, response.content)
        if response.status_code == 429:
            self.limiter.on_throttled(rejected.failure.retry_after)
        if rejected.failure.client_request_id is None:
            rejected = type(rejected)(replace(rejected.failure, client_request_id=client_request_id))
        raise rejected


def installed_version(installation: Any) -> str:
    """``teamsAppDefinition.version`` of an installation Graph returned: ``TypeError`` when absent,
    ``ValueError`` when it is not a version of dotted numbers."""
    definition = installation.get("teamsAppDefinition") if isinstance(installation, dict) else None
    version = definition.get("version") if isinstance(definition, dict) else None
    if not isinstance(version, str) or not version:
        raise TypeError("the installation has no teamsAppDefinition.version")
    return Version.parse(version).text


def _transport_failure(
    kind: type[TransientGraphError], code: str, error: Exception | str, client_request_id: str
) -> GraphError:
    detail = error if isinstance(error, str) else str(error) or type(error).__name__
    return kind(GraphFailure(status=None, code=code, message=detail, client_request_id=client_request_id))


def _failure_from(response: httpx.Response, call: GraphCall, *, code: str, message: str) -> GraphFailure:
    return GraphFailure(
        status=response.status_code,
        code=code,
        message=message,
        request_id=call.request_id,
        client_request_id=call.client_request_id,
        date=response.headers.get("date"),
        raw_body=response.text[:8192],
    )
