"""``upgrade``: one upgrade from the terminal through the function's handler, no queue."""

from __future__ import annotations

import uuid

from standins.graph_simulator import Fault
from tests.cli_support import DEADLETTER_QUEUE, UPGRADE_QUEUE
from tests.support import APP, TEAM, new_user

# The fixtures run_cli and cli_bus.
pytest_plugins = ["tests.cli_support"]


async def test_an_upgrade_prints_graphs_answer(run_cli, graph, broker, identity):
    _, upn, installation = new_user(graph.tenant)

    result = await run_cli("upgrade", "--user-id", upn, "--teams-app-id", APP)

    assert result.code == 0, result.text
    lookup, upgrade = graph.requests
    assert lookup.method == "GET" and upgrade.method == "POST" and upgrade.status == 204
    assert "Upgraded: Graph answered 204" in result.out and "on attempt 1" in result.out
    assert upgrade.headers["client-request-id"] in result.out
    assert graph.tenant.installation_version(installation) == "1.1.0"
    assert identity.requests[-1].status == 200, "the token came from the identity endpoint"
    assert broker.messages(UPGRADE_QUEUE) == [] and broker.messages(DEADLETTER_QUEUE) == []


async def test_a_rejected_upgrade_prints_the_graph_error_and_fails(run_cli, graph, broker):
    permanent = str(uuid.uuid4())
    graph.tenant.add_app(permanent, f"ext-{permanent}", permanent=True)
    installation = graph.tenant.install("team", TEAM, permanent)

    result = await run_cli("upgrade", "--team-id", TEAM, "--app-installation-id", installation)

    assert result.code == 1
    out = result.out
    assert "Failed: GraphRequestRejected. Graph answered 403 Forbidden/AccessDenied" in out
    assert "AccessDenied" in out and "is not allowed on a permanent app" in out
    [call] = graph.requests
    assert call.headers["client-request-id"] in out
    assert '"code": "Forbidden"' in out, "Graph's raw answer is printed"
    assert broker.messages(DEADLETTER_QUEUE) == [], "nothing goes to a queue"


async def test_a_transient_failure_is_retried_inline_as_the_function_does(run_cli, graph):
    user, _, installation = new_user(graph.tenant)
    graph.script("upgrade", Fault(502))

    result = await run_cli("upgrade", "--user-id", user, "--app-installation-id", installation)

    assert result.code == 0, result.text
    assert "attempt 1: Graph answered 502 BadGateway; retrying in" in result.out
    assert "on attempt 2" in result.out


async def test_a_long_throttle_says_when_to_try_again(run_cli, graph):
    user, _, installation = new_user(graph.tenant)
    graph.script("upgrade", Fault.throttled("60"))

    result = await run_cli("upgrade", "--user-id", user, "--app-installation-id", installation)

    assert result.code == 3
    assert "Not upgraded yet: Graph answered 429 TooManyRequests" in result.out
    assert "run this command again then" in result.out


async def test_an_invalid_request_never_reaches_graph(run_cli, graph):
    result = await run_cli("upgrade", "--user-id", "not a user", "--teams-app-id", APP)

    assert result.code == 2
    assert "userId is neither a GUID nor a user principal name" in result.err
    assert graph.requests == []
