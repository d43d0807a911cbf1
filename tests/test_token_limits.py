"""A token request ends in bounded time, for the caller that fetches and those behind it (contract §2).

Over the wire: the real ``azure-identity`` managed identity credential, as the function builds
it, talks to the identity endpoint stand-in through a proxy that can hold every byte.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from urllib.parse import urlsplit

import pytest

from standins.faults import FaultProxy
from tests.support import MI_CLIENT_ID
from upgrade_handler.auth import TokenProvider, default_credential
from upgrade_handler.errors import TokenUnavailable

SCOPE = "https://graph.microsoft.com/.default"
#: Longer than any test may take: reaching it means a caller was not bounded.
GUARD_SECONDS = 60


@pytest.fixture
def proxied_identity(identity, monkeypatch: pytest.MonkeyPatch) -> Iterator[FaultProxy]:
    """The identity endpoint behind a fault proxy, in the variables the platform sets."""
    endpoint = urlsplit(identity.url)
    assert endpoint.port is not None
    with FaultProxy(endpoint.port) as proxy:
        monkeypatch.setenv("IDENTITY_ENDPOINT", f"{proxy.url}{endpoint.path}")
        monkeypatch.setenv("IDENTITY_HEADER", identity.secret)
        yield proxy


async def test_callers_behind_a_hung_identity_endpoint_get_token_unavailable_within_the_bound(
    identity, proxied_identity: FaultProxy
):
    tokens = TokenProvider(SCOPE, lambda: default_credential(MI_CLIENT_ID), timeout=0.5)
    try:
        # Given an identity endpoint that accepts connections and never answers
        proxied_identity.freeze()

        # When several invocations ask for the token at once (one fetches, the others wait behind it)
        async with asyncio.timeout(GUARD_SECONDS):
            outcomes = await asyncio.gather(*(tokens.token() for _ in range(4)), return_exceptions=True)

        # Then every one of them is told the token is unavailable, none waits on
        assert all(isinstance(outcome, TokenUnavailable) for outcome in outcomes), outcomes
        for outcome in outcomes:
            assert isinstance(outcome, TokenUnavailable)
            assert outcome.failure.code == "TokenUnavailable"
            assert outcome.failure.status is None
            assert "0.5 s" in outcome.failure.message

        # And once the endpoint answers again, the next call gets a token on a new connection.
        connections = proxied_identity.connections
        proxied_identity.flow()
        async with asyncio.timeout(GUARD_SECONDS):
            token = await tokens.token()
        assert identity.is_valid(token)
        assert proxied_identity.connections > connections
    finally:
        await tokens.aclose()


def test_a_token_bound_that_is_not_positive_is_refused():
    with pytest.raises(ValueError, match="positive"):
        TokenProvider(SCOPE, lambda: default_credential(MI_CLIENT_ID), timeout=0)
