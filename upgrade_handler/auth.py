"""The Microsoft Graph token: one credential per process, one token shared by every invocation.

Inside Azure (``IDENTITY_ENDPOINT`` set by the platform) the credential is the managed identity,
user-assigned when ``AZURE_CLIENT_ID`` is set; elsewhere it is the developer's or pipeline's own
login (``DefaultAzureCredential``). Tokens are never logged.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Callable

from azure.core.credentials_async import AsyncTokenCredential
from azure.core.exceptions import AzureError

from .errors import GraphFailure, TokenUnavailable

#: A cached token is renewed when it has less than this many seconds left.
REFRESH_MARGIN_SECONDS = 300

CredentialFactory = Callable[[], AsyncTokenCredential]


def default_credential(client_id: str | None) -> AsyncTokenCredential:
    """The managed identity inside Azure, the developer's login elsewhere."""
    if os.environ.get("IDENTITY_ENDPOINT"):
        from azure.identity.aio import ManagedIdentityCredential

        return ManagedIdentityCredential(client_id=client_id)
    from azure.identity.aio import DefaultAzureCredential

    return DefaultAzureCredential(managed_identity_client_id=client_id)


class TokenProvider:
    """Hands out the Graph token for ``scope``, fetching it once per lifetime.

    Concurrent callers share one fetch. After Graph refuses a token, ``token(replacing=that)``
    builds a new credential so the next token is newly acquired rather than served from the
    credential's own cache; callers holding an already replaced token get the new one.
    """

    def __init__(self, scope: str, credential_factory: CredentialFactory) -> None:
        self._scope = scope
        self._factory = credential_factory
        self._credential: AsyncTokenCredential | None = None
        self._token: str | None = None
        self._expires_on = 0.0
        self._lock: asyncio.Lock | None = None
        self.fetches = 0

    async def token(self, *, replacing: str | None = None) -> str:
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
        self.fetches += 1
        try:
            access = await self._credential.get_token(self._scope)
        except AzureError as error:
            # The message names the endpoint's answer, never the token or the identity header.
            raise TokenUnavailable(
                GraphFailure(status=None, code="TokenUnavailable", message=_first_line(str(error)))
            ) from None
        self._token, self._expires_on = access.token, float(access.expires_on)

    async def _drop_credential(self) -> None:
        credential, self._credential = self._credential, None
        self._token, self._expires_on = None, 0.0
        if credential is not None:
            await credential.close()

    async def aclose(self) -> None:
        await self._drop_credential()


def _first_line(text: str) -> str:
    line = text.strip().splitlines()[0] if text.strip() else "the identity endpoint issued no token"
    return line[:512]
