"""Baseline: the raw AsyncOpenAI client against the fake server, with no platform in between."""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time
from collections.abc import Awaitable, Callable
from typing import Any
from urllib.parse import urlsplit

import openai

from local.fake_openai import remote_stats, subprocess_server

__all__ = ["measure_direct", "measure_server", "summarize"]

_MESSAGES: list[Any] = [
    {"role": "system", "content": "You are a terse benchmark assistant."},
    {"role": "user", "content": "Summarise the latency of an event-sourced orchestrator."},
]


def summarize(
    latencies_s: list[float], wall_s: float, cpu_s: float, errors: int, concurrency: int
) -> dict[str, float]:
    """Percentiles in ms, throughput and client CPU per call, as flat numbers."""
    ordered = sorted(latencies_s)
    n = len(ordered)

    def pct(q: float) -> float:
        return ordered[min(n - 1, int(q * n))] * 1000.0 if n else 0.0

    return {
        "n": float(n),
        "concurrency": float(concurrency),
        "errors": float(errors),
        "p50_ms": pct(0.50),
        "p95_ms": pct(0.95),
        "p99_ms": pct(0.99),
        "mean_ms": statistics.fmean(ordered) * 1000.0 if n else 0.0,
        "max_ms": ordered[-1] * 1000.0 if n else 0.0,
        "rps": n / wall_s if wall_s > 0 else 0.0,
        "wall_s": wall_s,
        "cpu_ms_per_call": cpu_s * 1000.0 / n if n else 0.0,
    }


async def _drive(
    call: Callable[[], Awaitable[None]], n: int, concurrency: int, warmup: int
) -> tuple[list[float], float, float, int]:
    for _ in range(warmup):
        await call()
    latencies: list[float] = []
    errors = 0
    remaining = iter(range(n))

    async def worker() -> None:
        nonlocal errors
        for _ in remaining:
            started = time.perf_counter()
            try:
                await call()
            except Exception:
                errors += 1
                continue
            latencies.append(time.perf_counter() - started)

    cpu0, wall0 = time.process_time(), time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return latencies, time.perf_counter() - wall0, time.process_time() - cpu0, errors


async def measure_direct(base_url: str, n: int, concurrency: int) -> dict[str, float]:
    """``n`` chat completions through a raw ``AsyncOpenAI`` client, ``concurrency`` at a time.

    No retries, so an error is counted, not hidden. Keys: n, concurrency, errors,
    p50_ms, p95_ms, p99_ms, mean_ms, max_ms, rps, wall_s, cpu_ms_per_call (this process).
    """
    client = openai.AsyncOpenAI(base_url=base_url, api_key="not-needed", max_retries=0)

    async def call() -> None:
        await client.chat.completions.create(model="gpt-4o-mini", messages=_MESSAGES)

    try:
        latencies, wall, cpu, errors = await _drive(call, n, concurrency, warmup=20)
    finally:
        await client.close()
    return summarize(latencies, wall, cpu, errors, concurrency)


async def measure_server(base_url: str, n: int, concurrency: int) -> dict[str, float]:
    """The same request over bare keep-alive HTTP/1.1: what the server can take by itself."""
    parts = urlsplit(base_url)
    host, port = parts.hostname or "127.0.0.1", parts.port or 80
    body = json.dumps({"model": "gpt-4o-mini", "messages": _MESSAGES}).encode()
    request = (
        f"POST {parts.path.rstrip('/')}/chat/completions HTTP/1.1\r\nHost: {host}:{port}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
    ).encode() + body
    pool: asyncio.Queue[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = asyncio.Queue()
    for _ in range(concurrency):
        pool.put_nowait(await asyncio.open_connection(host, port))

    async def call() -> None:
        reader, writer = await pool.get()
        try:
            writer.write(request)
            head = await reader.readuntil(b"\r\n\r\n")
            if not head.startswith(b"HTTP/1.1 200"):
                raise RuntimeError(head.split(b"\r\n", 1)[0].decode())
            length = next(
                int(line.split(b":", 1)[1])
                for line in head.split(b"\r\n")
                if line.lower().startswith(b"content-length:")
            )
            await reader.readexactly(length)
        finally:
            pool.put_nowait((reader, writer))

    try:
        latencies, wall, cpu, errors = await _drive(call, n, concurrency, warmup=20)
    finally:
        while not pool.empty():
            pool.get_nowait()[1].close()
    return summarize(latencies, wall, cpu, errors, concurrency)


def _row(name: str, r: dict[str, float]) -> str:
    return (
        f"{name:<14} c={int(r['concurrency']):<3} n={int(r['n']):<5} err={int(r['errors']):<3}"
        f" p50={r['p50_ms']:6.2f} p95={r['p95_ms']:6.2f} p99={r['p99_ms']:6.2f} ms"
        f" {r['rps']:7.0f} req/s  cpu/call: client {r['cpu_ms_per_call']:.2f} ms,"
        f" server {r['server_cpu_ms_per_call']:.3f} ms"
    )


async def _with_server_cpu(
    base_url: str, measure: Callable[[str, int, int], Awaitable[dict[str, float]]], n: int, c: int
) -> dict[str, float]:
    before = await asyncio.to_thread(remote_stats, base_url)
    result = await measure(base_url, n, c)
    after = await asyncio.to_thread(remote_stats, base_url)
    served = after["requests"] - before["requests"]
    cpu_s = after["process_cpu_s"] - before["process_cpu_s"]
    result["server_cpu_ms_per_call"] = cpu_s * 1000.0 / served if served else 0.0
    return result


async def _run(base_url: str, n: int, concurrencies: list[int]) -> None:
    for name, measure in (("openai client", measure_direct), ("bare HTTP", measure_server)):
        for concurrency in concurrencies:
            result = await _with_server_cpu(base_url, measure, n, concurrency)
            print(_row(name, result), flush=True)
    server = (await asyncio.to_thread(remote_stats, base_url))["server_us"]
    print(
        f"fake server handler wall time, last {server['count']} requests: "
        f"p50 {server['p50']} us, p99 {server['p99']} us, max {server['max']} us"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--n", type=int, default=1000, help="calls per run")
    parser.add_argument("--concurrency", default="1,16", help="comma-separated levels")
    parser.add_argument("--base-url", help="an already running fake server (default: spawn one)")
    args = parser.parse_args()
    levels = [int(c) for c in args.concurrency.split(",")]
    if args.base_url:
        asyncio.run(_run(args.base_url, args.n, levels))
        return
    with subprocess_server() as base_url:
        print(f"fake server {base_url} (own process)", flush=True)
        asyncio.run(_run(base_url, args.n, levels))


if __name__ == "__main__":
    main()
