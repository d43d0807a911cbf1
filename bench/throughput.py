"""Benchmark 1: throughput at Graph's limit.

The Graph simulator allows 30 requests per one-second sliding window for the tenant (throttled
calls count too) and answers after 150 ms ± 50 ms. The same upgrades are done three ways, one
after the other against the same simulator and identity endpoint:

- the function's handler, fed by an in-memory host with the host's concurrency (16);
- ``msgraph-sdk`` with its default middleware (retry handler included), through its request
  adapter with the raw URL, since the SDK has no request builder for the user-scope upgrade;
- a plain ``httpx`` loop that retries a 429 after its ``Retry-After``.

Then four worker processes, each with its own handler at ``GRAPH_MAX_REQUESTS_PER_SECOND=30``,
share the simulator's one 30-per-second budget, to show the adaptive limits converging.

    python -m bench throughput [--size 1000] [--processes 4] [--skip-sdk]
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import importlib.util
import json
import os
import sys
import time
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any

import httpx

from bench._common import (
    HOST_CONCURRENCY,
    JITTER,
    LATENCY,
    LIMIT,
    MI_CLIENT_ID,
    ROOT,
    WINDOW,
    LocalHost,
    add_users,
    environment,
    new_delivery,
    quiet_logs,
    ratio,
    request_body,
    stand_ins,
    table,
    worker_processes,
    write_result,
)
from standins.graph_simulator import GraphSimulator
from standins.identity_endpoint import IdentityEndpoint

#: Bounds: no run may take longer than this many times its floor (plus a minute).
DEADLINE_FACTOR = 6.0
#: The plain loop gives up on a request after this many 429s.
HTTPX_MAX_ATTEMPTS = 100
#: msgraph-sdk: a request that still fails after the SDK's own retries is tried again in a later
#: pass (as a user's script would), at most this many passes.
SDK_MAX_PASSES = 20

Users = list[tuple[str, str]]

Way = Callable[[GraphSimulator, IdentityEndpoint, Users], Coroutine[Any, Any, dict[str, Any]]]


def upgrade_path(user_id: str, installation_id: str) -> str:
    from urllib.parse import quote

    return f"/v1.0/users/{quote(user_id, safe='')}/teamwork/installedApps/{quote(installation_id, safe='')}/upgrade"


class Meter:
    """Wall time, this thread's CPU time, and the simulator's and identity endpoint's counters."""

    def __init__(self, graph: GraphSimulator, identity: IdentityEndpoint) -> None:
        self._graph, self._identity = graph, identity
        self._stats = graph.stats()
        self._tokens = len(identity.requests)
        self._upgraded = len(graph.upgraded)
        self._wall = time.perf_counter()
        self._cpu = time.thread_time()

    def read(self, users: Users) -> dict[str, Any]:
        wall = time.perf_counter() - self._wall
        cpu = time.thread_time() - self._cpu
        stats = self._graph.stats()
        calls = stats["requests"] - self._stats["requests"]
        throttled = stats["throttled"] - self._stats["throttled"]
        wanted = {iid for _, iid in users}
        done = {r.installation_id for r in self._graph.upgraded[self._upgraded :]} & wanted
        n = len(users)
        return {
            "requests": n,
            "upgraded": len(done),
            "elapsed_s": round(wall, 3),
            "floor_s": round(n / LIMIT, 3),
            "over_floor": round(wall / (n / LIMIT) - 1, 4),
            "graph_calls": calls,
            "throttled_429": throttled,
            "throttled_share": round(throttled / calls, 4) if calls else 0.0,
            "cpu_ms_per_message": round(cpu * 1000 / n, 3),
            "identity_calls": len(self._identity.requests) - self._tokens,
        }


def fresh_limit(graph: GraphSimulator) -> None:
    """A new, empty window, after letting whatever is in flight drain."""
    time.sleep(1.5)
    graph.set_rate_limit(LIMIT, window=WINDOW)
    graph.set_latency(LATENCY, JITTER)


# --- the function ----------------------------------------------------------------------------------


def build_handler(env: dict[str, str], host: LocalHost, statuses: Counter[str]) -> Any:
    """The handler as ``function_app`` builds it, with a response hook counting Graph statuses."""
    from upgrade_handler.graph import LIMITS, TIMEOUT, GraphClient
    from upgrade_handler.handler import UpgradeHandler
    from upgrade_handler.ratelimit import AdaptiveRateLimiter
    from upgrade_handler.settings import Settings

    async def count(response: httpx.Response) -> None:
        statuses[str(response.status_code)] += 1

    settings = Settings.from_environment(env)
    limiter_class: Any = AdaptiveRateLimiter
    other = os.environ.get("BENCH_LIMITER_FILE")
    if other:  # another version of ratelimit.py, for before/after figures (bench/README.md)
        limiter_class = load_limiter(other)
    http = httpx.AsyncClient(
        timeout=TIMEOUT, limits=LIMITS, follow_redirects=False, trust_env=False, event_hooks={"response": [count]}
    )
    graph = GraphClient(settings.graph_base_url, limiter=limiter_class(settings.max_requests_per_second), http=http)
    return UpgradeHandler(settings, graph=graph, sender=host)


