"""The Microsoft Graph token: one credential per process, one token shared by every invocation.

Inside Azure (``IDENTITY_ENDPOINT`` set by the platform) the credential is the managed identity,
user-assigned when ``AZURE_CLIENT_ID`` is set; elsewhere it is the developer's or pipeline's own
login (``DefaultAzureCredential``). Tokens are never logged.

A token request is bounded (contract §2): a caller gets a token or :class:`TokenUnavailable`
within ``TOKEN_TIMEOUT_SECONDS`` of asking, however long the identity endpoint takes to connect
or answer, and whether it fetched or waited behind another caller's fetch.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Callable
from typing import Any

from azure.core.credentials_async import AsyncTokenCredential
from azure.core.exceptions import AzureError

from .errors import GraphFailure, TokenUnavailable

#: A cached token is renewed when it has less than this many seconds left.
REFRESH_MARGIN_SECONDS = 300
#: The longest a caller waits for a token, its wait for another caller's fetch included.
TOKEN_TIMEOUT_SECONDS = 10.0
#: The managed identity's own HTTP limits, inside that bound: azure-core's defaults (a 300 s
#: read timeout, three retries with backoff) would each outlast it. One retry is left for a
#: connection the endpoint dropped.
MANAGED_IDENTITY_TRANSPORT: dict[str, Any] = {
    "connection_timeout": 3,
    "read_timeout": 8,
    "retry_total": 1,
    "retry_backoff_factor": 0.2,
}

CredentialFactory = Callable[[], AsyncTokenCredential]


def default_credential(client_id: str | None) -> AsyncTokenCredential:
    """The managed identity inside Azure, the developer's login elsewhere."""
    if os.environ.get("IDENTITY_ENDPOINT"):
        from azure.identity.aio import ManagedIdentityCredential

        return ManagedIdentityCredential(client_id=client_id, **MANAGED_IDENTITY_TRANSPORT)
    from azure.identity.aio import DefaultAzureCredential

    return DefaultAzureCredential(managed_identity_client_id=client_id)


class TokenProvider:
    """Hands out the Graph token for ``scope``, fetching it once per lifetime.

    Concurrent callers share one fetch. After Graph refuses a token, ``token(replacing=that)``
    builds a new credential so the next token is newly acquired rather than served from the
    credential's own cache; callers holding an already replaced token get the new one.

    Each call gives up after ``timeout`` seconds (default ``TOKEN_TIMEOUT_SECONDS``) with
    :class:`TokenUnavailable`. A fetch that timed out takes its credential with it: the next
    call starts with a new credential and a new connection instead of one stuck on a dead one.
    """

    def __init__(
        self, scope: str, credential_factory: CredentialFactory, *, timeout: float = TOKEN_TIMEOUT_SECONDS
    ) -> None:
        if not timeout > 0:
            raise ValueError("timeout must be positive")
        self._scope = scope
        self._factory = credential_factory
        self._timeout = timeout
        self._credential: AsyncTokenCredential | None = None
        self._token: str | None = None
        self._expires_on = 0.0
        self._lock: asyncio.Lock | None = None
        self._closing: set[asyncio.Task[None]] = set()
        self.fetches = 0

    async def token(self, *, replacing: str | None = None) -> str:
        try:
            async with asyncio.timeout(self._timeout):
                return await self._shared_token(replacing)
        except TimeoutError:
            raise TokenUnavailable(
                GraphFailure(
                    status=None,
                    code="TokenUnavailable",
                    message=f"the identity endpoint issued no token within {self._timeout:g} s",
                )
            ) from None

    async def _shared_token(self, replacing: str | None) -> str:
        if self._lock is None:
            self._lock = asyncio.Lock()
        async with self._lock:
            if replacing is not None and replacing == self._token:
                await self._drop_credential()
            if self._token is None or self._expires_on - time.time() < REFRESH_MARGIN_SECONDS:
                await self._fetch()
            assert self._token is not None
            return self._token

    async def _fetch(self) -> None:
        if self._credential is None:
            self._credential = self._factory()
        credential = self._credential
        self.fetches += 1
        try:
            access = await credential.get_token(self._scope)
        except AzureError as error:
            # The message names the endpoint's answer, never the token or the identity header.
            raise TokenUnavailable(
                GraphFailure(status=None, code="TokenUnavailable", message=_first_line(str(error)))
            ) from None
        except asyncio.CancelledError:
            # Timed out (or the caller went away) mid-request: this credential's connection may
            # be the stuck one, so it is not reused. Closing it must not hold up the caller.
            if self._credential is credential:
                self._credential = None
            closing = asyncio.ensure_future(credential.close())
            self._closing.add(closing)
            closing.add_done_callback(self._closed)
            raise
        self._token, self._expires_on = access.token, float(access.expires_on)

    def _closed(self, closing: asyncio.Task[None]) -> None:
        self._closing.discard(closing)
        if not closing.cancelled():
            closing.exception()  # a credential that fails to close has nothing more to say

    async def _drop_credential(self) -> None:
        credential, self._credential = self._credential, None
        self._token, self._expires_on = None, 0.0
        if credential is not None:
            await credential.close()

    async def aclose(self) -> None:
        await self._drop_credential()
        if self._closing:
            await asyncio.gather(*self._closing, return_exceptions=True)


def _first_line(text: str) -> str:
    line = text.strip().splitlines()[0] if text.strip() else "the identity endpoint issued no token"
    return line[:512]
