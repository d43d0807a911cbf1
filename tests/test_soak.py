"""A small seeded chaos soak (bench/soak.py at CI size): nothing is lost, nothing is unhandled.

Requests go through the broker and a host-like peek-lock driver while Graph fails 20% of calls,
the identity endpoint 5% of token requests and the broker 2% of the handler's sends, and on the
wire the identity endpoint hangs, the handler's Service Bus link freezes and Graph trickles, in
turn. Then every
request must have ended exactly once: upgraded, or dead-lettered with the reason its kind calls
for. Only outcomes are asserted, never time.
"""

from __future__ import annotations

import pytest

from bench.soak import SoakConfig, soak
from standins.graph_simulator import GraphSimulator
from standins.identity_endpoint import IdentityEndpoint
from standins.servicebus_broker import ServiceBusBroker

pytestmark = pytest.mark.usefixtures("reset_stand_ins")


@pytest.mark.parametrize("seed", [7, 8])
async def test_a_chaos_soak_loses_nothing_and_ends_every_request_once(
    identity: IdentityEndpoint,
    graph: GraphSimulator,
    broker: ServiceBusBroker,
    environment: dict[str, str],
    seed: int,
) -> None:
    report = await soak(identity, graph, broker, SoakConfig(size=200, seed=seed, deadline_seconds=50))

    assert report["left_on_queue"] == 0, report
    assert report["lost"] == 0, report["lost_ids"]
    assert report["unhandled_errors"] == 0, report["unhandled"]
    assert report["upgraded_and_dead_lettered"] == 0
    assert report["dead_lettered_without_reason"] == 0
    assert report["unexpected_end_count"] == 0, report["unexpected_ends"]
    assert sum(report["ends"].values()) == report["requests"] == 200
    # The trouble really happened, and the handler went through its retry paths.
    assert report["graph"]["faults"] > 0
    assert report["retry_copies_sent"] > 0
    assert {"upgraded", "InvalidMessage", "GraphRequestRejected", "InstallationNotFound"} <= set(report["ends"])
    # Each wire fault happened, and held up the handler's own traffic.
    wire = report["wire_faults"]
    assert set(wire["windows"]) == {"identity_hang", "servicebus_freeze", "graph_trickle"}, wire
    assert wire["identity_requests_held"] > 0, wire
    assert wire["servicebus_frames_held"] > 0, wire
    assert wire["graph_bytes_trickled"] > 0, wire
    assert report["raised_to_retry"].get("OperationTimeoutError", 0) > 0, report["raised_to_retry"]
