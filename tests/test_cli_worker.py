"""``worker``: the function's handler outside Azure Functions, settling as the Functions host does.

Over the wire: the real azure-servicebus receiver against the broker, the Graph simulator and the
identity endpoint. What an operator sees is the worker's output and the queues.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Mapping
from pathlib import Path

import pytest

from standins.graph_simulator import Fault
from standins.servicebus_broker import ServiceBusBroker
from tests.cli_support import DEADLETTER_QUEUE, UPGRADE_QUEUE
from tests.conftest import fast_credential
from tests.support import APP, new_user
from upgrade_handler.auth import TokenProvider
from upgrade_handler.cli.bus import Bus
from upgrade_handler.cli.worker import Processed, Worker
from upgrade_handler.handler import UpgradeHandler
from upgrade_handler.outcome import Outcome
from upgrade_handler.settings import Settings

ROOT = Path(__file__).resolve().parent.parent

# The fixtures run_cli and cli_bus.
pytest_plugins = ["tests.cli_support"]


async def send_json(bus: Bus, *bodies: Mapping[str, object] | bytes) -> list[str]:
    from azure.servicebus import ServiceBusMessage

    ids = []
    for body in bodies:
        message_id = str(uuid.uuid4())
        raw = body if isinstance(body, bytes) else json.dumps(body).encode()
        await bus.send(UPGRADE_QUEUE, [ServiceBusMessage(raw, message_id=message_id, content_type="application/json")])
        ids.append(message_id)
    return ids


async def test_a_message_is_handled_and_completed_when_the_handler_returns(run_cli, cli_bus, graph, broker):
    user, _, installation = new_user(graph.tenant)
    [message_id] = await send_json(cli_bus, {"userId": user, "appInstallationId": installation})

    result = await run_cli("worker", "--until-idle", "0.3")

    assert result.code == 0, result.text
    assert f"upgraded         {message_id}  delivery 1  attempt 1  Graph 204" in result.out
    assert "1 received, 1 completed, 0 abandoned (1 upgraded)" in result.out
    assert graph.tenant.installation_version(installation) == "1.1.0"
    assert broker.messages(UPGRADE_QUEUE) == [] and broker.messages(DEADLETTER_QUEUE) == []


async def test_a_request_already_at_its_version_is_reported_as_current(run_cli, cli_bus, graph, broker):
    user, _, installation = new_user(graph.tenant, version="1.1.0")
    [message_id] = await send_json(cli_bus, {"userId": user, "appInstallationId": installation, "version": "1.1.0"})

    result = await run_cli("worker", "--until-idle", "0.3")

    assert result.code == 0, result.text
    assert f"current          {message_id}  delivery 1  attempt 1" in result.out
    assert "1 received, 1 completed, 0 abandoned (1 current)" in result.out
    assert broker.messages(UPGRADE_QUEUE) == [] and broker.messages(DEADLETTER_QUEUE) == []


async def test_a_message_is_abandoned_when_the_handler_raises_and_handled_on_redelivery(run_cli, cli_bus, broker):
    # The dead-letter send fails once: the handler raises, as the contract says, and nothing is lost.
    [message_id] = await send_json(cli_bus, b"not json")
    broker.fail_sends(DEADLETTER_QUEUE, count=1)

    result = await run_cli("worker", "--until-idle", "0.3")

    assert result.code == 0, result.text
    lines = [line for line in result.out.splitlines() if message_id in line]
    assert lines[0].startswith("abandoned") and "delivery 1" in lines[0] and "ServiceBusError" in lines[0]
    assert lines[1].startswith("dead-lettered") and "delivery 2" in lines[1] and "InvalidMessage" in lines[1]
    assert "2 received, 1 completed, 1 abandoned" in result.out
    [letter] = broker.messages(DEADLETTER_QUEUE)
    assert letter.message_id == message_id
    assert letter.application_properties["OriginalDeliveryCount"] == 2
    assert broker.messages(UPGRADE_QUEUE) == []


async def test_a_scheduled_retry_copy_is_received_when_it_comes_due(run_cli, cli_bus, graph, broker, monkeypatch):
    monkeypatch.setenv("UPGRADE_MAX_INLINE_WAIT_SECONDS", "0.2")
    user, _, installation = new_user(graph.tenant)
    graph.script("upgrade", Fault.throttled("1"))
    [message_id] = await send_json(cli_bus, {"userId": user, "appInstallationId": installation})

    started = time.monotonic()
    result = await run_cli("worker", "--until-idle", "0.3")

    assert result.code == 0, result.text
    first, second = [line for line in result.out.splitlines() if message_id in line]
    assert first.startswith("retry scheduled") and "Graph 429 TooManyRequests" in first
    assert second.startswith("upgraded") and f"{message_id}:retry:1" in second and "attempt 2" in second
    assert time.monotonic() - started >= 1.0, "the worker waited for the copy, though the queue looked empty"
    assert [r.status for r in graph.requests if r.method == "POST"] == [429, 204]
    assert broker.messages(UPGRADE_QUEUE) == []


async def test_concurrency_bounds_the_handler_calls_in_flight(run_cli, cli_bus, graph, broker):
    graph.set_latency(0.4)
    installations = []
    for _ in range(8):
        user, _, installation = new_user(graph.tenant)
        installations.append((user, installation))
    await send_json(cli_bus, *({"userId": u, "appInstallationId": i} for u, i in installations))

    started = time.monotonic()
    result = await run_cli("worker", "--concurrency", "4", "--until-idle", "0.3")
    elapsed = time.monotonic() - started

    assert result.code == 0, result.text
    assert "8 received, 8 completed" in result.out
    sent = {r.headers["client-request-id"]: r.received_at for r in graph.requests if r.method == "POST"}
    spans = [(sent[u.client_request_id], u.time) for u in graph.upgraded if u.client_request_id in sent]
    assert len(spans) == 8
    most = max(sum(1 for start, end in spans if start <= moment < end) for moment, _ in spans)
    assert most == 4, f"{most} Graph calls were in flight at once"
    assert elapsed < 8 * 0.4 + 1.0, "the calls ran one after another"


async def test_the_lock_is_renewed_while_a_slow_message_is_handled(graph, environment):
    # A broker of its own, with a 3 s lock, and Graph answering after 4 s. (The SDK renews a lock this
    # short when less than 1.5 s is left, checking once a second.)
    with ServiceBusBroker(lock_duration=3.0) as short_lock:
        settings = Settings.from_environment({**environment, "ServiceBusConnection": short_lock.connection_string})
        bus = Bus(settings.service_bus, retry_total=0)
        handler = UpgradeHandler(settings, sender=bus, tokens=TokenProvider(settings.graph_scope, fast_credential))
        try:
            user, _, installation = new_user(graph.tenant)
            await send_json(bus, {"userId": user, "appInstallationId": installation})
            graph.set_latency(4.0)
            seen: list[Processed] = []
            worker = Worker(handler.handle, bus, UPGRADE_QUEUE, until_idle=0.3, on_processed=seen.append)
            stats = await worker.run()
        finally:
            graph.set_latency(0.0)
            await handler.aclose()
            await bus.aclose()
        assert [(p.outcome, p.settlement) for p in seen] == [(Outcome.UPGRADED, "completed")]
        assert stats.received == 1 and stats.completed == 1
        assert short_lock.messages(UPGRADE_QUEUE) == []


async def test_fan_out_children_are_received_and_handled_by_the_same_run(run_cli, cli_bus, graph, broker):
    users = [new_user(graph.tenant) for _ in range(3)]
    await send_json(cli_bus, {"userIds": [upn for _, upn, _ in users], "teamsAppId": APP})

    result = await run_cli("worker", "--until-idle", "0.3")

    assert result.code == 0, result.text
    assert "4 received, 4 completed, 0 abandoned (1 fanned_out, 3 upgraded)" in result.out
    assert all(graph.tenant.installation_version(i) == "1.1.0" for _, _, i in users)


def test_worker_stops_gracefully_on_sigterm(environment):
    env = {**os.environ, **environment}
    process = subprocess.Popen(
        [sys.executable, "-m", "upgrade_handler", "worker", "--concurrency", "2"],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert process.stdout is not None
        first = process.stdout.readline()
        assert first.startswith("Worker on teams-app-upgrades: 2 at a time"), first
        time.sleep(1.0)  # let it open its receiver and wait for messages
        process.send_signal(signal.SIGTERM)
        out, err = process.communicate(timeout=20)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 0, err
    assert "Worker stopped: 0 received" in out


@pytest.mark.parametrize("concurrency", ["0", "x"])
async def test_worker_refuses_a_concurrency_below_one(concurrency, capsys):
    from upgrade_handler.__main__ import main

    with pytest.raises(SystemExit) as exit_:
        main(["worker", "--concurrency", concurrency])
    assert exit_.value.code == 2
    assert "--concurrency" in capsys.readouterr().err


async def test_the_poison_guard_dead_letters_at_the_delivery_the_functions_host_would(
    run_cli, cli_bus, graph, broker, monkeypatch
):
    """Service Bus counts deliveries from 0 on the wire; the host (.NET) and the worker add 1."""
    monkeypatch.setenv("UPGRADE_MAX_DELIVERY_COUNT", "3")
    receiver = await cli_bus.receiver(UPGRADE_QUEUE)

    async def abandon(times: int) -> None:
        """What a host that crashed while handling the message leaves behind."""
        for _ in range(times):
            [message] = await receiver.receive_messages(max_message_count=1, max_wait_time=10)
            await receiver.abandon_message(message)

    # given a request abandoned twice: its next delivery is the third
    poisoned_user, _, poisoned = new_user(graph.tenant)
    [poison_id] = await send_json(cli_bus, {"userId": poisoned_user, "appInstallationId": poisoned})
    await abandon(2)

    # when the worker receives it
    result = await run_cli("worker", "--until-idle", "0.3")

    # then it is dead-lettered without a Graph call, as the host would on its third delivery
    assert result.code == 0, result.text
    [poison_line] = [line for line in result.out.splitlines() if poison_id in line]
    assert poison_line.startswith("dead-lettered") and "delivery 3" in poison_line, poison_line
    [letter] = broker.messages(DEADLETTER_QUEUE)
    assert letter.message_id == poison_id
    assert letter.application_properties["DeadLetterReason"] == "RetriesExhausted"
    assert letter.application_properties["OriginalDeliveryCount"] == 3
    assert not any(poisoned in r.raw_path for r in graph.requests)
    assert graph.tenant.installation_version(poisoned) == "1.0.0"

    # and a request abandoned once is handled on its second delivery
    user, _, installation = new_user(graph.tenant)
    [survivor_id] = await send_json(cli_bus, {"userId": user, "appInstallationId": installation})
    await abandon(1)
    result = await run_cli("worker", "--until-idle", "0.3")
    [survivor_line] = [line for line in result.out.splitlines() if survivor_id in line]
    assert survivor_line.startswith("upgraded") and "delivery 2" in survivor_line, survivor_line
    assert graph.tenant.installation_version(installation) == "1.1.0"
    assert broker.messages(UPGRADE_QUEUE) == []
