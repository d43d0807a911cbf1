"""A stand-in for the App Service / Azure Functions managed identity token endpoint.

Inside Azure Functions the platform sets ``IDENTITY_ENDPOINT`` and ``IDENTITY_HEADER``;
``azure.identity.ManagedIdentityCredential`` (sync, through MSAL) and
``azure.identity.aio.ManagedIdentityCredential`` then ask that endpoint for tokens. This module
serves the same protocol on ``http://127.0.0.1:<port>/msi/token`` so the function and its tests
run against the real ``azure-identity`` code with no Azure at all.

What it emulates (the "2019-08-01" protocol, as azure-identity 1.27 and MSAL send it):

* ``GET /msi/token?api-version=2019-08-01&resource=<resource>[&client_id=<id>]`` with the
  header ``X-IDENTITY-HEADER: <IDENTITY_HEADER>``.
* Success: ``200`` and ``{"access_token", "expires_on", "resource", "token_type", "client_id"}``
  with ``expires_on`` as epoch seconds in a string. Both SDK paths need ``expires_on``; the async
  one also needs ``resource`` (its cache key).
* Errors use the real endpoint's body shape ``{"statusCode", "message", "correlationId"}``
  (seen in the wild for the 400 "Unable to load the proper Managed Identity."). MSAL ignores the
  status code and reads ``statusCode`` and ``message`` from that body, so the shape matters.
* A user-assigned identity: when ``client_id`` is configured, a request must name exactly that
  client id. A request with another id, or with none (which asks for a system-assigned identity
  the app does not have), gets the 400 above, as a Function App with only a user-assigned
  identity answers.

Guesses, not verified against Azure: the 401 body for a wrong or missing ``X-IDENTITY-HEADER``
(the status is reported in SDK issues, the message is ours), the 400 for a missing ``resource``
or another ``api-version``, and the 5xx bodies of injected failures.

What it does not emulate: the 2017-09-01 protocol (``secret`` header, ``clientid``), ``mi_res_id``
and ``object_id`` selectors (accepted, not checked), token contents (tokens are opaque strings
``sim-token-<random>``, not JWTs, so nothing can read claims from them), and the real endpoint's
own server-side token cache: every successful request here mints a new token, whereas Azure may
hand back the token it already gave out until that one nears expiry.
"""

from __future__ import annotations

import random
import secrets
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NamedTuple, Self

from aiohttp import web

from ._background import BackgroundServer

__all__ = ["API_VERSION", "ENDPOINT_PATH", "IdentityEndpoint", "TokenRequest"]

API_VERSION = "2019-08-01"
ENDPOINT_PATH = "/msi/token"
_HEADER = "X-IDENTITY-HEADER"
_WRONG_IDENTITY = "Unable to load the proper Managed Identity."


class TokenRequest(NamedTuple):
    """One request seen by the endpoint, whatever it was answered.

    ``time`` is ``time.monotonic()`` at arrival, so gaps between requests (SDK retry backoff)
    can be measured; ``client_id`` and ``api_version`` are ``None`` when the query lacked them.
    """

    resource: str | None
    client_id: str | None
    api_version: str | None
    header_ok: bool
    status: int
    time: float


@dataclass
class _Issued:
    resource: str
    expires_at: float
    revoked: bool = False


