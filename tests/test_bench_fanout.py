"""The group fan-out benchmark (bench/fanout.py) at a tiny size, without the rate limit.

One ``groupId`` request through the broker and the host-like driver: every member gets exactly
one child request and exactly one upgrade, nothing is dead-lettered or lost. Small pages, so
continuations are exercised too. Only outcomes are asserted, never time.
"""

from __future__ import annotations

import pytest

from bench.fanout import FanOutConfig, fanout
from standins.graph_simulator import GraphSimulator
from standins.identity_endpoint import IdentityEndpoint
from standins.servicebus_broker import ServiceBusBroker

pytestmark = pytest.mark.usefixtures("reset_stand_ins")


async def test_a_group_fan_out_upgrades_every_member_exactly_once(
    identity: IdentityEndpoint,
    graph: GraphSimulator,
    broker: ServiceBusBroker,
    environment: dict[str, str],
) -> None:
    config = FanOutConfig(
        size=30,
        seed=11,
        rate_limit=None,
        latency=0.0,
        jitter=0.0,
        max_requests_per_second=100_000,
        page_size=7,
        deadline_seconds=60,
    )

    report = await fanout(identity, graph, broker, config)

    assert report["timed_out"] is False, report
    assert report["unhandled_errors"] == 0, report["unhandled"]
    assert report["children_distinct"] == report["members"] == 30
    assert report["children_match_members"] is True
    assert report["members_with_one_child"] == 30
    assert report["children_accepted_by_broker"] == 30
    assert report["continuations"] == 4  # pages of 7: 7, 7, 7, 7, 2
    assert report["graph_calls_by_kind"] == {"group_pages": 5, "lookups": 30, "upgrades": 30}
    assert report["upgraded_members"] == report["upgrades_2xx"] == 30
    assert report["upgraded_more_than_once"] == 0
    assert report["installations_at_latest"] == 30
    assert report["dead_letters"] == 0
    assert report["dead_lettered_by_service_bus"] == 0
    assert report["lost"] == 0, report["lost_ids"]
    assert report["left_on_queue"] == 0
    assert report["outcomes"] == {"fanned_out": 5, "upgraded": 30}
    assert graph.tenant.group_page_size == 999  # put back
