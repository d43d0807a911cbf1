"""A fault-injecting HTTP proxy in front of Azurite: the storage failures Azurite cannot show by itself.

The shared budget must go on when its store misbehaves (contract §7). Azurite shows a deleted table
for real (delete it); for the rest this proxy sits between the client and Azurite, on 127.0.0.1 in a
daemon thread with its own event loop, and answers one request at a time (each forwarded on a fresh
upstream connection with ``Connection: close``, so a fault applies from the very next request, kept
connections included):

- :meth:`~StorageProxy.forward`: pass requests through (the default);
- :meth:`~StorageProxy.stall`: read each request and answer nothing for ``seconds`` (then forward),
  a store that hangs;
- :meth:`~StorageProxy.answer`: answer every request with ``status`` (503 ``ServerBusy``, as storage
  throttles, or 500 ``InternalError``) in the Table service's JSON error format;
- :meth:`~StorageProxy.refuse`: close the listening socket, so connections are refused (open ones
  are dropped), until another mode is set.

``requests`` counts the requests read, ``faults`` those answered with a fault.
"""

from __future__ import annotations

import asyncio
import json

from .faults import LoopThread

_REASONS = {500: "Internal Server Error", 503: "Server Busy"}
_CODES = {500: "InternalError", 503: "ServerBusy"}


class StorageProxy(LoopThread):
    """Forwards HTTP/1.1 requests to ``upstream_port`` on 127.0.0.1 unless told to fail."""

    def __init__(self, upstream_port: int) -> None:
        super().__init__("storage-proxy")
        self.upstream_port = upstream_port
        self.requests = 0
        self.faults = 0
        self._mode: tuple[str, float] = ("forward", 0.0)

    @property
    def connection_string(self) -> str:
        from standins.azurite import connection_string

        return connection_string(self.port)

    # --- modes ---------------------------------------------------------------------------------------

    def forward(self) -> None:
        self._set("forward", 0.0)

    def stall(self, seconds: float = 3600.0) -> None:
        self._set("stall", seconds)

    def answer(self, status: int) -> None:
        self._set("answer", float(status))

    def refuse(self) -> None:
        self._set("refuse", 0.0)

    def _set(self, mode: str, value: float) -> None:
        self._run(self._switch(mode, value))

    async def _switch(self, mode: str, value: float) -> None:
        self._mode = (mode, value)
        if mode == "refuse":
            if self._server is not None:
                self._server.close()
                self._server = None
            for task in list(self._tasks):
                task.cancel()
        elif self._server is None:
            self._server = await asyncio.start_server(self._accept, "127.0.0.1", self.port, reuse_address=True)

    async def _shutdown(self) -> None:
        await self._switch("refuse", 0.0)
        await super()._shutdown()

    # --- serving -------------------------------------------------------------------------------------

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while (request := await _read_request(reader)) is not None:
            self.requests += 1
            if not await self._handle(request, writer):
                break

    async def _handle(self, request: bytes, writer: asyncio.StreamWriter) -> bool:
        """Answer one request; ``False`` when the client connection is done."""
        mode, value = self._mode
        if mode == "stall":
            self.faults += 1
            waited = 0.0
            while self._mode[0] == "stall" and waited < value:  # a new mode ends the stall early
                await asyncio.sleep(0.05)
                waited += 0.05
            mode, value = self._mode
        if mode == "answer":
            self.faults += 1
            status = int(value)
            code = _CODES.get(status, "InternalError")
            body = json.dumps({"odata.error": {"code": code, "message": {"lang": "en-US", "value": code}}}).encode()
            head = (
                f"HTTP/1.1 {status} {_REASONS.get(status, 'Error')}\r\n"
                "Content-Type: application/json;odata=minimalmetadata\r\n"
                f"x-ms-error-code: {code}\r\nContent-Length: {len(body)}\r\nConnection: close\r\n\r\n"
            )
            writer.write(head.encode() + body)
            await writer.drain()
            return False
        if mode == "refuse":
            return False
        upstream_reader, upstream_writer = await asyncio.open_connection("127.0.0.1", self.upstream_port)
        try:
            upstream_writer.write(request)
            await upstream_writer.drain()
            while chunk := await upstream_reader.read(65536):
                writer.write(chunk)
                await writer.drain()
        finally:
            upstream_writer.close()
        return False  # the upstream closed after its answer: so does this connection


async def _read_request(reader: asyncio.StreamReader) -> bytes | None:
    """One request with its body (``Content-Length``), its connection header set to close."""
    try:
        head = await reader.readuntil(b"\r\n\r\n")
    except asyncio.IncompleteReadError:
        return None
    lines = head.decode("latin-1").split("\r\n")
    kept, length = [lines[0]], 0
    for line in lines[1:]:
        if not line:
            continue
        name, _, value = line.partition(":")
        if name.strip().lower() == "connection":
            continue
        if name.strip().lower() == "content-length":
            length = int(value.strip())
        kept.append(line)
    body = await reader.readexactly(length) if length else b""
    return ("\r\n".join([*kept, "Connection: close", "", ""])).encode("latin-1") + body
