"""Faults on the wire: a TCP proxy that freezes or trickles, and a server that sends canned bytes.

Both run on 127.0.0.1 in a daemon thread with an event loop of their own, so a test's or a
benchmark's own loop talks to them over real sockets, as it would to a remote service:

- :class:`FaultProxy` stands in front of a stand-in (identity endpoint, Graph, broker) and
  forwards bytes both ways while ``flowing``. ``freeze()`` stops forwarding in both directions on
  every connection, open or new (connections are accepted and held): a hung endpoint or a frozen
  link. ``trickle(interval)`` passes what the service sends back one byte per ``interval``
  seconds. ``flow()`` resumes forwarding whatever was held; ``sever()`` first drops every open
  connection, as a network that finally resets a dead link does (what was held is lost).
- :class:`CannedServer` answers every request with the same bytes (``None``: reads and never
  answers) and closes the connection, for answers no stand-in would give (a corrupt body).
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from concurrent.futures import Future
from typing import Any, Self

_CHUNK = 65536


class LoopThread:
    """An event loop in a daemon thread, serving one ``asyncio.Server`` on a free loopback port.

    A subclass answers each connection in :meth:`_serve`; every open connection is a tracked task,
    cancelled by :meth:`stop`."""

    def __init__(self, name: str) -> None:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True, name=name)
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self.port = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> Self:
        self._thread.start()
        self._server = self._run(asyncio.start_server(self._accept, "127.0.0.1", 0))
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    def stop(self) -> None:
        if not self._thread.is_alive():
            return
        self._run(self._shutdown())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop.close()

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _run(self, coro: Any) -> Any:
        future: Future[Any] = asyncio.run_coroutine_threadsafe(coro, self._loop)
        return future.result(10)

    async def _shutdown(self) -> None:
        if self._server is not None:
            self._server.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        try:
            await self._serve(reader, writer)
        except (ConnectionError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
            pass
        except asyncio.CancelledError:
            pass  # stopped: asyncio's stream callback would report a cancelled task as an error
        finally:
            self._tasks.discard(task)
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        raise NotImplementedError


class FaultProxy(LoopThread):
    """A loopback TCP proxy to ``127.0.0.1:target_port`` that can freeze or trickle on command.

    ``connections`` counts the connections accepted so far (a client that reconnects opens one),
    ``held`` the chunks that arrived while frozen, ``trickled`` the bytes passed on a byte at a time.
    """

    def __init__(self, target_port: int, *, target_host: str = "127.0.0.1") -> None:
        super().__init__("fault-proxy")
        self._target = (target_host, target_port)
        self._flowing = asyncio.Event()
        self._trickle: float | None = None
        self.connections = 0
        self.held = 0
        self.trickled = 0
        self._open: set[asyncio.StreamWriter] = set()
        self._loop.call_soon(self._flowing.set)

    def freeze(self) -> None:
        """Hold every byte, both ways, on every connection (new ones are accepted, then held)."""
        self._loop.call_soon_threadsafe(self._flowing.clear)

    def flow(self) -> None:
        """Forward again at full speed, starting with whatever was held."""
        self._set_trickle(None)
        self._loop.call_soon_threadsafe(self._flowing.set)

    def sever(self) -> None:
        """Drop every open connection at once; new ones are accepted as the mode says."""

        def close_all() -> None:
            for writer in list(self._open):
                writer.transport.abort()

        self._loop.call_soon_threadsafe(close_all)

    def trickle(self, interval: float) -> None:
        """Pass the service's answers on one byte every ``interval`` seconds."""
        self._set_trickle(interval)
        self._loop.call_soon_threadsafe(self._flowing.set)

    def _set_trickle(self, interval: float | None) -> None:
        def apply() -> None:
            self._trickle = interval

        self._loop.call_soon_threadsafe(apply)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        upstream_reader, upstream_writer = await asyncio.open_connection(*self._target)
        self._open.update((writer, upstream_writer))
        try:
            await asyncio.gather(
                self._pump(reader, upstream_writer, answers=False),
                self._pump(upstream_reader, writer, answers=True),
            )
        finally:
            self._open.difference_update((writer, upstream_writer))
            upstream_writer.close()

    async def _pump(self, source: asyncio.StreamReader, sink: asyncio.StreamWriter, *, answers: bool) -> None:
        try:
            while chunk := await source.read(_CHUNK):
                if not self._flowing.is_set():
                    self.held += 1
                    await self._flowing.wait()
                if answers and self._trickle is not None:
                    for index in range(len(chunk)):
                        await self._flowing.wait()
                        sink.write(chunk[index : index + 1])
                        self.trickled += 1
                        await sink.drain()
                        if self._trickle is not None:
                            await asyncio.sleep(self._trickle)
                else:
                    sink.write(chunk)
                    await sink.drain()
        finally:
            # One side closed: close the other, so neither end waits on a half-open connection.
            sink.close()


class CannedServer(LoopThread):
    """Answers every request with ``answer`` and closes; with ``None``, reads and never answers.

    ``requests`` counts the requests whose head it read.
    """

    def __init__(self, answer: bytes | None) -> None:
        super().__init__("canned-server")
        self._answer = answer
        self.requests = 0

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        self.requests += 1
        if self._answer is None:
            await asyncio.Event().wait()  # never set: the request hangs until the client gives up
        writer.write(self._answer or b"")
        await writer.drain()
