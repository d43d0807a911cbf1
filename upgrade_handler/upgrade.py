"""The single-installation job: resolve the installation when needed, check versions, upgrade (§2, §8)."""

from __future__ import annotations

import logging

from .catalog import Catalog
from .context import DeliveryContext
from .errors import GraphFailure, InstallationNotFoundError, TransientGraphError
from .graph import GraphClient
from .messages import AppKind, AppRef, UpgradeRequest
from .outcome import Outcome
from .versions import Version


class SingleUpgrade:
    """One attempt at one upgrade request, given a token and the longest acceptable gate wait.

    With a ``version`` the installed version is read first (free with a lookup, one more call for an
    ``appInstallationId``): at or past it, nothing is upgraded; otherwise the catalog must already
    publish it, or the attempt is deferred as ``CatalogNotUpdated``.
    """

    def __init__(self, graph: GraphClient, catalog: Catalog, request: UpgradeRequest) -> None:
        self._graph = graph
        self._catalog = catalog
        self._request = request

    async def __call__(self, context: DeliveryContext, token: str, gate_wait: float) -> Outcome:
        request, graph = self._request, self._graph
        started = context.settler.clock.monotonic()
        installation_id, installed, catalog_app = await self._resolve(context, token, gate_wait)
        version_after: str | None = None
        if request.version is not None:
            if installed is not None and Version.parse(installed) >= request.version:
                return await context.complete(
                    Outcome.CURRENT,
                    "upgrade.already_current",
                    version_before=installed,
                    version_after=installed,
                    installed_version=installed,
                    requested_version=str(request.version),
                )
            published = await self._catalog.latest_published(
                catalog_app, token, max_gate_wait=gate_wait, max_budget_wait=context.budget_wait_left()
            )
            if published is None or published < request.version:
                raise TransientGraphError(
                    GraphFailure(
                        status=None,
                        code="CatalogNotUpdated",
                        message=f"the app catalog publishes {published or 'no version'} of the app, "
                        f"not yet {request.version}: an upgrade now would change nothing",
                    )
                )
            version_after = str(published)
        call = await graph.upgrade(
            request.target,
            installation_id,
            request.consented_permission_set,
            token,
            max_gate_wait=gate_wait,
            max_budget_wait=context.budget_wait_left(),
        )
        return await context.complete(
            Outcome.UPGRADED,
            "upgrade.succeeded",
            version_before=installed,
            version_after=version_after,
            graph_status=call.status,
            graph_request_id=call.request_id,
            client_request_id=call.client_request_id,
            duration_ms=round((context.settler.clock.monotonic() - started) * 1000),
            budget_wait_ms=call.budget_wait_ms,
        )

    async def _resolve(self, context: DeliveryContext, token: str, gate_wait: float) -> tuple[str, str | None, AppRef]:
        """The installation id, its installed version (when a version was asked for), and how to find
        its app in the catalog."""
        request, graph = self._request, self._graph
        wants_version = request.version is not None
        if request.app.kind is AppKind.INSTALLATION:
            if not wants_version:
                return request.app.value, None, request.app
            installed = await self._catalog.installed(
                request.target,
                request.app.value,
                token,
                max_gate_wait=gate_wait,
                max_budget_wait=context.budget_wait_left(),
            )
            return request.app.value, installed.version, AppRef(AppKind.TEAMS_APP_ID, installed.teams_app_id)
        found = await graph.find_installation(
            request.target,
            request.app,
            token,
            max_gate_wait=gate_wait,
            max_budget_wait=context.budget_wait_left(),
            with_version=wants_version,
        )
        if found is None:
            raise InstallationNotFoundError(
                f"no installation of {request.app.kind.value} {request.app.value!r} "
                f"for the {request.target.scope.value} in the request"
            )
        if found.matches > 1:
            context.log_event(
                "upgrade.lookup_ambiguous",
                logging.WARNING,
                matches=found.matches,
                installation_id=found.id,
                graph_request_id=found.call.request_id,
            )
        return found.id, found.version, request.app
