"""Graph's responses as the simulator writes them: headers, JSON and error bodies, faults, resets."""

from __future__ import annotations

import contextlib
import json
import socket
import struct
from collections.abc import Mapping
from datetime import UTC, datetime
from email.utils import format_datetime
from typing import Any

from aiohttp import web
from multidict import CIMultiDict

from .graph_faults import Fault
from .graph_requests import default_error

WWW_AUTHENTICATE = (
    'Bearer realm="", authorization_uri="https://login.microsoftonline.com/common/oauth2/authorize", '
    'client_id="00000003-0000-0000-c000-000000000000"'
)
_DIAGNOSTIC = json.dumps(
    {
        "ServerInfo": {
            "DataCenter": "Local Simulator",
            "Slice": "E",
            "Ring": "5",
            "ScaleUnit": "000",
            "RoleInstance": "SIM127001",
        }
    },
    separators=(",", ":"),
)
# What Graph sends on a successful OData read; clients must not insist on a bare "application/json".
ODATA_JSON = "application/json;odata.metadata=minimal;odata.streaming=true;IEEE754Compatible=false;charset=utf-8"


def reset_connection(request: web.Request) -> None:
    """Abort the connection with a TCP RST, so the client sees a reset, not a clean close."""
    transport = request.transport
    if transport is None:
        return
    sock = transport.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    transport.abort()


def graph_headers(ids: tuple[str, str], now: datetime | None = None) -> CIMultiDict[str]:
    return CIMultiDict(
        {
            "request-id": ids[0],
            "client-request-id": ids[1],
            "Date": format_datetime(now or datetime.now(UTC), usegmt=True),
            "x-ms-ags-diagnostic": _DIAGNOSTIC,
            "Strict-Transport-Security": "max-age=31536000",
            "Cache-Control": "no-store",
        }
    )


def json_response(
    status: int,
    payload: dict[str, Any],
    ids: tuple[str, str],
    content_type: str = "application/json",
    extra: Mapping[str, str] | None = None,
    now: datetime | None = None,
) -> web.Response:
    headers = graph_headers(ids, now)
    headers["Content-Type"] = content_type
    headers.update(extra or {})
    return web.Response(status=status, body=json.dumps(payload).encode(), headers=headers)


def _error_body(
    status: int,
    code: str,
    message: str,
    ids: tuple[str, str],
    now: datetime,
    inner: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    inner_error: dict[str, Any] = dict(inner or {})
    inner_error.update({"date": now.strftime("%Y-%m-%dT%H:%M:%S"), "request-id": ids[0], "client-request-id": ids[1]})
    return {"error": {"code": code, "message": message, "innerError": inner_error}}


def error_response(
    status: int,
    code: str,
    message: str,
    ids: tuple[str, str],
    headers: Mapping[str, str] | None = None,
    inner: Mapping[str, Any] | None = None,
) -> web.Response:
    now = datetime.now(UTC)
    extra = dict(headers or {})
    if status == 429:  # the shape of the throttling docs' sample (research §2.1)
        inner = {"code": "429", "message": "Please retry after", "status": "429"}
    if status == 401:
        extra.setdefault("WWW-Authenticate", WWW_AUTHENTICATE)
    body = _error_body(status, code, message, ids, now, inner)
    return json_response(status, body, ids, extra=extra, now=now)


def fault_response(fault: Fault, ids: tuple[str, str]) -> web.Response:
    if fault.body is None:
        if fault.status < 400:
            headers = graph_headers(ids)
            headers.update(fault.headers)
            return web.Response(status=fault.status, headers=headers)
        if fault.status == 429:
            code, message = "TooManyRequests", "Please retry again later."
        else:
            code, message = default_error(fault.status)
        return error_response(fault.status, code, message, ids, fault.headers)
    now = datetime.now(UTC)
    headers = graph_headers(ids, now)
    if isinstance(fault.body, dict):
        payload = json.loads(json.dumps(fault.body))  # deep copy: the Fault may be reused
        inner = payload.get("error", {}).get("innerError") if isinstance(payload.get("error"), dict) else None
        if isinstance(inner, dict):
            inner.setdefault("date", now.strftime("%Y-%m-%dT%H:%M:%S"))
            inner.setdefault("request-id", ids[0])
            inner.setdefault("client-request-id", ids[1])
        data = json.dumps(payload).encode()
        headers["Content-Type"] = "application/json"
    elif isinstance(fault.body, str):
        data = fault.body.encode()
        headers["Content-Type"] = "text/plain; charset=utf-8"
    else:
        data = fault.body
        headers["Content-Type"] = "application/octet-stream"
    headers.update(fault.headers)
    return web.Response(status=fault.status, body=data, headers=headers)
