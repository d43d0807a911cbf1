"""Versions: what an installation runs, and what the tenant's app catalog publishes (contract §8).

An upgrade moves an installation to the catalog's latest published version, so an upgrade sent
before a new version reaches the catalog is a silent no-op. :class:`Catalog` reads the highest
published version of an app (``appCatalogs/teamsApps`` with ``$expand=appDefinitions``, which
needs ``AppCatalog.Read.All``) and keeps it per app for at most :data:`CATALOG_TTL_SECONDS`, one
read shared by every request that asks meanwhile.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

from .errors import GraphFailure, PermanentGraphError
from .graph import API_VERSION, GraphCall, GraphClient, installed_apps_path, installed_version, odata_literal, segment
from .messages import AppKind, AppRef, Target
from .versions import Version

#: How long one catalog answer is trusted: long enough that a fan-out's children share one read,
#: short enough that a version reaching the catalog is seen within a minute.
CATALOG_TTL_SECONDS = 60.0


@dataclass(frozen=True, slots=True)
class InstalledApp:
    """What an installation runs: its version and the catalog app it is an installation of."""

    version: str
    teams_app_id: str


class Catalog:
    """The tenant's app catalog as one process sees it; ``clock`` is monotonic seconds."""

    def __init__(self, graph: GraphClient, clock: Callable[[], float], ttl: float = CATALOG_TTL_SECONDS) -> None:
        self._graph = graph
        self._clock = clock
        self._ttl = ttl
        self._answers: dict[tuple[AppKind, str], tuple[float, Version | None]] = {}
        self._reads: dict[tuple[AppKind, str], asyncio.Future[Version | None]] = {}
        #: Catalog reads sent to Graph (the cache's effect is visible in tests and logs).
        self.reads = 0

    async def latest_published(
        self, app: AppRef, token: str, *, max_gate_wait: float, max_budget_wait: float | None = None
    ) -> Version | None:
        """The highest version of ``app`` whose definition is ``published``; ``None`` when the catalog
        does not list the app (yet). Concurrent callers for one app share one read."""
        key = (app.kind, app.value.lower())
        cached = self._answers.get(key)
        if cached is not None and cached[0] > self._clock():
            return cached[1]
        pending = self._reads.get(key)
        if pending is not None:
            return await asyncio.shield(pending)
        future: asyncio.Future[Version | None] = asyncio.get_running_loop().create_future()
        self._reads[key] = future
        try:
            latest = await self._read(app, token, max_gate_wait, max_budget_wait)
        except BaseException as error:
            future.set_exception(error)
            future.exception()  # retrieved here, so a read nobody else awaited is not reported as lost
            raise
        finally:
            self._reads.pop(key, None)
        self._answers[key] = (self._clock() + self._ttl, latest)
        future.set_result(latest)
        return latest

    async def installed(
        self,
        target: Target,
        installation_id: str,
        token: str,
        *,
        max_gate_wait: float,
        max_budget_wait: float | None = None,
    ) -> InstalledApp:
        """``GET .../installedApps/{id}?$expand=teamsAppDefinition``: the version an installation runs."""
        url = (
            f"{self._graph.base_url}{installed_apps_path(target)}/{segment(installation_id)}?$expand=teamsAppDefinition"
        )
        document, call = await self._graph.get_page(
            url, token, max_gate_wait=max_gate_wait, max_budget_wait=max_budget_wait
        )
        try:
            version = installed_version(document)
            teams_app_id = document["teamsAppDefinition"].get("teamsAppId")
            if not isinstance(teams_app_id, str) or not teams_app_id:
                raise TypeError("the installation's teamsAppDefinition has no teamsAppId")
        except (TypeError, ValueError, KeyError, AttributeError) as error:
            raise _unreadable(call, document, f"installation answer unreadable: {error}") from None
        return InstalledApp(version, teams_app_id)

    async def _read(
        self, app: AppRef, token: str, max_gate_wait: float, max_budget_wait: float | None
    ) -> Version | None:
        self.reads += 1
        field = "id" if app.kind is AppKind.TEAMS_APP_ID else "externalId"
        url = (
            f"{self._graph.base_url}/{API_VERSION}/appCatalogs/teamsApps?$filter="
            + quote(f"{field} eq '{odata_literal(app.value)}'", safe="'")
            + "&$expand=appDefinitions"
        )
        document, call = await self._graph.get_page(
            url, token, max_gate_wait=max_gate_wait, max_budget_wait=max_budget_wait
        )
        try:
            return _latest_published(document)
        except (TypeError, ValueError) as error:
            raise _unreadable(call, document, f"catalog answer unreadable: {error}") from None


def _latest_published(document: dict[str, Any]) -> Version | None:
    apps = document.get("value")
    if not isinstance(apps, list):
        raise TypeError("value is not a list")
    if not apps:
        return None
    definitions = apps[0].get("appDefinitions") if isinstance(apps[0], dict) else None
    if not isinstance(definitions, list):
        raise TypeError("the app has no appDefinitions")
    published = [
        Version.parse(definition.get("version"))
        for definition in definitions
        if isinstance(definition, dict) and definition.get("publishingState") == "published"
    ]
    return max(published, default=None)


def _unreadable(call: GraphCall, document: dict[str, Any], message: str) -> PermanentGraphError:
    return PermanentGraphError(
        GraphFailure(
            status=call.status,
            code="UnreadableResponse",
            message=message,
            request_id=call.request_id,
            client_request_id=call.client_request_id,
            raw_body=json.dumps(document)[:8192],
        )
    )