def load_limiter(path: str) -> Any:
    """``AdaptiveRateLimiter`` of another ratelimit.py, raising the GateClosed the client catches."""
    from upgrade_handler import ratelimit

    spec = importlib.util.spec_from_file_location("other_ratelimit", path)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    setattr(module, "GateClosed", ratelimit.GateClosed)  # noqa: B010  # a module, not a class
    return module.AdaptiveRateLimiter


async def sample_rate(limiter: Any, trace: list[tuple[float, float]], started: float) -> None:
    while True:
        trace.append((round(time.perf_counter() - started, 2), round(limiter.rate, 2)))
        await asyncio.sleep(0.25)


async def drive_function(env: dict[str, str], users: Users, *, concurrency: int) -> dict[str, Any]:
    """Hand every request to one handler through the in-memory host; returns the host's report."""
    host = LocalHost()
    statuses: Counter[str] = Counter()
    handler = build_handler(env, host, statuses)
    for user_id, installation_id in users:
        host.put(new_delivery(request_body(user_id, installation_id, str(uuid.uuid4()))))
    trace: list[tuple[float, float]] = []
    started = time.perf_counter()
    sampler = asyncio.create_task(sample_rate(handler.graph.limiter, trace, started))
    deadline = time.monotonic() + len(users) / LIMIT * DEADLINE_FACTOR + 60
    report = await host.run(handler, concurrency=concurrency, deadline=deadline)
    elapsed = time.perf_counter() - started
    sampler.cancel()
    await handler.aclose()
    rates = [r for _, r in trace]
    return {
        "elapsed_s": round(elapsed, 3),
        "outcomes": dict(report.outcomes),
        "raised": dict(report.raised),
        "retries_scheduled": report.scheduled,
        "dead_lettered": len(report.dead_letters),
        "unfinished": report.unfinished,
        "statuses": dict(statuses),
        "rate_min": min(rates, default=0.0),
        "rate_mean": round(sum(rates) / len(rates), 2) if rates else 0.0,
        "rate_final": rates[-1] if rates else 0.0,
        "rate_decreases": getattr(handler.graph.limiter, "decreases", None),
        "rate_trace": trace[:: max(1, len(trace) // 40)],
    }


async def run_function(graph: GraphSimulator, identity: IdentityEndpoint, users: Users) -> dict[str, Any]:
    env = environment(identity, graph.url, GRAPH_MAX_REQUESTS_PER_SECOND=str(LIMIT))
    meter = Meter(graph, identity)
    detail = await drive_function(env, users, concurrency=HOST_CONCURRENCY)
    return {**meter.read(users), "detail": detail}


# --- msgraph-sdk ----------------------------------------------------------------------------------


async def run_sdk(graph: GraphSimulator, identity: IdentityEndpoint, users: Users) -> dict[str, Any]:
    from azure.identity.aio import ManagedIdentityCredential

    # By name, so that mypy never reads the SDK (and CI, which does not install it, is not bothered).
    Method = importlib.import_module("kiota_abstractions.method").Method
    RequestInformation = importlib.import_module("kiota_abstractions.request_information").RequestInformation
    AzureIdentityAuthenticationProvider = importlib.import_module(
        "kiota_authentication_azure.azure_identity_authentication_provider"
    ).AzureIdentityAuthenticationProvider
    msgraph = importlib.import_module("msgraph")
    GraphRequestAdapter, GraphServiceClient = msgraph.GraphRequestAdapter, msgraph.GraphServiceClient
    ODataError = importlib.import_module("msgraph.generated.models.o_data_errors.o_data_error").ODataError

    meter = Meter(graph, identity)
    credential = ManagedIdentityCredential(client_id=MI_CLIENT_ID)
    auth = AzureIdentityAuthenticationProvider(
        credential, scopes=["https://graph.microsoft.com/.default"], allowed_hosts=["127.0.0.1"]
    )
    adapter = GraphRequestAdapter(auth)
    adapter.base_url = f"{graph.url}/v1.0"
    GraphServiceClient(request_adapter=adapter)  # what a user builds; the upgrade goes past it
    template = "{+baseurl}/users/{user%2Did}/teamwork/installedApps/{userScopeTeamsAppInstallation%2Did}/upgrade"
    errors: Counter[str] = Counter()

    async def upgrade(user_id: str, installation_id: str) -> bool:
        info = RequestInformation(
            Method.POST, template, {"user%2Did": user_id, "userScopeTeamsAppInstallation%2Did": installation_id}
        )
        try:
            await adapter.send_no_response_content_async(info, {"XXX": ODataError})
            return True
        except Exception as error:
            status = getattr(error, "response_status_code", None)
            errors[f"{type(error).__name__} {status}"] += 1
            return False

    remaining, passes, first_pass_failures = list(users), 0, 0
    deadline = time.monotonic() + len(users) / LIMIT * DEADLINE_FACTOR + 60
    while remaining and passes < SDK_MAX_PASSES and time.monotonic() < deadline:
        passes += 1
        failed = await bounded(remaining, upgrade, HOST_CONCURRENCY)
        if passes == 1:
            first_pass_failures = len(failed)
        remaining = failed
    result = meter.read(users)
    await credential.close()
    return {
        **result,
        "detail": {"passes": passes, "failed_after_first_pass": first_pass_failures, "errors": dict(errors)},
    }


async def bounded(users: Users, call: Callable[[str, str], Awaitable[bool]], concurrency: int) -> Users:
    """Run ``call`` for every user, ``concurrency`` at a time; returns those that failed."""
    queue = list(reversed(users))
    failed: Users = []

    async def worker() -> None:
        while queue:
            user = queue.pop()
            if not await call(*user):
                failed.append(user)

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return failed


# --- a plain httpx loop ----------------------------------------------------------------------------


async def run_httpx(graph: GraphSimulator, identity: IdentityEndpoint, users: Users) -> dict[str, Any]:
    from azure.identity.aio import ManagedIdentityCredential

    meter = Meter(graph, identity)
    credential = ManagedIdentityCredential(client_id=MI_CLIENT_ID)
    errors: Counter[str] = Counter()
    deadline = time.monotonic() + len(users) / LIMIT * DEADLINE_FACTOR + 60
    async with httpx.AsyncClient(base_url=graph.url, timeout=30.0) as http:

        async def upgrade(user_id: str, installation_id: str) -> bool:
            for _ in range(HTTPX_MAX_ATTEMPTS):
                if time.monotonic() > deadline:
                    break
                token = await credential.get_token("https://graph.microsoft.com/.default")
                response = await http.post(
                    upgrade_path(user_id, installation_id), headers={"Authorization": f"Bearer {token.token}"}
                )
                if response.is_success:
                    return True
                if response.status_code != 429:
                    errors[str(response.status_code)] += 1
                    return False
                await asyncio.sleep(float(response.headers.get("Retry-After", "1")))
            errors["gave up"] += 1
            return False

        await bounded(users, upgrade, HOST_CONCURRENCY)
    result = meter.read(users)
    await credential.close()
    return {**result, "detail": {"errors": dict(errors)}}


# --- several processes ------------------------------------------------------------------------------


def run_processes(graph: GraphSimulator, identity: IdentityEndpoint, users: Users, processes: int) -> dict[str, Any]:
    """``processes`` workers, each its own handler at 30/s, against the one 30/s budget."""
    env = environment(identity, graph.url, GRAPH_MAX_REQUESTS_PER_SECOND=str(LIMIT))
    shares = [users[i::processes] for i in range(processes)]
    with worker_processes("bench.throughput", env, shares) as fleet:  # each has built its handler
        meter = Meter(graph, identity)
        fleet.go()
        reports = fleet.reports(timeout=len(users) / LIMIT * DEADLINE_FACTOR + 120)
    total = meter.read(users)
    per_process = []
    for index, report in enumerate(reports):
        statuses = report["statuses"]
        calls = sum(statuses.values())
        per_process.append(
            {
                "process": index + 1,
                "requests": len(shares[index]),
                "elapsed_s": report["elapsed_s"],
                "throughput_rps": round(len(shares[index]) / report["elapsed_s"], 2),
                "graph_calls": calls,
                "throttled_429": statuses.get("429", 0),
                "throttled_share": round(statuses.get("429", 0) / calls, 4) if calls else 0.0,
                "rate_mean": report["rate_mean"],
                "rate_final": report["rate_final"],
                "rate_trace": report["rate_trace"],
                "unfinished": report["unfinished"],
                "outcomes": report["outcomes"],
                "rate_decreases": report["rate_decreases"],
            }
        )
    total["throughput_rps"] = round(len(users) / total["elapsed_s"], 2)
    return {"total": total, "per_process": per_process}


def child_main() -> None:
    """One worker process: read the plan, say ready, wait for go, run, print the report."""
    quiet_logs()
    plan = json.loads(sys.stdin.readline())
    users = [tuple(pair) for pair in plan["users"]]
    print("ready", flush=True)
    if sys.stdin.readline().strip() != "go":
        return
    report = asyncio.run(drive_function(plan["env"], users, concurrency=HOST_CONCURRENCY))
    print(json.dumps(report), flush=True)


# --- the benchmark ---------------------------------------------------------------------------------

COLUMNS = (
    "way",
    "requests",
    "upgraded",
    "elapsed s",
    "floor s",
    "over floor",
    "Graph calls",
    "429s",
    "429 share",
    "CPU ms/msg",
    "identity calls",
)


def row(name: str, r: dict[str, Any]) -> list[Any]:
    return [
        name,
        r["requests"],
        r["upgraded"],
        r["elapsed_s"],
        r["floor_s"],
        f"{r['over_floor']:+.1%}",
        r["graph_calls"],
        r["throttled_429"],
        f"{r['throttled_share']:.2%}",
        r["cpu_ms_per_message"],
        r["identity_calls"],
    ]


def run(
    size: int = 1000,
    processes: int = 4,
    skip_sdk: bool = False,
    function_only: bool = False,
    output: str = "throughput",
) -> dict[str, Any]:
    quiet_logs()
    results: dict[str, Any] = {
        "size": size,
        "limit_per_second": LIMIT,
        "latency": [LATENCY, JITTER],
        "limiter": os.environ.get("BENCH_LIMITER_FILE") or "upgrade_handler/ratelimit.py",
    }
    with stand_ins() as (identity, graph):
        ways: list[tuple[str, Way]] = [
            ("function", run_function),
            ("httpx loop", run_httpx),
        ]
        if not skip_sdk and importlib.util.find_spec("msgraph") is None:
            print("msgraph-sdk is not installed (pip install -r bench/requirements.txt): left out", file=sys.stderr)
            skip_sdk = True
        if not skip_sdk:
            ways.insert(1, ("msgraph-sdk", run_sdk))
        if function_only:
            ways = ways[:1]
        for name, way in ways:
            users = add_users(graph, size)
            fresh_limit(graph)
            results[name] = asyncio.run(way(graph, identity, users))
            print(f"  {name}: {results[name]['elapsed_s']} s", file=sys.stderr, flush=True)
        if processes > 1:
            users = add_users(graph, size)
            fresh_limit(graph)
            results["processes"] = run_processes(graph, identity, users, processes)
    function = results["function"]
    rows = [row(name, results[name]) for name, _ in ways]
    if processes > 1:
        rows.append(row(f"function x{processes} processes", results["processes"]["total"]))
    print(table(COLUMNS, rows))
    ratios = {}
    for name, _ in ways[1:]:
        other = results[name]
        ratios[name] = {
            "elapsed": ratio(other["elapsed_s"], function["elapsed_s"]),
            "graph_calls": ratio(other["graph_calls"], function["graph_calls"]),
            "throttled_429": ratio(other["throttled_429"], max(1, function["throttled_429"])),
            "cpu_per_message": ratio(other["cpu_ms_per_message"], function["cpu_ms_per_message"]),
        }
    results["ratios_vs_function"] = ratios
    print()
    print(
        table(
            ("other way ÷ function", "elapsed", "Graph calls", "429s (÷ max(1, function's))", "CPU per message"),
            [[n, r["elapsed"], r["graph_calls"], r["throttled_429"], r["cpu_per_message"]] for n, r in ratios.items()],
        )
    )
    if processes > 1:
        print()
        print(
            table(
                (
                    "process",
                    "requests",
                    "elapsed s",
                    "rps",
                    "Graph calls",
                    "429s",
                    "429 share",
                    "mean limit/s",
                    "final limit/s",
                ),
                [
                    [
                        p["process"],
                        p["requests"],
                        p["elapsed_s"],
                        p["throughput_rps"],
                        p["graph_calls"],
                        p["throttled_429"],
                        f"{p['throttled_share']:.2%}",
                        p["rate_mean"],
                        p["rate_final"],
                    ]
                    for p in results["processes"]["per_process"]
                ],
            )
        )
        total = results["processes"]["total"]
        print(f"total: {total['throughput_rps']} requests/s against a budget of {LIMIT}/s")
    path = write_result(output, results)
    print(f"\nwritten to {path.relative_to(ROOT)}")
    return results


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench throughput")
    parser.add_argument("--size", type=int, default=1000)
    parser.add_argument("--processes", type=int, default=4)
    parser.add_argument("--skip-sdk", action="store_true", help="leave out msgraph-sdk (when it is not installed)")
    parser.add_argument("--function-only", action="store_true", help="leave out both comparisons")
    parser.add_argument("--output", default="throughput", help="results file name under bench/results/")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        child_main()
        return
    run(args.size, args.processes, args.skip_sdk, args.function_only, args.output)


if __name__ == "__main__":
    main()
