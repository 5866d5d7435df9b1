"""The gateway's overhead at concurrency 1 and its requests/s per process, measured with `hey`.

Starts the platform (budget, spawner, loader, router, a fake LLM) and one gateway process.
Concurrency 1: sequential chat completions over a kept-alive connection; for each, the
client's time is compared with ``x-orchestrator-latency-ms`` (the SDK's time inside the
gateway, from the request's send to its answer's read), so the difference is the gateway's
own part (HTTP, auth, JSON). Throughput: `hey` (Debian package ``hey``) against
``/v1/chat/completions`` (the whole platform behind it) and ``GET /v1/models`` (the
gateway alone: HTTP and key check), with the gateway's CPU per request.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import aiohttp

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench._platform import BenchPlatform, process_cpu_s  # noqa: E402
from streams.client import OrchestratorClient  # noqa: E402

GOAL = "bench-gateway"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else 0.0


def _body(i: int) -> dict[str, Any]:
    # A different message each time, so no automation answers from its cache.
    text = f"Why does my python function raise a KeyError? case {i}"
    return {"model": "auto", "messages": [{"role": "user", "content": text}]}


async def _ready(url: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    async with aiohttp.ClientSession() as http:
        while True:
            try:
                async with http.get(url.removesuffix("/v1") + "/health") as response:
                    if response.status == 200:
                        return
            except aiohttp.ClientConnectionError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError("the gateway did not answer")
            await asyncio.sleep(0.2)


async def sequential(url: str, key: str, count: int, offset: int) -> dict[str, Any]:
    """``count`` requests one after the other; client time vs the platform's time."""
    total: list[float] = []
    inside: list[float] = []
    overhead: list[float] = []
    headers = {"Authorization": f"Bearer {key}"}
    async with aiohttp.ClientSession() as http:
        for i in range(count):
            started = time.perf_counter()
            async with http.post(
                f"{url}/chat/completions", json=_body(offset + i), headers=headers
            ) as response:
                await response.read()
                if response.status != 200:
                    raise RuntimeError(f"request {i}: HTTP {response.status}")
                platform_ms = float(response.headers["x-orchestrator-latency-ms"])
            elapsed = (time.perf_counter() - started) * 1000.0
            total.append(elapsed)
            inside.append(platform_ms)
            overhead.append(elapsed - platform_ms)

    def row(values: list[float]) -> dict[str, float]:
        return {"p50": round(_pct(values, 0.5), 2), "p99": round(_pct(values, 0.99), 2)}

    return {
        "requests": count,
        "through_gateway_ms": row(total),
        "inside_platform_ms": row(inside),
        "gateway_overhead_ms": row(overhead),
    }


def hey(url: str, key: str, *, requests: int, concurrency: int, chat: bool) -> dict[str, Any]:
    """Run `hey` once; requests/s, latency percentiles and status counts from its report."""
    auth = f"Authorization: Bearer {key}"
    argv = ["hey", "-n", str(requests), "-c", str(concurrency), "-H", auth]
    if chat:
        # One body for all (hey sends the same); no improvement service runs, so no automation.
        body = json.dumps(_body(0))
        argv += ["-m", "POST", "-T", "application/json", "-d", body, f"{url}/chat/completions"]
    else:
        argv += [f"{url}/models"]
    out = subprocess.run(argv, capture_output=True, text=True, check=True, timeout=600).stdout
    rate = re.search(r"Requests/sec:\s+([\d.]+)", out)
    latencies = dict(re.findall(r"\s+(\d\d)% in ([\d.]+) secs", out))
    statuses = dict(re.findall(r"\[(\d+)\]\s+(\d+) responses", out))
    return {
        "requests": requests,
        "concurrency": concurrency,
        "requests_per_s": float(rate.group(1)) if rate else 0.0,
        "p50_ms": round(float(latencies.get("50", 0)) * 1000, 1),
        "p99_ms": round(float(latencies.get("99", 0)) * 1000, 1),
        "statuses": {k: int(v) for k, v in statuses.items()},
    }


async def run(args: argparse.Namespace) -> dict[str, Any]:
    port = _free_port()
    url = f"http://127.0.0.1:{port}/v1"
    env = {
        "ORCH_ROUTER_POLICY": "static",
        "ORCH_BUDGET_MAX_CONCURRENT": "1000",
        "ORCH_GATEWAY_PORT": str(port),
        "ORCH_GATEWAY_MAX_IN_FLIGHT": "1024",
    }
    async with BenchPlatform(env=env) as platform:
        await platform.warm_up([(_body(0)["messages"][0]["content"], GOAL)])
        gateway = platform.start_service("gateway")
        await _ready(url)
        async with OrchestratorClient(platform.settings, source="bench-gateway") as client:
            key, _ = await client.create_key(GOAL, "bench")
        await sequential(url, key, 20, 10_000)  # warm: the key, the connection, the agent
        results: dict[str, Any] = {"concurrency_1": await sequential(url, key, args.requests, 0)}
        for name, chat in (("chat_completions", True), ("models_only", False)):
            before = process_cpu_s(gateway.proc.pid)
            row = await asyncio.to_thread(
                hey, url, key, requests=args.hey_requests, concurrency=args.concurrency, chat=chat
            )
            cpu = process_cpu_s(gateway.proc.pid) - before
            row["gateway_cpu_ms_per_request"] = round(cpu * 1000 / args.hey_requests, 2)
            results[name] = row
        return results


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=300, help="sequential requests")
    parser.add_argument("--hey-requests", type=int, default=2000, help="requests per hey run")
    parser.add_argument("--concurrency", type=int, default=32, help="hey's concurrency")
    args = parser.parse_args(argv)
    if shutil.which("hey") is None:
        parser.error("needs the `hey` load generator: apt-get install hey")
    print(json.dumps(asyncio.run(run(args)), indent=2))


if __name__ == "__main__":
    main()
