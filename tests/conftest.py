"""The stand-ins every over-the-wire test talks to, started once per session on 127.0.0.1."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from dataclasses import replace
from typing import Any

import httpx
import pytest
from azure.identity.aio import ManagedIdentityCredential

from standins.graph_simulator import GraphSimulator
from standins.identity_endpoint import IdentityEndpoint
from standins.servicebus_broker import ServiceBusBroker
from tests.support import APP, APP_EXTERNAL, CHAT, MI_CLIENT_ID, TEAM, USER, USER_UPN, FakeClock
from upgrade_handler.auth import TokenProvider
from upgrade_handler.graph import GraphClient
from upgrade_handler.handler import UpgradeHandler
from upgrade_handler.ratelimit import AdaptiveRateLimiter
from upgrade_handler.servicebus import ServiceBusMessageSender
from upgrade_handler.settings import Settings

# Azurite (the ``azurite`` and ``storage_proxy`` fixtures), for the tests of the shared budget.
pytest_plugins = ["tests.storage_support"]

UPGRADE_QUEUE = "teams-app-upgrades"
DEADLETTER_QUEUE = "teams-app-upgrades-deadletter"


@pytest.fixture(scope="session")
def identity() -> Iterator[IdentityEndpoint]:
    with IdentityEndpoint(client_id=MI_CLIENT_ID) as endpoint:
        yield endpoint


@pytest.fixture(scope="session")
def graph(identity: IdentityEndpoint) -> Iterator[GraphSimulator]:
    with GraphSimulator(token_validator=identity.is_valid) as simulator:
        tenant = simulator.tenant
        tenant.add_user(USER, USER_UPN)
        tenant.add_team(TEAM)
        tenant.add_chat(CHAT)
        tenant.add_app(APP, APP_EXTERNAL, "Contoso Helpdesk")
        yield simulator


@pytest.fixture(scope="session")
def broker() -> Iterator[ServiceBusBroker]:
    # Both queues detect duplicates in Azure (infra/resources.bicep); the tests rely on it too.
    with ServiceBusBroker(duplicate_detection=[UPGRADE_QUEUE, DEADLETTER_QUEUE]) as running:
        yield running


@pytest.fixture(scope="session")
def environment(
    identity: IdentityEndpoint, graph: GraphSimulator, broker: ServiceBusBroker
) -> Iterator[dict[str, str]]:
    """The app settings of a local deployment, as the Functions host would set them."""
    values = {
        **identity.environment(),
        "ServiceBusConnection": broker.connection_string,
        "GRAPH_BASE_URL": graph.url,
        "AZURE_CLIENT_ID": MI_CLIENT_ID,
        "UPGRADE_QUEUE_NAME": UPGRADE_QUEUE,
        "DEADLETTER_QUEUE_NAME": DEADLETTER_QUEUE,
        # Pacing is tested on its own; here it would only stretch the tests.
        "GRAPH_MAX_REQUESTS_PER_SECOND": "100000",
    }
    with pytest.MonkeyPatch.context() as patch:
        for name, value in values.items():
            patch.setenv(name, value)
        yield values


@pytest.fixture(scope="session")
async def sender(environment: dict[str, str]) -> AsyncIterator[ServiceBusMessageSender]:
    """One sender for the session: opening a link costs the SDK about half a second."""
    settings = Settings.from_environment()
    message_sender = ServiceBusMessageSender(settings.service_bus, retry_total=0)
    yield message_sender
    await message_sender.aclose()


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def reset_stand_ins(graph: GraphSimulator, broker: ServiceBusBroker, identity: IdentityEndpoint) -> None:
    graph.reset()
    identity.fail_next(0)
    identity.set_failure_rate(0)
    broker.purge()


def fast_credential() -> ManagedIdentityCredential:
    """The managed identity credential, without the SDK's own waits between retries."""
    return ManagedIdentityCredential(client_id=MI_CLIENT_ID, retry_total=0)


@pytest.fixture
async def make_handler(
    environment: dict[str, str], sender: ServiceBusMessageSender, clock: FakeClock, reset_stand_ins: None
) -> AsyncIterator[Any]:
    """Builds handlers from the app settings (with overrides), sharing the session's sender."""
    made: list[UpgradeHandler] = []

    def build(*, graph_timeout: float = 5.0, **overrides: Any) -> UpgradeHandler:
        settings = replace(Settings.from_environment(), **overrides)
        tokens = TokenProvider(settings.graph_scope, fast_credential)
        limiter = AdaptiveRateLimiter(settings.max_requests_per_second, clock=clock.monotonic, sleep=clock.sleep)
        graph = GraphClient(
            settings.graph_base_url, limiter=limiter, timeout=httpx.Timeout(graph_timeout, connect=graph_timeout)
        )
        handler = UpgradeHandler(settings, sender=sender, clock=clock, tokens=tokens, graph=graph)
        made.append(handler)
        return handler

    yield build
    for handler in made:
        await handler.graph.aclose()
        await handler.tokens.aclose()


@pytest.fixture
def function_app_module(environment: dict[str, str]) -> Any:
    import function_app

    return function_app


@pytest.fixture(scope="session")
def trigger(environment: dict[str, str]) -> Any:
    """The user function behind the Service Bus trigger, as the worker finds it."""
    import function_app

    functions = {f.get_function_name(): f for f in function_app.app.get_functions()}
    return functions["UpgradeTeamsApp"]


@pytest.fixture
async def invoke(make_handler: Any, trigger: Any, monkeypatch: pytest.MonkeyPatch) -> Any:
    """Calls the function's real entry point with a handler on the driven clock."""
    import function_app

    handler = make_handler()
    monkeypatch.setattr(function_app, "handler", handler)
    user_function = trigger.get_user_function()

    async def call(message: Any, **overrides: Any) -> None:
        if overrides:
            monkeypatch.setattr(function_app, "handler", make_handler(**overrides))
        result = await user_function(message)
        assert result is None, "a trigger-only function must return None"

    return call
