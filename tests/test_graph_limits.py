"""Graph requests end in bounded time and every httpx failure is classified (contract §2).

Over the wire: the real ``httpx`` client against loopback servers that trickle an answer a byte
at a time or send one no client can decode. Bounds are shortened through the constructor.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator

import httpx
import pytest

from standins.faults import CannedServer, FaultProxy
from tests.support import APP, USER
from upgrade_handler.errors import GraphConnectionError, GraphTimeout, TransientGraphError
from upgrade_handler.graph import GraphClient
from upgrade_handler.messages import AppKind, AppRef, Scope, Target
from upgrade_handler.ratelimit import AdaptiveRateLimiter

TARGET = Target(Scope.USER, USER)
BY_APP = AppRef(AppKind.TEAMS_APP_ID, APP)
#: Longer than any test may take: reaching it means the request was not bounded.
GUARD_SECONDS = 60


def http_answer(status: str, body: bytes, *headers: str) -> bytes:
    head = [f"HTTP/1.1 {status}", f"Content-Length: {len(body)}", "Connection: close", *headers]
    return ("\r\n".join(head) + "\r\n\r\n").encode() + body


#: A lookup answer of a few kilobytes: one byte every 20 ms takes a minute and a half to arrive.
LOOKUP_BODY = json.dumps({"value": [{"id": "aW5zdGFsbGF0aW9u", "padding": "x" * 4000}]}).encode()


@pytest.fixture(scope="module")
def lookup_server() -> Iterator[CannedServer]:
    answer = http_answer("200 OK", LOOKUP_BODY, "Content-Type: application/json", "request-id: r-1")
    with CannedServer(answer) as server:
        yield server


@pytest.fixture
def proxy(lookup_server: CannedServer) -> Iterator[FaultProxy]:
    with FaultProxy(lookup_server.port) as running:
        yield running


def client(url: str, *, request_timeout: float = 30.0) -> GraphClient:
    # httpx's per-read limit (5 s) is far longer than the gap between trickled bytes.
    return GraphClient(
        url,
        limiter=AdaptiveRateLimiter(1000),
        timeout=httpx.Timeout(5.0),
        request_timeout=request_timeout,
    )


async def test_a_trickling_answer_is_a_timeout_once_the_whole_request_passes_its_bound(proxy: FaultProxy):
    graph = client(proxy.url, request_timeout=0.5)
    try:
        # Given a Graph whose answers arrive at full speed, the lookup works through the proxy.
        found = await graph.find_installation(TARGET, BY_APP, "token")
        assert found is not None and found.id == "aW5zdGFsbGF0aW9u"

        # When every byte of the answer comes 20 ms after the last (each read is quick, the whole is not)
        proxy.trickle(0.02)
        async with asyncio.timeout(GUARD_SECONDS):
            with pytest.raises(GraphTimeout) as raised:
                await graph.find_installation(TARGET, BY_APP, "token")
    finally:
        await graph.aclose()

    # Then the request is given up as a timeout, with no Graph answer to report.
    failure = raised.value.failure
    assert failure.code == "Timeout"
    assert failure.status is None
    assert "0.5 s" in failure.message
    assert failure.client_request_id


async def test_a_request_that_gets_no_answer_at_all_is_a_timeout_too():
    with CannedServer(None) as silent:
        graph = client(silent.url, request_timeout=0.3)
        try:
            async with asyncio.timeout(GUARD_SECONDS):
                with pytest.raises(GraphTimeout) as raised:
                    await graph.upgrade(TARGET, "aW5zdGFsbGF0aW9u", None, "token")
        finally:
            await graph.aclose()
        assert silent.requests == 1
    assert raised.value.failure.code == "Timeout"


CORRUPT_GZIP = b"\x1f\x8b\x08\x00" + b"not really deflate data at all"


@pytest.mark.parametrize(
    "answer",
    [
        pytest.param(
            http_answer("502 Bad Gateway", CORRUPT_GZIP, "Content-Type: application/json", "Content-Encoding: gzip"),
            id="502-corrupt-gzip",
        ),
        pytest.param(b"HTTP/1.1 two hundred\r\n\r\n", id="garbled-status-line"),
        pytest.param(http_answer("200 OK", b"{}")[:-20], id="cut-off-headers"),
    ],
)
async def test_an_answer_httpx_cannot_read_is_a_transient_connection_error(answer: bytes):
    with CannedServer(answer) as server:
        graph = client(server.url)
        try:
            with pytest.raises(GraphConnectionError) as raised:
                await graph.upgrade(TARGET, "aW5zdGFsbGF0aW9u", None, "token")
        finally:
            await graph.aclose()
    # Then it is retried like a lost connection, never raised as an unclassified exception.
    assert isinstance(raised.value, TransientGraphError)
    assert raised.value.failure.code == "ConnectionError"
    assert raised.value.failure.status is None
    assert raised.value.failure.message


def test_a_request_bound_that_is_not_positive_is_refused():
    with pytest.raises(ValueError, match="positive"):
        GraphClient("http://127.0.0.1:1", limiter=AdaptiveRateLimiter(1), request_timeout=0)
