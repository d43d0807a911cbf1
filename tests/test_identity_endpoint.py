"""The managed identity stand-in, driven by the real azure-identity 1.27 over loopback.

The credential tests pin down what azure-identity does against the App Service protocol (caching,
refresh, retries, errors), because the function's token handling is built on those behaviours.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from types import SimpleNamespace

import httpx
import pytest
from azure.core.exceptions import ClientAuthenticationError
from azure.identity import CredentialUnavailableError, ManagedIdentityCredential
from azure.identity.aio import ManagedIdentityCredential as AsyncManagedIdentityCredential

from standins.identity_endpoint import API_VERSION, IdentityEndpoint

GRAPH_SCOPE = "https://graph.microsoft.com/.default"
GRAPH = "https://graph.microsoft.com"
CLIENT_ID = "3f6f2c8e-2b7a-4d55-9a51-6c0f1f1e9b21"
CLAIMS = '{"access_token":{"nbf":{"essential":true,"value":"1700000000"}}}'


class FakeClock:
    def __init__(self) -> None:
        self.now = 1_700_000_000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture(scope="module")
def http() -> Iterator[httpx.Client]:
    # One client for all raw requests: a fresh httpx.get per call costs ~15 ms of TLS setup.
    with httpx.Client() as client:
        yield client


@pytest.fixture
def endpoint(monkeypatch: pytest.MonkeyPatch) -> Iterator[IdentityEndpoint]:
    """A user-assigned identity endpoint, wired into the environment azure-identity reads."""
    # With a thumbprint set, azure-identity would pick Service Fabric instead of App Service.
    monkeypatch.delenv("IDENTITY_SERVER_THUMBPRINT", raising=False)
    with IdentityEndpoint(client_id=CLIENT_ID) as ep:
        for name, value in ep.environment().items():
            monkeypatch.setenv(name, value)
        yield ep


def raw_get(
    http: httpx.Client,
    ep: IdentityEndpoint,
    overrides: dict[str, str] | None = None,
    *,
    header: str | None = None,
    omit_header: bool = False,
) -> httpx.Response:
    """One request as the SDK sends it, with ``overrides`` changing the query ("" drops a key).

    The identity header is the endpoint's secret unless ``header`` replaces or ``omit_header``
    drops it.
    """
    merged = {"api-version": API_VERSION, "resource": GRAPH, "client_id": CLIENT_ID, **(overrides or {})}
    query = {k: v for k, v in merged.items() if v}
    headers = {} if omit_header else {"X-IDENTITY-HEADER": header or ep.secret}
    return http.get(ep.url, params=query, headers=headers)


# -- the protocol -------------------------------------------------------------------------------


def test_environment_points_at_the_token_path() -> None:
    with IdentityEndpoint(secret="s3") as ep:
        assert ep.environment() == {"IDENTITY_ENDPOINT": ep.url, "IDENTITY_HEADER": "s3"}
        assert ep.url.startswith("http://127.0.0.1:")
        assert ep.url.endswith("/msi/token")
    assert IdentityEndpoint().secret != IdentityEndpoint().secret


def test_success_body_has_every_field_both_sdk_paths_need(http: httpx.Client, endpoint: IdentityEndpoint) -> None:
    before = int(time.time())

    response = raw_get(http, endpoint)

    assert response.status_code == 200
    body = response.json()
    assert set(body) == {"access_token", "expires_on", "resource", "token_type", "client_id"}
    assert body["access_token"].startswith("sim-token-")
    assert isinstance(body["expires_on"], str)
    assert before + 86400 <= int(body["expires_on"]) <= int(time.time()) + 86400
    assert (body["resource"], body["token_type"], body["client_id"]) == (GRAPH, "Bearer", CLIENT_ID)
    assert endpoint.tokens_issued == 1


def test_tokens_are_unique(http: httpx.Client, endpoint: IdentityEndpoint) -> None:
    tokens = {raw_get(http, endpoint).json()["access_token"] for _ in range(20)}

    assert len(tokens) == 20
    assert endpoint.tokens_issued == 20


@pytest.mark.parametrize(("header", "omit_header"), [(None, True), ("wrong-secret", False)])
def test_wrong_or_missing_identity_header_is_401(
    http: httpx.Client, endpoint: IdentityEndpoint, header: str | None, omit_header: bool
) -> None:
    response = raw_get(http, endpoint, header=header, omit_header=omit_header)

    assert response.status_code == 401
    assert response.json()["statusCode"] == 401
    assert "access_token" not in response.json()
    assert endpoint.requests[-1].header_ok is False
    assert endpoint.tokens_issued == 0


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({"resource": ""}, "resource"),
        ({"api-version": "2017-09-01"}, "api-version"),
        ({"client_id": "another-identity"}, "Unable to load the proper Managed Identity."),
        ({"client_id": ""}, "Unable to load the proper Managed Identity."),
    ],
    ids=["missing-resource", "old-api-version", "other-client-id", "no-client-id"],
)
def test_bad_requests_are_400(
    http: httpx.Client, endpoint: IdentityEndpoint, params: dict[str, str], message: str
) -> None:
    response = raw_get(http, endpoint, params)

    assert response.status_code == 400
    body = response.json()
    assert body["statusCode"] == 400
    assert message in body["message"]
    assert body["correlationId"]
    assert endpoint.tokens_issued == 0


def test_system_assigned_endpoint_accepts_any_or_no_client_id(http: httpx.Client) -> None:
    with IdentityEndpoint() as ep:
        without = raw_get(http, ep, {"client_id": ""})
        named = raw_get(http, ep, {"client_id": "some-id"})

    assert (without.status_code, named.status_code) == (200, 200)
    assert named.json()["client_id"] == "some-id"


def test_requests_record_what_was_asked_and_answered(http: httpx.Client, endpoint: IdentityEndpoint) -> None:
    raw_get(http, endpoint)
    raw_get(http, endpoint, header="nope")

    ok, denied = endpoint.requests
    assert (ok.resource, ok.client_id, ok.api_version, ok.header_ok, ok.status) == (
        GRAPH,
        CLIENT_ID,
        API_VERSION,
        True,
        200,
    )
    assert (denied.header_ok, denied.status) == (False, 401)
    assert ok.time <= denied.time


# -- steering failures --------------------------------------------------------------------------


def test_fail_next_fails_that_many_requests_then_recovers(http: httpx.Client, endpoint: IdentityEndpoint) -> None:
    endpoint.fail_next(2, status=503)

    statuses = [raw_get(http, endpoint).status_code for _ in range(3)]

    assert statuses == [503, 503, 200]
    assert raw_get(http, endpoint).status_code == 200


def test_failure_rate_is_seeded_and_can_be_turned_off(http: httpx.Client, endpoint: IdentityEndpoint) -> None:
    def pattern() -> list[int]:
        return [raw_get(http, endpoint).status_code for _ in range(30)]

    endpoint.set_failure_rate(0.5, seed=7, status=502)
    first = pattern()
    endpoint.set_failure_rate(0.5, seed=7, status=502)
    second = pattern()
    endpoint.set_failure_rate(0)
    off = pattern()

    assert first == second
    assert set(first) == {200, 502}
    assert set(off) == {200}


# -- validity, as the Graph simulator asks for it ------------------------------------------------


def test_is_valid_knows_only_its_own_unexpired_unrevoked_tokens(http: httpx.Client) -> None:
    clock = FakeClock()
    with IdentityEndpoint(token_lifetime=60, clock=clock) as ep:
        token = raw_get(http, ep, {"client_id": ""}).json()["access_token"]

        assert ep.is_valid(token)
        assert ep.is_valid(token, resource=GRAPH)
        assert not ep.is_valid(token, resource="https://management.azure.com")
        assert not ep.is_valid("sim-token-made-up")

        clock.now += 60
        assert not ep.is_valid(token)


def test_revoke_all_invalidates_issued_tokens_only(http: httpx.Client, endpoint: IdentityEndpoint) -> None:
    old = raw_get(http, endpoint).json()["access_token"]

    endpoint.revoke_all()
    new = raw_get(http, endpoint).json()["access_token"]

    assert not endpoint.is_valid(old)
    assert endpoint.is_valid(new)


def test_set_token_lifetime_applies_to_later_tokens(http: httpx.Client) -> None:
    clock = FakeClock()
    with IdentityEndpoint(clock=clock) as ep:
        long_lived = raw_get(http, ep, {"client_id": ""}).json()
        ep.set_token_lifetime(10)
        short_lived = raw_get(http, ep, {"client_id": ""}).json()

        clock.now += 10

        assert int(long_lived["expires_on"]) == int(clock.now - 10 + 86400)
        assert int(short_lived["expires_on"]) == int(clock.now)
        assert ep.is_valid(long_lived["access_token"])
        assert not ep.is_valid(short_lived["access_token"])


# -- the real credentials ------------------------------------------------------------------------


def test_sync_credential_gets_a_token_and_then_serves_it_from_cache(endpoint: IdentityEndpoint) -> None:
    credential = ManagedIdentityCredential(client_id=CLIENT_ID)

    first = credential.get_token(GRAPH_SCOPE)
    second = credential.get_token(GRAPH_SCOPE)

    assert endpoint.is_valid(first.token)
    assert second.token == first.token
    (request,) = endpoint.requests
    assert (request.resource, request.client_id, request.api_version, request.header_ok) == (
        GRAPH,
        CLIENT_ID,
        API_VERSION,
        True,
    )


async def test_async_credential_gets_a_token_and_then_serves_it_from_cache(
    endpoint: IdentityEndpoint,
) -> None:
    async with AsyncManagedIdentityCredential(client_id=CLIENT_ID) as credential:
        first = await credential.get_token(GRAPH_SCOPE)
        second = await credential.get_token(GRAPH_SCOPE)

    assert endpoint.is_valid(first.token)
    assert second.token == first.token
    (request,) = endpoint.requests
    assert (request.resource, request.client_id, request.api_version, request.header_ok) == (
        GRAPH,
        CLIENT_ID,
        API_VERSION,
        True,
    )


def test_sync_credential_refetches_a_token_with_under_five_minutes_left(endpoint: IdentityEndpoint) -> None:
    # MSAL treats a cached token with < 5 minutes left as expired, so it never serves it.
    endpoint.set_token_lifetime(60)
    credential = ManagedIdentityCredential(client_id=CLIENT_ID)

    first = credential.get_token(GRAPH_SCOPE)
    second = credential.get_token(GRAPH_SCOPE)

    assert second.token != first.token
    assert len(endpoint.requests) == 2


async def test_async_credential_keeps_a_short_lived_token_for_30_seconds(
    endpoint: IdentityEndpoint, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The async credential refreshes a token within 5 minutes of expiry, but at most once per
    # 30 s (DEFAULT_TOKEN_REFRESH_RETRY_DELAY): a 60 s token is reused right after it was fetched.
    endpoint.set_token_lifetime(60)
    async with AsyncManagedIdentityCredential(client_id=CLIENT_ID) as credential:
        first = await credential.get_token(GRAPH_SCOPE)
        reused = await credential.get_token(GRAPH_SCOPE)

        # Move the SDK's refresh decision 31 s ahead (the token is still unexpired then).
        # This patches azure-identity 1.27 internals; the seam is private and may move.
        real_time = time.time
        monkeypatch.setattr("azure.identity._internal.utils.time", SimpleNamespace(time=lambda: real_time() + 31))
        refreshed = await credential.get_token(GRAPH_SCOPE)

    assert reused.token == first.token
    assert refreshed.token != first.token
    assert len(endpoint.requests) == 2


async def test_async_credential_refetches_an_expired_token(endpoint: IdentityEndpoint) -> None:
    endpoint.set_token_lifetime(0)
    async with AsyncManagedIdentityCredential(client_id=CLIENT_ID) as credential:
        first = await credential.get_token(GRAPH_SCOPE)
        second = await credential.get_token(GRAPH_SCOPE)

    assert second.token != first.token
    assert len(endpoint.requests) == 2


def test_sync_credential_raises_credential_unavailable_on_a_wrong_header(
    endpoint: IdentityEndpoint, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("IDENTITY_HEADER", "not-the-secret")
    credential = ManagedIdentityCredential(client_id=CLIENT_ID)

    # MSAL ignores the status and turns the error body into "(invalid_scope) 401, <message>".
    with pytest.raises(CredentialUnavailableError, match="401"):
        credential.get_token(GRAPH_SCOPE)
    assert [r.status for r in endpoint.requests] == [401]


async def test_async_credential_raises_client_authentication_error_on_a_wrong_header(
    endpoint: IdentityEndpoint, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("IDENTITY_HEADER", "not-the-secret")
    async with AsyncManagedIdentityCredential(client_id=CLIENT_ID) as credential:
        with pytest.raises(ClientAuthenticationError, match="X-IDENTITY-HEADER") as raised:
            await credential.get_token(GRAPH_SCOPE)

    # Not the CredentialUnavailableError subclass: a chained credential would not move on.
    assert type(raised.value) is ClientAuthenticationError
    assert [r.status for r in endpoint.requests] == [401]


async def test_async_credential_for_another_identity_is_refused(endpoint: IdentityEndpoint) -> None:
    async with AsyncManagedIdentityCredential(client_id="some-other-identity") as credential:
        with pytest.raises(ClientAuthenticationError, match="Unable to load the proper Managed Identity"):
            await credential.get_token(GRAPH_SCOPE)

    assert [(r.client_id, r.status) for r in endpoint.requests] == [("some-other-identity", 400)]


async def test_async_credential_without_client_id_is_refused_by_a_user_assigned_identity(
    endpoint: IdentityEndpoint,
) -> None:
    # ManagedIdentityCredential does not read AZURE_CLIENT_ID; forgetting client_id= asks for a
    # system-assigned identity the app does not have.
    async with AsyncManagedIdentityCredential() as credential:
        with pytest.raises(ClientAuthenticationError, match="Unable to load the proper Managed Identity"):
            await credential.get_token(GRAPH_SCOPE)

    assert [(r.client_id, r.status) for r in endpoint.requests] == [(None, 400)]


async def test_async_credential_retries_a_500_by_itself(endpoint: IdentityEndpoint) -> None:
    endpoint.fail_next(1)
    async with AsyncManagedIdentityCredential(client_id=CLIENT_ID) as credential:
        token = await credential.get_token(GRAPH_SCOPE)

    # azure-core's retry policy: the first retry comes without backoff.
    assert endpoint.is_valid(token.token)
    assert [r.status for r in endpoint.requests] == [500, 200]


def test_sync_credential_retries_a_500_by_itself(endpoint: IdentityEndpoint) -> None:
    endpoint.fail_next(1)

    token = ManagedIdentityCredential(client_id=CLIENT_ID).get_token(GRAPH_SCOPE)

    assert endpoint.is_valid(token.token)
    assert [r.status for r in endpoint.requests] == [500, 200]


async def test_async_credential_gives_up_after_four_requests(endpoint: IdentityEndpoint) -> None:
    # By default the gaps are 0 s, 1.6 s, 3.2 s (about 4.8 s in all); a tiny backoff factor keeps
    # the count and drops the waiting.
    endpoint.fail_next(100)
    async with AsyncManagedIdentityCredential(client_id=CLIENT_ID, retry_backoff_factor=0.001) as credential:
        with pytest.raises(ClientAuthenticationError, match="Injected failure"):
            await credential.get_token(GRAPH_SCOPE)

    assert [r.status for r in endpoint.requests] == [500] * 4


async def test_async_credential_with_retry_total_0_fails_on_the_first_500(endpoint: IdentityEndpoint) -> None:
    endpoint.fail_next(1)
    async with AsyncManagedIdentityCredential(client_id=CLIENT_ID, retry_total=0) as credential:
        with pytest.raises(ClientAuthenticationError):
            await credential.get_token(GRAPH_SCOPE)
        token = await credential.get_token(GRAPH_SCOPE)

    assert endpoint.is_valid(token.token)
    assert [r.status for r in endpoint.requests] == [500, 200]


def test_sync_credential_replays_a_5xx_for_five_seconds_without_asking(endpoint: IdentityEndpoint) -> None:
    # MSAL throttles: a final 429/5xx answer is cached per credential for Retry-After or 5 s.
    endpoint.fail_next(100)
    credential = ManagedIdentityCredential(client_id=CLIENT_ID, retry_total=0)
    with pytest.raises(CredentialUnavailableError, match="500"):
        credential.get_token(GRAPH_SCOPE)
    endpoint.fail_next(0)

    with pytest.raises(CredentialUnavailableError, match="500"):
        credential.get_token(GRAPH_SCOPE)
    assert len(endpoint.requests) == 1
    # A new credential has its own throttle cache.
    assert ManagedIdentityCredential(client_id=CLIENT_ID).get_token(GRAPH_SCOPE).token


# -- forcing a fresh token after Graph refuses a cached one ---------------------------------------


async def test_async_claims_bypass_the_cache_and_the_new_token_is_cached(endpoint: IdentityEndpoint) -> None:
    async with AsyncManagedIdentityCredential(client_id=CLIENT_ID) as credential:
        cached = await credential.get_token(GRAPH_SCOPE)
        endpoint.revoke_all()

        fresh = await credential.get_token(GRAPH_SCOPE, claims=CLAIMS)
        after = await credential.get_token(GRAPH_SCOPE)

    assert not endpoint.is_valid(cached.token)
    assert endpoint.is_valid(fresh.token)
    assert after.token == fresh.token
    assert len(endpoint.requests) == 2


def test_sync_claims_bypass_the_cache_and_the_new_token_is_cached(endpoint: IdentityEndpoint) -> None:
    credential = ManagedIdentityCredential(client_id=CLIENT_ID)
    cached = credential.get_token(GRAPH_SCOPE)
    endpoint.revoke_all()

    fresh = credential.get_token(GRAPH_SCOPE, claims=CLAIMS)
    after = credential.get_token(GRAPH_SCOPE)

    assert endpoint.is_valid(fresh.token)
    assert fresh.token != cached.token
    assert after.token == fresh.token
    assert len(endpoint.requests) == 2


async def test_a_new_async_credential_has_an_empty_cache(endpoint: IdentityEndpoint) -> None:
    async with AsyncManagedIdentityCredential(client_id=CLIENT_ID) as credential:
        cached = await credential.get_token(GRAPH_SCOPE)
    endpoint.revoke_all()

    async with AsyncManagedIdentityCredential(client_id=CLIENT_ID) as credential:
        fresh = await credential.get_token(GRAPH_SCOPE)

    assert fresh.token != cached.token
    assert endpoint.is_valid(fresh.token)
