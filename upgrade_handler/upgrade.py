"""The single-installation job: resolve the installation when needed, then upgrade it (contract §2)."""

from __future__ import annotations

import logging

from .context import DeliveryContext
from .errors import InstallationNotFoundError
from .graph import GraphCall, GraphClient
from .messages import AppKind, UpgradeRequest
from .outcome import Outcome


class SingleUpgrade:
    """One attempt at one upgrade request, given a token and the longest acceptable gate wait."""

    def __init__(self, graph: GraphClient, request: UpgradeRequest) -> None:
        self._graph = graph
        self._request = request

    async def __call__(self, context: DeliveryContext, token: str, gate_wait: float) -> Outcome:
        started = context.settler.clock.monotonic()
        call = await self._attempt(context, token, gate_wait)
        return context.complete(
            Outcome.UPGRADED,
            "upgrade.succeeded",
            graph_status=call.status,
            graph_request_id=call.request_id,
            client_request_id=call.client_request_id,
            duration_ms=round((context.settler.clock.monotonic() - started) * 1000),
        )

    async def _attempt(self, context: DeliveryContext, token: str, gate_wait: float) -> GraphCall:
        request, graph = self._request, self._graph
        installation_id = request.app.value
        if request.app.kind is not AppKind.INSTALLATION:
            found = await graph.find_installation(request.target, request.app, token, max_gate_wait=gate_wait)
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
            installation_id = found.id
        return await graph.upgrade(
            request.target, installation_id, request.consented_permission_set, token, max_gate_wait=gate_wait
        )
