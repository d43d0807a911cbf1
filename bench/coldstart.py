"""Benchmark 2: cold start and memory.

A fresh Python process imports the function module and hands its first message to the
function's entry point (as the Functions worker does after indexing); the parent times the
whole process, from exec to exit, and the child reports the import and the first message on
their own. Median of several runs, ours against the same function written on msgraph-sdk
(bench/_sdk_function_app.py), each in a virtual environment holding only its own
deployment's packages (built by the footprint benchmark under /tmp/bench-venvs, or here when
missing): in the development environment httpx would also import the HTTP/2 stack that
msgraph-sdk drags in, so our function would pay for the SDK's dependencies. Then peak RSS of
a process that has 100 invocations in flight at once (Graph answering in 150 ms ± 50 ms, the
rate limit set high so that all are in flight).

    python -m bench coldstart [--runs 7]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import time
from typing import Any

from bench._common import ROOT, add_users, environment, quiet_logs, ratio, stand_ins, table, write_result
from bench.footprint import ensure

#: Each function runs in the environment of its own deployment (built by bench/footprint.py).
VARIANTS = {
    "function": ("function_app", "function"),
    "msgraph-sdk": ("bench._sdk_function_app", "function + msgraph-sdk"),
}

#: Runs in the fresh process: nothing of ours is imported before the module under test.
CHILD = r"""
import time
started = time.perf_counter()
import asyncio, importlib, json, resource, sys
plan = json.loads(sys.stdin.readline())
before_import = time.perf_counter()
module = importlib.import_module(plan["module"])
imported = time.perf_counter()
from azure.functions.servicebus import ServiceBusMessage
functions = {f.get_function_name(): f for f in module.app.get_functions()}
user_function = functions["UpgradeTeamsApp"].get_user_function()

def message(user, number):
    body = json.dumps({"userId": user[0], "appInstallationId": user[1], "requestId": f"cold-{number}"}).encode()
    return ServiceBusMessage(body=body, message_id=f"cold-{number}", delivery_count=1,
                             content_type="application/json", application_properties={}, user_properties={})

def status():
    fields = dict(line.split(":", 1) for line in open("/proc/self/status") if ":" in line)
    return {k: int(fields[k].split()[0]) for k in ("VmRSS", "VmHWM")}

async def main():
    first_started = time.perf_counter()
    await user_function(message(plan["users"][0], 0))
    first_done = time.perf_counter()
    after_first = status()
    concurrent = plan["users"][1:]
    if concurrent:
        await asyncio.gather(*(user_function(message(u, i + 1)) for i, u in enumerate(concurrent)))
    return first_started, first_done, after_first

first_started, first_done, after_first = asyncio.run(main())
print(json.dumps({
    "import_s": imported - before_import,
    "first_message_s": first_done - first_started,
    "to_first_message_done_s": first_done - started,
    "modules": len(sys.modules),
    "rss_after_first_kb": after_first["VmRSS"],
    "peak_rss_kb": status()["VmHWM"],
}))
"""


def child(python: str, plan: dict[str, Any], env: dict[str, str]) -> tuple[float, dict[str, Any]]:
    started = time.perf_counter()
    done = subprocess.run(
        [python, "-c", CHILD],
        input=json.dumps(plan) + "\n",
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=env,
        timeout=120,
        check=False,
    )
    wall = time.perf_counter() - started
    if done.returncode != 0:
        raise RuntimeError(f"{plan['module']} child failed:\n{done.stderr[-2000:]}")
    return wall, json.loads(done.stdout.strip().splitlines()[-1])


def run(runs: int = 7, concurrent: int = 100, skip_sdk: bool = False) -> dict[str, Any]:
    quiet_logs()
    variants = {k: v for k, v in VARIANTS.items() if not (skip_sdk and k == "msgraph-sdk")}
    pythons = {name: str(ensure(environment_name)) for name, (_, environment_name) in variants.items()}
    results: dict[str, Any] = {"runs": runs, "concurrent": concurrent, "environments": pythons}
    with stand_ins() as (identity, graph):
        env = {
            **os.environ,
            **environment(identity, graph.url, GRAPH_MAX_REQUESTS_PER_SECOND="1000"),
            "PYTHONPATH": str(ROOT),
            "PYTHONDONTWRITEBYTECODE": "",
        }
        samples: dict[str, list[tuple[float, dict[str, Any]]]] = {name: [] for name in variants}
        for _ in range(runs):  # interleaved, so drift on the machine hits both alike
            for name, (module, _) in variants.items():
                users = add_users(graph, 1)
                samples[name].append(child(pythons[name], {"module": module, "users": users}, env))
        graph.set_latency(0.150, 0.050)
        memory: dict[str, dict[str, Any]] = {}
        for name, (module, _) in variants.items():
            users = add_users(graph, 1 + concurrent)
            _, memory[name] = child(pythons[name], {"module": module, "users": users}, env)
        graph.set_latency(0.0)
    rows = []
    for name in variants:
        walls = [wall for wall, _ in samples[name]]
        reports = [report for _, report in samples[name]]
        summary = {
            "process_to_first_message_done_s": round(statistics.median(walls), 3),
            "import_s": round(statistics.median(r["import_s"] for r in reports), 3),
            "first_message_s": round(statistics.median(r["first_message_s"] for r in reports), 3),
            "modules": reports[-1]["modules"],
            "rss_after_first_message_mb": round(reports[-1]["rss_after_first_kb"] / 1024, 1),
            "peak_rss_100_concurrent_mb": round(memory[name]["peak_rss_kb"] / 1024, 1),
            "all_process_walls_s": [round(w, 3) for w in walls],
        }
        results[name] = summary
        rows.append(
            [
                name,
                summary["process_to_first_message_done_s"],
                summary["import_s"],
                summary["first_message_s"],
                summary["modules"],
                summary["rss_after_first_message_mb"],
                summary["peak_rss_100_concurrent_mb"],
            ]
        )
    print(
        table(
            (
                "function built on",
                "process start to first message done s (median)",
                "import s",
                "first message s",
                "modules loaded",
                "RSS after first MB",
                f"peak RSS, {concurrent} in flight MB",
            ),
            rows,
        )
    )
    if "msgraph-sdk" in variants:
        ours, sdk = results["function"], results["msgraph-sdk"]
        results["ratios_sdk_vs_function"] = {
            "cold_start": ratio(sdk["process_to_first_message_done_s"], ours["process_to_first_message_done_s"]),
            "import": ratio(sdk["import_s"], ours["import_s"]),
            "first_message": ratio(sdk["first_message_s"], ours["first_message_s"]),
            "peak_rss": ratio(sdk["peak_rss_100_concurrent_mb"], ours["peak_rss_100_concurrent_mb"]),
        }
        print()
        print(table(("msgraph-sdk ÷ function", "ratio"), list(results["ratios_sdk_vs_function"].items())))
    path = write_result("coldstart", results)
    print(f"\nwritten to {path.relative_to(ROOT)}")
    return results


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench coldstart")
    parser.add_argument("--runs", type=int, default=7)
    parser.add_argument("--concurrent", type=int, default=100)
    parser.add_argument("--skip-sdk", action="store_true", help="leave out msgraph-sdk (when it is not installed)")
    args = parser.parse_args(argv)
    run(args.runs, args.concurrent, args.skip_sdk)


if __name__ == "__main__":
    main()