class IdentityEndpoint:
    """Serves managed identity tokens on loopback from a background thread.

    ``secret`` is the ``IDENTITY_HEADER`` value the caller must send back. ``token_lifetime`` is in
    seconds; ``expires_on`` is reported rounded down to whole seconds. ``client_id`` configures a
    user-assigned identity (``None``: a system-assigned one, which accepts any or no client id).
    ``seed`` seeds the failure-rate draws. ``clock`` returns epoch seconds; it decides expiry for
    :meth:`is_valid` and ``expires_on``, and exists so expiry can be tested without sleeping (the
    SDK itself always uses the real clock).

    All methods are thread-safe: the server runs on its own thread and loop.
    """

    def __init__(
        self,
        *,
        secret: str | None = None,
        token_lifetime: float = 86400.0,
        client_id: str | None = None,
        seed: int = 0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.secret = secret if secret is not None else secrets.token_urlsafe(24)
        self.client_id = client_id
        self._clock = clock
        self._lock = threading.Lock()
        self._token_lifetime = token_lifetime
        self._fail_next = 0
        self._fail_next_status = 500
        self._failure_rate = 0.0
        self._failure_status = 500
        self._rng = random.Random(seed)
        # The client id a system-assigned identity reports; any stable GUID-looking value will do.
        self._system_client_id = str(uuid.UUID(int=random.Random(seed).getrandbits(128), version=4))
        self._issued: dict[str, _Issued] = {}
        self._requests: list[TokenRequest] = []
        self._server: BackgroundServer | None = None

    # -- lifecycle ---------------------------------------------------------------------------

    def start(self) -> Self:
        if self._server is not None:
            raise RuntimeError("IdentityEndpoint is already started; create a new one to restart")
        app = web.Application()
        app.router.add_get(ENDPOINT_PATH, self._handle_token)
        self._server = BackgroundServer(app).start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.stop()

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def url(self) -> str:
        """The full ``IDENTITY_ENDPOINT`` value."""
        if self._server is None:
            raise RuntimeError("IdentityEndpoint is not started")
        return self._server.url + ENDPOINT_PATH

    def environment(self) -> dict[str, str]:
        """The variables that make ``ManagedIdentityCredential`` pick the App Service flavour."""
        return {"IDENTITY_ENDPOINT": self.url, "IDENTITY_HEADER": self.secret}

    # -- what tests steer --------------------------------------------------------------------

    def set_token_lifetime(self, seconds: float) -> None:
        """Lifetime of tokens issued from now on; tokens already out keep theirs."""
        with self._lock:
            self._token_lifetime = seconds

    def fail_next(self, count: int, status: int = 500) -> None:
        """The next ``count`` requests, whatever they carry, are answered ``status``.

        An outage comes before any validation, so these failures are consumed first. Note that
        azure-core retries 408, 429, 500, 502, 503, 504 (three retries, exponential backoff).
        """
        if count < 0 or status < 400:
            raise ValueError("count must be >= 0 and status an error status (>= 400)")
        with self._lock:
            self._fail_next = count
            self._fail_next_status = status

    def set_failure_rate(self, rate: float, *, seed: int = 0, status: int = 500) -> None:
        """Fail about ``rate`` of the requests not already failed by :meth:`fail_next`.

        The draws come from ``random.Random(seed)``, one per request, so a given sequence of
        requests fails the same way on every run. ``rate=0`` turns it off.
        """
        if not 0.0 <= rate <= 1.0 or status < 400:
            raise ValueError("rate must be within [0, 1] and status an error status (>= 400)")
        with self._lock:
            self._failure_rate = rate
            self._failure_status = status
            self._rng = random.Random(seed)

    def revoke_all(self) -> None:
        """Every token issued so far becomes invalid; tokens issued later are not affected."""
        with self._lock:
            for issued in self._issued.values():
                issued.revoked = True

    # -- what tests and the Graph simulator read ---------------------------------------------

    def is_valid(self, token: str, *, resource: str | None = None) -> bool:
        """Issued here, not expired, not revoked, and (when given) issued for ``resource``."""
        with self._lock:
            issued = self._issued.get(token)
            if issued is None or issued.revoked or self._clock() >= issued.expires_at:
                return False
            return resource is None or issued.resource == resource

    @property
    def requests(self) -> list[TokenRequest]:
        """A snapshot of every request so far, oldest first."""
        with self._lock:
            return list(self._requests)

    @property
    def tokens_issued(self) -> int:
        with self._lock:
            return len(self._issued)

    # -- the endpoint ------------------------------------------------------------------------

    async def _handle_token(self, request: web.Request) -> web.Response:
        query = request.query
        resource = query.get("resource") or None
        client_id = query.get("client_id")
        api_version = query.get("api-version")
        sent = request.headers.get(_HEADER)
        header_ok = sent is not None and secrets.compare_digest(sent.encode(), self.secret.encode())

        with self._lock:
            status, body = self._answer(resource, client_id, api_version, header_ok)
            self._requests.append(TokenRequest(resource, client_id, api_version, header_ok, status, time.monotonic()))
        return web.json_response(body, status=status)

    def _answer(
        self, resource: str | None, client_id: str | None, api_version: str | None, header_ok: bool
    ) -> tuple[int, dict[str, Any]]:
        # Called with the lock held, so counters and the seeded draws stay in request order.
        if self._fail_next > 0:
            self._fail_next -= 1
            return _error(self._fail_next_status, "Injected failure (fail_next).")
        # Draw only while a rate is set, so the seeded sequence depends on requests made under it.
        if self._failure_rate > 0 and self._rng.random() < self._failure_rate:
            return _error(self._failure_status, "Injected failure (failure rate).")
        if not header_ok:
            return _error(401, f"The {_HEADER} header is missing or does not match IDENTITY_HEADER.")
        if api_version != API_VERSION:
            return _error(400, f"Unsupported api-version {api_version!r}; this endpoint serves {API_VERSION}.")
        if resource is None:
            return _error(400, "The 'resource' query parameter is required.")
        if self.client_id is not None and client_id != self.client_id:
            return _error(400, _WRONG_IDENTITY)

        token = f"sim-token-{secrets.token_urlsafe(24)}"
        expires_at = self._clock() + self._token_lifetime
        self._issued[token] = _Issued(resource=resource, expires_at=expires_at)
        return 200, {
            "access_token": token,
            # Rounded down: the SDK parses it with int(), and it must never outlive expires_at.
            "expires_on": str(int(expires_at)),
            "resource": resource,
            "token_type": "Bearer",
            "client_id": self.client_id or client_id or self._system_client_id,
        }


def _error(status: int, message: str) -> tuple[int, dict[str, Any]]:
    return status, {"statusCode": status, "message": message, "correlationId": str(uuid.uuid4())}
